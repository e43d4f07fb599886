"""Observers that turn transport and journal events into metrics and log lines."""

from __future__ import annotations

import logging

from node.metrics import NodeMetrics

logger = logging.getLogger("tonle.raft")


class TransportMetrics:
    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def peer_connected(self, name: str, role: str) -> None:
        logger.info("raft peer %s (%s) connected", name, role, extra={"event": "peer_connected", "peer": name})

    def peer_disconnected(self, name: str) -> None:
        logger.info("raft peer %s disconnected", name, extra={"event": "peer_disconnected", "peer": name})

    def handshake_refused(self, reason: str, remote: str) -> None:
        self._metrics.handshakes_refused.labels(reason).inc()

    def frame_refused(self, peer: str, reason: str) -> None:
        self._metrics.frames_refused.labels(reason).inc()

    def message_dropped(self, peer: str, message_type: str, reason: str) -> None:
        self._metrics.messages_dropped.labels(reason).inc()

    def round_trip_observed(self, peer: str, seconds: float) -> None:
        self._metrics.peer_round_trip.labels(peer).observe(seconds)


class JournalMetrics:
    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def fsync_completed(self, seconds: float, bytes_written: int) -> None:
        self._metrics.fsync.observe(seconds)

    def corruption_detected(self, position: int, offset: int, reason: str) -> None:
        logger.critical(
            "journal record %d at offset %d is damaged (%s): truncated there; this node abstains from voting "
            "until the leader has refilled its log",
            position,
            offset,
            reason,
            extra={"event": "journal_corruption"},
        )

    def torn_tail_truncated(self, offset: int, bytes_dropped: int) -> None:
        logger.warning(
            "journal ended in a torn record at offset %d (%d bytes dropped): the last write before a crash",
            offset,
            bytes_dropped,
            extra={"event": "journal_torn_tail"},
        )
