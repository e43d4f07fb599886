"""Finding a recorded transfer by the SHA-256 of its signed entry: an append-only log in the state, and an index built from it off the apply path."""

from __future__ import annotations

import hashlib
import itertools
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lmdb

from consensus.codec import CodecError, pack, unpack
from storage.state import LedgerStore, StateTransaction, StorageCorrupted, open_environment

# Bakong-style lookups know a transfer by the SHA-256 of its signed entry, as stored and replicated; the
# short hash is its first 4 bytes.
entry_hash_bytes = 32
transfer_id_bytes = 16
pair_bytes = entry_hash_bytes + transfer_id_bytes

# Why two structures. A lookup by hash needs records sorted by hash, and a hash is random: every insert lands
# on a random page of a B-tree that grows with every transfer ever recorded (1.25 GB at 12 million). Written
# by the apply, those inserts cost a fault and two dirty pages per transfer inside the commit, and cut the
# throughput at 1 million accounts by a quarter (README, "Scale"). So the apply only appends one `hash_log`
# record per Raft entry (sequential keys: append-mostly pages) holding the (hash, id) pairs of the transfers
# it recorded, and a node thread copies the log into a separate, hash-sorted LMDB environment in large
# transactions (as sorted runs merged in the background: EntryHashIndex). A lookup reads the index up to where it has been built and scans the log after it, so an
# answer never depends on how far the index has got: a transfer is found the moment it is applied.
hash_log_database = "hash_log"
# The indexer's transaction size: large enough to share the B-tree's upper pages among many inserts,
# small enough that a catching-up node commits every fraction of a second.
catch_up_entries_max = 20_000
# A lookup scans at most this many logged pairs past the index (a few milliseconds); past it, the index is
# rebuilding (a node that just installed a snapshot of a large state) and the lookup says so instead of
# stalling its caller.
lookup_scan_entries_max = 65_536
# Layout 1 was one B-tree (`hashes`); an index found in it is dropped and built again from the log.
index_layout_version = 2
# The databases that can hold runs. A level (runs of 8**n to 8**(n+1) - 1 pairs) holds at most
# `runs_per_level_max` - 1 runs that wait; merges of small runs end within the transaction that starts them,
# so beside those wait at most one large merge's sources and output: 7 x 10 levels (a billion pairs) + 9 in
# 100 slots, and a shortage makes merges run past their budget.
run_slots = 100
# A merge's fan-in, and the factor between levels: runs of one level are merged when there are this many.
# Fewer runs per lookup against fewer rewrites of each pair (log base this of the pairs).
runs_per_level_max = 8
# A merge is written in ranges of hashes of about this many pairs, one transaction each: the dirty pages
# LMDB holds in memory until commit stay a few megabytes, and a lookup never waits long for the writer.
merge_chunk_entries_max = 65_536
# The merging an indexing transaction does, in pairs written per pair indexed: above the number of levels a
# pair passes through (3 to 4 at 13 million pairs with runs of 7,000, 6 at a billion), so merges keep up.
merge_entries_per_pair = 8
# Merge ranges split the first two bytes of the hash.
chunk_prefixes = 1 << 16
index_databases_max = run_slots + 2  # the slots, `meta`, and layout 1's `hashes` while it is dropped

_u64 = struct.Struct(">Q")
_meta_indexed_through = b"indexed_through"
_meta_cluster_id = b"cluster_id"
_meta_layout = b"layout"
_meta_runs = b"runs"
_meta_merges = b"merges"
_legacy_database = b"hashes"


class EntryHashIndexBehind(RuntimeError):
    """The index is too far behind the state for a lookup to scan the rest (it is being rebuilt); retry."""

    def __init__(self, indexed_through: int, applied_index: int) -> None:
        super().__init__(f"the entry-hash index is built through index {indexed_through} of {applied_index}; retry shortly")
        self.indexed_through = indexed_through
        self.applied_index = applied_index


def log_pair(entry_raw: bytes, transfer_id: bytes) -> bytes:
    """The 48 bytes the log keeps for one recorded transfer: its entry's SHA-256, then its id."""
    if len(transfer_id) != transfer_id_bytes:
        raise ValueError(f"transfer id is {len(transfer_id)} bytes, not {transfer_id_bytes}")
    return hashlib.sha256(entry_raw).digest() + transfer_id


def put_log(transaction: StateTransaction, index: int, pairs: bytes) -> None:
    """Log the pairs of the transfers the entry at `index` recorded. Keys only grow, so pages fill in order."""
    transaction.insert(hash_log_database, _u64.pack(index), pairs)


def _logged_pairs(transaction: StateTransaction, after_index: int):
    """(index, pairs) of every logged entry after `after_index`, in order."""
    for key, pairs in transaction.items(hash_log_database, start=_u64.pack(after_index + 1)):
        if len(pairs) % pair_bytes:
            raise StorageCorrupted(f"hash_log record {key.hex()} is {len(pairs)} bytes, not a multiple of {pair_bytes}")
        yield _u64.unpack(key)[0], pairs


class IndexLayoutOutdated(RuntimeError):
    """A read-only open found an index written by an older node; a node opening it rebuilds it."""

    def __init__(self, path: Path, layout: int) -> None:
        super().__init__(
            f"{path} holds an entry-hash index in layout {layout}, not {index_layout_version}: a node started on "
            "this data directory builds it again from the log"
        )


class IndexDamaged(StorageCorrupted):
    """The index's own records are damaged: derived data, so the ledger goes on and lookups say so."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: stop the node and delete its entry_hashes directory (it is rebuilt from the log)")


class IndexSlotsExhausted(RuntimeError):
    """No database is free for a new run: cannot happen while merges keep up (`run_slots`)."""

    def __init__(self, runs: tuple[Run, ...], merges: tuple[Merge, ...]) -> None:
        super().__init__(f"the entry-hash index has no free slot: {len(runs)} runs, {len(merges)} merges under way")


@dataclass(frozen=True, slots=True)
class Run:
    """A sorted run of (hash, id) pairs in one slot's database."""

    slot: int
    entries: int

    @property
    def level(self) -> int:
        """Its size class, from its size: never stored, so the classes can change without a new layout."""
        return _level(self.entries)


@dataclass(frozen=True, slots=True)
class Merge:
    """Runs being merged into an output slot, one range of hashes per transaction."""

    output_slot: int
    sources: tuple[int, ...]  # slots, each holding a run until the merge ends
    chunks: int  # ranges of hashes
    next_chunk: int
    entries: int  # written to the output so far


@dataclass(frozen=True, slots=True)
class IndexCheck:
    """An index compared with the state's log: where each stands, and how they differ up to the index's position."""

    indexed_through: int
    applied_index: int
    logged_pairs: int  # pairs the log holds through `indexed_through`
    indexed_pairs: int  # pairs in the index
    missing_pairs: int  # logged through `indexed_through` and not in the index
    missing_examples: tuple[bytes, ...]
    other_network: bool  # built for another network's state

    @property
    def consistent(self) -> bool:
        """Every pair logged through the index's position is in it, and nothing else is."""
        return (
            not self.other_network
            and self.indexed_through <= self.applied_index
            and self.missing_pairs == 0
            and self.indexed_pairs == self.logged_pairs
        )


class EntryHashIndex:
    """The hash-sorted index, in its own LMDB environment: derived data, rebuilt from the log when missing.

    It has its own environment, not a database in the state's, because LMDB allows one writer per
    environment: in the state's, every indexing transaction would hold up the apply.

    It is a set of sorted runs merged in the background, as in an LSM tree, not one B-tree. A hash is random:
    inserted into one tree that holds every transfer ever recorded, each lands on a page of its own (at 13
    million pairs, an indexing transaction of 6,800 pairs dirtied 6,700 of the tree's 266,000 leaves and 3,700
    of its 5,200 branch pages, about 1.5 written pages per transfer, README "Scale"). Here each indexing
    transaction writes its pairs, sorted, as a new run: appended into an empty database, so its pages are
    written once and full. When `runs_per_level_max` runs of about the same size exist, they are merged into
    one, by ranges of hashes, a transaction per range, each written in order the same way. A pair is written
    once per level it passes through (log8 of the pairs over those of the first run: 3 to 4 at 13 million
    with runs of 7,000), a seventieth of a page each time. A lookup seeks every run: at most 7 a level, 42
    at a billion pairs with runs of 7,000, and 8 more while a merge is under way.

    Each run lives in one of `run_slots` LMDB databases, all opened when the index is: handles are shared
    by every thread, and LMDB's `mdb_dbi_open` must not run beside another transaction's. The manifest in
    `meta` names the slots that hold runs and the merges under way; a slot is emptied (its pages freed
    without reading its leaves) in the transaction that ends the merge that read it. A reader sees the
    manifest and the runs of one snapshot, so a merge never shows a pair twice or not at all.
    """

    def __init__(self, path: Path, *, map_size_bytes: int, sync: bool = True, readonly: bool = False) -> None:
        """`readonly`: open an index a node built, beside it or after it stopped, to read or `check` it."""
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
        elif not (path / "data.mdb").exists():
            raise FileNotFoundError(f"{path} holds no entry-hash index")
        self.path = path
        # Pairs this object's merges wrote, for the node's metrics: a merge's work comes in bursts (a level
        # is merged when it fills), and a benchmark window must say whether it held one.
        self.pairs_merged = 0
        # sync=True with metasync=False: a crash may lose the last indexing transaction, never the index's
        # integrity (LMDB's MDB_NOMETASYNC); what is lost is indexed again from the log.
        self.environment = open_environment(
            path, map_size_bytes=map_size_bytes, sync=sync, metasync=False, databases_max=index_databases_max,
            readonly=readonly,
        )
        try:
            if readonly:
                self._meta = self.environment.open_db(b"meta", create=False)
                with self.environment.begin() as transaction:
                    layout = _layout(transaction.get(_meta_layout, db=self._meta))
                if layout != index_layout_version:
                    raise IndexLayoutOutdated(path, layout)
                self._slots = tuple(self.environment.open_db(_slot_name(slot), create=False) for slot in range(run_slots))
            else:
                self._open_writable()
        except BaseException:
            self.environment.close()
            raise

    def _open_writable(self) -> None:
        """Open (creating) every slot; an index of an older layout is dropped here and built again from the log."""
        with self.environment.begin(write=True) as transaction:
            self._meta = self.environment.open_db(b"meta", txn=transaction)
            self._slots = tuple(self.environment.open_db(_slot_name(slot), txn=transaction) for slot in range(run_slots))
            if _layout(transaction.get(_meta_layout, db=self._meta)) != index_layout_version:
                try:
                    legacy = self.environment.open_db(_legacy_database, txn=transaction, create=False)
                except lmdb.NotFoundError:
                    pass
                else:
                    transaction.drop(legacy, delete=True)
                self._clear(transaction)
                transaction.delete(_meta_indexed_through, db=self._meta)
                transaction.put(_meta_layout, _u64.pack(index_layout_version), db=self._meta)

    def close(self) -> None:
        self.environment.close()

    def indexed_through(self) -> int:
        with self.environment.begin() as transaction:
            return self._indexed_through(transaction)

    def _indexed_through(self, transaction: lmdb.Transaction) -> int:
        stored = transaction.get(_meta_indexed_through, db=self._meta)
        return 0 if stored is None else _u64.unpack(stored)[0]

    def runs(self) -> tuple[Run, ...]:
        """The runs a lookup reads now."""
        with self.environment.begin() as transaction:
            return self._runs(transaction)

    def merges(self) -> tuple[Merge, ...]:
        """The merges under way."""
        with self.environment.begin() as transaction:
            return self._merges(transaction)

    def slot_database(self, slot: int) -> Any:
        """The LMDB database handle of a run slot (for tools and tests that read or repair a run)."""
        return self._slots[slot]

    def _runs(self, transaction: lmdb.Transaction) -> tuple[Run, ...]:
        stored = transaction.get(_meta_runs, db=self._meta)
        try:
            return () if stored is None else tuple(Run(*fields) for fields in unpack(stored))
        except (CodecError, TypeError) as error:
            raise IndexDamaged(f"the entry-hash index's run list is damaged ({error})") from error

    def _merges(self, transaction: lmdb.Transaction) -> tuple[Merge, ...]:
        stored = transaction.get(_meta_merges, db=self._meta)
        try:
            return () if stored is None else tuple(
                Merge(output, tuple(sources), chunks, next_chunk, entries) for output, sources, chunks, next_chunk, entries in unpack(stored)
            )
        except (CodecError, TypeError, ValueError) as error:
            raise IndexDamaged(f"the entry-hash index's merge list is damaged ({error})") from error

    def _put_manifest(self, transaction: lmdb.Transaction, runs: tuple[Run, ...], merges: tuple[Merge, ...]) -> None:
        transaction.put(_meta_runs, pack([[run.slot, run.entries] for run in runs]), db=self._meta)
        transaction.put(
            _meta_merges,
            pack([[merge.output_slot, list(merge.sources), merge.chunks, merge.next_chunk, merge.entries] for merge in merges]),
            db=self._meta,
        )

    def _clear(self, transaction: lmdb.Transaction) -> None:
        """Empty every slot and the manifest (a rebuild starts from nothing)."""
        for database in self._slots:
            transaction.drop(database, delete=False)
        self._put_manifest(transaction, (), ())

    def catch_up(self, store: LedgerStore, entries_max: int = catch_up_entries_max) -> int:
        """Index logged pairs past where the index stands, up to about `entries_max` in one transaction, then
        merge up to `merge_entries_per_pair` times as many pairs as that (in transactions of up to
        `merge_chunk_entries_max`). Returns how many pairs it indexed (0: the index is current). One caller at
        a time (the indexer thread).

        The log is read first and its read transaction ended before the index is written: an LMDB reader
        pins the pages the apply frees after it began, and one held through the index's writes and fsync
        made the state file grow instead of reusing them."""
        with self.environment.begin() as transaction:
            indexed_through = self._indexed_through(transaction)
            stored_cluster_id = transaction.get(_meta_cluster_id, db=self._meta)
        with store.read() as state:
            applied_index = state.applied_index()
            identity = state.identity()
            cluster_id = b"" if identity is None else identity[0].encode()
            # An index ahead of the state, or of another network, belongs to a state this node no longer has
            # (its data directory was restored from elsewhere): start again from the log.
            rebuild = indexed_through > applied_index or stored_cluster_id not in (None, cluster_id)
            if rebuild:
                indexed_through = 0
            elif indexed_through == applied_index:
                return 0
            pairs: list[bytes] = []
            reached = applied_index
            # The apply writes a log record and the applied index in one transaction: this view holds no record
            # past `applied_index`.
            for index, logged in _logged_pairs(state, indexed_through):
                pairs.extend(logged[start : start + pair_bytes] for start in range(0, len(logged), pair_bytes))
                if len(pairs) >= entries_max:
                    reached = index
                    break
        pairs.sort()
        with self.environment.begin() as transaction:
            slots_short = _slots_short(self._runs(transaction), self._merges(transaction))
        if slots_short and not rebuild:
            self.merge(0)  # works until a merge ends and frees slots
        with self.environment.begin(write=True) as transaction:
            if rebuild:
                self._clear(transaction)
            runs, merges = self._runs(transaction), self._merges(transaction)
            if pairs:
                # The last free slot is kept for a merge's output: with none, no merge could ever free one.
                slot = None if _slots_short(runs, merges) else _free_slot(runs, merges)
                if slot is None:
                    raise IndexSlotsExhausted(runs, merges)
                self._write_run(transaction, slot, pairs)
                runs += (Run(slot, len(pairs)),)
                self._put_manifest(transaction, runs, merges)
            transaction.put(_meta_indexed_through, _u64.pack(reached), db=self._meta)
            transaction.put(_meta_cluster_id, cluster_id, db=self._meta)
        self.merge(merge_entries_per_pair * len(pairs))
        return len(pairs)

    def _write_run(self, transaction: lmdb.Transaction, slot: int, pairs: list[bytes]) -> None:
        """Append sorted pairs to a slot's database; appended, LMDB fills each page before it starts the next."""
        with transaction.cursor(db=self._slots[slot]) as cursor:
            cursor.putmulti(zip(pairs, itertools.repeat(b"")), append=True)

    def merge(self, entries_budget: int) -> int:
        """Start the merges that are due and work on them, lowest level first, until about `entries_budget`
        pairs have been written, and at least one range when a merge is under way. With fewer than two slots
        free it goes on until a merge ends, and merges the smallest runs early if none is due. Returns the
        pairs written."""
        written = 0
        while True:
            with self.environment.begin() as transaction:
                runs, merges = self._runs(transaction), self._merges(transaction)
                if not _start_due_merges(runs, merges, _slots_short(runs, merges)):
                    return written
            with self.environment.begin(write=True) as transaction:
                runs, merges = self._runs(transaction), self._merges(transaction)
                merges = _start_due_merges(runs, merges, _slots_short(runs, merges))
                # A small merge is a step away from freeing its slots; a large one waits for the leftover budget.
                merge = min(merges, key=lambda candidate: (_level(_source_entries(runs, candidate)), candidate.output_slot))
                chunk_entries, runs, merges = self._merge_chunk(transaction, merge, runs, merges)
                written += chunk_entries
                slots_short = _slots_short(runs, merges)
            self.pairs_merged += chunk_entries
            if written >= entries_budget and not slots_short:
                return written

    def _merge_chunk(
        self, transaction: lmdb.Transaction, merge: Merge, runs: tuple[Run, ...], merges: tuple[Merge, ...]
    ) -> tuple[int, tuple[Run, ...], tuple[Merge, ...]]:
        """Merge the sources' pairs in the merge's next range of hashes into its output; the last range ends
        the merge: the output becomes a run and the sources' slots are emptied, in this transaction. Returns
        the pairs written and the manifest (runs, merges) it wrote."""
        low = _chunk_bound(merge.next_chunk, merge.chunks)
        high = _chunk_bound(merge.next_chunk + 1, merge.chunks) if merge.next_chunk + 1 < merge.chunks else None
        pairs: list[bytes] = []
        for slot in merge.sources:
            with transaction.cursor(db=self._slots[slot]) as cursor:
                if not cursor.set_range(low):
                    continue
                keys = cursor.iternext(values=False)
                pairs.extend(keys if high is None else itertools.takewhile(high.__gt__, keys))
        # Each source is sorted: the sort merges runs, in C.
        pairs.sort()
        self._write_run(transaction, merge.output_slot, pairs)
        progressed = replace(merge, next_chunk=merge.next_chunk + 1, entries=merge.entries + len(pairs))
        others = tuple(other for other in merges if other.output_slot != merge.output_slot)
        if progressed.next_chunk < progressed.chunks:
            merges = others + (progressed,)
        else:
            for slot in merge.sources:
                transaction.drop(self._slots[slot], delete=False)
            runs = tuple(run for run in runs if run.slot not in merge.sources) + (Run(merge.output_slot, progressed.entries),)
            merges = others
        self._put_manifest(transaction, runs, merges)
        return len(pairs), runs, merges

    def check(self, store: LedgerStore, examples_max: int = 10) -> IndexCheck:
        """Compare the index with the state's log: each logged pair looked up in the runs, largest first
        (most pairs are in the largest), under one read transaction on each (65 s for 11.7 M pairs in 23
        runs on a stopped node, while a running node's writer cannot reuse the pages it frees meanwhile).

        Logged pairs are unique (a transfer is recorded once), so every logged pair found and equal counts
        mean the index holds exactly the log through its position. The index's transaction begins first, so
        on a running node the state read is at or past the index's position."""
        missing: list[bytes] = []
        missing_pairs = logged_pairs = 0
        with self.environment.begin() as transaction, store.read() as state:
            indexed_through = self._indexed_through(transaction)
            runs = sorted(self._runs(transaction), key=lambda run: run.entries, reverse=True)
            indexed_pairs = sum(transaction.stat(self._slots[run.slot])["entries"] for run in runs)
            databases = [self._slots[run.slot] for run in runs]
            stored_cluster_id = transaction.get(_meta_cluster_id, db=self._meta)
            identity = state.identity()
            cluster_id = b"" if identity is None else identity[0].encode()
            applied_index = state.applied_index()
            for index, logged in _logged_pairs(state, 0):
                if index > indexed_through:
                    break
                for start in range(0, len(logged), pair_bytes):
                    logged_pairs += 1
                    pair = logged[start : start + pair_bytes]
                    if not any(transaction.get(pair, db=database) is not None for database in databases):
                        missing_pairs += 1
                        if len(missing) < examples_max:
                            missing.append(pair)
        return IndexCheck(
            indexed_through, applied_index, logged_pairs, indexed_pairs, missing_pairs, tuple(missing),
            other_network=stored_cluster_id not in (None, cluster_id),
        )

    def ids_with_prefix(self, prefix: bytes, limit: int) -> tuple[list[bytes], int]:
        """(ids of indexed pairs whose hash starts with `prefix`, the `limit` first in hash order; the index's
        position)."""
        found: list[bytes] = []
        with self.environment.begin() as transaction:
            indexed_through = self._indexed_through(transaction)
            for run in self._runs(transaction):
                with transaction.cursor(db=self._slots[run.slot]) as cursor:
                    if not cursor.set_range(prefix):
                        continue
                    for count, key in enumerate(cursor.iternext(values=False)):
                        if count == limit or not key.startswith(prefix):
                            break
                        found.append(key)
        return [pair[entry_hash_bytes:] for pair in sorted(found)[:limit]], indexed_through


def run_database_names() -> list[bytes]:
    """The LMDB names of the run slots (what a tool reading a stopped node's index opens)."""
    return [_slot_name(slot) for slot in range(run_slots)]


def _slot_name(slot: int) -> bytes:
    return b"run-%03d" % slot


def _layout(stored: bytes | None) -> int:
    """The layout an index was written in; before layouts were recorded it was one B-tree (layout 1)."""
    return 1 if stored is None else _u64.unpack(stored)[0]


def _level(entries: int) -> int:
    """A run's size class: level n holds runs of `runs_per_level_max`**n pairs up to the next power. Merging
    that many runs of one level always yields a run of a higher level, so each merge moves a pair up: with an
    open-ended lowest level, a slow network's runs (38 pairs per indexing transaction at 19 transfers/s)
    would merge into one run that every later merge rewrote, adding 7 small runs at a time."""
    level = 0
    while entries >= runs_per_level_max ** (level + 1):
        level += 1
    return level


def _source_entries(runs: tuple[Run, ...], merge: Merge) -> int:
    return sum(run.entries for run in runs if run.slot in merge.sources)


def _used_slots(runs: tuple[Run, ...], merges: tuple[Merge, ...]) -> set[int]:
    return {run.slot for run in runs} | {merge.output_slot for merge in merges}


def _free_slot(runs: tuple[Run, ...], merges: tuple[Merge, ...]) -> int | None:
    used = _used_slots(runs, merges)
    return next((slot for slot in range(run_slots) if slot not in used), None)


def _slots_short(runs: tuple[Run, ...], merges: tuple[Merge, ...]) -> bool:
    """Fewer than two slots free: the next run would take the last, which a merge's output needs."""
    return run_slots - len(_used_slots(runs, merges)) < 2


def _start_due_merges(runs: tuple[Run, ...], merges: tuple[Merge, ...], slots_short: bool = False) -> tuple[Merge, ...]:
    """Add a merge for every level holding `runs_per_level_max` runs that no merge is reading yet, oldest
    runs first (the manifest keeps runs in the order they were made). Short of slots with no merge under
    way or due, merge the smallest runs waiting, as many as a merge takes, early."""
    merging = {slot for merge in merges for slot in merge.sources}
    waiting_runs = [run for run in runs if run.slot not in merging]
    by_level: dict[int, list[Run]] = {}
    for run in waiting_runs:
        by_level.setdefault(run.level, []).append(run)
    due: list[list[Run]] = []
    for level in sorted(by_level):
        waiting = by_level[level]
        while len(waiting) >= runs_per_level_max:
            due.append(waiting[:runs_per_level_max])
            waiting = waiting[runs_per_level_max:]
    if not due and not merges and slots_short and len(waiting_runs) >= 2:
        due.append(sorted(waiting_runs, key=lambda run: run.entries)[:runs_per_level_max])
    for sources in due:
        output = _free_slot(runs, merges)
        if output is None:
            break
        entries = sum(run.entries for run in sources)
        chunks = min(chunk_prefixes, -(-entries // merge_chunk_entries_max))
        merges += (Merge(output, tuple(run.slot for run in sources), chunks, 0, 0),)
    return merges


def _chunk_bound(chunk: int, chunks: int) -> bytes:
    """The first hash of a merge's range `chunk` of `chunks`: ranges split the hashes' first two bytes evenly."""
    return (chunk * chunk_prefixes // chunks).to_bytes(2, "big")


def transfer_ids_with_hash_prefix(transaction: StateTransaction, index: EntryHashIndex | None, prefix: bytes, limit: int) -> list[bytes]:
    """Ids of recorded transfers whose entry's SHA-256 starts with `prefix`, as of `transaction`: from the
    index where it is built, from the log past that. Raises EntryHashIndexBehind when the log past the index
    is too long to scan. Without an index (a read-only store) the whole log is the part to scan."""
    if len(prefix) > entry_hash_bytes:
        return []
    found, indexed_through = ([], 0) if index is None else index.ids_with_prefix(prefix, limit)
    applied_index = transaction.applied_index()
    if indexed_through >= applied_index:
        return found
    scanned = 0
    for _index, logged in _logged_pairs(transaction, indexed_through):
        scanned += len(logged) // pair_bytes
        if scanned > lookup_scan_entries_max:
            raise EntryHashIndexBehind(indexed_through, applied_index)
        for start in range(0, len(logged), pair_bytes):
            if len(found) == limit:
                return found
            if logged.startswith(prefix, start):
                found.append(logged[start + entry_hash_bytes : start + pair_bytes])
    return found
