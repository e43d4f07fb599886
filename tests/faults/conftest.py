"""Fault-injection fixtures: chaos runs in network namespaces, their reports and node logs attached on failure."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node.chaos import ChaosOptions, faketime_library, fiu_libraries, render_table, report_file_name, run_chaos
from node.cluster import LocalCluster
from node.netns import NamespaceNetwork, unavailable_reason

# The CI subset always runs; the rest of the full suite runs with TONLE_FAULTS=full (docs/faults.md).
full_suite_variable = "TONLE_FAULTS"
install_hint = "apt-get install -y iproute2 iptables faketime fiu-utils, and run the tests as root"
log_tail_bytes = 6000

_directories_key = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: a chaos run of real nodes under injected faults (needs root)")
    config.addinivalue_line("markers", f"faults_full: in the full fault suite only ({full_suite_variable}=full)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(full_suite_variable) == "full":
        return
    skip = pytest.mark.skip(reason=f"full fault suite only: run with {full_suite_variable}=full (docs/faults.md)")
    for item in items:
        if "faults_full" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for directory in item.stash.get(_directories_key, []):
        path = directory / report_file_name
        if path.exists():
            report.sections.append((f"chaos report ({path})", render_table(json.loads(path.read_text()))))
        if (directory / "cluster.json").exists():
            report.sections.append((f"node logs ({directory})", LocalCluster.load(directory).logs(tail_bytes=log_tail_bytes)))


@pytest.fixture(scope="session")
def namespaces_available() -> None:
    """Network namespaces, iptables and tmpfs mounts: the CI subset fails (not skips) without them."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"fault tests need network namespaces: {reason} ({install_hint})")


@pytest.fixture(scope="session")
def preload_libraries_available() -> None:
    missing = [str(path) for path in (faketime_library, *fiu_libraries) if not path.exists()]
    if missing:
        pytest.fail(f"fault tests need {missing} ({install_hint})")


def leftovers(directory: Path) -> list[str]:
    """Namespaces, mounts and node processes of a finished run that are still there (must be none)."""
    found = []
    network = NamespaceNetwork.load(directory)
    if network is not None:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20, check=True).stdout
        found += [line.split()[0] for line in listed.splitlines() if line.startswith(f"tonle{network.octet}-")]
    mounts = Path("/proc/mounts").read_text()
    found += [line.split()[1] for line in mounts.splitlines() if line.split()[1].startswith(str(directory))]
    if (directory / "cluster.json").exists():
        cluster = LocalCluster.load(directory)
        found += [f"process of {name}" for name in cluster.nodes if cluster.is_running(name)]
    return found


@pytest.fixture
def chaos(request: pytest.FixtureRequest, tmp_path: Path, namespaces_available: None) -> Callable[..., dict[str, Any]]:
    """Run `tonle chaos` in this test's directory and return its report; checks nothing was left behind."""

    def run(nemeses: tuple[str, ...], seed: int, duration_seconds: float) -> dict[str, Any]:
        directory = tmp_path / f"network-{seed}"
        request.node.stash.setdefault(_directories_key, []).append(directory)
        seed = int(os.environ.get("TONLE_FAULTS_SEED", seed))
        options = ChaosOptions(directory, seed, duration_seconds, nemeses)
        print(f"chaos seed {seed}; replay: {options}")
        try:
            document = run_chaos(options, print)
        finally:
            left = leftovers(directory)
            assert not left, f"the run left these behind: {left}"
        print(render_table(document))
        return document

    return run


def assert_sound(document: dict[str, Any]) -> None:
    """Every invariant held and every fault had its effect (a run whose faults did nothing proves nothing)."""
    broken = [name for name, ok in document["invariants"].items() if not ok]
    assert not broken, f"broken invariants {broken}: {json.dumps(document['violations'], indent=1)[:4000]}"
    assert document["lost"] == 0 and document["duplicated"] == 0
    assert document["faults"], "no fault was injected"
    assert document["faults_effective"], [fault for fault in document["faults"] if not fault["happened"]]
    assert document["operations"]["read"]["ok"] > 0 and document["acknowledged"] > 0


def faults_of(document: dict[str, Any], variant: str | None = None) -> list[dict[str, Any]]:
    return [fault for fault in document["faults"] if variant is None or fault["variant"] == variant]
