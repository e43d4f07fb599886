"""Finding a recorded transfer by the SHA-256 of its signed entry: an append-only log in the state, and an index built from it off the apply path."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import lmdb

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
# transactions. A lookup reads the index up to where it has been built and scans the log after it, so an
# answer never depends on how far the index has got: a transfer is found the moment it is applied.
hash_log_database = "hash_log"
# The indexer's transaction size: large enough to share the B-tree's upper pages among many inserts,
# small enough that a catching-up node commits every fraction of a second.
catch_up_entries_max = 20_000
# A lookup scans at most this many logged pairs past the index (a few milliseconds); past it, the index is
# rebuilding (a node that just installed a snapshot of a large state) and the lookup says so instead of
# stalling its caller.
lookup_scan_entries_max = 65_536
index_databases_max = 4

_u64 = struct.Struct(">Q")
_meta_indexed_through = b"indexed_through"
_meta_cluster_id = b"cluster_id"


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
    """

    def __init__(self, path: Path, *, map_size_bytes: int, sync: bool = True, readonly: bool = False) -> None:
        """`readonly`: open an index a node built, beside it or after it stopped, to read or `check` it."""
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
        elif not (path / "data.mdb").exists():
            raise FileNotFoundError(f"{path} holds no entry-hash index")
        self.path = path
        # sync=True with metasync=False: a crash may lose the last indexing transaction, never the index's
        # integrity (LMDB's MDB_NOMETASYNC); what is lost is indexed again from the log.
        self.environment = open_environment(
            path, map_size_bytes=map_size_bytes, sync=sync, metasync=False, databases_max=index_databases_max,
            readonly=readonly,
        )
        self._hashes = self.environment.open_db(b"hashes", create=not readonly)
        self._meta = self.environment.open_db(b"meta", create=not readonly)

    def close(self) -> None:
        self.environment.close()

    def indexed_through(self) -> int:
        with self.environment.begin() as transaction:
            return self._indexed_through(transaction)

    def _indexed_through(self, transaction: lmdb.Transaction) -> int:
        stored = transaction.get(_meta_indexed_through, db=self._meta)
        return 0 if stored is None else _u64.unpack(stored)[0]

    def catch_up(self, store: LedgerStore, entries_max: int = catch_up_entries_max) -> int:
        """Index logged pairs past where the index stands, up to about `entries_max` in one transaction.
        Returns how many pairs it indexed (0: the index is current). One caller at a time (the indexer thread).

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
        # Sorted, the inserts walk the tree left to right and share the pages they touch.
        pairs.sort()
        with self.environment.begin(write=True) as transaction:
            if rebuild:
                transaction.drop(self._hashes, delete=False)
            with transaction.cursor(db=self._hashes) as cursor:
                cursor.putmulti((pair, b"") for pair in pairs)
            transaction.put(_meta_indexed_through, _u64.pack(reached), db=self._meta)
            transaction.put(_meta_cluster_id, cluster_id, db=self._meta)
        return len(pairs)

    def check(self, store: LedgerStore, examples_max: int = 10) -> IndexCheck:
        """Compare the index with the state's log: one lookup per logged pair, under one read transaction on
        each (about 50 s for 13.5 M pairs, while the state's writer cannot reuse the pages it frees meanwhile).

        Logged pairs are unique (a transfer is recorded once), so every logged pair found and equal counts
        mean the index holds exactly the log through its position. The index's transaction begins first, so
        on a running node the state read is at or past the index's position."""
        missing: list[bytes] = []
        missing_pairs = logged_pairs = 0
        with self.environment.begin() as transaction, store.read() as state:
            indexed_through = self._indexed_through(transaction)
            indexed_pairs = transaction.stat(self._hashes)["entries"]
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
                    if transaction.get(pair, db=self._hashes) is None:
                        missing_pairs += 1
                        if len(missing) < examples_max:
                            missing.append(pair)
        return IndexCheck(
            indexed_through, applied_index, logged_pairs, indexed_pairs, missing_pairs, tuple(missing),
            other_network=stored_cluster_id not in (None, cluster_id),
        )

    def ids_with_prefix(self, prefix: bytes, limit: int) -> tuple[list[bytes], int]:
        """(ids of indexed pairs whose hash starts with `prefix`, up to `limit`; the index's position)."""
        found: list[bytes] = []
        with self.environment.begin() as transaction, transaction.cursor(db=self._hashes) as cursor:
            indexed_through = self._indexed_through(transaction)
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not key.startswith(prefix) or len(found) == limit:
                        break
                    found.append(key[entry_hash_bytes:])
        return found, indexed_through


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
