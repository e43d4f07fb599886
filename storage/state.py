"""The LMDB environment of a node's ledger state: layout, checksummed records and the running state hash."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from config.keys import sync_directory

# 2: history appended in apply order and linked per account, with per-account checkpoints (was keyed by account).
# 3: the entry-hash index left the state for its own environment; the state keeps an append-only hash_log.
# 4: a transfer record points at its entry in the archived batch instead of holding a copy; receipt-tree
#    subtrees are keyed by last leaf, then level, so they are written in key order.
schema_version = 4

# Named databases. `meta` holds bookkeeping that is not part of the replicated state hash.
_state_database_names = (
    "currencies",
    "institutions",
    "nodes",
    "accounts",
    "transfers",
    "pending",
    "expiry",
    "aliases",
    "history",
    "history_checkpoints",
    "references",
    "batch_times",
    "tree",
    "hash_log",
    "parameters",
)
# Databases outside the state hash: bookkeeping (meta), the archive of applied batches (what `tonle export`
# hands an auditor) and signed tree heads (validators' attestations about the state, not state).
_unhashed_database_names = ("meta", "archive", "heads")
_database_names = (*_unhashed_database_names, *_state_database_names)
databases_max = 32
readers_max = 256
# write_environment_in_full_pages commits after about this many bytes of records: LMDB keeps in heap, for the
# life of the environment, as many pages as one write transaction changed (4 MiB of records fill about 1,000).
copy_transaction_bytes_max = 4 << 20
# `LedgerStore.compact` copies a database here and back within one write transaction.
_compaction_scratch_name = b"compaction.scratch"

# Every stored value ends in a short checksum over its database, key and payload, verified on every
# read: LMDB has no page checksums, and a flipped bit in a balance must stop the node, not move money.
value_checksum_bytes = 8
# The state hash is an additive multiset hash (AdHash) of every state record, kept modulo 2^256 and
# updated by each write, so two replicas with the same records have the same hash however they got them
# (replay or snapshot), and a full recomputation can be compared against the stored value.
state_hash_modulus = 1 << 256
state_hash_bytes = 32

_meta_applied_index = b"applied_index"
_meta_state_hash = b"state_hash"
_meta_cluster_time = b"cluster_time_ms"
_meta_next_account_number = b"next_account_number"
_meta_schema_version = b"schema_version"
_meta_cluster_id = b"cluster_id"
_meta_genesis_digest = b"genesis_digest"

_u64 = struct.Struct(">Q")


class StorageCorrupted(RuntimeError):
    """A stored record failed its checksum or the layout is not what this version wrote. Fatal."""


_record_hasher = hashlib.blake2b(digest_size=state_hash_bytes, person=b"tonle-record-v1")


def _record_digest(prefix: bytes, key: bytes, payload: bytes) -> bytes:
    """One BLAKE2b over a record names it in the state hash and, cut short, seals it on disk.

    `prefix` is the database's length-prefixed name; the key is length-prefixed too, so no record of one
    database or key can hash like another's. One hash per read or write: the apply writes several records
    per transfer, and this is most of what a write costs.
    """
    hasher = _record_hasher.copy()  # copying a keyed-up hasher is ~40 % cheaper than making one per record
    hasher.update(prefix + len(key).to_bytes(2, "big") + key + payload)
    return hasher.digest()


def _database_prefix(name: str) -> bytes:
    encoded = name.encode()
    return len(encoded).to_bytes(1, "big") + encoded


_prefixes = {name: _database_prefix(name) for name in _database_names}


def _record_hash(database: bytes, key: bytes, payload: bytes) -> int:
    return int.from_bytes(_record_digest(len(database).to_bytes(1, "big") + database, key, payload), "big")


def _seal(database: bytes, key: bytes, payload: bytes) -> bytes:
    digest = _record_digest(len(database).to_bytes(1, "big") + database, key, payload)
    return payload + digest[:value_checksum_bytes]


def _unseal(prefix: bytes, key: bytes, stored: bytes) -> tuple[bytes, bytes]:
    """(payload, full digest) of a stored record, or StorageCorrupted if its seal does not match."""
    payload = stored[:-value_checksum_bytes]
    digest = _record_digest(prefix, key, payload)
    if len(stored) < value_checksum_bytes or digest[:value_checksum_bytes] != stored[-value_checksum_bytes:]:
        raise StorageCorrupted(
            f"record {prefix[1:].decode()}/{key.hex()} fails its checksum: the data file is damaged; "
            "stop this node and restore it from a healthy peer"
        )
    return payload, digest


def _open(database: bytes, key: bytes, stored: bytes) -> bytes:
    return _unseal(len(database).to_bytes(1, "big") + database, key, stored)[0]


@dataclass(frozen=True, slots=True)
class CompactedDatabase:
    """One database rewritten by `LedgerStore.compact`: its records, and its B-tree pages before and after."""

    name: str
    entries: int
    pages_before: int
    pages_after: int


@dataclass(frozen=True, slots=True)
class StateSummary:
    """Where a node's state stands: the last applied Raft index and the state hash after it."""

    applied_index: int
    state_hash: bytes
    cluster_time_ms: int


def open_environment(
    path: Path, *, map_size_bytes: int, sync: bool, metasync: bool, databases_max: int, readonly: bool = False
) -> lmdb.Environment:
    """An LMDB environment with every option spelled out: writemap=False keeps a full disk an error instead
    of a SIGBUS (measured in research/reliability.md); readahead=False suits random access to a database
    larger than RAM; map_async does nothing without writemap and is off. Locking stays on when read-only:
    a reader beside a running node (`tonle export --data-dir`) must be in the lock table, or the node's
    writer reuses the pages its snapshot still reads."""
    return lmdb.open(
        str(path),
        map_size=map_size_bytes,
        subdir=True,
        readonly=readonly,
        metasync=metasync,
        sync=sync,
        map_async=False,
        writemap=False,
        readahead=False,
        meminit=False,
        max_readers=readers_max,
        max_dbs=databases_max,
        lock=True,
    )


@dataclass(frozen=True, slots=True)
class ReaderTable:
    """The open read transactions of an LMDB environment, and how far behind its newest commit the oldest one reads."""

    open: int
    oldest_lag_transactions: int


def reader_table(listing: str, last_transaction_id: int) -> ReaderTable:
    """Read mdb_reader_list's text (py-lmdb's `Environment.readers()`): a header, then one line per slot,
    `pid thread txnid`, where the txnid of a slot with no transaction open is `-`; or `(no active readers)`."""
    snapshots = []
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) != 3 or fields[2] == "-":
            continue
        try:
            snapshots.append(int(fields[2]))
        except ValueError:
            raise ValueError(f"unexpected line in LMDB's reader table: {line!r}") from None
    if not snapshots:
        return ReaderTable(open=0, oldest_lag_transactions=0)
    return ReaderTable(open=len(snapshots), oldest_lag_transactions=max(0, last_transaction_id - min(snapshots)))


def clear_stale_readers(environment: lmdb.Environment) -> int:
    """Free the reader slots of an environment held by processes that died inside a read transaction; returns
    how many.

    Why. LMDB reuses no page freed after the snapshot its oldest reader reads, and a process killed inside a
    read transaction (`tonle export --data-dir` beside the node, stopped with SIGKILL) leaves its slot in the
    lock file holding that snapshot for good: every page a commit frees from then on stays unused and the data
    file grows with each commit until the node restarts. LMDB only clears such a slot when asked
    (mdb_reader_check: a slot whose process no longer exists)."""
    return environment.reader_check()


class _Generation:
    """One open LMDB environment of a store, and its named databases.

    Installing a snapshot puts a new environment in place of the old one (LedgerStore.replace_with). Every
    transaction holds its generation, so the old environment is closed when the last transaction begun on it
    is gone (CPython frees an object when its last reference goes): a reader that began before the install
    finishes on the state it began with instead of failing on a closed environment. No lock or count is
    needed, and this module stays free of threading (tests/unit/test_purity.py)."""

    def __init__(self, environment: lmdb.Environment, databases: dict[str, lmdb._Database]) -> None:
        self.environment = environment
        self.databases = databases
        # Set once another generation has taken this one's place: a writer that waited for this one's write
        # lock starts again on the current generation.
        self.retired = False
        self.closing = weakref.finalize(self, environment.close)


class LedgerStore:
    """An open LMDB environment holding one node's ledger state."""

    def __init__(self, path: Path, *, map_size_bytes: int, sync: bool = True, readonly: bool = False) -> None:
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
            _finish_interrupted_replacement(path)
            path.mkdir(exist_ok=True)
        self.path = path
        self._map_size_bytes = map_size_bytes
        self._sync = sync
        self._readonly = readonly
        self._generation = self._open_generation(path)

    def _open_generation(self, path: Path) -> _Generation:
        # sync+metasync make a committed transaction durable before commit returns.
        environment = open_environment(
            path,
            map_size_bytes=self._map_size_bytes,
            sync=self._sync,
            metasync=self._sync,
            readonly=self._readonly,
            databases_max=databases_max,
        )
        try:
            databases = {name: environment.open_db(name.encode(), create=not self._readonly) for name in _database_names}
        except BaseException:
            environment.close()
            raise
        return _Generation(environment, databases)

    @property
    def environment(self) -> lmdb.Environment:
        return self._generation.environment

    @property
    def databases(self) -> dict[str, lmdb._Database]:
        return self._generation.databases

    def close(self) -> None:
        self._generation.closing()

    def write(self) -> StateTransaction:
        while True:
            generation = self._generation
            transaction = generation.environment.begin(write=True)
            # A writer that waited for the write lock of an environment replace_with has since retired
            # would write into the replaced state: it starts again on the current one.
            if not generation.retired:
                return StateTransaction(self, generation, transaction)
            transaction.abort()

    def read(self) -> StateTransaction:
        generation = self._generation
        return StateTransaction(self, generation, generation.environment.begin(write=False, buffers=False))

    def replace_with(self, directory: Path) -> None:
        """Put the LMDB environment in `directory` (written, synced and closed: a snapshot's checked records,
        write_environment_in_full_pages) in place of this store's, all at once.

        The swap is two renames in the store's parent directory: the state directory to `<name>.retired`,
        then `directory` to the state directory. A crash between them leaves only the retired one, which
        the next open puts back (the node then installs the snapshot again from its file); a crash after
        them leaves both, and the next open removes the retired one. Holding the old environment's write
        lock across the swap keeps every writer out of it; readers that began before it finish on it."""
        if self._readonly:
            raise ValueError("a read-only store cannot be replaced")
        retired_path = _retired_path(self.path)
        old = self._generation
        blocker = old.environment.begin(write=True)
        try:
            if retired_path.exists():
                shutil.rmtree(retired_path)
            os.rename(self.path, retired_path)
            try:
                os.rename(directory, self.path)
            except BaseException:
                os.rename(retired_path, self.path)
                raise
            sync_directory(self.path.parent)
            try:
                self._generation = self._open_generation(self.path)
            except BaseException as error:
                # The new state is in place on disk but cannot be opened here: the node must stop, and the
                # next start opens it (or fails the same way, with the cause in front of the operator).
                raise StorageCorrupted(f"installed state at {self.path} cannot be opened: {error!r}") from error
            old.retired = True
        finally:
            blocker.abort()
        del old, blocker  # the old environment closes now unless a transaction still holds it
        # The retired files are unlinked now; an open environment's mapping keeps them readable until closed.
        shutil.rmtree(retired_path, ignore_errors=True)

    def summary(self) -> StateSummary:
        with self.read() as transaction:
            return transaction.summary()

    def used_bytes(self) -> int:
        info = self.environment.info()
        stat = self.environment.stat()
        return (info["last_pgno"] + 1) * stat["psize"]

    def map_size_bytes(self) -> int:
        return self.environment.info()["map_size"]

    def readers(self) -> ReaderTable:
        """The read transactions open on the state, from every process (LMDB's reader lock table)."""
        environment = self.environment
        return reader_table(environment.readers(), environment.info()["last_txnid"])

    def clear_stale_readers(self) -> int:
        """Free the state's reader slots of processes that died inside a read transaction; returns how many."""
        return clear_stale_readers(self.environment)

    def copy_into(self, descriptor: int, as_of: StateTransaction | None = None) -> None:
        """Write a consistent, compact copy of the environment (an LMDB data file) to a file or pipe, from its
        current position: the view of `as_of` (a read transaction the caller also read the summary from), or
        of a fresh read transaction. Call it on the thread that opened `as_of`."""
        if as_of is None:
            self.environment.copyfd(descriptor, compact=True)
        else:
            as_of._generation.environment.copyfd(descriptor, compact=True, txn=as_of._transaction)

    def compact(self, names: tuple[str, ...] | None = None) -> list[CompactedDatabase]:
        """Rewrite databases so that every B-tree page is full, as `etcdctl defrag` does for bbolt.

        LMDB splits a full page in the middle unless the write appends, so a database written in random key
        order, or whose records grew in place, ends with pages about half full: an account database of
        1 million records took 165 MiB where its records need about 95 (README, "Memory under a limit"),
        and a node whose memory is limited reads the difference from disk. Each database is copied in key
        order into a scratch database and back with LMDB's append mode, which fills each page before it
        starts the next, compared record by record with the scratch copy, and committed in one write
        transaction per database: the records, and so the state hash, do not change, and a failure leaves
        the database as it was. The pages it frees stay in the file for later writes (the file does not
        shrink, and grows by up to the largest database while one is rewritten)."""
        compacted = []
        for name in _database_names if names is None else names:
            if name not in self.databases:
                raise ValueError(f"no database named {name!r} (known: {', '.join(_database_names)})")
            handle = self.databases[name]
            with self.environment.begin(write=True) as transaction:
                before = transaction.stat(handle)
                scratch = self.environment.open_db(_compaction_scratch_name, txn=transaction, create=True)
                transaction.drop(scratch, delete=False)
                with transaction.cursor(handle) as source, transaction.cursor(scratch) as target:
                    copied = _append_all(target, source, name)
                transaction.drop(handle, delete=False)
                with transaction.cursor(scratch) as source, transaction.cursor(handle) as target:
                    restored = _append_all(target, source, name)
                with transaction.cursor(scratch) as copy, transaction.cursor(handle) as rewritten:
                    same = all(left == right for left, right in zip(copy, rewritten))
                if not same or not copied == restored == before["entries"]:
                    # An exception aborts the transaction: the database stays as it was.
                    raise StorageCorrupted(f"compacting {name!r} did not reproduce its {before['entries']} records")
                transaction.drop(scratch, delete=True)
                after = transaction.stat(handle)
            compacted.append(CompactedDatabase(name, before["entries"], pages_of(before), pages_of(after)))
        return compacted


def pages_of(stat: dict[str, int]) -> int:
    """The B-tree pages of a database, from its LMDB `stat`: branch, leaf and overflow."""
    return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]


def _append_all(target: lmdb.Cursor, source: lmdb.Cursor, name: str) -> int:
    """Append every (key, value) of `source`, in its key order, to the empty database of `target`."""
    consumed, added = target.putmulti(source.iternext(keys=True, values=True), append=True)
    if consumed != added:
        raise StorageCorrupted(f"records of {name!r} did not arrive in key order")
    return added


class StateTransaction:
    """One LMDB transaction with typed, checksummed access and the state hash kept current.

    Used as a context manager: leaving the block normally commits a write transaction, an exception
    aborts it, so nothing is ever half-applied.
    """

    def __init__(
        self,
        store: LedgerStore,
        generation: _Generation,
        transaction: lmdb.Transaction,
        parent: StateTransaction | None = None,
    ) -> None:
        self._store = store
        self._generation = generation
        self._transaction = transaction
        self._databases = generation.databases
        self._parent = parent
        self._state_hash: int | None = None if parent is None else parent._current_state_hash()
        self._state_hash_changed = False
        # Record hashes this transaction has computed (reads verify them, writes need the old one), so a
        # read-modify-write of a record hashes it twice, not four times. A child starts empty and hands its
        # entries up when it commits; an aborted child's are dropped with it.
        self._known: dict[tuple[str, bytes], int] = {}

    def nested(self) -> StateTransaction:
        """A child write transaction: committing it folds its writes (and state hash) into this one,
        aborting it leaves this one exactly as it was. Linked chains apply all-or-nothing through it."""
        self._current_state_hash()  # read before the child exists: a parent with a child cannot be read
        child = self._generation.environment.begin(write=True, parent=self._transaction)
        return StateTransaction(self._store, self._generation, child, parent=self)

    def __enter__(self) -> StateTransaction:
        return self

    def __exit__(self, exception_type, exception, traceback) -> None:
        if exception_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> None:
        if self._parent is not None:
            self._transaction.commit()
            self._parent._known.update(self._known)
            if self._state_hash_changed:
                self._parent._state_hash = self._state_hash
                self._parent._state_hash_changed = True
            return
        if self._state_hash_changed and self._state_hash is not None:
            self._put_meta(_meta_state_hash, self._state_hash.to_bytes(state_hash_bytes, "big"))
        self._transaction.commit()

    def abort(self) -> None:
        self._transaction.abort()

    # Raw checksummed access ---------------------------------------------------------------------------

    def get(self, database: str, key: bytes) -> bytes | None:
        stored = self._transaction.get(key, db=self._databases[database])
        if stored is None:
            return None
        payload, digest = _unseal(_prefixes[database], key, stored)
        self._known[(database, key)] = int.from_bytes(digest, "big")
        return payload

    def contains(self, database: str, key: bytes) -> bool:
        """Whether a record is stored under `key`, its value unchecked: a read-ahead's walk to the record's
        pages (py-lmdb lets go of the GIL while LMDB walks, so a page fault here holds up no other thread)."""
        return self._transaction.get(key, db=self._databases[database]) is not None

    def _old_hash(self, database: str, key: bytes) -> int:
        known = self._known.get((database, key))
        if known is not None:
            return known
        stored = self._transaction.get(key, db=self._databases[database])
        if stored is None:
            return 0
        return int.from_bytes(_unseal(_prefixes[database], key, stored)[1], "big")

    def put(self, database: str, key: bytes, payload: bytes) -> None:
        """Write a state record and move the state hash from its old value to its new one."""
        old = self._old_hash(database, key)
        digest = _record_digest(_prefixes[database], key, payload)
        new = int.from_bytes(digest, "big")
        self._known[(database, key)] = new
        self._state_hash = (self._current_state_hash() - old + new) % state_hash_modulus
        self._state_hash_changed = True
        self._transaction.put(key, payload + digest[:value_checksum_bytes], db=self._databases[database])

    def insert(self, database: str, key: bytes, payload: bytes) -> None:
        """`put` for a record the caller expects to be new (history, a transfer's first outcome, a tree
        node): skips reading an old value, and falls back to `put` if there was one after all."""
        digest = _record_digest(_prefixes[database], key, payload)
        if not self._transaction.put(key, payload + digest[:value_checksum_bytes], db=self._databases[database], overwrite=False):
            self.put(database, key, payload)
            return
        new = int.from_bytes(digest, "big")
        self._known[(database, key)] = new
        self._state_hash = (self._current_state_hash() + new) % state_hash_modulus
        self._state_hash_changed = True

    def delete(self, database: str, key: bytes) -> bool:
        """Remove a state record, taking its contribution out of the state hash."""
        old = self._old_hash(database, key)
        if not self._transaction.delete(key, db=self._databases[database]):
            return False
        self._known.pop((database, key), None)
        self._state_hash = (self._current_state_hash() - old) % state_hash_modulus
        self._state_hash_changed = True
        return True

    def items(self, database: str, prefix: bytes = b"", start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Records whose key starts with `prefix`, in key order, from `start` (default: the prefix)."""
        name = database.encode()
        with self._transaction.cursor(db=self._databases[database]) as cursor:
            if not cursor.set_range(prefix if start is None else start):
                return
            for key, stored in cursor:
                if not key.startswith(prefix):
                    return
                yield key, _open(name, key, stored)

    def items_reverse(self, database: str, prefix: bytes, before: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Records whose key starts with `prefix` and sorts strictly before `before`, newest key first."""
        name = database.encode()
        with self._transaction.cursor(db=self._databases[database]) as cursor:
            if cursor.set_range(before):
                found = cursor.prev()
            else:
                found = cursor.last()
            while found:
                key = cursor.key()
                if not key.startswith(prefix):
                    return
                if key < before:
                    yield key, _open(name, key, cursor.value())
                found = cursor.prev()

    # Meta ----------------------------------------------------------------------------------------------

    def _get_meta(self, key: bytes) -> bytes | None:
        return self.get("meta", key)

    def _put_meta(self, key: bytes, payload: bytes) -> None:
        self.put_unhashed("meta", key, payload)

    def put_unhashed(self, database: str, key: bytes, payload: bytes) -> None:
        """Write a sealed record that is about the state, not state: it is not part of the state hash."""
        if database not in _unhashed_database_names:
            raise ValueError(f"{database} is part of the state hash; use put()")
        self._transaction.put(key, _seal(database.encode(), key, payload), db=self._databases[database])

    def _meta_int(self, key: bytes) -> int:
        payload = self._get_meta(key)
        return 0 if payload is None else _u64.unpack(payload)[0]

    def _current_state_hash(self) -> int:
        if self._state_hash is None:
            payload = self._get_meta(_meta_state_hash)
            self._state_hash = 0 if payload is None else int.from_bytes(payload, "big")
        return self._state_hash

    def applied_index(self) -> int:
        return self._meta_int(_meta_applied_index)

    def set_applied_index(self, index: int) -> None:
        self._put_meta(_meta_applied_index, _u64.pack(index))

    def cluster_time_ms(self) -> int:
        return self._meta_int(_meta_cluster_time)

    def set_cluster_time_ms(self, value: int) -> None:
        self._put_meta(_meta_cluster_time, _u64.pack(value))

    def take_account_number(self) -> int:
        number = self._meta_int(_meta_next_account_number) + 1
        self._put_meta(_meta_next_account_number, _u64.pack(number))
        return number

    def state_hash(self) -> bytes:
        return self._current_state_hash().to_bytes(state_hash_bytes, "big")

    def summary(self) -> StateSummary:
        return StateSummary(
            applied_index=self.applied_index(),
            state_hash=self.state_hash(),
            cluster_time_ms=self.cluster_time_ms(),
        )

    def identity(self) -> tuple[str, bytes] | None:
        """(cluster id, genesis digest) this state was initialised for, or None for an empty store."""
        cluster = self._get_meta(_meta_cluster_id)
        if cluster is None:
            return None
        digest = self._get_meta(_meta_genesis_digest) or b""
        return cluster.decode(), digest

    def stored_schema_version(self) -> int | None:
        """The layout version the state was written with (None for an empty store)."""
        stored = self._get_meta(_meta_schema_version)
        return None if stored is None else _u64.unpack(stored)[0]

    def set_identity(self, cluster_id: str, genesis_digest: bytes) -> None:
        self._put_meta(_meta_cluster_id, cluster_id.encode())
        self._put_meta(_meta_genesis_digest, genesis_digest)
        self._put_meta(_meta_schema_version, _u64.pack(schema_version))

    def recompute_state_hash(self) -> bytes:
        """The state hash computed from every record, to compare with the running value."""
        total = 0
        for database in _state_database_names:
            name = database.encode()
            with self._transaction.cursor(db=self._databases[database]) as cursor:
                for key, stored in cursor:
                    total += _record_hash(name, key, _open(name, key, stored))
        return (total % state_hash_modulus).to_bytes(state_hash_bytes, "big")

    def verify_records(self) -> bytes:
        """Check a whole environment received from elsewhere (a snapshot image) and return the state hash of
        its records: it holds no database this version does not know, and every record of every database
        passes its checksum."""
        with self._transaction.cursor() as names:
            for name in names.iternext(keys=True, values=False):
                if name.decode(errors="replace") not in self._databases:
                    raise StorageCorrupted(f"snapshot holds a database this version does not know: {name!r}")
        for database in _unhashed_database_names:
            name = database.encode()
            with self._transaction.cursor(db=self._databases[database]) as cursor:
                for key, stored in cursor:
                    _open(name, key, stored)
        return self.recompute_state_hash()


def write_environment_in_full_pages(source: StateTransaction, directory: Path, *, map_size_bytes: int) -> int:
    """Copy every record `source` reads into a new environment in `directory`, in write transactions of at
    most `copy_transaction_bytes_max` of records; returns the records copied. The environment is synced
    once at the end and closed, ready for LedgerStore.replace_with.

    Appended in key order, so LMDB fills each page before it starts the next: the copy holds its records in
    as few pages as `compact` would leave, whatever the source's pages (LMDB's own compact copy keeps each
    page as it was: a source whose pages are half empty would stay so). Bounded, because a write
    transaction keeps every page it changes in heap and LMDB keeps those pages afterwards for later ones:
    copying a state of a few hundred MiB in one transaction would take as much heap for the life of the
    process, more than a node limited to 300 MB has."""
    directory.mkdir(parents=True, exist_ok=True)
    # Synced once at the end: a crash before it leaves a scratch directory the install starts again from.
    environment = open_environment(
        directory, map_size_bytes=map_size_bytes, sync=False, metasync=False, databases_max=databases_max
    )
    copied = 0
    try:
        for name in _database_names:
            target = environment.open_db(name.encode(), create=True)
            with source._transaction.cursor(db=source._databases[name]) as cursor:
                records = cursor.iternext(keys=True, values=True)
                while True:
                    chunk, chunk_bytes = [], 0
                    for key, stored in records:
                        chunk.append((key, stored))
                        chunk_bytes += len(key) + len(stored)
                        if chunk_bytes >= copy_transaction_bytes_max:
                            break
                    if not chunk:
                        break
                    with environment.begin(write=True) as transaction, transaction.cursor(target) as appender:
                        consumed, added = appender.putmulti(chunk, append=True)
                    if consumed != added:
                        raise StorageCorrupted(f"records of {name!r} did not arrive in key order")
                    copied += added
        environment.sync(True)
    finally:
        environment.close()
    return copied


def _retired_path(path: Path) -> Path:
    return path.with_name(path.name + ".retired")


# Versions before 40e2da7 received a snapshot into `.install-*` beside the state (one held the whole image,
# up to the state's size): a node upgraded after a crash cut such an install short still removes it.
_older_replacement_scratch_prefix = ".install-"


def replacement_scratch_prefix(path: Path) -> str:
    """The name prefix of the scratch directories, beside the state at `path`, its replacement is built in."""
    return f".{path.name}.install-"


def _finish_interrupted_replacement(path: Path) -> None:
    """Complete or undo a LedgerStore.replace_with that a crash interrupted, before the state is opened, and
    remove the scratch directories of installs a crash cut short (each up to twice the state's size)."""
    for prefix in (replacement_scratch_prefix(path), _older_replacement_scratch_prefix):
        for scratch in path.parent.glob(prefix + "*"):
            shutil.rmtree(scratch)
    retired = _retired_path(path)
    if not retired.exists():
        return
    if path.exists():
        shutil.rmtree(retired)  # the new state was in place: the retired one is what the crash left
    else:
        os.rename(retired, path)  # between the renames: the old state is still whole
    sync_directory(path.parent)


def open_store(data_dir: Path, *, map_size_bytes: int, sync: bool = True) -> LedgerStore:
    """Open (creating if needed) the state environment under `data_dir/state`."""
    path = data_dir / "state"
    os.makedirs(path, exist_ok=True)
    return LedgerStore(path, map_size_bytes=map_size_bytes, sync=sync)
