"""The client API listener: an asyncio protocol that frames, parses and dispatches requests to the node."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from node.protocol import (
    ERROR_BUSY,
    FrameReader,
    ProtocolError,
    SubmitRequest,
    decode_payload,
    encode_frame,
    error_reply,
    parse_request,
)

if TYPE_CHECKING:
    from node.server import LedgerNode

logger = logging.getLogger("tonle.api")

# Requests one connection may have in flight; beyond it the server answers `busy` and stops reading
# from that connection until replies drain, so one client cannot queue unbounded work.
requests_in_flight_per_connection_max = 256


class ApiProtocol(asyncio.Protocol):
    def __init__(self, node: LedgerNode, server: ApiServer) -> None:
        self._node = node
        self._server = server
        self._reader = FrameReader(node.config.api.frame_bytes_max)
        self._transport: asyncio.Transport | None = None
        self._in_flight = 0
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if not self._server.admit(self):
            self._send(error_reply(None, ERROR_BUSY, "too many client connections"))
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.release(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except ProtocolError as error:
            # The stream cannot be resynchronised after a refused length: answer and close.
            self._count("frame", error.code)
            self._send(error_reply(None, error.code, error.message))
            if self._transport is not None:
                self._transport.close()
            return
        for payload in frames:
            self._handle(payload)

    def _handle(self, payload: bytes) -> None:
        try:
            request = parse_request(decode_payload(payload))
        except ProtocolError as error:
            self._count("invalid", error.code)
            self._send(error_reply(error.request_id, error.code, error.message))
            return
        operation = "submit" if isinstance(request, SubmitRequest) else request.operation
        if self._in_flight >= requests_in_flight_per_connection_max:
            self._count(operation, ERROR_BUSY)
            self._send(error_reply(request.request_id, ERROR_BUSY, "too many requests in flight on this connection"))
            return
        if isinstance(request, SubmitRequest):
            self._in_flight += 1
            if self._in_flight >= requests_in_flight_per_connection_max and self._transport is not None:
                self._transport.pause_reading()
                self._paused = True
            task = asyncio.get_running_loop().create_task(self._submit(request))
            self._server.track(task)
            return
        try:
            reply = {"id": request.request_id, "ok": True, **self._node.handle_query(request)}
        except Exception as error:  # noqa: BLE001 - a failed query must not take the connection down
            logger.exception("query failed")
            self._count(operation, "internal_error")
            self._send(error_reply(request.request_id, "internal_error", str(error)))
            return
        self._count(operation, "ok")
        self._send(reply)

    async def _submit(self, request: SubmitRequest) -> None:
        try:
            results = await self._node.submit(request)
            self._count("submit", "ok")
            self._send({"id": request.request_id, "ok": True, "results": results})
        except Exception as error:  # noqa: BLE001
            logger.exception("submit failed")
            self._count("submit", "internal_error")
            self._send(error_reply(request.request_id, "internal_error", str(error)))
        finally:
            self._in_flight -= 1
            if self._paused and self._in_flight < requests_in_flight_per_connection_max // 2 and self._transport:
                self._transport.resume_reading()
                self._paused = False

    def _send(self, message: dict[str, Any]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode_frame(message))

    def _count(self, operation: str, result: str) -> None:
        self._node.metrics.api_requests.labels(operation, result).inc()


class ApiServer:
    """Owns the listening socket and bounds the number of client connections."""

    def __init__(self, node: LedgerNode) -> None:
        self._node = node
        self._connections: set[ApiProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ApiProtocol(self._node, self), host, port, backlog=512)

    def admit(self, connection: ApiProtocol) -> bool:
        if len(self._connections) >= self._node.config.api.connections_max:
            return False
        self._connections.add(connection)
        self._node.metrics.api_connections.set(len(self._connections))
        return True

    def release(self, connection: ApiProtocol) -> None:
        self._connections.discard(connection)
        self._node.metrics.api_connections.set(len(self._connections))

    def track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

