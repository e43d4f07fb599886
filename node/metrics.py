"""Prometheus metrics of one node, under the `tonle_` prefix, in base units, with bounded labels."""

from __future__ import annotations

from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Classic histograms with 1 ms x 2^k buckets: 1 ms .. ~16 s, wide enough for a commit under any fault.
latency_buckets_seconds = tuple(0.001 * 2**k for k in range(15))
# Fsyncs and applies are often well under a millisecond; start lower for them.
short_latency_buckets_seconds = tuple(0.0000625 * 2**k for k in range(19))
batch_entry_buckets = tuple(2**k for k in range(13))


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
        build = Info("tonle_build", "Build and identity of this node.", registry=registry)
        build.info(
            {
                "version": _version("tonle"),
                "pysyncobj_version": _version("pysyncobj"),
                "node": node_name,
                "role": node_role,
            }
        )
        # Raft -------------------------------------------------------------------------------------------
        self.is_leader = Gauge("tonle_raft_is_leader", "1 if this node is the Raft leader.", registry=registry)
        self.has_leader = Gauge("tonle_raft_has_leader", "1 if this node knows a leader.", registry=registry)
        self.leader_changes = Counter(
            "tonle_raft_leader_changes", "Times the leader seen by this node changed.", registry=registry
        )
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
            "Time from sending entries to a peer to its acknowledgement.",
            ["peer"],
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.handshakes_refused = Counter(
            "tonle_raft_handshakes_refused", "Raft connections refused during the handshake.", ["reason"], registry=registry
        )
        self.frames_refused = Counter(
            "tonle_raft_frames_refused", "Raft frames refused after the handshake.", ["reason"], registry=registry
        )
        self.messages_dropped = Counter(
            "tonle_raft_messages_dropped", "Raft messages dropped (not permitted or unsupported).", ["reason"], registry=registry
        )
        self.recovering = Gauge(
            "tonle_raft_recovering",
            "1 while this node refills a damaged journal and abstains from voting.",
            registry=registry,
        )
        # Commit path ------------------------------------------------------------------------------------
        self.proposer_queue = Gauge("tonle_proposer_queue_entries", "Verified entries waiting for a batch.", registry=registry)
        self.proposals = Counter("tonle_proposals", "Batches proposed to Raft by this node.", registry=registry)
        self.proposals_failed = Counter(
            "tonle_proposals_failed", "Proposals that Raft reported as not committed.", ["reason"], registry=registry
        )
        self.proposals_pending = Gauge(
            "tonle_proposals_pending", "Batches proposed and not yet applied or failed.", registry=registry
        )
        self.queue_wait = Histogram(
            "tonle_commit_queue_wait_seconds",
            "Time an entry waited in the proposer queue (per batch, oldest entry).",
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.batch_build = Histogram(
            "tonle_commit_batch_build_seconds", "Time to cut and encode a batch.", buckets=short_latency_buckets_seconds, registry=registry
        )
        self.signature_verification = Histogram(
            "tonle_commit_signature_verification_seconds",
            "Time to verify the signatures of one intake request or one prefetched batch.",
            buckets=short_latency_buckets_seconds,
            registry=registry,
        )
        self.replication = Histogram(
            "tonle_commit_replication_seconds",
            "Leader: time from proposing a batch to applying it (replication, fsyncs, commit).",
            buckets=latency_buckets_seconds,
            registry=registry,
        )
        self.fsync = Histogram(
            "tonle_journal_fsync_seconds", "Duration of one journal fsync.", buckets=short_latency_buckets_seconds, registry=registry
        )
        self.apply = Histogram(
            "tonle_commit_apply_seconds", "Duration of applying one batch in one LMDB transaction.", buckets=short_latency_buckets_seconds, registry=registry
        )
        self.batch_entries = Histogram(
            "tonle_batch_entries", "Entries per applied batch.", buckets=batch_entry_buckets, registry=registry
        )
        self.entries_applied = Counter(
            "tonle_entries_applied", "Entries applied, by result.", ["result"], registry=registry
        )
        self.entries_rejected = Counter(
            "tonle_entries_rejected", "Entries refused on intake (never logged), by reason.", ["reason"], registry=registry
        )
        self.signatures_verified = Counter(
            "tonle_signatures_verified", "Ed25519 verifications performed by this node.", registry=registry
        )
        # State ----------------------------------------------------------------------------------------
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
        # Client API -----------------------------------------------------------------------------------
        self.api_requests = Counter(
            "tonle_api_requests", "Client API requests, by operation and result.", ["operation", "result"], registry=registry
        )
        self.api_connections = Gauge("tonle_api_connections", "Open client API connections.", registry=registry)
