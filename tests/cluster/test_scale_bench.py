"""The scale bench on a small network: the load it settles the nodes under reaches the state but is not counted."""

from __future__ import annotations

from pathlib import Path

from node.bench_scale import _recorded_transfers, measure
from node.cluster import LocalCluster


def test_the_scale_bench_settles_its_network_under_load_it_does_not_count(tmp_path: Path) -> None:
    directory = tmp_path / "scale"
    try:
        document = measure(directory, accounts=200, transfers=2_000, seconds=3, seed=5, settle_seconds=2)
        settling = document["settling"]
        assert settling["seconds"] == 2 and settling["failed"] == {} and settling["transfers_acknowledged"] > 0
        assert document["failed"] == {} and document["transfers_acknowledged"] > 0
        assert document["entry_hash_index_pairs_merged_per_transfer"] >= 0
        cluster = LocalCluster.load(directory)
        # The leader applied every acknowledged transfer before acknowledging it, and the nodes commit with fsync.
        held = max(_recorded_transfers(cluster.nodes[name].data_dir) for name in cluster.validators())
        assert held == document["transfers_at_start"] + settling["transfers_acknowledged"] + document["transfers_acknowledged"]
    except BaseException:
        if (directory / "cluster.json").exists():
            print(LocalCluster.load(directory).logs())
        raise
