"""The admin HTTP listener: /livez, /readyz with named checks, /status and /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from node.server import LedgerNode

logger = logging.getLogger("tonle.admin")

request_head_bytes_max = 8192
request_read_timeout_seconds = 5.0
admin_connections_max = 64

_reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class AdminServer:
    """A deliberately small HTTP/1.1 server: GET and HEAD only, one request per connection."""

    def __init__(self, node: LedgerNode) -> None:
        self._node = node
        self._server: asyncio.AbstractServer | None = None
        self._open = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=request_head_bytes_max)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > admin_connections_max:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), request_read_timeout_seconds)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            status, content_type, body, method = self._respond(head)
            headers = (
                f"HTTP/1.1 {status} {_reasons.get(status, '')}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(headers.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._open -= 1
            writer.close()

    def _respond(self, head: bytes) -> tuple[int, str, bytes, str]:
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, _version = request_line.split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return 400, "text/plain", b"bad request\n", "GET"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n", method
        url = urlsplit(target)
        query = parse_qs(url.query, keep_blank_values=True)
        path = url.path.rstrip("/") or "/"
        if path == "/livez":
            # Liveness depends on nothing but this process answering: never on a leader or on peers.
            return 200, "text/plain", b"ok\n", method
        if path == "/readyz" or path.startswith("/readyz/"):
            return self._readyz(path, query) + (method,)
        if path == "/status":
            body = json.dumps(self._node.status(), indent=2, sort_keys=True).encode() + b"\n"
            return 200, "application/json", body, method
        if path == "/metrics":
            self._node.refresh_gauges()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._node.metrics.registry), method
        return 404, "text/plain", b"not found\n", method

    def _readyz(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        ready, checks = self._node.readiness()
        if path.startswith("/readyz/"):
            name = path[len("/readyz/") :]
            if name not in checks:
                return 404, "text/plain", f"no check named {name!r}\n".encode()
            ok, detail = checks[name]
            return (200 if ok else 503), "text/plain", f"[{'+' if ok else '-'}]{name} {detail}\n".encode()
        excluded = {name for value in query.get("exclude", []) for name in value.split(",") if name}
        selected = {name: result for name, result in checks.items() if name not in excluded}
        ready = all(ok for ok, _ in selected.values())
        if "verbose" in query or not ready:
            lines = [f"[{'+' if ok else '-'}]{name} {detail}" for name, (ok, detail) in selected.items()]
            lines.append(f"readyz check {'passed' if ready else 'failed'}")
            body = ("\n".join(lines) + "\n").encode()
        else:
            body = b"ok\n"
        return (200 if ready else 503), "text/plain", body
