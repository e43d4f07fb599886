"""Cluster test fixtures: real node processes on 127.0.0.1, logs attached to any failing test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cluster import LocalCluster

_clusters_key = pytest.StashKey[list]()


def _remember(request: pytest.FixtureRequest, cluster: LocalCluster) -> None:
    request.node.stash.setdefault(_clusters_key, []).append(cluster)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for cluster in item.stash.get(_clusters_key, []):
            report.sections.append((f"node logs ({cluster.directory})", cluster.logs()))


def start_cluster(directory: Path, **options) -> LocalCluster:
    """A funded local network, started and ready; the caller stops it."""
    cluster = LocalCluster.create(directory, **options)
    cluster.start()
    try:
        leader = cluster.wait_for_leader()
        cluster.wait_ready()
        cluster.open_and_fund_accounts(via=leader)
    except BaseException:
        print(cluster.logs())
        cluster.kill()
        raise
    return cluster


def stop_everything(network: LocalCluster) -> None:
    """Kill every node, including any a command added to cluster.json after this object was loaded."""
    # Read cluster.json first: `network.kill()` saves this object's view of it, which would forget them.
    latest = LocalCluster.load(network.directory)
    network.kill()
    latest.kill()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """A fresh 3-validator, 2-institution network for a test that may break it."""
    network = start_cluster(tmp_path / "network")
    _remember(request, network)
    try:
        yield network
    finally:
        stop_everything(network)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One network for the tests of a module that only submit and read (they must not stop nodes)."""
    network = start_cluster(tmp_path_factory.mktemp("shared") / "network")
    try:
        yield network
    finally:
        stop_everything(network)


@pytest.fixture
def network(request: pytest.FixtureRequest, shared_cluster: LocalCluster) -> LocalCluster:
    _remember(request, shared_cluster)
    return shared_cluster
