"""Dead copies: the pages an LMDB commit freed are read from the data file's free-page tree, and a node drops
them from memory right after the commit, keeping the live pages and every record as it was."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import lmdb
import pytest

from config import schema
from config.loader import load_node_config
from node.cluster import LocalCluster
from node.page_aging import DeadCopyDropper, PageAgingUnavailable, ProcessPageOut, page_runs, whole_mapping_of
from node.server import LedgerNode, dead_copies_are_dropped
from storage.free_pages import FreePagesUnreadable, freed_by_newest_commit, freed_pages_per_commit_max
from storage.state import LedgerStore
from tests.ledger_fixtures import put_random_accounts

map_size_bytes = 64 << 20
accounts = 20_000
madvise_dont_need = 4  # MADV_DONTNEED: unmaps a shared file mapping's pages, the page cache keeps them


def _page_bytes(environment: lmdb.Environment) -> int:
    return environment.stat()["psize"]


@pytest.fixture
def environment(tmp_path: Path):
    environment = lmdb.open(str(tmp_path), map_size=map_size_bytes, max_dbs=2, sync=False, readahead=False)
    database = environment.open_db(b"accounts")
    with environment.begin(write=True) as transaction:
        for number in range(accounts):
            transaction.put(b"account-%06d" % number, b"before-%06d" % number + os.urandom(80), db=database)
    yield environment, database
    environment.close()


def _descriptor(tmp_path: Path) -> int:
    return os.open(tmp_path / "data.mdb", os.O_RDONLY)


def test_the_pages_a_commit_freed_hold_the_records_it_replaced_and_no_longer_belong_to_the_state(environment, tmp_path) -> None:
    environment, database = environment
    with environment.begin(write=True) as transaction:
        old = transaction.get(b"account-000500", db=database)
        transaction.put(b"account-000500", b"after" * 20, db=database)
    descriptor = _descriptor(tmp_path)
    try:
        freed = freed_by_newest_commit(descriptor, _page_bytes(environment))
        assert freed.transaction_id == environment.info()["last_txnid"]
        assert 2 <= len(freed.pages) < 10  # the leaf, the branches above it, the free-page tree's own pages
        copies = [os.pread(descriptor, _page_bytes(environment), page * _page_bytes(environment)) for page in freed.pages]
        assert sum(old in copy for copy in copies) == 1  # the dead copy of the leaf still holds the old record
        assert not any(b"after" * 20 in copy for copy in copies)
    finally:
        os.close(descriptor)
    with environment.begin() as transaction:
        assert transaction.get(b"account-000500", db=database) == b"after" * 20


def test_a_commit_that_freed_more_page_numbers_than_fit_in_a_page_is_read_from_its_overflow_pages(environment, tmp_path) -> None:
    environment, database = environment
    with environment.begin(write=True) as transaction:
        for number in range(0, accounts, 7):
            transaction.put(b"account-%06d" % number, b"after" * 20, db=database)
    descriptor = _descriptor(tmp_path)
    try:
        freed = freed_by_newest_commit(descriptor, _page_bytes(environment))
    finally:
        os.close(descriptor)
    assert len(freed.pages) * 8 > _page_bytes(environment)
    assert len(set(freed.pages)) == len(freed.pages)
    assert all(2 <= page < freed.pages_in_file for page in freed.pages)


def test_a_newest_commit_that_freed_nothing_reads_as_no_pages(tmp_path: Path) -> None:
    environment = lmdb.open(str(tmp_path), map_size=map_size_bytes, sync=False)
    try:
        descriptor = _descriptor(tmp_path)
        try:
            assert freed_by_newest_commit(descriptor, _page_bytes(environment)).pages == ()  # nothing committed yet
            with environment.begin(write=True) as transaction:
                transaction.put(b"first", b"record")  # a first commit adds pages and frees none
            freed = freed_by_newest_commit(descriptor, _page_bytes(environment))
            assert freed.pages == () and freed.transaction_id == environment.info()["last_txnid"]
        finally:
            os.close(descriptor)
    finally:
        environment.close()


def _damaged_copy(tmp_path: Path, offset: int, value: bytes) -> int:
    shutil.copy(tmp_path / "data.mdb", tmp_path / "damaged.mdb")
    descriptor = os.open(tmp_path / "damaged.mdb", os.O_RDWR)
    os.pwrite(descriptor, value, offset)
    return descriptor


@pytest.mark.parametrize("meta_offset, value, message", [
    (16, struct.pack("<I", 0xDEADBEEF), "magic 0xdeadbeef"),  # not an LMDB data file
    (20, struct.pack("<I", 2), "version 2"),  # a data layout this module does not read
])
def test_a_data_file_in_a_layout_it_does_not_know_is_refused(environment, tmp_path, meta_offset, value, message) -> None:
    environment, _ = environment
    page_bytes = _page_bytes(environment)
    for meta_page in (0, 1):
        descriptor = _damaged_copy(tmp_path, meta_page * page_bytes + meta_offset, value)
        try:
            with pytest.raises(FreePagesUnreadable, match=message):
                freed_by_newest_commit(descriptor, page_bytes)
        finally:
            os.close(descriptor)


def test_a_free_page_tree_pointing_outside_the_file_is_refused(environment, tmp_path) -> None:
    environment, database = environment
    with environment.begin(write=True) as transaction:
        transaction.put(b"account-000001", b"after", db=database)
    page_bytes = _page_bytes(environment)
    newest_meta = max((0, 1), key=lambda page: struct.unpack_from(
        "<Q", open(tmp_path / "data.mdb", "rb").read(2 * page_bytes), page * page_bytes + 144)[0])
    descriptor = _damaged_copy(tmp_path, newest_meta * page_bytes + 80, struct.pack("<Q", 1 << 40))  # its root
    try:
        with pytest.raises(FreePagesUnreadable, match="outside the file"):
            freed_by_newest_commit(descriptor, page_bytes)
    finally:
        os.close(descriptor)


def test_a_page_size_other_than_the_files_is_refused(environment, tmp_path) -> None:
    environment, _ = environment
    descriptor = _descriptor(tmp_path)
    try:
        with pytest.raises(FreePagesUnreadable, match="states pages of"):
            freed_by_newest_commit(descriptor, 2 * _page_bytes(environment))
        with pytest.raises(FreePagesUnreadable, match="not a power of two"):
            freed_by_newest_commit(descriptor, 3000)
    finally:
        os.close(descriptor)


def test_the_limit_on_page_numbers_read_from_one_record_refuses_a_list_that_states_more() -> None:
    from storage.free_pages import _page_list
    stated = struct.pack("<Q", freed_pages_per_commit_max + 1)
    with pytest.raises(FreePagesUnreadable, match="states"):
        _page_list(stated, pages_in_file=1 << 40)
    with pytest.raises(FreePagesUnreadable, match="states 3 pages in 24 bytes"):
        _page_list(struct.pack("<QQQ", 3, 5, 6), pages_in_file=100)


def test_runs_of_consecutive_pages_are_advised_at_once() -> None:
    assert page_runs((9, 3, 4, 5, 11, 10, 20)) == [(3, 3), (9, 3), (20, 1)]
    assert page_runs(()) == []


def test_only_one_mapping_of_the_data_file_from_its_start_is_taken() -> None:
    line = "7f0000000000-7f0004000000 r--s {offset} fd:01 1234   /srv/tonle/state/data.mdb\n"
    path = Path("/srv/tonle/state/data.mdb")
    assert whole_mapping_of(path, line.format(offset="00000000")) == (0x7F0000000000, 0x7F0004000000)
    assert whole_mapping_of(path, line.format(offset="00001000")) is None
    assert whole_mapping_of(path, line.format(offset="00000000") * 2) is None
    assert whole_mapping_of(path, "") is None


def _resident(start: int, page_bytes: int, pages) -> int:
    """How many of `pages` of the mapping at `start` are in the page cache (mincore reports a shared file
    mapping's pages whether or not this process has them mapped)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    flag = ctypes.c_ubyte()
    count = 0
    for page in pages:
        assert libc.mincore(start + page * page_bytes, page_bytes, ctypes.byref(flag)) == 0
        count += flag.value & 1
    return count


def _cache_cold(store: LedgerStore, start: int, end: int) -> None:
    """Drop the whole state from memory, so that reading it back maps it a page at a time (as a node's
    random reads do) instead of in the large folios one long write leaves, which drop only whole."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.madvise(start, end - start, madvise_dont_need) == 0
    descriptor = os.open(store.path / "data.mdb", os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def test_the_dropper_takes_a_commits_dead_copies_out_of_memory_and_every_record_reads_as_committed(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "state", map_size_bytes=map_size_bytes)
    try:
        put_random_accounts(store, accounts)
        start, end = whole_mapping_of(store.path / "data.mdb", Path("/proc/self/maps").read_text())
        page_bytes = _page_bytes(store.environment)
        _cache_cold(store, start, end)
        with store.read() as transaction:
            before = dict(transaction.items("accounts"))
        dropper = DeadCopyDropper(store)
        dropper.drop_newest()  # the copies of the fill, if any: not what this test looks at
        with store.write() as transaction:
            for number in range(0, accounts, 50):
                transaction.put("accounts", b"account-%06d" % number, b"after" * 20)
        descriptor = os.open(store.path / "data.mdb", os.O_RDONLY)
        try:
            freed = freed_by_newest_commit(descriptor, page_bytes)
        finally:
            os.close(descriptor)
        assert len(freed.pages) > accounts // 50 // 2
        assert _resident(start, page_bytes, freed.pages) == len(freed.pages)
        assert dropper.drop_newest() == len(freed.pages)
        assert dropper.drop_newest() == 0  # once per commit
        assert dropper.pages_dropped >= len(freed.pages)
        if _resident(start, page_bytes, freed.pages) and _file_system_of(tmp_path) == "tmpfs":
            pytest.skip("this file system keeps file pages in memory whatever the advice (tmpfs)")
        # MADV_PAGEOUT is best effort: a page it finds busy (under writeback, locked, in a large folio) stays,
        # 0-6 of these 409 in repeated runs here, 3.5 % on the scale network.
        assert _resident(start, page_bytes, freed.pages) <= len(freed.pages) // 20
        live = set(range(2, freed.pages_in_file)) - set(freed.pages)
        assert _resident(start, page_bytes, live) >= len(live) // 2  # the live pages stayed
        with store.read() as transaction:
            after = dict(transaction.items("accounts"))
        assert after == {key: b"after" * 20 if int(key[-6:]) % 50 == 0 else value for key, value in before.items()}
    finally:
        store.close()


def _file_system_of(path: Path) -> str:
    """The type of the file system `path` is on: that of the longest mount point above it (/proc/mounts)."""
    resolved, best, kind = str(path.resolve()), "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount_point, file_system = line.split()[:3]
        if (resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(best):
            best, kind = mount_point, file_system
    return kind


class _Recorded:
    """Stands for ProcessPageOut where a test only looks at the ranges a dropper would page out."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def __call__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges.extend(ranges)

    def close(self) -> None:
        pass


def test_a_kernel_that_cannot_page_out_on_request_is_reported_as_unavailable(monkeypatch) -> None:
    page_out = ProcessPageOut()
    try:
        def refused(*_arguments):
            ctypes.set_errno(38)  # ENOSYS: a kernel before process_madvise
            return -1

        monkeypatch.setattr(page_out, "_syscall", refused)
        with pytest.raises(PageAgingUnavailable, match="Linux 5.10"):
            page_out([(0x10000000, 4096)])
    finally:
        page_out.close()


def test_the_dropper_never_advises_memory_outside_the_data_files_mapping(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "state", map_size_bytes=map_size_bytes, sync=False)
    page_out = _Recorded()
    try:
        put_random_accounts(store, accounts)
        with store.write() as transaction:
            for number in range(0, accounts, 50):
                transaction.put("accounts", b"account-%06d" % number, b"after")
        # A mapping that ends after the first four pages: most freed pages lie beyond it, so none is advised.
        maps = f"10000000-{0x10000000 + 4 * 4096:x} r--s 00000000 fd:01 1 {(store.path / 'data.mdb').resolve()}\n"
        dropper = DeadCopyDropper(store, page_out=page_out, maps=lambda: maps)
        with pytest.raises(FreePagesUnreadable, match="outside the mapping"):
            dropper.drop_newest()
        assert page_out.ranges == []
        dropper.close()
        # Inside the mapping, every freed page is advised, in runs of consecutive pages.
        start = 0x10000000
        maps = f"{start:x}-{start + (64 << 20):x} r--s 00000000 fd:01 1 {(store.path / 'data.mdb').resolve()}\n"
        dropper = DeadCopyDropper(store, page_out=page_out, maps=lambda: maps)
        dropped = dropper.drop_newest()
        assert dropped > accounts // 50 // 2
        assert sum(length for _address, length in page_out.ranges) == dropped * 4096
        assert all(start + 2 * 4096 <= address and address + length <= start + (64 << 20) for address, length in page_out.ranges)
        dropper.close()
    finally:
        store.close()


def test_the_dropper_follows_the_environment_a_snapshot_install_puts_in_place(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "state", map_size_bytes=map_size_bytes, sync=False)
    try:
        put_random_accounts(store, 1000)
        dropper = DeadCopyDropper(store)
        dropper.drop_newest()
        replacement = LedgerStore(tmp_path / "replacement", map_size_bytes=map_size_bytes, sync=False)
        put_random_accounts(replacement, 2000)
        replacement.close()
        store.replace_with(tmp_path / "replacement")
        with store.write() as transaction:
            for number in range(0, 2000, 10):
                transaction.put("accounts", b"account-%06d" % number, b"after")
        assert dropper.drop_newest() > 0
        descriptor = os.open(store.path / "data.mdb", os.O_RDONLY)
        try:
            assert os.fstat(dropper._descriptor).st_ino == os.fstat(descriptor).st_ino
        finally:
            os.close(descriptor)
        dropper.close()
    finally:
        store.close()


def test_a_node_whose_dropper_fails_warns_and_goes_on_without_it(tmp_path: Path, caplog) -> None:
    cluster = LocalCluster.create(tmp_path / "network", validators=1, institutions=0)
    node_spec = next(iter(cluster.nodes.values()))
    config, genesis = load_node_config(node_spec.config)
    assert config.storage.drop_dead_copies == schema.drop_dead_copies_default == "auto"
    off = LedgerNode(replace(config, storage=replace(config.storage, drop_dead_copies=False)), genesis)
    try:
        assert off.dead_copies is None
        off.drop_dead_copies()  # nothing to do
    finally:
        off.close()
    node = LedgerNode(replace(config, storage=replace(config.storage, drop_dead_copies=True)), genesis)
    try:
        assert node.dead_copies is not None
        with node.store.write() as transaction:
            transaction.put("accounts", b"account-000001", b"record")
        node.drop_dead_copies()

        def unreadable():
            raise FreePagesUnreadable("test: another layout")

        node.dead_copies.drop_newest = unreadable
        caplog.set_level(logging.WARNING, logger="tonle.node")
        node.drop_dead_copies()
        assert node.dead_copies is None
        assert "stopped dropping the state's dead page copies: test: another layout" in caplog.text
        node.drop_dead_copies()
    finally:
        node.close()


def test_auto_drops_dead_copies_only_under_a_memory_limit() -> None:
    assert not dead_copies_are_dropped("auto", lambda: None)
    assert dead_copies_are_dropped("auto", lambda: 300 * 2**20)


def test_true_and_false_drop_dead_copies_whatever_the_memory_limit() -> None:
    def unread() -> int | None:
        raise AssertionError("an explicit setting must not read the limit")

    assert dead_copies_are_dropped(True, unread)
    assert not dead_copies_are_dropped(False, unread)
