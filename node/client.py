"""Client library for a node's API: an asyncio client, a blocking client, and retry by id."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from typing import Any

from node.protocol import (
    STATUS_REJECTED,
    STATUS_UNKNOWN,
    FrameReader,
    ProtocolError,
    decode_payload,
    encode_frame,
    frame_bytes_max_default,
    retryable_errors,
)

connect_timeout_seconds_default = 5.0
request_timeout_seconds_default = 30.0
retry_backoff_seconds = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)
read_chunk_bytes = 1 << 16


class ClientError(Exception):
    """The node answered with an error, or could not be reached. `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def new_transfer_id() -> bytes:
    """A 128-bit id that sorts by creation time (48-bit milliseconds, then 80 random bits).

    Time-ordered ids keep the node's transfer index append-mostly, which is much cheaper to write than
    random keys (research/performance.md §3), and remain unique without coordination.
    """
    return (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _is_retryable(result: dict[str, Any]) -> bool:
    if result["status"] == STATUS_UNKNOWN:
        return True
    return result["status"] == STATUS_REJECTED and result["result"] in retryable_errors


_transport_failures = retryable_errors | {"unreachable", "disconnected", "timeout"}


def _unknown_replies(error: ClientError, count: int) -> list[dict[str, Any]]:
    """A request that failed in transit: its entries' outcomes are unknown, so they are retried."""
    if error.code not in _transport_failures:
        raise error
    return [{"status": STATUS_UNKNOWN, "result": error.code, "index": None, "original": None}] * count


def _found(reply: dict[str, Any], key: str) -> Any:
    return reply[key] if reply["found"] else None


def _given(**fields: Any) -> dict[str, Any]:
    """Only the optional fields that were given: the server refuses nulls where it expects values."""
    return {name: value for name, value in fields.items() if value is not None}


def _record(results: list[dict[str, Any] | None], todo: list[int], replies: list[dict[str, Any]]) -> list[int]:
    """Store the latest reply of each entry; return the positions that should be sent again."""
    retry = []
    for position, reply in zip(todo, replies, strict=True):
        results[position] = reply
        if _is_retryable(reply):
            retry.append(position)
    return retry


class AsyncClient:
    """One connection to a node, with any number of requests in flight on it."""

    def __init__(self, address: str, *, frame_bytes_max: int = frame_bytes_max_default) -> None:
        self.address = address
        self._frame_bytes_max = frame_bytes_max
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._connect_lock = asyncio.Lock()

    async def _ensure_connected(self) -> asyncio.StreamWriter:
        async with self._connect_lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            host, port = _split_address(self.address)
            try:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), connect_timeout_seconds_default
                )
            except (OSError, asyncio.TimeoutError) as error:
                raise ClientError("unreachable", f"cannot connect to {self.address}: {error}") from None
            sock = self._writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._read_task = asyncio.get_running_loop().create_task(self._read_loop(self._reader))
            return self._writer

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        frames = FrameReader(self._frame_bytes_max)
        error: ClientError = ClientError("disconnected", f"connection to {self.address} closed")
        try:
            while True:
                data = await reader.read(read_chunk_bytes)
                if not data:
                    break
                for payload in frames.feed(data):
                    message = decode_payload(payload)
                    future = self._pending.pop(message.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result(message)
                    elif message.get("id") is None and not message.get("ok", True):
                        failure = message["error"]
                        error = ClientError(failure["code"], failure["message"])
        except (OSError, ProtocolError) as failure:
            error = ClientError("disconnected", str(failure))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
            if self._writer is not None:
                self._writer.close()

    async def request(self, operation: str, timeout_seconds: float = request_timeout_seconds_default, **fields: Any) -> dict[str, Any]:
        writer = await self._ensure_connected()
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        writer.write(encode_frame({"id": request_id, "op": operation, **fields}))
        try:
            reply = await asyncio.wait_for(future, timeout_seconds)
        except asyncio.TimeoutError:
            self._pending.pop(request_id, None)
            raise ClientError("timeout", f"no reply from {self.address} within {timeout_seconds} s") from None
        if not reply.get("ok"):
            failure = reply.get("error", {})
            raise ClientError(failure.get("code", "error"), failure.get("message", ""))
        return reply

    async def submit_raw(
        self, entries: list[bytes], *, forwarded: bool = False, timeout_seconds: float = request_timeout_seconds_default
    ) -> list[dict[str, Any]]:
        reply = await self.request("submit", timeout_seconds, entries=entries, forwarded=forwarded)
        return reply["results"]

    async def submit(self, entries: list[bytes], *, deadline_seconds: float = request_timeout_seconds_default) -> list[dict[str, Any]]:
        """Submit and retry what is still unknown or refused for a retryable reason, with the same bytes.

        Entries carry their ids, so a retry can never apply anything twice: an entry that was applied
        after all answers `exists` (or its pinned failure) the second time.
        """
        deadline = time.monotonic() + deadline_seconds
        results: list[dict[str, Any] | None] = [None] * len(entries)
        todo = list(range(len(entries)))
        for attempt in itertools.count():
            remaining = deadline - time.monotonic()
            try:
                replies = await self.submit_raw([entries[i] for i in todo], timeout_seconds=max(0.1, remaining))
            except ClientError as error:
                replies = _unknown_replies(error, len(todo))
            todo = _record(results, todo, replies)
            if not todo or time.monotonic() >= deadline:
                break
            await asyncio.sleep(retry_backoff_seconds[min(attempt, len(retry_backoff_seconds) - 1)])
        return [result for result in results if result is not None]

    async def lookup_transfer(self, transfer_id: bytes) -> dict[str, Any] | None:
        return _found(await self.request("lookup_transfer", transfer_id=transfer_id), "transfer")

    async def transfers_by_reference(self, reference: str, limit: int = 100) -> list[dict[str, Any]]:
        return (await self.request("transfers_by_reference", reference=reference, limit=limit))["transfers"]

    async def balance(self, account: str, as_of_index: int | None = None) -> dict[str, Any] | None:
        return _found(await self.request("balance", account=account, **_given(as_of_index=as_of_index)), "balance")

    async def history(self, account: str, **filters: Any) -> dict[str, Any] | None:
        return _found(await self.request("history", account=account, **_given(**filters)), "history")

    async def institution(self, institution: str) -> dict[str, Any] | None:
        return _found(await self.request("institution", institution=institution), "institution")

    async def alias(self, alias: str) -> dict[str, Any] | None:
        return _found(await self.request("alias", alias=alias), "alias")

    async def status(self) -> dict[str, Any]:
        return (await self.request("status"))["status"]

    async def totals(self) -> dict[str, Any]:
        return await self.request("totals")

    async def accounts(self) -> list[dict[str, Any]]:
        return (await self.request("accounts"))["accounts"]

    async def nodes(self) -> list[dict[str, Any]]:
        return (await self.request("nodes"))["nodes"]

    async def receipt(self, transfer_id: bytes) -> dict[str, Any]:
        """{"found", "why", "receipt": compact binary or None}; "why" is not_found or not_yet_signed."""
        return await self.request("receipt", transfer_id=transfer_id)

    async def receipt_status(self, transfer_id: bytes) -> dict[str, Any] | None:
        return _found(await self.request("receipt_status", transfer_id=transfer_id), "receipt_status")

    async def tree_head(self, index: int | None = None) -> dict[str, Any] | None:
        return _found(await self.request("tree_head", **_given(index=index)), "head")

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes] | None:
        return _found(await self.request("consistency_proof", old_size=old_size, new_size=new_size), "proof")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._read_task is not None:
            self._read_task.cancel()
        self._writer = None


class Client:
    """A blocking client: one request at a time over one socket. For scripts, the CLI and tests."""

    def __init__(self, address: str, *, timeout_seconds: float = request_timeout_seconds_default,
                 frame_bytes_max: int = frame_bytes_max_default) -> None:
        self.address = address
        self.timeout_seconds = timeout_seconds
        self._frame_bytes_max = frame_bytes_max
        self._socket: socket.socket | None = None
        self._frames = FrameReader(frame_bytes_max)
        self._ids = itertools.count(1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()

    def _connect(self) -> socket.socket:
        if self._socket is None:
            try:
                self._socket = socket.create_connection(_split_address(self.address), timeout=connect_timeout_seconds_default)
            except OSError as error:
                raise ClientError("unreachable", f"cannot connect to {self.address}: {error}") from None
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socket.settimeout(self.timeout_seconds)
            self._frames = FrameReader(self._frame_bytes_max)
        return self._socket

    def request(self, operation: str, **fields: Any) -> dict[str, Any]:
        connection = self._connect()
        request_id = next(self._ids)
        try:
            connection.sendall(encode_frame({"id": request_id, "op": operation, **fields}))
            while True:
                data = connection.recv(read_chunk_bytes)
                if not data:
                    raise ClientError("disconnected", f"{self.address} closed the connection")
                for payload in self._frames.feed(data):
                    reply = decode_payload(payload)
                    if reply.get("id") in (request_id, None):
                        return self._checked(reply)
        except (OSError, ProtocolError) as error:
            self.close()
            if isinstance(error, TimeoutError | socket.timeout):
                raise ClientError("timeout", f"no reply from {self.address} within {self.timeout_seconds} s") from None
            raise ClientError("disconnected", str(error)) from None
        except ClientError:
            self.close()
            raise

    @staticmethod
    def _checked(reply: dict[str, Any]) -> dict[str, Any]:
        if not reply.get("ok"):
            failure = reply.get("error", {})
            raise ClientError(failure.get("code", "error"), failure.get("message", ""))
        return reply

    def submit_raw(self, entries: list[bytes]) -> list[dict[str, Any]]:
        return self.request("submit", entries=entries)["results"]

    def submit(self, entries: list[bytes], *, deadline_seconds: float = request_timeout_seconds_default) -> list[dict[str, Any]]:
        """As AsyncClient.submit: retries unknown and retryable outcomes with the same bytes."""
        deadline = time.monotonic() + deadline_seconds
        results: list[dict[str, Any] | None] = [None] * len(entries)
        todo = list(range(len(entries)))
        for attempt in itertools.count():
            try:
                replies = self.submit_raw([entries[i] for i in todo])
            except ClientError as error:
                replies = _unknown_replies(error, len(todo))
            todo = _record(results, todo, replies)
            if not todo or time.monotonic() >= deadline:
                break
            time.sleep(retry_backoff_seconds[min(attempt, len(retry_backoff_seconds) - 1)])
        return [result for result in results if result is not None]

    def lookup_transfer(self, transfer_id: bytes) -> dict[str, Any] | None:
        return _found(self.request("lookup_transfer", transfer_id=transfer_id), "transfer")

    def transfers_by_reference(self, reference: str, limit: int = 100) -> list[dict[str, Any]]:
        return self.request("transfers_by_reference", reference=reference, limit=limit)["transfers"]

    def balance(self, account: str, as_of_index: int | None = None) -> dict[str, Any] | None:
        return _found(self.request("balance", account=account, **_given(as_of_index=as_of_index)), "balance")

    def history(self, account: str, **filters: Any) -> dict[str, Any] | None:
        """Filters: start_ms, end_ms, limit, cursor (from the previous page)."""
        return _found(self.request("history", account=account, **_given(**filters)), "history")

    def institution(self, institution: str) -> dict[str, Any] | None:
        return _found(self.request("institution", institution=institution), "institution")

    def alias(self, alias: str) -> dict[str, Any] | None:
        return _found(self.request("alias", alias=alias), "alias")

    def status(self) -> dict[str, Any]:
        return self.request("status")["status"]

    def totals(self) -> dict[str, Any]:
        return self.request("totals")

    def accounts(self) -> list[dict[str, Any]]:
        return self.request("accounts")["accounts"]

    def nodes(self) -> list[dict[str, Any]]:
        return self.request("nodes")["nodes"]

    def receipt(self, transfer_id: bytes) -> dict[str, Any]:
        """{"found", "why", "receipt": compact binary or None}; "why" is not_found or not_yet_signed."""
        return self.request("receipt", transfer_id=transfer_id)

    def receipt_status(self, transfer_id: bytes) -> dict[str, Any] | None:
        return _found(self.request("receipt_status", transfer_id=transfer_id), "receipt_status")

    def tree_head(self, index: int | None = None) -> dict[str, Any] | None:
        """The first head at or after `index` signed by a majority (the latest such head without one)."""
        return _found(self.request("tree_head", **_given(index=index)), "head")

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes] | None:
        return _found(self.request("consistency_proof", old_size=old_size, new_size=new_size), "proof")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
