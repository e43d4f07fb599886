"""Page aging: a node marks the pages it mapped from its LMDB state cold, so reclaim under a memory limit
takes the copies copy-on-write left behind before the pages it still reads."""

from __future__ import annotations

import errno
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from config import schema
from config.loader import load_node_config
from node.cluster import LocalCluster
from node.page_aging import PageAger, PageAgingUnavailable, age_pages, mappings_of
from node.server import LedgerNode
from storage.state import LedgerStore
from tests.ledger_fixtures import put_random_accounts
from tests.waiting import wait_until

map_size_bytes = 64 << 20
wait_seconds = 20.0


def _referenced_kib(path: Path) -> int:
    """Kibibytes of this process's mappings of `path` whose pages were accessed since last aged (smaps)."""
    target = str(path.resolve())
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) == 6 and fields[5] == target
        elif inside and line.startswith("Referenced:"):
            total += int(fields[1])
    return total


@pytest.fixture
def store(tmp_path: Path):
    store = LedgerStore(tmp_path / "state", map_size_bytes=map_size_bytes, sync=False)
    put_random_accounts(store, 20_000)
    yield store
    store.close()


def _read_everything(store: LedgerStore) -> None:
    with store.read() as transaction:
        assert sum(1 for _ in transaction.items("accounts")) == 20_000


def test_the_state_file_is_found_among_the_processes_mappings_whatever_its_name() -> None:
    maps = (
        "7f0000000000-7f0004000000 r--s 00000000 fd:01 1234   /srv/tonle node/data/state/data.mdb\n"
        "7f0004000000-7f0004001000 rw-s 00000000 fd:01 1235   /srv/tonle node/data/state/lock.mdb\n"
        "7f0005000000-7f0006000000 r--s 00000000 fd:01 1236   /srv/other/data.mdb\n"
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0      [stack]\n"
    )
    found = mappings_of(Path("/srv/tonle node/data/state/data.mdb"), maps)
    assert found == [(0x7F0000000000, 0x7F0004000000)]


def test_aging_clears_the_accessed_mark_of_every_page_read_through_the_map(store: LedgerStore) -> None:
    data_file = store.path / "data.mdb"
    _read_everything(store)
    assert _referenced_kib(data_file) > 0
    assert age_pages(data_file) >= data_file.stat().st_size  # the whole map, past the file's end
    assert _referenced_kib(data_file) == 0
    _read_everything(store)
    assert _referenced_kib(data_file) > 0, "pages read again must count as used again"


def test_a_kernel_without_madv_cold_is_reported_as_unavailable(store: LedgerStore) -> None:
    def refusing(start, length, advice):
        import ctypes

        ctypes.set_errno(errno.EINVAL)
        return -1

    with pytest.raises(PageAgingUnavailable, match="MADV_COLD"):
        age_pages(store.path / "data.mdb", refusing)


def test_the_ager_ages_at_its_interval_until_closed(store: LedgerStore) -> None:
    ager = PageAger(store.path / "data.mdb", interval_seconds=0.05)
    ager.start()
    try:
        wait_until(lambda: ager.rounds >= 3, wait_seconds, "three rounds of page aging")
    finally:
        ager.close()
    rounds = ager.rounds
    assert not ager._thread.is_alive()
    assert ager.rounds == rounds


def test_an_ager_that_cannot_advise_stops_with_a_warning_and_the_node_goes_on(store: LedgerStore, monkeypatch, caplog) -> None:
    import node.page_aging as page_aging

    def unavailable():
        raise PageAgingUnavailable("no madvise in this C library: test")

    monkeypatch.setattr(page_aging, "_madvise", unavailable)
    caplog.set_level(logging.WARNING, logger="tonle.page_aging")
    ager = PageAger(store.path / "data.mdb", interval_seconds=0.05)
    ager.start()
    ager._thread.join(wait_seconds)
    assert not ager._thread.is_alive()
    assert "page aging of" in caplog.text and "no madvise" in caplog.text
    ager.close()


def test_an_interval_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval_seconds must be positive"):
        PageAger(tmp_path / "data.mdb", interval_seconds=0)


def test_a_node_configured_with_an_interval_of_zero_starts_no_ager(tmp_path: Path) -> None:
    cluster = LocalCluster.create(tmp_path / "network", validators=1, institutions=0)
    node = next(iter(cluster.nodes.values()))
    config, genesis = load_node_config(node.config)
    assert config.storage.page_aging_interval_ms == schema.page_aging_interval_ms_default
    off = LedgerNode(replace(config, storage=replace(config.storage, page_aging_interval_ms=0)), genesis)
    try:
        off.start_raft()
        assert off.page_ager is None
    finally:
        off.close()
    on = LedgerNode(config, genesis)
    try:
        on.start_raft()
        assert on.page_ager is not None and on.page_ager.interval_seconds == 2.0
    finally:
        on.close()
    assert not on.page_ager._thread.is_alive()
