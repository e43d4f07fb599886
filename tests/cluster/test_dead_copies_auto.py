"""A node left at `drop_dead_copies = "auto"` drops its dead page copies inside a memory cgroup, and leaves them
to the kernel outside one."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.cluster import LocalCluster
from node.memory_limit import MemoryCgroup, own_memory_limit_bytes
from tests.cluster.conftest import _remember, stop_everything
from tests.memory_cgroups import cgroups, memory_cgroup_or_skip  # noqa: F401 - cgroups is a fixture

pytestmark = pytest.mark.cluster

confined_limit_bytes = 2**30  # far above what a node of this size uses: the limit only has to exist
deadline_seconds = 120.0


def dead_pages_dropped(cluster: LocalCluster, name: str) -> float:
    code, text = cluster.admin_get(name, "/metrics", timeout_seconds=5.0)
    assert code == 200, (name, code)
    for family in text_string_to_metric_families(text):
        if family.name == "tonle_state_dead_pages_dropped":
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    raise AssertionError(f"{name} exports no tonle_state_dead_pages_dropped")


def test_auto_drops_dead_copies_in_a_memory_cgroup_and_not_outside_one(
    request: pytest.FixtureRequest, tmp_path: Path, cgroups: list[MemoryCgroup]
) -> None:
    cgroup = memory_cgroup_or_skip(confined_limit_bytes)
    cgroups.append(cgroup)
    cluster = LocalCluster.create(tmp_path / "network", validators=3, institutions=1, institution_nodes=False)
    _remember(request, cluster)
    confined, *others = cluster.validators()
    # The other nodes run where this test runs: under no limit on a bare machine, under its limit in a
    # container that has one (and then "auto" drops there too).
    others_limited = own_memory_limit_bytes() is not None
    try:
        cluster.start(memory_cgroups={confined: cgroup})
        leader = cluster.wait_for_leader(timeout_seconds=deadline_seconds)
        cluster.wait_ready(timeout_seconds=deadline_seconds)
        cluster.open_and_fund_accounts(via=leader)  # every node applies and commits these
        cluster.wait_converged(timeout_seconds=deadline_seconds)
        assert dead_pages_dropped(cluster, confined) >= 1
        for name in others:
            assert (dead_pages_dropped(cluster, name) >= 1) is others_limited, name
    finally:
        stop_everything(cluster)
    dropping = "dead page copies are dropped after each commit: this node runs under a"
    left = "dead page copies are left to the kernel: this node runs under no memory limit"
    assert dropping in cluster.logs([confined])
    for name in others:
        assert (dropping if others_limited else left) in cluster.logs([name]), name
