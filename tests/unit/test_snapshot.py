"""Snapshot files: written from LMDB, verified on read, installed only when newer, never half-installed."""

import ctypes
import dataclasses
import errno
import hashlib
import mmap
import os
import pathlib
import struct
import subprocess
import sys
import threading
import time

import lmdb
import pytest

import storage.state
from consensus.entries import Issue, OpenAccount, Transfer, signature_is_valid
from consensus.raft import snapshot
from consensus.raft.snapshot import (
    SnapshotError,
    SnapshotHeader,
    _read_dropping_behind,
    read_header,
    restore_from_snapshot,
    write_snapshot,
)
from storage import queries
from storage.rules import apply_batch, initialize
from storage.state import LedgerStore, StorageCorrupted, schema_version, write_environment_in_full_pages
from tests.ledger_fixtures import batch, make_network, stored_records
from tests.memory_cgroups import memory_cgroup_or_skip


def tid(number: int) -> bytes:
    return number.to_bytes(16, "big")


@pytest.fixture
def network():
    return make_network()


def new_store(path, network, map_size_bytes: int = 64 << 20) -> LedgerStore:
    store = LedgerStore(path, map_size_bytes=map_size_bytes)
    with store.write() as transaction:
        initialize(transaction, network.genesis)
    return store


def advance(store, network, count: int, first_id: int = 100) -> None:
    """Apply `count` batches after the store's applied index."""
    entries = [
        network.sign(OpenAccount("sokha@aba", "KHR"), "aba"),
        network.sign(Issue(tid(1), "settlement.khr@aba", 10_000, "KHR"), "nbc"),
    ]
    entries += [
        network.sign(Transfer(tid(first_id + number), "settlement.khr@aba", "sokha@aba", 1, "KHR"), "aba")
        for number in range(count)
    ]
    for entry in entries[: count]:
        with store.write() as transaction:
            index = transaction.applied_index() + 1
            apply_batch(transaction, index, batch(entry), signature_is_valid, network.genesis.cluster_id)


def snapshot_of(store, path, network) -> SnapshotHeader:
    summary = store.summary()
    header = SnapshotHeader(
        cluster_id=network.genesis.cluster_id,
        last_entry=(b"\x00last", summary.applied_index, 1),
        previous_entry=(b"\x00prev", summary.applied_index - 1, 1),
        voters=("127.0.0.1:7001",),
        applied_index=summary.applied_index,
        state_hash=summary.state_hash,
    )
    write_snapshot(path, store, header)
    return header


def test_a_newer_snapshot_is_installed_with_the_same_state(tmp_path, network):
    source = new_store(tmp_path / "a", network)
    advance(source, network, 6)
    header = snapshot_of(source, tmp_path / "snapshot.bin", network)
    target = new_store(tmp_path / "b", network)
    parsed, installed = restore_from_snapshot(tmp_path / "snapshot.bin", target, network.genesis.cluster_id)
    assert installed and parsed == header
    assert target.summary() == source.summary()
    with target.read() as transaction:
        assert queries.balance(transaction, "sokha@aba")["balance"] == 4
        assert transaction.recompute_state_hash() == transaction.state_hash()


def test_an_older_snapshot_is_ignored_and_the_state_kept(tmp_path, network):
    store = new_store(tmp_path / "a", network)
    advance(store, network, 3)
    snapshot_of(store, tmp_path / "old.bin", network)
    advance(store, network, 4, first_id=200)
    before = store.summary()
    _header, installed = restore_from_snapshot(tmp_path / "old.bin", store, network.genesis.cluster_id)
    assert not installed
    assert store.summary() == before


def test_a_damaged_snapshot_is_refused(tmp_path, network):
    store = new_store(tmp_path / "a", network)
    advance(store, network, 3)
    path = tmp_path / "snapshot.bin"
    snapshot_of(store, path, network)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="digest"):
        read_header(path)


def test_a_snapshot_of_another_network_is_refused(tmp_path, network):
    store = new_store(tmp_path / "a", network)
    advance(store, network, 3)
    snapshot_of(store, tmp_path / "snapshot.bin", network)
    with pytest.raises(SnapshotError, match="network"):
        restore_from_snapshot(tmp_path / "snapshot.bin", new_store(tmp_path / "b", network), "tonle-other")


def test_a_snapshot_whose_records_do_not_match_its_claimed_hash_installs_nothing(tmp_path, network):
    source = new_store(tmp_path / "a", network)
    advance(source, network, 5)
    header = snapshot_of(source, tmp_path / "honest.bin", network)
    lying = dataclasses.replace(header, state_hash=bytes(32))
    write_snapshot(tmp_path / "lying.bin", source, lying)
    target = new_store(tmp_path / "b", network)
    before = target.summary()
    with pytest.raises(StorageCorrupted):
        restore_from_snapshot(tmp_path / "lying.bin", target, network.genesis.cluster_id)
    assert target.summary() == before


def test_a_snapshot_of_a_state_in_another_layout_installs_nothing(tmp_path, network):
    source = new_store(tmp_path / "a", network)
    advance(source, network, 5)
    with source.write() as transaction:
        transaction.put_unhashed("meta", b"schema_version", struct.pack(">Q", schema_version - 1))
    snapshot_of(source, tmp_path / "older-version.bin", network)
    target = new_store(tmp_path / "b", network)
    before = target.summary()
    with pytest.raises(SnapshotError, match=f"layout {schema_version - 1}; this node reads layout {schema_version}"):
        restore_from_snapshot(tmp_path / "older-version.bin", target, network.genesis.cluster_id)
    assert target.summary() == before
    with target.read() as transaction:
        assert transaction.stored_schema_version() == schema_version


def test_a_snapshot_as_of_a_read_transaction_holds_that_state_while_the_apply_goes_on(tmp_path, network):
    store = new_store(tmp_path / "a", network)
    advance(store, network, 3)
    with store.read() as transaction:
        summary = transaction.summary()
        advance(store, network, 5, first_id=200)  # the apply writes while the snapshot is taken
        assert store.summary().applied_index > summary.applied_index
        header = SnapshotHeader(network.genesis.cluster_id, (b"\x00last", summary.applied_index, 1),
                                (b"\x00prev", summary.applied_index - 1, 1), ("127.0.0.1:7001",),
                                summary.applied_index, summary.state_hash)
        write_snapshot(tmp_path / "snapshot.bin", store, header, as_of=transaction)
    target = new_store(tmp_path / "b", network)
    _parsed, installed = restore_from_snapshot(tmp_path / "snapshot.bin", target, network.genesis.cluster_id)
    assert installed
    assert target.summary() == summary



def _cached_pages(path) -> int:
    """How many of the file's pages are in the page cache (mincore(2) over a read-only shared mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            residency = (ctypes.c_ubyte * pages)()
            assert libc.mincore(address, size, residency) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    return sum(page & 1 for page in residency)


def _skip_unless_the_page_cache_can_be_dropped(path) -> None:
    with open(path, "rb") as source:
        source.read()
        os.posix_fadvise(source.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _cached_pages(path):
        pytest.skip("this file system keeps file pages in memory whatever the advice (tmpfs)")


def test_reading_or_installing_a_snapshot_leaves_its_image_out_of_the_page_cache(tmp_path, network):
    # A snapshot is as large as the state and is read whole at every start: through the page cache it would
    # evict the account and index pages the apply needs. Only the few pages around the header may stay.
    source = new_store(tmp_path / "a", network)
    advance(source, network, 6)
    path = tmp_path / "snapshot.bin"
    snapshot_of(source, path, network)
    image_pages = os.path.getsize(path) // mmap.PAGESIZE
    assert image_pages >= 8, "the image must span many pages for the counts below to mean anything"
    assert _cached_pages(path) <= 2, "a snapshot just written stays cached"
    _skip_unless_the_page_cache_can_be_dropped(path)
    path.read_bytes()  # as if something else had read it
    assert _cached_pages(path) >= image_pages - 1
    read_header(path)
    assert _cached_pages(path) <= 2
    path.read_bytes()
    restore_from_snapshot(path, new_store(tmp_path / "b", network), network.genesis.cluster_id)
    assert _cached_pages(path) <= 2


def test_a_large_image_read_through_leaves_no_page_cached_whatever_the_folio_size(tmp_path):
    # Read ahead, the kernel caches a large file in folios of up to 2 MiB and drops only whole ones: dropping
    # exactly each chunk read leaves most of the file cached. 48 MiB spans many folios and chunks.
    path = tmp_path / "image"
    with open(path, "wb") as output:
        output.write(os.urandom(48 << 20))
        os.fsync(output.fileno())  # dirty pages cannot be dropped; a snapshot on disk is written and synced
    _skip_unless_the_page_cache_can_be_dropped(path)
    with open(path, "rb") as source:
        while source.read(4 << 20):  # cached as a reader would leave it, in read-ahead folios
            pass
    assert _cached_pages(path) == (48 << 20) // mmap.PAGESIZE
    with open(path, "rb") as source:
        source.seek(12345)  # an image starts after a header of any length
        assert sum(len(chunk) for chunk in _read_dropping_behind(source, (48 << 20) - 12345)) == (48 << 20) - 12345
    assert _cached_pages(path) == 0


def _as_format_version_1(path) -> None:
    """Rewrite a snapshot in format version 1: the image's length before the image, not after it."""
    data = path.read_bytes()
    magic, _version, header_length = struct.unpack(">8sII", data[:16])
    header_end = 16 + header_length
    image, length = data[header_end:-40], data[-40:-32]
    body = struct.pack(">8sII", magic, 1, header_length) + data[16:header_end] + length + image
    path.write_bytes(body + hashlib.blake2b(body, digest_size=32, person=b"tonle-snapshot1").digest())


def test_a_snapshot_in_the_previous_format_is_still_read_and_installed(tmp_path, network):
    # A node upgraded in place starts from the snapshot an older version wrote.
    source = new_store(tmp_path / "a", network)
    advance(source, network, 6)
    path = tmp_path / "snapshot.bin"
    header = snapshot_of(source, path, network)
    _as_format_version_1(path)
    assert path.read_bytes()[8:12] == (1).to_bytes(4, "big")
    target = new_store(tmp_path / "b", network)
    parsed, installed = restore_from_snapshot(path, target, network.genesis.cluster_id)
    assert installed and parsed == header
    assert target.summary() == source.summary()


@pytest.mark.parametrize("version", [1, 2])
def test_a_snapshot_cut_short_anywhere_is_refused(tmp_path, network, version):
    store = new_store(tmp_path / "a", network)
    advance(store, network, 3)
    path = tmp_path / "snapshot.bin"
    snapshot_of(store, path, network)
    if version == 1:
        _as_format_version_1(path)
    whole = path.read_bytes()
    for length in (0, 10, 20, 100, len(whole) // 2, len(whole) - 40, len(whole) - 33, len(whole) - 1):
        path.write_bytes(whole[:length])
        with pytest.raises(SnapshotError):
            read_header(path)


def test_a_state_larger_than_the_flush_step_streams_into_a_snapshot_that_installs(tmp_path, network, monkeypatch):
    # The image is synced and dropped from the page cache every `_write_flush_bytes` as LMDB streams it.
    monkeypatch.setattr(snapshot, "_write_flush_bytes", 16 << 10)
    monkeypatch.setattr(snapshot, "_pipe_bytes", 4096)  # the helper reads at most a page at a time
    source = new_store(tmp_path / "a", network)
    advance(source, network, 60)
    path = tmp_path / "snapshot.bin"
    header = snapshot_of(source, path, network)
    assert os.path.getsize(path) > 4 * (16 << 10)
    target = new_store(tmp_path / "b", network)
    parsed, installed = restore_from_snapshot(path, target, network.genesis.cluster_id)
    assert installed and parsed == header
    assert target.summary() == source.summary()


def test_a_snapshot_that_cannot_be_written_raises_the_write_error_instead_of_hanging(tmp_path, network, monkeypatch):
    # /dev/full fails every write with ENOSPC: the helper stops reading the pipe LMDB writes into, and LMDB
    # must then fail too rather than block on a full pipe (a page: much smaller than the image).
    monkeypatch.setattr(snapshot, "_pipe_bytes", 4096)
    store = new_store(tmp_path / "a", network)
    advance(store, network, 60)
    outcome: list[BaseException] = []

    def write() -> None:
        try:
            snapshot_of(store, pathlib.Path("/dev/full"), network)
        except BaseException as error:  # noqa: BLE001 - inspected below
            outcome.append(error)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(timeout=30)
    assert not writer.is_alive(), "writing a snapshot to a full disk hung"
    assert len(outcome) == 1 and isinstance(outcome[0], OSError) and outcome[0].errno == errno.ENOSPC, outcome
    with store.write() as transaction:  # the store is not left with a stuck reader or writer
        transaction.applied_index()


_heap_probe = """
import gc, sys
from pathlib import Path
from consensus.raft.snapshot import restore_from_snapshot
from storage.state import LedgerStore

def anonymous_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

store = LedgerStore(Path(sys.argv[1]), map_size_bytes=1 << 30)
store.summary()
before = anonymous_bytes()
_header, installed = restore_from_snapshot(Path(sys.argv[2]), store, sys.argv[3])
gc.collect()
print(installed, anonymous_bytes() - before)
"""


def _large_snapshot(tmp_path, network, record_count: int, value_bytes: int, state_bytes_min: int) -> tuple[LedgerStore, pathlib.Path]:
    """A store grown past `state_bytes_min` by archive records (outside the state hash, so quick to write),
    and a snapshot of it."""
    source = new_store(tmp_path / "a", network, map_size_bytes=1 << 30)
    advance(source, network, 3)
    step = 20_000
    for start in range(0, record_count, step):
        with source.write() as transaction:
            for number in range(start, min(start + step, record_count)):
                transaction.put_unhashed("archive", number.to_bytes(8, "big"), bytes(value_bytes))
    assert source.used_bytes() > state_bytes_min
    path = tmp_path / "snapshot.bin"
    snapshot_of(source, path, network)
    return source, path


def _install_in_a_process(command_prefix: list[str], target, path, network) -> tuple[bool, int]:
    """Install the snapshot at `path` into a new store at `target` in a process of its own (started under
    `command_prefix`); returns whether it was installed and how much its heap grew."""
    program = [sys.executable, "-c", _heap_probe, str(target), str(path), network.genesis.cluster_id]
    result = subprocess.run(
        [*command_prefix, *program],
        capture_output=True, text=True, timeout=600, cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    installed, grown_bytes = result.stdout.split()
    return installed == "True", int(grown_bytes)


def test_installing_a_snapshot_leaves_no_more_heap_behind_than_one_bounded_transaction(tmp_path, network):
    # LMDB copies each page a write transaction changes into heap and keeps those pages for later
    # transactions: installed in one transaction, a 48 MiB state left about 48 MiB of heap for the life of
    # the process (a 300 MB node could not install a state of a few hundred MiB at all).
    record_count = 320_000
    source, path = _large_snapshot(tmp_path, network, record_count, 128, 48 << 20)
    installed, grown_bytes = _install_in_a_process([], tmp_path / "b", path, network)
    assert installed
    # The copy's transactions hold about copy_transaction_bytes_max of records (4 MiB) each.
    assert grown_bytes < 16 << 20, f"installing left {grown_bytes >> 20} MiB more heap"
    target = LedgerStore(tmp_path / "b", map_size_bytes=1 << 30)
    assert target.summary() == source.summary()
    with target.read() as transaction:
        assert sum(1 for _ in transaction.items("archive")) == record_count


def test_a_state_is_copied_in_transactions_of_at_most_the_byte_bound(tmp_path, network, monkeypatch):
    monkeypatch.setattr(storage.state, "copy_transaction_bytes_max", 16 << 10)
    source = new_store(tmp_path / "a", network)
    with source.write() as transaction:
        for number in range(2_000):
            transaction.put_unhashed("archive", number.to_bytes(8, "big"), bytes(100))
    with source.read() as reader:
        copied = write_environment_in_full_pages(reader, tmp_path / "copy", map_size_bytes=64 << 20)
    assert copied == len(stored_records(source))
    copy = lmdb.open(str(tmp_path / "copy"), readonly=True, max_dbs=64)
    try:
        # 2,000 archive records of 8 + 108 bytes are 232,000 bytes: at least 14 transactions of 16 KiB.
        assert copy.info()["last_txnid"] >= 15
    finally:
        copy.close()


def test_a_reader_that_began_before_an_install_finishes_on_the_state_it_began_with(tmp_path, network):
    source = new_store(tmp_path / "a", network)
    advance(source, network, 6)
    path = tmp_path / "snapshot.bin"
    snapshot_of(source, path, network)
    target = new_store(tmp_path / "b", network)
    before = target.summary()
    old_environment = target.environment
    reader = target.read()
    _header, installed = restore_from_snapshot(path, target, network.genesis.cluster_id)
    assert installed
    assert reader.summary() == before
    assert queries.balance(reader, "settlement.khr@aba")["balance"] == 0
    old_environment.info()  # still open for the reader
    reader.commit()
    del reader
    assert target.summary() == source.summary()
    with pytest.raises(lmdb.Error):
        old_environment.info()  # closed once its last reader is gone
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["a", "b", "snapshot.bin"]


def test_a_writer_waiting_while_the_state_is_replaced_writes_into_the_new_state(tmp_path, network, monkeypatch):
    source = new_store(tmp_path / "a", network)
    advance(source, network, 6)
    path = tmp_path / "snapshot.bin"
    snapshot_of(source, path, network)
    target = new_store(tmp_path / "b", network)
    old_environment = target.environment
    began = threading.Semaphore(0)

    class CountingBegins:
        """The old environment, signalling each transaction begun on it."""

        def begin(self, **options):
            began.release()
            return old_environment.begin(**options)

        def __getattr__(self, name):
            return getattr(old_environment, name)

    target._generation.environment = CountingBegins()
    writer_errors: list[BaseException] = []

    def write_a_head() -> None:
        try:
            with target.write() as transaction:
                transaction.put_unhashed("heads", b"late", b"written during the swap")
        except BaseException as error:  # noqa: BLE001 - reported below
            writer_errors.append(error)

    writer = threading.Thread(target=write_a_head)
    sync_directory = storage.state.sync_directory

    def start_a_writer_during_the_swap(directory) -> None:
        # The swap holds the old environment's write lock (its begin was the last one): the writer waits for it.
        while began.acquire(blocking=False):
            pass  # the begins so far: the install's own
        writer.start()
        assert began.acquire(timeout=30), "the writer never began"
        time.sleep(0.05)  # into LMDB's wait for the lock; if not yet, it begins on the new state, also right
        sync_directory(directory)

    monkeypatch.setattr(storage.state, "sync_directory", start_a_writer_during_the_swap)
    _header, installed = restore_from_snapshot(path, target, network.genesis.cluster_id)
    writer.join(timeout=30)
    assert installed and not writer.is_alive() and not writer_errors
    with target.read() as transaction:
        assert transaction.get("heads", b"late") == b"written during the swap"
    assert target.summary() == source.summary()
    with pytest.raises(lmdb.Error):
        old_environment.info()


def test_a_snapshot_holding_a_database_this_version_does_not_know_installs_nothing(tmp_path, network):
    source = new_store(tmp_path / "a", network)
    advance(source, network, 5)
    with source.environment.begin(write=True) as transaction:
        extra = source.environment.open_db(b"unknown", txn=transaction)
        transaction.put(b"key", b"value", db=extra)
    snapshot_of(source, tmp_path / "snapshot.bin", network)
    target = new_store(tmp_path / "b", network)
    before = target.summary()
    with pytest.raises(StorageCorrupted, match="does not know: b'unknown'"):
        restore_from_snapshot(tmp_path / "snapshot.bin", target, network.genesis.cluster_id)
    assert target.summary() == before
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["a", "b", "snapshot.bin"]


def test_a_crash_between_the_renames_of_an_install_leaves_the_old_state_to_open_and_no_scratch_of_any_version(tmp_path, network):
    store = new_store(tmp_path / "state", network)
    advance(store, network, 3)
    before = store.summary()
    store.close()
    os.rename(tmp_path / "state", tmp_path / "state.retired")
    (tmp_path / ".state.install-x1" / "state").mkdir(parents=True)  # the new state, left in its scratch directory
    (tmp_path / ".install-x0").mkdir()  # where versions before 40e2da7 received a snapshot
    (tmp_path / ".install-x0" / "image").write_bytes(b"x" * 4096)
    reopened = LedgerStore(tmp_path / "state", map_size_bytes=64 << 20)
    assert reopened.summary() == before
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["state"]


def test_a_crash_after_the_renames_of_an_install_leaves_the_new_state_to_open(tmp_path, network):
    old = new_store(tmp_path / "state.retired", network)
    old.close()
    new = new_store(tmp_path / "state", network)
    advance(new, network, 3)
    after = new.summary()
    new.close()
    reopened = LedgerStore(tmp_path / "state", map_size_bytes=64 << 20)
    assert reopened.summary() == after
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["state"]


def test_a_process_limited_to_less_memory_than_the_state_installs_a_snapshot_of_it(tmp_path, network):
    # Installed in one write transaction, the state's changed pages stayed in heap: a 160 MiB state took a
    # process limited to 96 MiB over its limit and the kernel killed it (a 1.1 GiB state did the same to a
    # 300 MB one). Page cache is charged too, but the kernel can take it back.
    cgroup = memory_cgroup_or_skip(96 << 20)
    try:
        source, path = _large_snapshot(tmp_path, network, 80_000, 1000, 150 << 20)
        installed, _grown_bytes = _install_in_a_process(cgroup.command([]), tmp_path / "b", path, network)
        assert installed
        assert cgroup.out_of_memory_kills() == 0
    finally:
        cgroup.remove()
    target = LedgerStore(tmp_path / "b", map_size_bytes=1 << 30)
    assert target.summary() == source.summary()
