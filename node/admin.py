"""The admin HTTP listener: /livez, /readyz with named checks, /status, /cluster, /metrics and the status page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from config.schema import NodeSpec
from node.status_page import (
    CommitHistory,
    HistorySample,
    NodeReport,
    content_security_policy,
    page_html,
    summarize_cluster,
)

if TYPE_CHECKING:
    from node.metrics import NodeMetrics
    from node.server import LedgerNode

request_head_bytes_max = 8192
request_read_timeout_seconds = 5.0
admin_connections_max = 64
# The status page's commit-rate chart: one sample a second, five minutes of them.
history_sample_interval_seconds = 1.0
history_samples_max = 300
# /cluster asks every peer for its /status; a peer slower than this is shown as unreachable, so one paused
# node cannot hold the page (or the admin connection slots) hostage.
peer_status_timeout_seconds = 1.0
peer_status_bytes_max = 65536

# What summarize_cluster reads from a peer's /status; a peer answering anything else is shown as unreachable.
_status_fields: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "role": str,
    "term": int,
    "leader": (str, type(None)),
    "commit_index": int,
    "applied_index": int,
    "ready": bool,
    "diverged": bool,
    "connected_peers": list,
}

_reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class PeerStatusError(Exception):
    """A peer's /status could not be read; the message says why (shown on the status page)."""


class AdminServer:
    """A deliberately small HTTP/1.1 server: GET and HEAD only, one request per connection."""

    def __init__(self, node: LedgerNode) -> None:
        self._node = node
        self._server: asyncio.AbstractServer | None = None
        self._open = 0
        self.history = CommitHistory(history_samples_max)
        self._sampler: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=request_head_bytes_max)
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._server is not None:
            self._server.close()

    async def _sample_forever(self) -> None:
        while True:
            self.history.add(
                HistorySample(
                    unix_seconds=time.time(),
                    monotonic_seconds=time.monotonic(),
                    applied_index=self._node.metrics_applied_index(),
                    entries_applied=_entries_applied(self._node.metrics),
                )
            )
            await asyncio.sleep(history_sample_interval_seconds)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > admin_connections_max:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), request_read_timeout_seconds)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            method, response = await self._respond(head)
            headers = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
            head_out = (
                f"HTTP/1.1 {response.status} {_reasons.get(response.status, '')}\r\n"
                f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n"
                f"{headers}Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(head_out.encode() + (b"" if method == "HEAD" else response.body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _respond(self, head: bytes) -> tuple[str, Response]:
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, _version = request_line.split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return "GET", _text(400, "bad request")
        if method not in ("GET", "HEAD"):
            return method, Response(405, "text/plain", b"only GET and HEAD\n", (("Allow", "GET, HEAD"),))
        url = urlsplit(target)
        query = parse_qs(url.query, keep_blank_values=True)
        path = url.path.rstrip("/") or "/"
        if path == "/livez":
            # Liveness depends on nothing but this process answering: never on a leader or on peers, so a
            # leaderless network is not restarted into a restart storm.
            return method, _text(200, "ok")
        if path == "/readyz" or path.startswith("/readyz/"):
            return method, self._readyz(path, query)
        if path == "/status":
            return method, _json(self._node.status())
        if path == "/cluster":
            return method, _json(await self.cluster_view())
        if path == "/metrics":
            self._node.refresh_gauges()
            return method, Response(200, CONTENT_TYPE_LATEST, generate_latest(self._node.metrics.registry))
        if path == "/":
            return method, Response(
                200, "text/html; charset=utf-8", page_html, (("Content-Security-Policy", content_security_policy),)
            )
        return method, _text(404, "not found")

    def _readyz(self, path: str, query: dict[str, list[str]]) -> Response:
        _ready, checks = self._node.readiness()
        if path.startswith("/readyz/"):
            name = path[len("/readyz/") :]
            if name not in checks:
                return _text(404, f"no check named {name!r}; checks: {', '.join(checks)}")
            selected = {name: checks[name]}
        else:
            excluded = {name for value in query.get("exclude", []) for name in value.split(",") if name}
            selected = {name: result for name, result in checks.items() if name not in excluded}
        ready = all(ok for ok, _ in selected.values())
        counter = self._node.metrics.health_checks
        for name, (ok, _detail) in selected.items():
            counter.labels(name, "passed" if ok else "failed").inc()
        if "verbose" in query or not ready:
            lines = [_check_line(name, ok, detail) for name, (ok, detail) in selected.items()]
            lines.append(f"readyz check {'passed' if ready else 'failed'}")
            return _text(200 if ready else 503, "\n".join(lines))
        return _text(200, "ok")

    async def cluster_view(self) -> dict[str, Any]:
        """Every node's /status gathered now (peers concurrently, each within its timeout)."""
        node = self._node
        peers = [spec for spec in node.genesis.nodes if spec.name != node.spec.name]
        answers = await asyncio.gather(*(_peer_report(spec) for spec in peers))
        by_name = {report.name: report for report in answers}
        by_name[node.spec.name] = NodeReport(node.spec.name, str(node.spec.role), node.status(), None)
        reports = [by_name[spec.name] for spec in node.genesis.nodes]
        return summarize_cluster(
            node.spec.name,
            node.genesis.cluster_id,
            reports,
            self.history.rates(),
            history_samples_max * history_sample_interval_seconds,
            time.time(),
        )


async def _peer_report(spec: NodeSpec) -> NodeReport:
    try:
        fetch = fetch_status(spec.admin_address.host, spec.admin_address.port)
        status = await asyncio.wait_for(fetch, peer_status_timeout_seconds)
    except asyncio.TimeoutError:
        return NodeReport(spec.name, str(spec.role), None, f"no answer within {peer_status_timeout_seconds} s")
    except (OSError, PeerStatusError) as error:
        return NodeReport(spec.name, str(spec.role), None, str(error) or type(error).__name__)
    return NodeReport(spec.name, str(spec.role), status, None)


async def fetch_status(host: str, port: int) -> dict[str, Any]:
    """GET /status from a peer's admin listener; raises PeerStatusError for any answer that is not one."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        writer.write(f"GET /status HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = b""
        while len(raw) <= peer_status_bytes_max:
            chunk = await reader.read(peer_status_bytes_max + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if len(raw) > peer_status_bytes_max:
        raise PeerStatusError(f"answer larger than {peer_status_bytes_max} bytes")
    head, separator, body = raw.partition(b"\r\n\r\n")
    if not separator or not head.startswith(b"HTTP/1.1 200 "):
        raise PeerStatusError(f"unexpected answer: {head[:60]!r}")
    try:
        status = json.loads(body)
    except ValueError as error:
        raise PeerStatusError(f"status is not JSON: {error}") from None
    if not isinstance(status, dict):
        raise PeerStatusError("status is not a JSON object")
    for field, kind in _status_fields.items():
        if not isinstance(status.get(field), kind):
            raise PeerStatusError(f"status field {field!r} is missing or of the wrong type")
    return status


def _check_line(name: str, ok: bool, detail: str) -> str:
    """Kubernetes' verbose form: `[+]name ok` or `[-]name failed`, with the node's reason after it."""
    return f"[+]{name} ok: {detail}" if ok else f"[-]{name} failed: {detail}"


def _entries_applied(metrics: NodeMetrics) -> int:
    return int(sum(sample.value for family in metrics.entries_applied.collect() for sample in family.samples))


def _text(status: int, text: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", (text + "\n").encode())


def _json(document: dict[str, Any]) -> Response:
    return Response(200, "application/json", json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")
