"""Prometheus metrics of one node, under the `tonle_` prefix, in base units, with bounded labels."""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from consensus.raft.apply_thread import follower_grouping

# `_created` series double the series count of every counter and histogram, and no alert or panel reads them.
disable_created_metrics()

# etcd's commit-path buckets, 1 ms x 2^k, so dashboards built for etcd read the same way. The top bucket
# (16.384 s) is wide enough for a commit that waits out an election.
latency_buckets_seconds = tuple(0.001 * 2.0**k for k in range(15))
# The same ladder extended four steps down to 62.5 us (1 ms x 2^-4) for stages that usually finish well
# under a millisecond. From 1 ms up the boundaries coincide with latency_buckets_seconds.
short_latency_buckets_seconds = tuple(0.001 * 2.0**k for k in range(-4, 15))
batch_entry_buckets = tuple(float(2**k) for k in range(13))
# Writing or installing a snapshot takes about a second per few hundred MiB of state, minutes under a memory
# limit (61 s for 1.1 GiB under 300 MB): the same ladder continued up to 524.288 s (1 ms x 2^19).
snapshot_buckets_seconds = tuple(0.001 * 2.0**k for k in range(20))
apply_batch_buckets = tuple(float(count) for count in range(1, follower_grouping.entries_max + 1))

# pysyncobj's FAIL_REASON names (lower case, as the adapter reports them) plus the node's own timeout.
# Exported at zero from the start so a rate over them exists before the first failure.
proposal_failure_reasons = (
    "queue_full",
    "missing_leader",
    "discarded",
    "not_leader",
    "leader_changed",
    "request_denied",
    "unknown_outcome",
    "timeout",
)
health_check_results = ("passed", "failed")

# CPU is reported by the job a thread does, not per thread: the verifier pool and the snapshot writers come
# and go, and a label per thread would grow without bound.
thread_roles = ("event_loop", "raft", "apply", "verify", "read_ahead", "snapshot", "receipts", "index", "other")
thread_cpu_modes = ("user", "system")
_task_directory = Path("/proc/self/task")
_process_stat_path = Path("/proc/self/stat")
_clock_ticks_per_second = os.sysconf("SC_CLK_TCK")

_short_note = " Buckets start at 62.5 us (1 ms x 2^-4): the stage is usually sub-millisecond."


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


class NodeMetrics:
    """Every metric of a node in its own registry (so tests can run several nodes in one process)."""

    def __init__(self, node_name: str, node_role: str) -> None:
        registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
        # `name` and `role`, not `node` and `node_role`: those are the scrape target's labels and a clash
        # would rename these to `exported_*`.
        build = Info("tonle_build", "Build and identity of this node (always 1).", registry=registry)
        build.info(
            {
                "version": _version("tonle"),
                "pysyncobj_version": _version("pysyncobj"),
                "python_version": platform.python_version(),
                "name": node_name,
                "role": node_role,
            }
        )
        self._define_raft(registry)
        self._define_commit_path(registry)
        self._define_state(registry)
        self._define_api_and_health(registry)
        registry.register(ThreadCpuCollector())

    def _define_raft(self, registry: CollectorRegistry) -> None:
        self.is_leader = Gauge("tonle_raft_is_leader", "1 if this node is the Raft leader.", registry=registry)
        self.has_leader = Gauge("tonle_raft_has_leader", "1 if this node knows a leader.", registry=registry)
        self.leader_changes = Counter(
            "tonle_raft_leader_changes_seen",
            "Times the leader known to this node changed (the first leader counts).",
            registry=registry,
        )
        self.leader_last_contact = Gauge(
            "tonle_raft_leader_last_contact_timestamp_seconds",
            "Unix time this node last heard from the leader (now, on the leader); NaN until known.",
            registry=registry,
        )
        # NaN, not 0: an unset gauge must not read as "heard from the leader at the epoch" nor as fresh.
        self.leader_last_contact.set(float("nan"))
        self.term = Gauge("tonle_raft_term", "Current Raft term.", registry=registry)
        self.commit_index = Gauge("tonle_raft_commit_index", "Raft commit index known to this node.", registry=registry)
        self.applied_index = Gauge(
            "tonle_raft_applied_index", "Last Raft index applied to the state (LMDB).", registry=registry
        )
        self.last_log_index = Gauge("tonle_raft_last_log_index", "Last index in the local journal.", registry=registry)
        self.peer_connected = Gauge(
            "tonle_raft_peer_connected", "1 if the Raft connection to the peer is up.", ["peer"], registry=registry
        )
        self.peer_round_trip = Histogram(
            "tonle_raft_peer_round_trip_seconds",
            "Time from sending entries to a peer to its acknowledgement." + _short_note,
            ["peer"],
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.handshakes_refused = Counter(
            "tonle_raft_handshakes_refused",
            "Raft connections refused during the handshake.",
            ["reason"],
            registry=registry,
        )
        self.frames_refused = Counter(
            "tonle_raft_frames_refused", "Raft frames refused after the handshake.", ["reason"], registry=registry
        )
        self.messages_dropped = Counter(
            "tonle_raft_messages_dropped",
            "Raft messages dropped (not permitted or unsupported).",
            ["reason"],
            registry=registry,
        )
        self.recovering = Gauge(
            "tonle_raft_recovering",
            "1 while this node refills a damaged journal and abstains from voting.",
            registry=registry,
        )

    def _define_commit_path(self, registry: CollectorRegistry) -> None:
        self.proposer_queue = Gauge(
            "tonle_proposer_queue_entries", "Verified entries waiting for a batch.", registry=registry
        )
        self.outcomes_awaited = Gauge(
            "tonle_outcomes_awaited_entries",
            "Entries whose outcome clients of this node are waiting for (bounded; beyond it intake answers busy).",
            registry=registry,
        )
        self.proposals = Counter("tonle_proposals", "Batches proposed to Raft by this node.", registry=registry)
        self.proposals_failed = Counter(
            "tonle_proposals_failed",
            "Proposals that Raft reported as not committed, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in proposal_failure_reasons:
            self.proposals_failed.labels(reason)
        self.proposals_pending = Gauge(
            "tonle_proposals_pending", "Batches proposed and not yet applied or failed.", registry=registry
        )
        self.queue_wait = Histogram(
            "tonle_commit_queue_wait_seconds",
            "Time the oldest entry of a batch waited in the proposer queue (one observation per batch)." + _short_note,
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.batch_build = Histogram(
            "tonle_commit_batch_build_seconds",
            "Time to cut and encode one batch." + _short_note,
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.signature_verification = Histogram(
            "tonle_commit_signature_verification_seconds",
            "Time to verify the signatures of one intake request or one prefetched batch." + _short_note,
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.replication = Histogram(
            "tonle_commit_replication_seconds",
            "Leader: time from proposing a batch to its commit callback (replication, fsyncs, apply).",
            buckets=latency_buckets_seconds,
            registry=registry,
        )
        self.fsync = Histogram(
            "tonle_journal_fsync_seconds",
            "Duration of one journal fsync." + _short_note,
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.apply = Histogram(
            "tonle_commit_apply_seconds",
            "Duration of one apply LMDB transaction, commit included: one batch, or the batches that were"
            " waiting when the apply took the next (tonle_commit_apply_batches)." + _short_note,
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.state_commit = Histogram(
            "tonle_state_commit_seconds",
            "Duration of the LMDB commit that ends an apply transaction (its page writes and fsyncs): the"
            " state's disk, as tonle_journal_fsync_seconds is the journal's." + _short_note,
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.apply_batches = Histogram(
            "tonle_commit_apply_batches",
            "Batches applied per LMDB transaction: more than one when the apply had fallen behind.",
            buckets=apply_batch_buckets,
            registry=registry,
        )
        self.batch_entries = Histogram(
            "tonle_batch_entries", "Entries per applied batch.", buckets=batch_entry_buckets, registry=registry
        )
        self.entries_applied = Counter(
            "tonle_entries_applied",
            "Entries applied, by result (ok or the rule that refused it).",
            ["result"],
            registry=registry,
        )
        self.entries_rejected = Counter(
            "tonle_entries_rejected",
            "Entries refused on intake (never logged), by reason.",
            ["reason"],
            registry=registry,
        )
        self.signatures_verified = Counter(
            "tonle_signatures_verified", "Ed25519 verifications performed by this node.", registry=registry
        )
        self.accounts_read_ahead = Counter(
            "tonle_accounts_read_ahead",
            "Accounts named by entries on intake or in arriving batches whose pages were read ahead of the apply.",
            registry=registry,
        )
        self.read_aheads_dropped = Counter(
            "tonle_read_aheads_dropped",
            "Read-aheads not started because the read-ahead queue was full (the apply read those pages itself).",
            registry=registry,
        )

    def _define_state(self, registry: CollectorRegistry) -> None:
        self.dead_pages_dropped = Counter(
            "tonle_state_dead_pages_dropped",
            "State pages an apply commit freed (the copies LMDB's copy-on-write left) that the node then dropped from memory.",
            registry=registry,
        )
        self.state_divergence = Counter(
            "tonle_state_divergence",
            "Checkpoints from the leader whose state hash differed from this node's at the same index.",
            registry=registry,
        )
        self.state_diverged = Gauge(
            "tonle_state_diverged", "1 once this node has seen a state hash divergence.", registry=registry
        )
        self.storage_used = Gauge("tonle_storage_used_bytes", "Bytes used in the LMDB map.", registry=registry)
        self.storage_map_size = Gauge("tonle_storage_map_size_bytes", "Configured LMDB map size.", registry=registry)
        self.storage_readers = Gauge(
            "tonle_storage_readers",
            "Read transactions open on the state, from every process (LMDB's reader table).",
            registry=registry,
        )
        self.storage_oldest_reader_lag = Gauge(
            "tonle_storage_oldest_reader_lag_transactions",
            "Commits to the state since the snapshot its oldest open reader reads: LMDB reuses no page freed"
            " after it, so while this grows the data file grows.",
            registry=registry,
        )
        self.storage_stale_readers_cleared = Counter(
            "tonle_storage_stale_readers_cleared",
            "Reader slots of the state or the entry-hash index the node freed because the process holding them"
            " had died inside a read transaction.",
            registry=registry,
        )
        self.entry_hash_index_index = Gauge(
            "tonle_entry_hash_index_raft_index",
            "Raft index the entry-hash lookup index is built through (lookups scan the hash log past it).",
            registry=registry,
        )
        self.entry_hash_index_entries = Counter(
            "tonle_entry_hash_index_entries", "Transfers added to the entry-hash lookup index.", registry=registry
        )
        self.entry_hash_index_merged = Counter(
            "tonle_entry_hash_index_merged_entries",
            "Transfers the entry-hash index's merges wrote again (each is rewritten about once per size class it"
            " passes through; the work comes in bursts, as a size class fills).",
            registry=registry,
        )
        self.entry_hash_index_runs = Gauge(
            "tonle_entry_hash_index_runs",
            "Sorted runs in the entry-hash lookup index: a lookup seeks each; merges keep them under 8 a size class.",
            registry=registry,
        )
        self.entry_hash_index_errors = Counter(
            "tonle_entry_hash_index_errors", "Indexing transactions that failed (retried after a pause).", registry=registry
        )
        self.snapshot_write = Histogram(
            "tonle_snapshot_write_seconds",
            "Duration of writing one snapshot file (LMDB copy, fsync, rename), on the snapshot thread.",
            buckets=snapshot_buckets_seconds,
            registry=registry,
        )
        self.snapshot_file_bytes = Gauge(
            "tonle_snapshot_file_bytes", "Size of the snapshot file this node wrote last.", registry=registry
        )
        self.snapshot_install = Histogram(
            "tonle_snapshot_install_seconds",
            "Duration of one snapshot install (copy, checks, new LMDB environment, swap): from a leader, or this"
            " node's own snapshot at start when its state is behind it. The apply waits meanwhile.",
            buckets=snapshot_buckets_seconds,
            registry=registry,
        )

    def _define_api_and_health(self, registry: CollectorRegistry) -> None:
        self.api_requests = Counter(
            "tonle_api_requests",
            "Client API requests, by operation and result.",
            ["operation", "result"],
            registry=registry,
        )
        self.api_connections = Gauge("tonle_api_connections", "Open client API connections.", registry=registry)
        self.health_checks = Counter(
            "tonle_health_checks",
            "Readiness checks evaluated by /readyz, by check and result.",
            ["check", "result"],
            registry=registry,
        )


def thread_role(name: str) -> str:
    """The job of a thread, from the name the node (or pysyncobj, or the executor) gave it."""
    if name == "MainThread":
        return "event_loop"  # uvloop: client API, admin HTTP, batching and replies
    if name.startswith("tonle-apply"):
        return "apply"
    if name.endswith("(_autoTickThread)"):
        return "raft"  # pysyncobj's tick thread: network, journal, elections, commit
    if name.startswith("verify_"):
        return "verify"
    if name.startswith("read-ahead_"):
        return "read_ahead"  # the accounts' pages read ahead of the apply
    if name.startswith("tonle-snapshot"):
        return "snapshot"
    if name.startswith("heads_"):
        return "receipts"  # signing and storing tree heads
    if name == "entry-hash-indexer":
        return "index"
    return "other"


def stat_fields(path: Path) -> list[str]:
    """The fields of a /proc/.../stat file after the command name, which may hold spaces and parentheses:
    the state is [0], minor and major faults [7] and [9], user and system CPU ticks [11] and [12] (proc(5))."""
    return path.read_text().rpartition(")")[2].split()


def thread_usage(native_id: int) -> tuple[float, float, int] | None:
    """(user CPU seconds, system CPU seconds, major page faults) of one thread of this process, or None once
    it has exited (Linux)."""
    try:
        return _usage(_task_directory / str(native_id) / "stat")
    except OSError:
        return None


def process_usage() -> tuple[float, float, int]:
    """(user CPU seconds, system CPU seconds, major page faults) of this whole process, its exited threads'
    included (Linux)."""
    return _usage(_process_stat_path)


def _usage(stat_path: Path) -> tuple[float, float, int]:
    fields = stat_fields(stat_path)
    return int(fields[11]) / _clock_ticks_per_second, int(fields[12]) / _clock_ticks_per_second, int(fields[9])


class ThreadCpuCollector(Collector):
    """`tonle_thread_cpu_seconds_total{thread, mode}`: where a node's CPU goes, by job, and
    `tonle_thread_major_page_faults_total{thread}`: which job waits for pages read from disk (LMDB maps its
    files, so a read of a page not in memory is a major fault of the reading thread). Read on each scrape.

    A thread that has exited keeps its last-read counts in the totals, so the counters never go down when a
    snapshot writer or a pool thread ends. What no scrape saw (a thread that started and ended between two,
    the last moments of one that ended) is still in the process's own counts: the part of those no thread
    accounts for goes to `other`, so the jobs add up to the process's CPU (`process_cpu_seconds_total`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # two concurrent scrapes must not retire a thread twice
        self._last: dict[threading.Thread, tuple[str, float, float, int]] = {}
        self._retired = {(role, mode): 0.0 for role in thread_roles for mode in thread_cpu_modes}
        self._retired_faults = {role: 0 for role in thread_roles}
        self._unseen = {mode: 0.0 for mode in thread_cpu_modes}
        self._unseen_faults = 0

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            # Read before the threads: a thread read later has run longer, so what is left over for `other`
            # is at most what no thread accounts for, never time a thread will report itself.
            process_user, process_system, process_faults = process_usage()
            seen: dict[threading.Thread, tuple[str, float, float, int]] = {}
            for thread in threading.enumerate():
                if thread.native_id is None:
                    continue
                usage = thread_usage(thread.native_id)
                if usage is not None:
                    seen[thread] = (thread_role(thread.name), *usage)
            for thread, (role, user, system, faults) in self._last.items():
                if thread not in seen:
                    self._retired[(role, "user")] += user
                    self._retired[(role, "system")] += system
                    self._retired_faults[role] += faults
            self._last = seen
            totals = dict(self._retired)
            fault_totals = dict(self._retired_faults)
            for role, user, system, faults in seen.values():
                totals[(role, "user")] += user
                totals[(role, "system")] += system
                fault_totals[role] += faults
            # Kept at its highest, so that a counter never goes down: per-thread clock ticks are rounded down
            # one thread at a time, so the remainder can come out a tick lower on a later scrape.
            for mode, process_seconds in (("user", process_user), ("system", process_system)):
                accounted = sum(seconds for (_role, counted_mode), seconds in totals.items() if counted_mode == mode)
                self._unseen[mode] = max(self._unseen[mode], process_seconds - accounted)
                totals[("other", mode)] += self._unseen[mode]
            self._unseen_faults = max(self._unseen_faults, process_faults - sum(fault_totals.values()))
            fault_totals["other"] += self._unseen_faults
        family = CounterMetricFamily(
            "tonle_thread_cpu_seconds",
            "CPU time of this node's threads by job (event_loop, raft, apply, verify, read_ahead, snapshot, receipts, index, other) and mode.",
            labels=["thread", "mode"],
        )
        for (role, mode), seconds in totals.items():
            family.add_metric([role, mode], seconds)
        yield family
        faults_family = CounterMetricFamily(
            "tonle_thread_major_page_faults",
            "Page faults of this node's threads that read from disk, by job (as tonle_thread_cpu_seconds).",
            labels=["thread"],
        )
        for role, faults in fault_totals.items():
            faults_family.add_metric([role], faults)
        yield faults_family

    def describe(self) -> Iterator[Metric]:
        # Described without reading /proc, so registering the collector does not scrape it.
        yield CounterMetricFamily("tonle_thread_cpu_seconds", "CPU time of this node's threads.", labels=["thread", "mode"])
        yield CounterMetricFamily("tonle_thread_major_page_faults", "Page faults of this node's threads that read from disk.", labels=["thread"])
