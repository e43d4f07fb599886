"""`tonle chaos`: a Jepsen-style bank test that injects faults into a local network and checks the ledger after."""

from __future__ import annotations

import argparse
import asyncio
import bisect
import errno
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lmdb
from nacl.signing import SigningKey

from config.loader import load_genesis
from config.render import render_genesis
from config.schema import Address, NodeSpec
from consensus.entries import AccountFlags, OpenAccount, Transfer, sign_entry
from consensus.raft.journal import digest_bytes, file_header, record_header
from node.cli_support import exit_code_failure, json_default
from node.client import AsyncClient, Client, ClientError, new_transfer_id, retry_backoff_seconds
from node.cluster import ClusterError, LocalCluster, local_raft
from node.indexer import check_index, index_check_document
from node.netns import NamespaceNetwork, NetworkError, unavailable_reason
from node.protocol import STATUS_APPLIED, STATUS_REJECTED, STATUS_UNKNOWN, retryable_errors
from storage.entry_hashes import IndexCheck
from storage.state import StorageCorrupted
from storage.state import databases_max as state_databases_max
from storage.state import value_checksum_bytes

# What can be injected. The CI subset is what `.ci/run` runs on every push (under 10 minutes in total).
nemesis_names = ("partition", "kill", "pause", "clock", "disk-full", "fsync", "bitflip")
ci_nemeses = ("partition", "kill", "pause", "disk-full")
nemesis_variants: dict[str, tuple[str, ...]] = {
    "partition": ("leader-isolated", "majority-split", "one-way"),
    "kill": ("leader", "follower", "replica", "all"),
    "pause": ("leader", "follower"),
    # libfaketime settings: a wall-clock offset, then the rate at which every clock of the process runs.
    "clock": ("+1h x2", "-1d x0.5", "+15m x3", "-2h x1"),
    "disk-full": ("ballast",),
    "fsync": ("leader", "follower"),
    "bitflip": ("journal", "state"),
}
# How long each fault lasts (seconds, drawn from the range): long enough for its effect to show, e.g. an
# isolated leader stepping down after leader_fallback_timeout_ms (2.5 s on local networks).
fault_seconds: dict[str, tuple[float, float]] = {
    "partition": (6.0, 9.0),
    "kill": (2.0, 4.0),
    "pause": (4.0, 6.0),
    "clock": (8.0, 11.0),
    "disk-full": (6.0, 8.0),
    "fsync": (5.0, 7.0),
    "bitflip": (6.0, 8.0),
}

# Run limits.
duration_seconds_min = 15.0
duration_seconds_max = 6 * 3600.0
validators_min = 3  # a majority split needs a minority that is not everyone
validators_max = 7
workers_min = 1
workers_max = 64
workers_default = 6
warmup_seconds = 4.0
tail_seconds = 3.0
fault_gap_seconds = (2.0, 4.0)
# Spacing the planner leaves after each fault for the network to recover before the next one.
recovery_allowance_seconds = 3.0

# Workload mix (fractions of operations) and shape.
read_fraction = 0.15
duplicate_fraction = 0.05
conflict_fraction = 0.01
overdraft_fraction = 0.02
retry_fraction = 0.05
transfer_amount_max = 100
overdraft_amount = 10**15
think_seconds = 0.05
client_timeout_seconds = 3.0
submit_deadline_seconds = 8.0
conflict_amount_step_max = 50

# Waits. Each is generous: the machine has two cores shared with other test runs.
recovery_timeout_seconds = 90.0
convergence_timeout_seconds = 120.0
liveness_deadline_seconds = 30.0
probe_interval_seconds = 0.5
poll_seconds = 0.2
lookup_requests_in_flight_max = 64
history_page_entries = 1000

# Fault mechanics.
# Chaos networks compact their Raft log every 1,000 entries instead of 5,000, so that snapshot installs
# happen during a run (a node that falls behind a compaction can only catch up through one).
chaos_log_compaction_entries = 1000
# The state bit flip waits for the leader's next compaction (1,000 entries take well under this).
compaction_wait_seconds = 45.0
namespace_ports = {"raft": 7100, "client": 7101, "admin": 7102}
small_disk_bytes = 128 << 20
# The ballast takes every free block, so the node's next new block fails with ENOSPC (leaving a little room
# instead gives LMDB short writes, which it reports as EIO).
ballast_chunk_bytes = 1 << 20
ballast_chunk_bytes_min = 4096
fsync_failure_probability = 0.05
faketime_library = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
fiu_libraries = (Path("/usr/lib/fiu/fiu_run_preload.so"), Path("/usr/lib/fiu/fiu_posix_preload.so"))
clock_offset_tolerance_seconds = 60.0
fatal_exit_code = 70  # node.server.fatal_exit_code: the node stopped itself on purpose
killed_exit_code = -9
examples_max = 5

source_packages = ("node", "consensus", "storage", "config")
history_file_name = "chaos-history.jsonl"
report_file_name = "chaos-report.json"

_transfer_kinds = ("transfer", "duplicate", "conflict", "overdraft", "retry", "probe")
_serving_line = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .* serving: ")
_offset_pattern = re.compile(r"^([+-])(\d+)([smhd]?)")
_offset_unit_seconds = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ChaosError(RuntimeError):
    """A chaos run could not be set up or driven (not a broken invariant: those are in the report)."""


# Plans and records ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChaosOptions:
    directory: Path
    seed: int
    duration_seconds: float
    nemeses: tuple[str, ...] = nemesis_names
    validators: int = 3
    workers: int = workers_default
    namespaces: bool = True  # False forces loopback even where namespaces work

    def validate(self) -> None:
        unknown = [name for name in self.nemeses if name not in nemesis_names]
        if unknown:
            raise ValueError(f"unknown nemeses {unknown}; known: {', '.join(nemesis_names)}")
        if not self.nemeses:
            raise ValueError("name at least one nemesis")
        if not duration_seconds_min <= self.duration_seconds <= duration_seconds_max:
            raise ValueError(
                f"duration must be {duration_seconds_min:g}..{duration_seconds_max:g} s, got {self.duration_seconds:g}"
            )
        if not validators_min <= self.validators <= validators_max:
            raise ValueError(f"validators must be {validators_min}..{validators_max}, got {self.validators}")
        if not workers_min <= self.workers <= workers_max:
            raise ValueError(f"workers must be {workers_min}..{workers_max}, got {self.workers}")
        if not plan_faults(self.seed, self.nemeses, self.duration_seconds):
            raise ValueError(f"no fault of {', '.join(self.nemeses)} fits in {self.duration_seconds:g} s: run longer")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """One fault of the schedule: what, which variant, and when at the earliest (seconds into the run)."""

    kind: str
    variant: str
    role: str  # which node it targets once resolved against the live network: leader, follower, replica, all
    start_seconds: float
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """What a fault did: its targets, when it started and healed, how long recovery took, and the evidence
    that it really happened (a passing run with faults that had no effect proves nothing)."""

    kind: str
    variant: str
    targets: tuple[str, ...]
    started_seconds: float
    healed_seconds: float
    recovery_seconds: float | None
    happened: bool
    evidence: Mapping[str, Any]

    def document(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "variant": self.variant,
            "targets": list(self.targets),
            "started_seconds": round(self.started_seconds, 3),
            "healed_seconds": round(self.healed_seconds, 3),
            "recovery_seconds": None if self.recovery_seconds is None else round(self.recovery_seconds, 3),
            "happened": self.happened,
            "evidence": dict(self.evidence),
        }


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation of the history: invoked and completed in seconds since the workload started."""

    kind: str
    worker: int
    node: str
    outcome: str  # ok, fail (definitely not applied as sent), info (unknown)
    result: str
    invoked_seconds: float
    completed_seconds: float
    transfer_id: bytes | None = None
    entry: bytes | None = None
    index: int | None = None
    balances: tuple[tuple[str, int], ...] = ()

    def document(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "worker": self.worker, "node": self.node, "outcome": self.outcome,
            "result": self.result, "invoked": round(self.invoked_seconds, 4), "completed": round(self.completed_seconds, 4),
            "id": None if self.transfer_id is None else self.transfer_id.hex(), "index": self.index,
            **({"balances": dict(self.balances)} if self.balances else {}),
        }


def plan_faults(seed: int, nemeses: Sequence[str], duration_seconds: float) -> tuple[FaultPlan, ...]:
    """The schedule a seed draws: nemeses take turns in a seeded order, each cycling through its variants,
    with faults and gaps of seeded lengths, until the run has no room for another before its tail."""
    generator = random.Random(f"{seed}/plan")
    order = list(dict.fromkeys(nemeses))
    generator.shuffle(order)
    queues = {}
    for kind in order:
        variants = list(nemesis_variants[kind])
        generator.shuffle(variants)
        queues[kind] = deque(variants)
    plans: list[FaultPlan] = []
    clock = warmup_seconds
    for turn in itertools.count():
        kind = order[turn % len(order)]
        length = round(generator.uniform(*fault_seconds[kind]), 2)
        gap = generator.uniform(*fault_gap_seconds)
        if clock + length + tail_seconds > duration_seconds:
            break
        variant = queues[kind][0]
        queues[kind].rotate(-1)
        plans.append(FaultPlan(kind, variant, _role_of(kind, variant, generator), round(clock, 2), length))
        clock += length + gap + recovery_allowance_seconds
    return tuple(plans)


def _role_of(kind: str, variant: str, generator: random.Random) -> str:
    if kind in ("kill", "pause", "fsync"):
        return variant
    if kind == "clock":
        return generator.choice(("leader", "follower"))
    if kind == "partition":
        return "all" if variant == "majority-split" else "leader"
    if kind == "bitflip":
        return "follower"
    return "fixed"


# The network under test ------------------------------------------------------------------------------


class ChaosCluster(LocalCluster):
    """A LocalCluster whose nodes may each run inside a network namespace and under extra environment
    variables (libfaketime, libfiu) set per node for as long as a fault lasts."""

    def __init__(self, directory: Path, description: dict[str, Any]) -> None:
        super().__init__(directory, description)
        self.network: NamespaceNetwork | None = None
        self.node_environment: dict[str, dict[str, str]] = {}

    def start(self, names: Iterable[str] | None = None, *, environment: dict[str, str] | None = None) -> None:
        for name in list(names) if names is not None else list(self.nodes):
            node = self.nodes[name]
            if self.is_running(name):
                continue
            prefix = self.network.command_prefix(name) if self.network is not None else []
            with open(node.log, "ab") as log:
                process = subprocess.Popen(
                    [*prefix, sys.executable, "-m", "node", "node", "start", "--config", str(node.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={
                        **os.environ, "PYTHONUNBUFFERED": "1", **self.node_environment.get(name, {}), **(environment or {})
                    },
                )
            node.pid = process.pid
            self._processes[name] = process
        self.save()

    def exit_code(self, name: str) -> int | None:
        """The exit status of a node this object started and that has ended (None while it runs)."""
        process = self._processes.get(name)
        return None if process is None else process.poll()

    def kill_reporting(self, names: Sequence[str]) -> dict[str, int | None]:
        """SIGKILL `names`; return how each process ended (-9 when the kill did it)."""
        processes = {name: self._processes.get(name) for name in names}
        self.kill(names)
        return {name: None if process is None else process.returncode for name, process in processes.items()}

    def log_size(self, name: str) -> int:
        try:
            return self.nodes[name].log.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, name: str, offset: int) -> str:
        try:
            with open(self.nodes[name].log, "rb") as source:
                source.seek(offset)
                return source.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


def _move_into_namespaces(cluster: ChaosCluster, network: NamespaceNetwork) -> None:
    """Give every node its namespace's address (fixed ports) in the genesis and cluster.json. Only for a
    network that never started: the genesis digest is part of every node's state."""
    genesis_path = Path(cluster.description["genesis"])
    genesis = load_genesis(genesis_path)

    def moved(spec: NodeSpec) -> NodeSpec:
        host = network.address(spec.name)
        return replace(
            spec,
            raft_address=Address(host, namespace_ports["raft"]),
            client_address=Address(host, namespace_ports["client"]),
            admin_address=Address(host, namespace_ports["admin"]),
        )

    genesis = replace(
        genesis,
        validators=tuple(moved(spec) for spec in genesis.validators),
        institution_nodes=tuple(moved(spec) for spec in genesis.institution_nodes),
    )
    genesis_path.write_text(render_genesis(genesis))
    for spec in genesis.nodes:
        node = cluster.nodes[spec.name]
        node.raft_address = str(spec.raft_address)
        node.client_address = str(spec.client_address)
        node.admin_address = str(spec.admin_address)
    cluster.save()


class SmallDisk:
    """One node's data directory on a small tmpfs, so that a ballast file can fill it (the disk-full nemesis)."""

    def __init__(self, node: str, data_dir: Path) -> None:
        self.node = node
        self.data_dir = data_dir
        self.ballast = data_dir / "chaos-ballast"
        self._aside = data_dir.with_name(data_dir.name + ".on-disk")

    def mount(self) -> None:
        """Mount the tmpfs (the node must be stopped); data already there moves onto it."""
        if self.data_dir.exists():
            self.data_dir.rename(self._aside)
        self.data_dir.mkdir(parents=True)
        _checked(["mount", "-t", "tmpfs", "-o", f"size={small_disk_bytes},mode=0700", "tmpfs", str(self.data_dir)])
        if self._aside.exists():
            shutil.copytree(self._aside, self.data_dir, dirs_exist_ok=True)
            shutil.rmtree(self._aside)

    def fill(self) -> int:
        """Grow the ballast until the file system refuses another block; return its size. Called again
        while the fault lasts: the node frees blocks too (a log compaction replaces the journal file)."""
        descriptor = os.open(self.ballast, os.O_CREAT | os.O_WRONLY, 0o600)
        size = os.fstat(descriptor).st_size
        chunk = ballast_chunk_bytes
        try:
            while chunk >= ballast_chunk_bytes_min:
                try:
                    os.posix_fallocate(descriptor, size, chunk)
                    size += chunk
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
        finally:
            os.close(descriptor)
        return size

    def drain(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def unmount(self) -> None:
        """Copy the data back onto the real disk and unmount (the node must be stopped)."""
        if not os.path.ismount(self.data_dir):
            return
        self.drain()
        shutil.copytree(self.data_dir, self._aside, dirs_exist_ok=True)
        try:
            _checked(["umount", str(self.data_dir)])
        except ChaosError:
            _checked(["umount", "-l", str(self.data_dir)])
        self.data_dir.rmdir()
        self._aside.rename(self.data_dir)


def _checked(command: list[str]) -> str:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if completed.returncode != 0:
        raise ChaosError(f"{' '.join(command)} exited {completed.returncode}: {completed.stderr.strip()}")
    return completed.stdout


# Workload ---------------------------------------------------------------------------------------------


def classify(reply: Mapping[str, Any]) -> str:
    """ok: the entry is applied (now or before, `exists`); fail: it definitely is not, as sent; info: unknown.

    An intake refusal for a retryable reason (no leader, busy) says nothing about an earlier attempt of
    the same bytes, so it is info, not fail.
    """
    if reply["status"] == STATUS_APPLIED:
        return "ok" if reply["result"] in ("ok", "exists") else "fail"
    if reply["status"] == STATUS_REJECTED and reply["result"] not in retryable_errors:
        return "fail"
    return "info"


def _needs_another_attempt(reply: Mapping[str, Any]) -> bool:
    return reply["status"] == STATUS_UNKNOWN or (reply["status"] == STATUS_REJECTED and reply["result"] in retryable_errors)


class _Session:
    """One client's view of the network: a connection per node, failing over to the next node whenever
    an attempt's outcome is unknown, always resubmitting the same bytes."""

    def __init__(self, cluster: LocalCluster, names: Sequence[str], position: int) -> None:
        self._cluster = cluster
        self._names = list(names)
        self._position = position % len(self._names)
        self._clients: dict[str, Client] = {}

    @property
    def current(self) -> str:
        return self._names[self._position]

    def client(self, name: str) -> Client:
        if name not in self._clients:
            self._clients[name] = Client(self._cluster.nodes[name].client_address, timeout_seconds=client_timeout_seconds)
        return self._clients[name]

    def submit(self, entry: bytes, deadline_seconds: float = submit_deadline_seconds) -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + deadline_seconds
        attempt = 0
        while True:
            name = self.current
            try:
                (reply,) = self.client(name).submit_raw([entry])
            except ClientError as error:
                reply = {"status": STATUS_UNKNOWN, "result": error.code, "index": None}
            if not _needs_another_attempt(reply) or time.monotonic() >= deadline:
                return name, reply
            self._position = (self._position + 1) % len(self._names)
            time.sleep(retry_backoff_seconds[min(attempt, len(retry_backoff_seconds) - 1)])
            attempt += 1

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


class Registry:
    """Every transfer entry the workload signed, by bytes and by id, and the ones whose outcome is unknown."""

    def __init__(self) -> None:
        self.bodies: dict[bytes, Transfer] = {}
        self.by_id: dict[bytes, list[bytes]] = {}
        self.pending: dict[bytes, None] = {}  # raw entries last seen with an unknown outcome, oldest first
        self._order: list[bytes] = []
        self._lock = threading.Lock()

    def add(self, entry: bytes, body: Transfer) -> None:
        with self._lock:
            if entry not in self.bodies:
                self.bodies[entry] = body
                self.by_id.setdefault(body.id, []).append(entry)
                self._order.append(entry)

    def settle(self, entry: bytes, outcome: str) -> None:
        with self._lock:
            if outcome == "info":
                self.pending[entry] = None
            else:
                self.pending.pop(entry, None)

    def any_entry(self, generator: random.Random) -> bytes | None:
        with self._lock:
            return generator.choice(self._order) if self._order else None

    def take_pending(self) -> bytes | None:
        with self._lock:
            if not self.pending:
                return None
            entry = next(iter(self.pending))
            del self.pending[entry]
            return entry


class Workload:
    """Concurrent clients of transfers (with deliberate duplicates, same-id-different-body conflicts,
    overdrafts that must fail and retries of unknown outcomes under the same id) and linearizable reads."""

    def __init__(self, cluster: LocalCluster, seed: int, workers: int, keys: Mapping[str, SigningKey]) -> None:
        self.cluster = cluster
        self.registry = Registry()
        self.operations: list[Operation] = []
        self._seed = seed
        self._keys = keys
        self._accounts = {account["account"]: account["currency"] for account in cluster.customer_accounts()}
        self._by_currency: dict[str, list[str]] = {}
        for account, currency in self._accounts.items():
            self._by_currency.setdefault(currency, []).append(account)
        self._currencies = sorted(currency for currency, names in self._by_currency.items() if len(names) >= 2)
        if not self._currencies:
            raise ChaosError("the network needs two customer accounts in one currency")
        self._nodes = list(cluster.nodes)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._origin = time.monotonic()
        self._threads = [threading.Thread(target=self._work, args=(number,), daemon=True, name=f"chaos-worker-{number}")
                         for number in range(workers)]

    @property
    def accounts(self) -> Mapping[str, str]:
        return self._accounts

    def clock(self) -> float:
        return time.monotonic() - self._origin

    def start(self, origin: float) -> None:
        self._origin = origin
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=submit_deadline_seconds * 4 + 30)

    def _record(self, operation: Operation) -> None:
        with self._lock:
            self.operations.append(operation)

    def _sign(self, body: Transfer | OpenAccount, signer: str) -> bytes:
        return sign_entry(body, cluster_id=self.cluster.cluster_id, signer=signer, signing_key=self._keys[signer])

    def _work(self, number: int) -> None:
        generator = random.Random(f"{self._seed}/worker/{number}")
        session = _Session(self.cluster, self._nodes, number)
        try:
            while not self._stop.is_set():
                self._record(self._one_operation(session, generator, number))
                self._stop.wait(think_seconds)
        finally:
            session.close()

    def _one_operation(self, session: _Session, generator: random.Random, number: int) -> Operation:
        draw = generator.random()
        if draw < read_fraction:
            return self._read(session, generator, number)
        draw -= read_fraction
        if draw < duplicate_fraction and (entry := self.registry.any_entry(generator)) is not None:
            return self._submit("duplicate", entry, session, number)
        draw -= duplicate_fraction
        if draw < conflict_fraction and (entry := self.registry.any_entry(generator)) is not None:
            return self._submit("conflict", self._conflicting(entry, generator), session, number)
        draw -= conflict_fraction
        if draw < overdraft_fraction:
            return self._submit("overdraft", self._new_transfer(generator, overdraft_amount), session, number)
        draw -= overdraft_fraction
        if draw < retry_fraction and (entry := self.registry.take_pending()) is not None:
            return self._submit("retry", entry, session, number)
        entry = self._new_transfer(generator, generator.randint(1, transfer_amount_max))
        return self._submit("transfer", entry, session, number)

    def _new_transfer(self, generator: random.Random, amount: int) -> bytes:
        currency = generator.choice(self._currencies)
        debit, credit = generator.sample(self._by_currency[currency], 2)
        body = Transfer(new_transfer_id(), debit, credit, amount, currency)
        entry = self._sign(body, debit.rpartition("@")[2])
        self.registry.add(entry, body)
        return entry

    def _conflicting(self, entry: bytes, generator: random.Random) -> bytes:
        """The same id as an earlier entry with a different amount: must never apply beside it."""
        original = self.registry.bodies[entry]
        body = replace(original, amount=original.amount + generator.randint(1, conflict_amount_step_max))
        conflicting = self._sign(body, body.debit_account.rpartition("@")[2])
        self.registry.add(conflicting, body)
        return conflicting

    def _submit(self, kind: str, entry: bytes, session: _Session, number: int,
                deadline_seconds: float = submit_deadline_seconds) -> Operation:
        body = self.registry.bodies[entry]
        invoked = self.clock()
        node, reply = session.submit(entry, deadline_seconds)
        outcome = classify(reply)
        self.registry.settle(entry, outcome)
        return Operation(kind, number, node, outcome, str(reply["result"]), invoked, self.clock(), body.id, entry,
                         reply.get("index"))

    def _read(self, session: _Session, generator: random.Random, number: int) -> Operation:
        """A read through the log: a barrier entry that changes nothing, then every balance as of the index
        the barrier applied at, from the node that answered (it has applied at least that far)."""
        account = generator.choice(sorted(self._accounts))
        # A fresh user_data makes each barrier unique: identical barriers share one outcome key on a node,
        # so a lagging node could answer a new read with an old barrier's index (a stale read).
        barrier = OpenAccount(account, self._accounts[account], tier="full", user_data=os.urandom(16))
        invoked = self.clock()
        node, reply = session.submit(self._sign(barrier, account.rpartition("@")[2]))
        if reply["status"] != STATUS_APPLIED:
            return Operation("read", number, node, "info", str(reply["result"]), invoked, self.clock())
        index = int(reply["index"])
        balances = []
        try:
            client = session.client(node)
            for name in sorted(self._accounts):
                found = client.balance(name, as_of_index=index)
                if found is None or found["applied_index"] < index:
                    return Operation("read", number, node, "info", "behind_barrier", invoked, self.clock(), index=index)
                balances.append((name, int(found["balance"])))
        except ClientError as error:
            return Operation("read", number, node, "info", error.code, invoked, self.clock(), index=index)
        return Operation("read", number, node, "ok", str(reply["result"]), invoked, self.clock(), index=index,
                         balances=tuple(balances))

    def probe(self, deadline_seconds: float) -> Operation:
        """One transfer after the final heal, to show the network commits again (liveness)."""
        session = _Session(self.cluster, self._nodes, 0)
        try:
            entry = self._new_transfer(random.Random(f"{self._seed}/probe"), 1)
            operation = self._submit("probe", entry, session, -1, deadline_seconds)
        finally:
            session.close()
        self._record(operation)
        return operation


# Checker ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Baseline:
    """The workload accounts before the workload: balances at `index`, currencies, overdraft rules."""

    index: int
    balances: Mapping[str, int]
    currencies: Mapping[str, str]
    negative_forbidden: frozenset[str]

    def total(self, currency: str) -> int:
        return sum(amount for account, amount in self.balances.items() if self.currencies[account] == currency)


@dataclass(frozen=True, slots=True)
class AppliedTransfer:
    """A transfer id's record on a node: its result, log index, the entry bytes that applied, what moved."""

    result: str
    index: int
    entry: bytes
    amount: int


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the checker reads from one node after healing."""

    name: str
    applied_index: int
    state_hash: str
    balances: Mapping[str, int]
    totals: Mapping[str, Mapping[str, int]]
    transfers: Mapping[bytes, AppliedTransfer | None]
    history: Mapping[str, tuple[tuple[bytes, int, int], ...]]  # account: (transfer id, index, amount) after baseline


@dataclass(frozen=True, slots=True)
class Verdict:
    counts: Mapping[str, int]
    invariants: Mapping[str, bool]
    examples: Mapping[str, tuple[str, ...]]


class _Findings:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, name: str, example: str, count: int = 1) -> None:
        self.counts[name] += count
        examples = self.examples.setdefault(name, [])
        if len(examples) < examples_max:
            examples.append(example)


def check(baseline: Baseline, bodies: Mapping[bytes, Transfer], operations: Sequence[Operation],
          states: Sequence[NodeState], positions: Mapping[str, tuple[int, str]]) -> Verdict:
    """research/reliability.md §6.4 over a history and the final state of every node.

    I1 conservation per currency at every read and on every node; I2 no negative balance where forbidden;
    I3 no acknowledged transfer missing; I4 none applied twice; I5 nothing applied that was refused or
    never submitted; I6 convergence (`positions`: every node's applied index and state hash, read at one
    moment after healing) and agreement with a replay of the applied ids; I7 reads equal the state at
    their log index and respect real-time order.
    """
    findings = _Findings()
    acknowledged: dict[bytes, set[bytes]] = {}
    refused: set[bytes] = set()
    for operation in operations:
        if operation.kind in _transfer_kinds and operation.entry is not None:
            if operation.outcome == "ok":
                acknowledged.setdefault(operation.transfer_id, set()).add(operation.entry)
            elif operation.outcome == "fail":
                refused.add(operation.entry)
    lost: set[bytes] = set()
    duplicated: set[bytes] = set()
    for state in states:
        lost |= _check_acknowledged(state, acknowledged, findings)
        _check_refused(state, refused, bodies, findings)
        _check_phantoms(state, baseline, bodies, findings)
        duplicated |= _check_duplicates(state, findings)
        _check_model(state, baseline, bodies, findings)
        _check_final_balances(state, baseline, findings)
    if not positions or len(set(positions.values())) > 1:
        findings.add("diverged", ", ".join(f"{name}@{index}:{digest[:12]}" for name, (index, digest) in positions.items()))
    if states:
        _check_reads(baseline, bodies, operations, states[0], findings)
    counts = {
        "acknowledged": len(acknowledged),
        "lost": len(lost),
        "duplicated": len(duplicated),
        **{name: findings.counts[name] for name in _finding_names},
        "reads_ok": sum(1 for operation in operations if operation.kind == "read" and operation.outcome == "ok"),
    }
    invariants = {
        "conservation": findings.counts["read_total_wrong"] == 0 and findings.counts["final_total_wrong"] == 0,
        "no_negative_balance": findings.counts["read_negative"] == 0 and findings.counts["final_negative"] == 0,
        "no_lost_acknowledged": not lost,
        "no_duplicate_application": not duplicated,
        "no_phantom_or_refused_applied": findings.counts["phantom"] == 0 and findings.counts["refused_applied"] == 0,
        "model_agreement": findings.counts["model_mismatch"] == 0,
        "reads_linearizable": findings.counts["read_stale"] == 0 and findings.counts["read_real_time"] == 0,
        "converged": findings.counts["diverged"] == 0,
    }
    return Verdict(counts, invariants, {name: tuple(values) for name, values in findings.examples.items()})


_finding_names = ("phantom", "refused_applied", "model_mismatch", "final_total_wrong", "final_negative", "diverged",
                  "read_total_wrong", "read_negative", "read_stale", "read_real_time")


def _check_acknowledged(state: NodeState, acknowledged: Mapping[bytes, set[bytes]], findings: _Findings) -> set[bytes]:
    lost = set()
    for transfer_id, entries in acknowledged.items():
        record = state.transfers.get(transfer_id)
        for entry in entries:
            if record is None or record.result != "ok" or record.entry != entry:
                lost.add(transfer_id)
                body = "same" if record is not None and record.entry == entry else "other"
                found = "absent" if record is None else f"{record.result}, {body} body"
                findings.add("lost_on_" + state.name, f"{transfer_id.hex()} acknowledged, {found}")
    return lost


def _check_refused(state: NodeState, refused: set[bytes], bodies: Mapping[bytes, Transfer], findings: _Findings) -> None:
    for entry in refused:
        body = bodies.get(entry)
        record = None if body is None else state.transfers.get(body.id)
        if record is not None and record.result == "ok" and record.entry == entry:
            findings.add("refused_applied", f"{state.name}: {body.id.hex()} was refused but is applied")


def _check_phantoms(state: NodeState, baseline: Baseline, bodies: Mapping[bytes, Transfer], findings: _Findings) -> None:
    submitted = {body.id for body in bodies.values()}
    for account, events in state.history.items():
        for transfer_id, index, _amount in events:
            if index > baseline.index and transfer_id not in submitted:
                findings.add("phantom", f"{state.name}: {account} moved by {transfer_id.hex()} at {index}, never submitted")
    for transfer_id, record in state.transfers.items():
        if record is not None and record.result == "ok" and record.entry not in bodies:
            findings.add("phantom", f"{state.name}: {transfer_id.hex()} applied with a body never submitted")


def _check_duplicates(state: NodeState, findings: _Findings) -> set[bytes]:
    duplicated = set()
    for account, events in state.history.items():
        for transfer_id, times in Counter(transfer_id for transfer_id, _index, _amount in events).items():
            if times > 1:
                duplicated.add(transfer_id)
                findings.add("duplicate_on_" + state.name, f"{account}: {transfer_id.hex()} applied {times} times")
    return duplicated


def _applied_bodies(state: NodeState, bodies: Mapping[bytes, Transfer]) -> list[tuple[int, Transfer, int]]:
    """(index, body, amount moved) of every transfer applied ok with a known body, in log order."""
    applied = [
        (record.index, bodies[record.entry], record.amount)
        for record in state.transfers.values()
        if record is not None and record.result == "ok" and record.entry in bodies
    ]
    applied.sort(key=lambda item: item[0])
    return applied


def _check_model(state: NodeState, baseline: Baseline, bodies: Mapping[bytes, Transfer], findings: _Findings) -> None:
    expected = dict(baseline.balances)
    for _index, body, amount in _applied_bodies(state, bodies):
        if amount != body.amount:
            findings.add("model_mismatch", f"{state.name}: {body.id.hex()} moved {amount}, signed for {body.amount}")
        expected[body.debit_account] -= amount
        expected[body.credit_account] += amount
    for account, amount in expected.items():
        if state.balances.get(account) != amount:
            findings.add("model_mismatch", f"{state.name}: {account} holds {state.balances.get(account)}, replay gives {amount}")


def _check_final_balances(state: NodeState, baseline: Baseline, findings: _Findings) -> None:
    for currency in sorted(set(baseline.currencies.values())):
        held = sum(amount for account, amount in state.balances.items() if baseline.currencies.get(account) == currency)
        if held != baseline.total(currency):
            findings.add("final_total_wrong", f"{state.name}: {currency} accounts hold {held}, started with {baseline.total(currency)}")
    for currency, row in state.totals.items():
        if row["held"] != row["issued"] or row["net"] != 0:
            findings.add("final_total_wrong", f"{state.name}: {currency} totals {dict(row)}")
    for account in baseline.negative_forbidden:
        if state.balances.get(account, 0) < 0:
            findings.add("final_negative", f"{state.name}: {account} holds {state.balances[account]}")


def _check_reads(baseline: Baseline, bodies: Mapping[bytes, Transfer], operations: Sequence[Operation],
                 reference: NodeState, findings: _Findings) -> None:
    reads = [operation for operation in operations if operation.kind == "read" and operation.outcome == "ok"]
    for read in reads:
        balances = dict(read.balances)
        for currency in sorted(set(baseline.currencies.values())):
            held = sum(amount for account, amount in balances.items() if baseline.currencies[account] == currency)
            if held != baseline.total(currency):
                findings.add("read_total_wrong", f"read at {read.index} by worker {read.worker}: {currency} sums to {held}")
        for account in baseline.negative_forbidden:
            if balances.get(account, 0) < 0:
                findings.add("read_negative", f"read at {read.index}: {account} holds {balances[account]}")
    _check_reads_against_model(baseline, _applied_bodies(reference, bodies), reads, findings)
    _check_real_time(operations, reads, reference, findings)


def _check_reads_against_model(baseline: Baseline, applied: list[tuple[int, Transfer, int]], reads: list[Operation],
                               findings: _Findings) -> None:
    """Each read must equal the replay of every applied transfer up to and including its index."""
    model = dict(baseline.balances)
    position = 0
    for read in sorted(reads, key=lambda operation: operation.index or 0):
        assert read.index is not None  # an ok read always has the index of its barrier
        if read.index < baseline.index:
            findings.add("read_stale", f"read at {read.index} is older than the baseline {baseline.index}")
            continue
        while position < len(applied) and applied[position][0] <= read.index:
            _index, body, amount = applied[position]
            model[body.debit_account] -= amount
            model[body.credit_account] += amount
            position += 1
        wrong = [account for account, amount in read.balances if model.get(account) != amount]
        if wrong:
            findings.add("read_stale", f"read at {read.index} on {read.node}: {wrong[0]} {dict(read.balances)[wrong[0]]}"
                         f" but the log gives {model.get(wrong[0])}")


def _check_real_time(operations: Sequence[Operation], reads: list[Operation], reference: NodeState, findings: _Findings) -> None:
    """Log indexes must respect real time: what completed before a read began is visible to it, what began
    after a read ended is not, and a read never sees an older index than one that completed before it."""
    index_of = {transfer_id: record.index for transfer_id, record in reference.transfers.items()
                if record is not None and record.result == "ok"}
    acknowledged = sorted((operation.completed_seconds, index_of[operation.transfer_id]) for operation in operations
                          if operation.kind in _transfer_kinds and operation.outcome == "ok" and operation.transfer_id in index_of)
    first_invoked: dict[bytes, float] = {}
    for operation in operations:
        if operation.transfer_id is not None and operation.kind != "read":
            first_invoked[operation.transfer_id] = min(first_invoked.get(operation.transfer_id, operation.invoked_seconds),
                                                       operation.invoked_seconds)
    _visible_before(acknowledged, reads, "transfer", findings)
    _visible_before(sorted((read.completed_seconds, read.index or 0) for read in reads), reads, "read", findings)
    completed_reads = sorted((read.completed_seconds, read.index or 0) for read in reads)
    times = [completed for completed, _index in completed_reads]
    highest = list(itertools.accumulate((index for _completed, index in completed_reads), max))
    for transfer_id, invoked in first_invoked.items():
        if transfer_id not in index_of:
            continue
        position = bisect.bisect_left(times, invoked)
        if position and highest[position - 1] >= index_of[transfer_id]:
            findings.add("read_real_time", f"{transfer_id.hex()} at index {index_of[transfer_id]} was invoked after a read"
                         f" at index {highest[position - 1]} had completed")


def _visible_before(completed: list[tuple[float, int]], reads: list[Operation], what: str, findings: _Findings) -> None:
    times = [moment for moment, _index in completed]
    highest = list(itertools.accumulate((index for _moment, index in completed), max))
    for read in reads:
        position = bisect.bisect_left(times, read.invoked_seconds)
        if position and highest[position - 1] > (read.index or 0):
            findings.add("read_real_time", f"read at {read.index} (worker {read.worker}) misses a {what} at index"
                         f" {highest[position - 1]} completed before it began")


# Nemeses ----------------------------------------------------------------------------------------------


class Nemesis:
    """Injects the planned faults one after another, each healed and recovered from before the next."""

    def __init__(self, run: ChaosRun, plans: Sequence[FaultPlan]) -> None:
        self._run = run
        self._cluster = run.cluster
        self._plans = plans
        self._targets = random.Random(f"{run.options.seed}/targets")
        self.records: list[FaultRecord] = []
        self.skipped: list[FaultPlan] = []
        self.observations = _Observations()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="chaos-nemesis")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Let the fault in progress finish and heal; start no other."""
        self._stop.set()
        self._thread.join(timeout=recovery_timeout_seconds * 2 + 120)

    def _main(self) -> None:
        try:
            previous_end = 0.0
            for plan in self._plans:
                start = max(plan.start_seconds, previous_end)
                if start + plan.duration_seconds + tail_seconds > self._run.options.duration_seconds:
                    self.skipped.append(plan)
                    continue
                if self._stop.wait(max(0.0, start - self._run.clock())):
                    self.skipped.append(plan)
                    continue
                self._run.say(f"fault {len(self.records) + 1}: {plan.kind} {plan.variant} at {self._run.clock():.1f} s")
                record = getattr(self, "_" + plan.kind.replace("-", "_"))(plan)
                self.records.append(record)
                self._run.say(f"  targets {', '.join(record.targets)}; happened={record.happened}; "
                              f"recovered in {record.recovery_seconds} s")
                previous_end = self._run.clock() + fault_gap_seconds[0]
        except BaseException as error:  # noqa: BLE001 - reported by the run, which then heals everything
            self.error = error

    # Targets and observation ------------------------------------------------------------------------

    def _leader(self) -> str:
        return self._cluster.wait_for_leader(timeout_seconds=recovery_timeout_seconds)

    def _target(self, role: str) -> str:
        leader = self._leader()
        if role == "leader":
            return leader
        validators = [name for name in self._cluster.validators() if name != leader and self._cluster.is_running(name)]
        if role == "replica":
            replicas = [name for name in self._cluster.nodes if name not in self._cluster.validators()]
            return self._targets.choice(sorted(replicas)) if replicas else self._targets.choice(sorted(validators))
        return self._targets.choice(sorted(validators))

    def _statuses(self, names: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        statuses = {name: self._cluster.status(name) for name in names}
        self.observations.see(statuses)
        return statuses

    def _hold(self, seconds: float, probe: Callable[[], None] | None = None) -> None:
        """Keep the fault in place for `seconds`, probing the network every half second."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if probe is not None:
                probe()
            else:
                self._statuses(self._cluster.nodes)
            time.sleep(max(0.0, min(probe_interval_seconds, deadline - time.monotonic())))

    def _watch_exit(self, target: str, seen: dict[str, Any]) -> None:
        """One probe of the network that also records `target`'s exit code in `seen` once it has one."""
        self._statuses(self._cluster.nodes)
        code = self._cluster.exit_code(target)
        if code is not None:
            seen["exit_code"] = code

    def _record(self, plan: FaultPlan, targets: Sequence[str], started: float, happened: bool,
                evidence: Mapping[str, Any]) -> FaultRecord:
        healed = self._run.clock()
        recovery = self._run.wait_recovered()
        return FaultRecord(plan.kind, plan.variant, tuple(targets), started, healed, recovery, happened, evidence)

    def _agreed_leader(self, names: Sequence[str]) -> str | None:
        statuses = self._statuses(names)
        leaders = {status["leader"] for status in statuses.values() if status is not None and status["leader"]}
        for leader in leaders:
            status = statuses.get(leader)
            if status is not None and status["role"] == "leader":
                return leader
        return None

    # Partitions ------------------------------------------------------------------------------------------

    def _partition(self, plan: FaultPlan) -> FaultRecord:
        network = self._run.network
        assert network is not None  # partitions are only planned where namespaces exist
        leader = self._leader()
        names = list(self._cluster.nodes)
        others = [name for name in names if name != leader]
        if plan.variant == "majority-split":
            validators = self._cluster.validators()
            self._targets.shuffle(validators)
            minority = validators[: (len(validators) - 1) // 2]
            replicas = [name for name in names if name not in validators]
            minority += [name for name in replicas if self._targets.random() < 0.5]
            majority = [name for name in names if name not in minority]
            blocked = [(a, b) for a in minority for b in majority] + [(b, a) for a in minority for b in majority]
            targets = minority
        elif plan.variant == "one-way":
            blocked = [(leader, other) for other in others]
            targets = [leader]
        else:
            blocked = [(leader, other) for other in others] + [(other, leader) for other in others]
            targets = [leader]
        started = self._run.clock()
        for source, destination in blocked:
            network.block(source, destination)
        rules = {name: len(network.rules(name)) for name in targets}
        seen: dict[str, Any] = {"rules_in_force": rules, "blocked_links": len(blocked)}
        if plan.variant == "majority-split":
            validators = self._cluster.validators()
            majority_validators = [name for name in validators if name not in targets]
            minority_validators = [name for name in validators if name in targets]

            def probe() -> None:
                statuses = self._statuses(names)
                new = self._agreed_leader(majority_validators)
                if new is not None:
                    seen["majority_leader"] = new
                    seen["majority_applied_index"] = statuses[new]["applied_index"] if statuses.get(new) else None
                seen["minority_applied_index"] = max(
                    (statuses[name]["applied_index"] for name in minority_validators if statuses.get(name)), default=None)
                seen["minority_roles"] = {name: statuses[name]["role"] for name in minority_validators if statuses.get(name)}

            self._hold(plan.duration_seconds, probe)
            network.heal()
            happened = (seen.get("majority_leader") is not None and seen.get("majority_applied_index") is not None
                        and seen.get("minority_applied_index") is not None
                        and seen["majority_applied_index"] > seen["minority_applied_index"])
        else:

            def probe() -> None:
                self._statuses(names)
                new = self._agreed_leader([name for name in self._cluster.validators() if name != leader])
                if new is not None:
                    seen["new_leader"] = new
                own = self._cluster.status(leader)
                if own is not None:
                    seen["isolated_role"] = own["role"]

            self._hold(plan.duration_seconds, probe)
            network.heal()
            happened = seen.get("new_leader") is not None and seen.get("isolated_role") not in (None, "leader")
            seen["lost_leadership"] = happened
        return self._record(plan, targets, started, happened, seen)

    # Processes -------------------------------------------------------------------------------------------

    def _kill(self, plan: FaultPlan) -> FaultRecord:
        targets = list(self._cluster.nodes) if plan.role == "all" else [self._target(plan.role)]
        before = {name: (self._cluster.status(name) or {}).get("applied_index") for name in targets}
        started = self._run.clock()
        endings = self._cluster.kill_reporting(targets)
        self._hold(plan.duration_seconds)
        self._cluster.start(targets)
        record = self._record(plan, targets, started, all(code == killed_exit_code for code in endings.values()),
                              {"exit_codes": endings, "applied_index_before": before})
        after = {name: (self._cluster.status(name) or {}).get("applied_index") for name in targets}
        durable = all(after[name] is not None and before[name] is not None and after[name] >= before[name] for name in targets)
        return replace(record, evidence={**record.evidence, "applied_index_after": after, "state_survived": durable},
                       happened=record.happened and durable)

    def _pause(self, plan: FaultPlan) -> FaultRecord:
        target = self._target(plan.role)
        status = self._cluster.status(target) or {}
        before = status.get("applied_index", 0)
        was_leader = status.get("role") == "leader"
        others = [name for name in self._cluster.nodes if name != target]
        seen: dict[str, Any] = {"applied_index_when_paused": before, "was_leader": was_leader}
        started = self._run.clock()
        self._cluster.pause([target])

        def probe() -> None:
            statuses = self._statuses(others)
            seen["others_applied_index"] = max((s["applied_index"] for s in statuses.values() if s), default=None)
            seen["paused_answered"] = seen.get("paused_answered", False) or self._cluster.status(target) is not None
            if was_leader:
                new = self._agreed_leader([name for name in self._cluster.validators() if name != target])
                if new is not None:
                    seen["new_leader"] = new

        self._hold(plan.duration_seconds, probe)
        self._cluster.resume([target])
        fell_behind = seen.get("others_applied_index") is not None and seen["others_applied_index"] > before
        seen["fell_behind"] = fell_behind
        happened = fell_behind and not seen.get("paused_answered") and (not was_leader or "new_leader" in seen)
        return self._record(plan, [target], started, happened, seen)

    def _clock(self, plan: FaultPlan) -> FaultRecord:
        target = self._target(plan.role)
        setting = plan.variant
        offset = self._cluster.log_size(target)
        started = self._run.clock()
        self._cluster.stop([target])
        self._cluster.node_environment[target] = {"LD_PRELOAD": str(faketime_library), "FAKETIME": setting}
        restarted_at = time.time()
        self._cluster.start([target])
        pid = self._cluster.nodes[target].pid
        seen: dict[str, Any] = {"faketime": setting, "expected_offset_seconds": _offset_seconds(setting)}

        def probe() -> None:
            self._statuses(self._cluster.nodes)
            if "observed_offset_seconds" not in seen:
                logged = _serving_time(self._cluster.log_since(target, offset))
                if logged is not None:
                    seen["observed_offset_seconds"] = round(logged - restarted_at, 1)
            if not seen.get("library_loaded") and pid is not None:  # the first look may come before the exec
                try:
                    seen["library_loaded"] = "libfaketime" in Path(f"/proc/{pid}/maps").read_text()
                except OSError:
                    pass

        self._hold(plan.duration_seconds, probe)
        del self._cluster.node_environment[target]
        self._cluster.stop([target])
        self._cluster.start([target])
        observed = seen.get("observed_offset_seconds")
        happened = bool(seen.get("library_loaded")) and observed is not None and \
            abs(observed - seen["expected_offset_seconds"]) <= clock_offset_tolerance_seconds
        return self._record(plan, [target], started, happened, seen)

    # Storage ---------------------------------------------------------------------------------------------

    def _disk_full(self, plan: FaultPlan) -> FaultRecord:
        disk = self._run.disk
        assert disk is not None  # mounted at set-up whenever disk-full is planned
        target = disk.node
        offset = self._cluster.log_size(target)
        started = self._run.clock()
        seen: dict[str, Any] = {"ballast_bytes": disk.fill()}

        def probe() -> None:
            seen["ballast_bytes"] = disk.fill()
            self._watch_exit(target, seen)

        self._hold(plan.duration_seconds, probe)
        disk.drain()
        if not self._cluster.is_running(target):
            self._cluster.start([target])
        text = self._cluster.log_since(target, offset)
        # A write that finds no free block fails with ENOSPC; a multi-page write that gets only part of its
        # blocks is short, and LMDB reports a short write as EIO. Either way the full disk stopped the write,
        # and the node names it: for LMDB's EIO it adds that the file system is full (full_disk_hint).
        seen["enospc_logged"] = "No space left on device" in text
        seen["line"] = _first_line_with(text, "No space left on device", "Input/output error")
        return self._record(plan, [target], started, seen["line"] is not None, seen)

    def _fsync(self, plan: FaultPlan) -> FaultRecord:
        target = self._target(plan.role)
        offset = self._cluster.log_size(target)
        started = self._run.clock()
        self._cluster.stop([target])
        self._cluster.node_environment[target] = {
            "LD_PRELOAD": " ".join(str(library) for library in fiu_libraries),
            "FIU_CTRL_FIFO": "",
            "FIU_ENABLE": f"enable_random name=posix/io/sync/fdatasync,probability={fsync_failure_probability},failinfo={errno.EIO}",
        }
        self._cluster.start([target])
        seen: dict[str, Any] = {"probability": fsync_failure_probability}

        self._hold(plan.duration_seconds, lambda: self._watch_exit(target, seen))
        del self._cluster.node_environment[target]
        text = self._cluster.log_since(target, offset)
        # The journal names its failed fdatasync; LMDB reports the same EIO from its commit.
        seen["line"] = _first_line_with(text, "fsync failed", "Input/output error")
        if self._cluster.is_running(target):
            self._cluster.stop([target])
        self._cluster.start([target])
        happened = seen.get("exit_code") == fatal_exit_code and seen["line"] is not None
        return self._record(plan, [target], started, happened, seen)

    def _bitflip(self, plan: FaultPlan) -> FaultRecord:
        target = self._target("follower")
        data_dir = self._cluster.nodes[target].data_dir
        # Right after the leader compacts its log, the follower can catch up from the log: otherwise it may
        # install a snapshot on restart, which replaces the damaged record before anything reads it.
        after_compaction = plan.variant == "state" and self._await_leader_compaction()
        started = self._run.clock()
        self._cluster.stop([target])
        if plan.variant == "journal":
            seen = _flip_journal_record(data_dir / "raft" / "journal" / "raft.log")
            detection = "is damaged"
        else:
            account = self._targets.choice(sorted(self._run.workload.accounts))
            seen = _flip_account_record(data_dir, account)
            detection = "fails its checksum"
        offset = self._cluster.log_size(target)
        self._cluster.start([target])

        self._hold(plan.duration_seconds, lambda: self._watch_exit(target, seen))
        text = self._cluster.log_since(target, offset)
        seen["line"] = _first_line_with(text, detection)
        # A follower that fell behind a log compaction installs a snapshot, which replaces every record
        # (damaged one included) before anything reads it: the flip is then gone, never applied.
        seen["superseded_by_snapshot"] = seen["line"] is None and _first_line_with(text, "installed snapshot") is not None
        if not self._cluster.is_running(target):
            # The node stopped rather than apply what it read: rebuild its state from its log and peers.
            shutil.rmtree(data_dir / "state", ignore_errors=True)
            seen["state_rebuilt"] = True
            self._cluster.start([target])
        seen["after_leader_compaction"] = after_compaction
        happened = seen.get("copies_flipped", seen.get("records", 0)) > 0 and (
            seen["line"] is not None or seen["superseded_by_snapshot"])
        return self._record(plan, [target], started, happened, seen)

    def _await_leader_compaction(self) -> bool:
        """Wait (at most compaction_wait_seconds) until the leader logs that it compacted its log."""
        leader = self._leader()
        offset = self._cluster.log_size(leader)
        deadline = time.monotonic() + compaction_wait_seconds
        while time.monotonic() < deadline:
            if "wrote snapshot" in self._cluster.log_since(leader, offset):
                return True
            time.sleep(poll_seconds)
        return False


class _Observations:
    """What every status probe saw: a node ready while it knows it diverged, or two nodes at the same
    applied index with different state hashes, is a broken replica however the run ends."""

    def __init__(self) -> None:
        self.probes = 0
        self.ready_while_diverged: list[str] = []
        self.hash_mismatches: list[str] = []

    def see(self, statuses: Mapping[str, Mapping[str, Any] | None]) -> None:
        self.probes += 1
        by_index: dict[int, dict[str, str]] = {}
        for name, status in statuses.items():
            if status is None:
                continue
            if status.get("ready") and status.get("diverged"):
                self.ready_while_diverged.append(name)
            by_index.setdefault(status["applied_index"], {})[name] = status["state_hash"]
        for index, hashes in by_index.items():
            if len(set(hashes.values())) > 1 and len(self.hash_mismatches) < examples_max:
                self.hash_mismatches.append(f"index {index}: {hashes}")


def _offset_seconds(setting: str) -> float:
    match = _offset_pattern.match(setting)
    if match is None:
        raise ValueError(f"faketime setting {setting!r} has no offset")
    sign = -1 if match.group(1) == "-" else 1
    return sign * int(match.group(2)) * _offset_unit_seconds[match.group(3)]


def _serving_time(text: str) -> float | None:
    """The (possibly faked) wall-clock time a node logged when it started serving."""
    for line in text.splitlines():
        match = _serving_line.match(line)
        if match:
            return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
    return None


def _first_line_with(text: str, *needles: str) -> str | None:
    return next((line.strip()[:300] for line in text.splitlines() if any(needle in line for needle in needles)), None)


def _flip_journal_record(journal: Path) -> dict[str, Any]:
    """Flip one bit in the payload of the middle record of a stopped node's raft.log."""
    data = bytearray(journal.read_bytes())
    records = []
    position = file_header.size
    while position + record_header.size <= len(data):
        length, index, _term = record_header.unpack_from(data, position)
        records.append((position, length, index))
        position += record_header.size + length + digest_bytes
    if not records:
        return {"records": 0}
    position, length, index = records[len(records) // 2]
    flipped_at = position + record_header.size + length // 2
    data[flipped_at] ^= 0x04
    journal.write_bytes(bytes(data))
    return {"records": len(records), "raft_index": index, "file_offset": flipped_at}


def _flip_account_record(data_dir: Path, account: str) -> dict[str, Any]:
    """Flip one bit in the payload of an account's record (which holds or leads to its balance) in a
    stopped node's data.mdb, in every copy of the stored bytes: LMDB's copy-on-write pages can hold the
    same value more than once, and the copy the tree points to must be among those damaged."""
    environment = lmdb.open(str(data_dir / "state"), readonly=True, lock=False, subdir=True, max_dbs=state_databases_max)
    try:
        database = environment.open_db(b"accounts", create=False)
        with environment.begin(db=database) as transaction:
            stored = transaction.get(account.encode())
    finally:
        environment.close()
    if stored is None or len(stored) <= value_checksum_bytes:
        return {"account": account, "copies_flipped": 0}
    stored = bytes(stored)
    flipped_at = (len(stored) - value_checksum_bytes) // 2  # inside the payload, not the seal
    path = data_dir / "state" / "data.mdb"
    data = bytearray(path.read_bytes())
    copies = 0
    start = 0
    while (found := data.find(stored, start)) >= 0:
        data[found + flipped_at] ^= 0x10
        copies += 1
        start = found + 1
    path.write_bytes(bytes(data))
    return {"account": account, "record_bytes": len(stored), "copies_flipped": copies}


# The run ----------------------------------------------------------------------------------------------


class ChaosRun:
    """Sets up (or reuses) a network, runs the workload and the nemesis, heals, checks, reports, cleans up."""

    def __init__(self, options: ChaosOptions, say: Callable[[str], None] | None = None) -> None:
        options.validate()
        self.options = options
        self.say = say or (lambda message: None)
        self.cluster: ChaosCluster = None  # type: ignore[assignment]  # set by _set_up
        self.network: NamespaceNetwork | None = None
        self.disk: SmallDisk | None = None
        self.workload: Workload = None  # type: ignore[assignment]
        self.mode = "loopback"
        self.unavailable: dict[str, str] = {}
        self.source_at_start = source_digest()
        self._origin = time.monotonic()

    def clock(self) -> float:
        return time.monotonic() - self._origin

    def execute(self) -> dict[str, Any]:
        """The whole run; always removes what it created (processes, mounts, namespaces)."""
        try:
            document = self._execute()
        except BaseException:
            try:
                self.clean_up()
            except ChaosError as error:
                self.say(str(error))
            raise
        self.clean_up()
        return document

    def _execute(self) -> dict[str, Any]:
        plans = self._set_up()
        baseline = self._baseline()
        nemesis = Nemesis(self, plans)
        self._origin = time.monotonic()
        self.workload.start(self._origin)
        nemesis.start()
        self.say(f"workload and nemesis running for {self.options.duration_seconds:g} s ({len(plans)} faults planned)")
        time.sleep(max(0.0, self.options.duration_seconds - self.clock()))
        nemesis.stop()
        self.workload.stop()
        if nemesis.error is not None:
            raise ChaosError(f"the nemesis failed: {nemesis.error!r}") from nemesis.error
        self.say("healing everything and waiting for the network to converge")
        final_recovery = self.heal_everything()
        probe = self.workload.probe(liveness_deadline_seconds)
        positions = self._converge()
        states = self._read_states(baseline)
        verdict = check(baseline, self.workload.registry.bodies, self.workload.operations, states, positions)
        indexes = self._check_entry_hash_indexes()
        return self._report(plans, nemesis, verdict, positions, final_recovery, probe, indexes)

    # Set-up ------------------------------------------------------------------------------------------------

    def _set_up(self) -> tuple[FaultPlan, ...]:
        options = self.options
        directory = options.directory.resolve()
        reusing = (directory / "cluster.json").exists()
        nemeses = list(dict.fromkeys(options.nemeses))
        reason = unavailable_reason() if options.namespaces else "loopback requested"
        if reusing:
            self.cluster = ChaosCluster.load(directory)
            self.cluster.kill()  # nodes started elsewhere: restart them under this run's control
            self.network = NamespaceNetwork.load(directory)
            if self.network is not None:
                if reason is not None:
                    raise ChaosError(f"{directory} was built in network namespaces, which are unavailable: {reason}")
                self.network.destroy()
                self.network = NamespaceNetwork.create(self.network.names, directory, octet=self.network.octet)
        else:
            raft = replace(local_raft, log_compaction_entries=chaos_log_compaction_entries)
            self.cluster = ChaosCluster.create(directory, validators=options.validators, raft=raft)
            if reason is None:
                self.network = NamespaceNetwork.create(list(self.cluster.nodes), directory)
                _move_into_namespaces(self.cluster, self.network)
        self.cluster.network = self.network
        self.mode = "namespaces" if self.network is not None else "loopback"
        if self.network is None and "partition" in nemeses:
            self.unavailable["partition"] = reason or "this network was built without namespaces"
            nemeses.remove("partition")
        if not nemeses:
            raise ChaosError(f"no nemesis can run here: {self.unavailable}")
        plans = plan_faults(options.seed, nemeses, options.duration_seconds)
        if not plans:
            raise ChaosError(f"no fault of {', '.join(nemeses)} fits in {options.duration_seconds:g} s: run longer")
        if any(plan.kind == "disk-full" for plan in plans):
            victim = random.Random(f"{options.seed}/disk").choice(self.cluster.validators())
            self.disk = SmallDisk(victim, self.cluster.nodes[victim].data_dir)
            self.disk.mount()
        self.say(f"network in {directory} ({self.mode}); starting {len(self.cluster.nodes)} nodes")
        self.cluster.start()
        leader = self.cluster.wait_for_leader()
        self.cluster.wait_ready()
        keys = {record["id"]: self.cluster.institution_key(record["id"]) for record in self.cluster.description["institutions"]}
        if not reusing or not self._accounts_exist(leader):
            self.cluster.open_and_fund_accounts(via=leader)
        self.workload = Workload(self.cluster, options.seed, options.workers, keys)
        return plans

    def _accounts_exist(self, leader: str) -> bool:
        first = self.cluster.customer_accounts()[0]["account"]
        with self.cluster.client(leader) as client:
            return client.balance(first) is not None

    def _baseline(self) -> Baseline:
        statuses = self.cluster.wait_converged(timeout_seconds=convergence_timeout_seconds)
        leader = self.cluster.wait_for_leader()
        index = statuses[leader]["applied_index"]
        balances, currencies, forbidden = {}, {}, set()
        with self.cluster.client(leader) as client:
            for account in self.cluster.customer_accounts():
                name = account["account"]
                found = client.balance(name, as_of_index=index)
                if found is None:
                    raise ChaosError(f"account {name} is not open on {leader}")
                balances[name] = int(found["balance"])
                currencies[name] = found["currency"]
                if AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS in AccountFlags(found["flags"]):
                    forbidden.add(name)
        return Baseline(index, balances, currencies, frozenset(forbidden))

    # Healing -----------------------------------------------------------------------------------------------

    def wait_recovered(self) -> float | None:
        """Seconds until every node answers, is ready, and has applied what the leader had committed when
        the wait began; None if that did not happen within recovery_timeout_seconds."""
        began = time.monotonic()
        deadline = began + recovery_timeout_seconds
        target: int | None = None
        while time.monotonic() < deadline:
            statuses = self.cluster.statuses()
            if all(status is not None and status["ready"] for status in statuses.values()):
                leaders = [status for status in statuses.values() if status is not None and status["role"] == "leader"]
                if leaders and target is None:
                    target = leaders[0]["commit_index"]
                if target is not None and all(status["applied_index"] >= target for status in statuses.values() if status):
                    return round(time.monotonic() - began, 3)
            time.sleep(poll_seconds)
        return None

    def heal_everything(self) -> float | None:
        """Undo any fault still in place and start every node plainly; return the recovery time."""
        if self.network is not None:
            self.network.heal()
        self.cluster.resume(list(self.cluster.nodes))
        if self.disk is not None:
            self.disk.drain()
        for name in list(self.cluster.node_environment):
            del self.cluster.node_environment[name]
            self.cluster.stop([name])
        self.cluster.start()
        return self.wait_recovered()

    def _converge(self) -> dict[str, tuple[int, str]]:
        """Every node's (applied index, state hash) once they agree, or as last seen if they never do."""
        try:
            statuses = self.cluster.wait_converged(timeout_seconds=convergence_timeout_seconds)
        except ClusterError:
            statuses = {name: status for name, status in self.cluster.statuses().items() if status is not None}
        return {name: (status["applied_index"], status["state_hash"]) for name, status in statuses.items()}

    # Final state -------------------------------------------------------------------------------------------

    def _read_states(self, baseline: Baseline) -> list[NodeState]:
        ids = sorted(self.workload.registry.by_id)
        states = []
        for name in self.cluster.nodes:
            try:
                states.append(self._read_state(name, ids, baseline))
            except (ClientError, OSError) as error:
                raise ChaosError(f"cannot read the final state of {name}: {error}") from error
        return states

    def _read_state(self, name: str, ids: list[bytes], baseline: Baseline) -> NodeState:
        with self.cluster.client(name) as client:
            status = client.status()
            balances = {account: int(client.balance(account)["balance"]) for account in baseline.balances}
            totals = client.totals()["totals"]
            history = {account: _history_since(client, account, baseline.index) for account in baseline.balances}
        found = asyncio.run(_look_up(self.cluster.nodes[name].client_address, ids))
        transfers = {
            transfer_id: None if record is None else AppliedTransfer(record["result"], record["index"], record["entry"],
                                                                     record["amount_moved"])
            for transfer_id, record in found.items()
        }
        return NodeState(name, status["applied_index"], status["state_hash"], balances, totals, transfers, history)

    def _check_entry_hash_indexes(self) -> dict[str, IndexCheck | str]:
        """Stop every node, then compare each node's entry-hash index with its state's log (derived data the
        state hash does not cover, written by a thread of its own through every fault): a check, or the error
        that prevented one."""
        self.cluster.stop()
        checks: dict[str, IndexCheck | str] = {}
        for name, node in self.cluster.nodes.items():
            try:
                checks[name] = check_index(node.data_dir)
            except (lmdb.Error, StorageCorrupted, OSError) as error:
                checks[name] = f"{type(error).__name__}: {error}"
        return checks

    # Report ------------------------------------------------------------------------------------------------

    def _report(self, plans: Sequence[FaultPlan], nemesis: Nemesis, verdict: Verdict, positions: Mapping[str, tuple[int, str]],
                final_recovery: float | None, probe: Operation, indexes: Mapping[str, IndexCheck | str]) -> dict[str, Any]:
        operations = self.workload.operations
        faults = [record.document() for record in nemesis.records]
        windows = [(record.started_seconds, record.healed_seconds) for record in nemesis.records]
        observations = nemesis.observations
        invariants = dict(verdict.invariants)
        invariants["recovered_after_every_fault"] = all(record.recovery_seconds is not None for record in nemesis.records) \
            and final_recovery is not None
        invariants["live_after_heal"] = probe.outcome == "ok"
        invariants["never_ready_while_diverged"] = not observations.ready_while_diverged and not observations.hash_mismatches
        # The index is derived data outside the state hash: `converged` cannot vouch for it (docs/faults.md finding 6).
        invariants["entry_hash_indexes_consistent"] = bool(indexes) and all(
            isinstance(found, IndexCheck) and found.consistent for found in indexes.values()
        )
        document = {
            "seed": self.options.seed,
            "commit": _git_commit(),
            "source_digest": self.source_at_start,
            "source_changed_during_run": source_digest() != self.source_at_start,
            "mode": self.mode,
            "unavailable_nemeses": self.unavailable,
            "directory": str(self.cluster.directory),
            "duration_seconds": self.options.duration_seconds,
            "nodes": list(self.cluster.nodes),
            "validators": len(self.cluster.validators()),
            "workers": self.options.workers,
            "nemeses": sorted({plan.kind for plan in plans}),
            "faults": faults,
            "faults_planned": len(plans),
            "faults_skipped": [f"{plan.kind} {plan.variant}" for plan in nemesis.skipped],
            "faults_effective": all(record.happened for record in nemesis.records) and bool(nemesis.records),
            "operations": _operation_counts(operations),
            "acknowledged": verdict.counts["acknowledged"],
            "lost": verdict.counts["lost"],
            "duplicated": verdict.counts["duplicated"],
            "findings": {name: count for name, count in verdict.counts.items() if name not in ("acknowledged", "lost", "duplicated")},
            "violations": {name: list(examples) for name, examples in verdict.examples.items()},
            "converged": invariants["converged"],
            "final": {name: {"applied_index": index, "state_hash": digest} for name, (index, digest) in positions.items()},
            "longest_unavailability_seconds": _longest_gap(operations, self.options.duration_seconds),
            "latency_ms": _latencies(operations, windows),
            "recovery_seconds_max": max((record.recovery_seconds or 0.0 for record in nemesis.records), default=0.0),
            "final_recovery_seconds": final_recovery,
            "liveness_probe": {"outcome": probe.outcome, "seconds": round(probe.completed_seconds - probe.invoked_seconds, 3)},
            "status_probes": observations.probes,
            "ready_while_diverged": observations.ready_while_diverged,
            "state_hash_mismatches": observations.hash_mismatches,
            "entry_hash_indexes": {
                name: {"error": found} if isinstance(found, str) else index_check_document(found) for name, found in indexes.items()
            },
            "invariants": invariants,
            "invariants_ok": all(invariants.values()),
            "replay": replay_command(self.options),
        }
        self._write_files(document)
        return document

    def _write_files(self, document: dict[str, Any]) -> None:
        directory = self.cluster.directory
        with open(directory / history_file_name, "w") as history:
            for operation in self.workload.operations:
                history.write(json.dumps(operation.document()) + "\n")
        (directory / report_file_name).write_text(json.dumps(document, indent=2, default=json_default) + "\n")

    # Clean-up ----------------------------------------------------------------------------------------------

    def clean_up(self) -> None:
        """Kill every node, unmount the small disk, delete the namespaces: whatever happened before."""
        problems = []
        if self.cluster is not None:
            self.cluster.node_environment.clear()
            self.cluster.kill()
        if self.disk is not None:
            try:
                self.disk.unmount()
            except (ChaosError, OSError) as error:
                problems.append(str(error))
        if self.network is not None:
            problems += self.network.destroy()
        if problems:
            raise ChaosError("clean-up left things behind: " + "; ".join(problems))


def _history_since(client: Client, account: str, index: int) -> tuple[tuple[bytes, int, int], ...]:
    """An account's balance changes after log index `index`, oldest last (the API pages newest first)."""
    events: list[tuple[bytes, int, int]] = []
    cursor: bytes | None = None
    while True:
        page = client.history(account, limit=history_page_entries, cursor=cursor)
        if page is None:
            return tuple(events)
        for event in page["events"]:
            if event["index"] <= index:
                return tuple(events)
            events.append((event["transfer_id"], event["index"], event["amount"]))
        cursor = page["cursor"]
        if cursor is None:
            return tuple(events)


async def _look_up(address: str, ids: list[bytes]) -> dict[bytes, dict[str, Any] | None]:
    client = AsyncClient(address)
    found: dict[bytes, dict[str, Any] | None] = {}
    try:
        for start in range(0, len(ids), lookup_requests_in_flight_max):
            chunk = ids[start : start + lookup_requests_in_flight_max]
            found.update(zip(chunk, await asyncio.gather(*(client.lookup_transfer(i) for i in chunk)), strict=True))
    finally:
        client.close()
    return found


def _operation_counts(operations: Sequence[Operation]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for operation in operations:
        row = counts.setdefault(operation.kind, {"ok": 0, "fail": 0, "info": 0})
        row[operation.outcome] += 1
    return counts


def _longest_gap(operations: Sequence[Operation], duration_seconds: float) -> float:
    """The longest time during the run with no transfer acknowledged (start and end included)."""
    moments = sorted(operation.completed_seconds for operation in operations
                     if operation.kind in _transfer_kinds and operation.kind != "probe" and operation.outcome == "ok")
    edges = [0.0, *moments, duration_seconds]
    return round(max(later - earlier for earlier, later in itertools.pairwise(edges)), 3)


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _latencies(operations: Sequence[Operation], windows: Sequence[tuple[float, float]]) -> dict[str, float]:
    healthy, faulted = [], []
    for operation in operations:
        if operation.kind in _transfer_kinds and operation.kind != "probe" and operation.outcome == "ok":
            elapsed = (operation.completed_seconds - operation.invoked_seconds) * 1000
            inside = any(start <= operation.invoked_seconds <= end for start, end in windows)
            (faulted if inside else healthy).append(elapsed)
    every = healthy + faulted
    return {
        "p50": round(_percentile(every, 0.50), 1),
        "p99": round(_percentile(every, 0.99), 1),
        "max": round(max(every, default=0.0), 1),
        "p99_healthy": round(_percentile(healthy, 0.99), 1),
        "p99_under_fault": round(_percentile(faulted, 0.99), 1),
    }


def source_digest() -> str:
    """A digest of the Python sources of every package a node runs. Recorded at the start and the end of a
    run: nodes restarted while someone edits the tree run different code, and their replicas can diverge
    for that reason alone."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.blake2b(digest_size=16)
    for package in source_packages:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            try:
                digest.update(path.read_bytes())
            except FileNotFoundError:
                digest.update(b"(removed)")
    return digest.hexdigest()


def _git_commit() -> str:
    try:
        completed = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                                   capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    return completed.stdout.strip() or "unknown"


def replay_command(options: ChaosOptions) -> str:
    return (f"tonle chaos --dir NEW_DIR --seed {options.seed} --duration {options.duration_seconds:g} "
            f"--nemesis {','.join(options.nemeses)} --validators {options.validators} --workers {options.workers}"
            f"{'' if options.namespaces else ' --loopback'}")


def render_table(document: Mapping[str, Any]) -> str:
    """The short human summary: faults, operations by outcome, the headline figures, each invariant."""
    lines = [f"chaos run, seed {document['seed']}, {document['mode']}, {document['duration_seconds']:g} s, "
             f"{len(document['nodes'])} nodes ({document['validators']} validators)"]
    for kind, reason in document["unavailable_nemeses"].items():
        lines.append(f"not run here: {kind} ({reason})")
    lines.append(f"faults injected {len(document['faults'])} (planned {document['faults_planned']}):")
    for fault in document["faults"]:
        recovery = "not recovered" if fault["recovery_seconds"] is None else f"recovered {fault['recovery_seconds']:.1f} s"
        lines.append(f"  {fault['started_seconds']:6.1f} s  {fault['kind']:<9} {fault['variant']:<16} "
                     f"{','.join(fault['targets']):<12} {'happened' if fault['happened'] else 'NO EFFECT'}  {recovery}")
    lines.append("operations        ok    fail    info")
    for kind, row in sorted(document["operations"].items()):
        lines.append(f"  {kind:<12} {row['ok']:>6}  {row['fail']:>6}  {row['info']:>6}")
    latency = document["latency_ms"]
    lines += [
        f"acknowledged {document['acknowledged']}   lost {document['lost']}   duplicated {document['duplicated']}",
        f"longest unavailability {document['longest_unavailability_seconds']:.2f} s   "
        f"latency p50 {latency['p50']} ms  p99 {latency['p99']} ms (p99 under fault {latency['p99_under_fault']} ms)",
        "entry-hash indexes (indexed / applied): " + ", ".join(_index_summary(name, found) for name, found in document.get("entry_hash_indexes", {}).items()),
        "invariants: " + ", ".join(f"{name} {'ok' if ok else 'BROKEN'}" for name, ok in document["invariants"].items()),
        f"verdict: {'PASS' if document['invariants_ok'] and document['faults_effective'] else 'FAIL'}"
        f"{'' if document['faults_effective'] else ' (a fault had no effect)' if document['faults'] else ' (no fault ran)'}",
        f"replay: {document['replay']}",
    ]
    if document["source_changed_during_run"]:
        lines.append("WARNING: the node sources changed during the run; nodes started at different times ran different code")
    return "\n".join(lines)


def _index_summary(name: str, found: Mapping[str, Any]) -> str:
    if "error" in found:
        return f"{name} {found['error']}"
    differs = "" if found["consistent"] else f" INCONSISTENT ({found['missing_pairs']} missing, {found['indexed_pairs']} of {found['logged_pairs']} pairs)"
    return f"{name} {found['indexed_through']}/{found['applied_index']}{differs}"


def run_chaos(options: ChaosOptions, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    return ChaosRun(options, say).execute()


# Command line -----------------------------------------------------------------------------------------


nemesis_groups = {"all": nemesis_names, "ci": ci_nemeses}


def _nemesis_list(text: str) -> list[str]:
    names = [name for part in text.split(",") if part.strip() for name in nemesis_groups.get(part.strip(), (part.strip(),))]
    unknown = [name for name in names if name not in nemesis_names]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown nemeses {unknown}; known: {', '.join(nemesis_names)}")
    return names


def command_chaos(arguments: argparse.Namespace) -> int:
    nemeses = tuple(dict.fromkeys(name for group in (arguments.nemesis or [list(nemesis_names)]) for name in group))
    seed = arguments.seed if arguments.seed is not None else random.SystemRandom().randrange(2**32)
    options = ChaosOptions(Path(arguments.dir), seed, arguments.duration, nemeses, arguments.validators, arguments.workers,
                           namespaces=not arguments.loopback)
    print(f"tonle chaos: seed {seed} (replay with --seed {seed})", file=sys.stderr)
    try:
        document = run_chaos(options, lambda message: print(f"chaos: {message}", file=sys.stderr, flush=True))
    except (ChaosError, NetworkError) as error:
        print(f"tonle chaos: {error}", file=sys.stderr)
        return exit_code_failure
    print(render_table(document))
    if arguments.output == "json":
        print(json.dumps(document, indent=2, sort_keys=True, default=json_default))
    return 0 if document["invariants_ok"] and document["faults_effective"] else exit_code_failure


def add_chaos_commands(subparsers: Any) -> None:
    """Register `tonle chaos` on the CLI's sub-command parser."""
    chaos = subparsers.add_parser(
        "chaos", help="inject faults into a local network under a bank workload, then check every invariant"
    )
    chaos.add_argument("--dir", required=True, help="the network's directory (created if new, reused otherwise)")
    chaos.add_argument("--seed", type=int, help="draws the fault schedule and the workload (default: random)")
    chaos.add_argument("--duration", type=float, default=60.0, help="seconds of workload under faults")
    chaos.add_argument("--nemesis", type=_nemesis_list, action="append",
                       help=f"comma-separated, repeatable, from {','.join(nemesis_names)}; 'ci' is "
                       f"{','.join(ci_nemeses)}; default all")
    chaos.add_argument("--validators", type=int, default=3)
    chaos.add_argument("--workers", type=int, default=workers_default, help="concurrent clients")
    chaos.add_argument("--loopback", action="store_true", help="no network namespaces (partitions cannot run)")
    chaos.add_argument("--output", choices=("table", "json"), default="table",
                       help="json: the table, then the full report as JSON, last on stdout")
    chaos.set_defaults(handler=command_chaos)
