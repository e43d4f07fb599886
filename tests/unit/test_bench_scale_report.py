"""The scale bench's report: the size of each network's account database before and after its run, read
from a stopped node's LMDB state, next to the throughput it explains."""

from __future__ import annotations

from pathlib import Path

from node.bench_scale import _account_database_bytes, render_scale
from storage.state import LedgerStore

map_size_bytes = 64 << 20


def _side(accounts: int, at_start: int, at_end: int) -> dict:
    memory = {"VmRSS": 200 << 20, "RssAnon": 60 << 20, "RssFile": 140 << 20}
    return {
        "accounts": accounts, "preloaded_transfers": 10 * accounts, "transfers_at_start": 11 * accounts,
        "state_bytes": 1 << 30, "transfers_per_second": 1000.0, "node_cpu_microseconds_per_transfer": 900.0,
        "entry_hash_index_lag_entries": 3, "disk_reads_per_transfer": 0.5, "node_memory_bytes": {"v1": memory},
        "account_database_bytes_at_start": at_start, "account_database_bytes_at_end": at_end,
    }


def _rows(document: dict, label: str) -> list[str]:
    """The report's lines that start with `label`."""
    return [line for line in render_scale(document).splitlines() if line.startswith(label)]


def test_the_account_database_is_measured_in_whole_pages_of_a_stopped_node(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "data" / "state", map_size_bytes=map_size_bytes, sync=False)
    with store.write() as transaction:
        for number in range(5_000):
            transaction.put("accounts", f"s{number}.khr@aba".encode(), b"\x01" * 60)
    with store.environment.begin() as transaction:
        stat = transaction.stat(store.databases["accounts"])
    store.close()
    pages = stat["branch_pages"] + stat["leaf_pages"]
    assert pages > 50
    assert _account_database_bytes(tmp_path / "data") == pages * stat["psize"]


def test_the_report_shows_each_networks_account_database_at_the_start_and_end_of_its_run() -> None:
    document = {
        "small": _side(10_000, 1 << 20, 2 << 20),
        "large": _side(1_000_000, 102 << 20, 110 << 20),
        "throughput_ratio_large_to_small": 0.8,
    }
    rows = _rows(document, "account database")
    assert len(rows) == 1
    assert rows[0].split()[-8:] == ["1", "/", "2", "MiB", "102", "/", "110", "MiB"]


def test_the_report_shows_the_dead_page_copies_each_network_dropped_per_transfer() -> None:
    small, large = _side(10_000, 1 << 20, 1 << 20), _side(1_000_000, 102 << 20, 102 << 20)
    small["dead_pages_dropped_per_transfer"], large["dead_pages_dropped_per_transfer"] = 0.61, 7.04
    document = {"small": small, "large": large, "throughput_ratio_large_to_small": 0.8}
    rows = _rows(document, "dead page copies")
    assert len(rows) == 1 and rows[0].split()[-2:] == ["0.6", "7.0"]


def test_the_report_shows_the_entry_hash_index_merge_work_each_measurement_held() -> None:
    small, large = _side(10_000, 1 << 20, 1 << 20), _side(1_000_000, 102 << 20, 102 << 20)
    small["entry_hash_index_pairs_merged_per_transfer"], large["entry_hash_index_pairs_merged_per_transfer"] = 0.0, 21.37
    document = {"small": small, "large": large, "throughput_ratio_large_to_small": 0.8}
    rows = _rows(document, "entry-hash index merges")
    assert len(rows) == 1 and rows[0].split()[-2:] == ["0.0", "21.4"]
    # A document from before the field was measured has no such row.
    del small["entry_hash_index_pairs_merged_per_transfer"]
    assert _rows(document, "entry-hash index merges") == []


def test_the_report_shows_the_uncounted_load_each_network_settled_under_and_its_disk_reads() -> None:
    small, large = _side(10_000, 1 << 20, 1 << 20), _side(1_000_000, 102 << 20, 102 << 20)
    small["settling"] = {"seconds": 30, "transfers_per_second": 2100.0, "disk_reads_per_transfer": 0.0, "failed": {}}
    large["settling"] = {"seconds": 30, "transfers_per_second": 1500.0, "disk_reads_per_transfer": 1.234, "failed": {}}
    document = {"small": small, "large": large, "throughput_ratio_large_to_small": 0.8}
    lines = render_scale(document).splitlines()
    at = next(number for number, line in enumerate(lines) if line.startswith("load before measuring"))
    assert lines[at].split()[-4:] == ["30", "s", "30", "s"]
    assert lines[at + 1].split()[-2:] == ["2,100", "1,500"]
    assert lines[at + 2].split()[-2:] == ["0.00", "1.23"]
    assert lines[at + 3].startswith("committed transfers/s")


def test_the_report_has_no_settling_rows_for_a_run_measured_without_one() -> None:
    document = {"small": _side(10_000, 1 << 20, 1 << 20), "large": _side(1_000_000, 1 << 20, 1 << 20), "throughput_ratio_large_to_small": 0.8}
    assert _rows(document, "load before measuring") == []
