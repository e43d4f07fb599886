"""Signed tree heads: each validator signs the heads the apply computes, shares its signature with every node,
and every node gathers the validators' signatures, so receipts can carry a majority."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from config.schema import NodeRole
from consensus.receipts import TreeHead
from node.client import AsyncClient, ClientError
from storage.records import HeadRecord, get_head, list_nodes, put_head
from storage.state import StateTransaction

if TYPE_CHECKING:
    from node.server import LedgerNode

logger = logging.getLogger("tonle.heads")

# Signatures that arrive before this node applied their head wait here (bounded: a node far behind drops
# the oldest; it can still serve receipts from heads its peers signed later).
early_signatures_max = 10_000
share_timeout_seconds = 2.0
# Received signatures are written in small groups: one LMDB commit (one fsync) per flush, not per signature.
flush_interval_seconds = 0.05


def head_payload(cluster_id: str, head: HeadRecord) -> bytes:
    return TreeHead(cluster_id, head.tree_size, head.root_hash, head.state_hash, head.index, head.cluster_time_ms).signing_payload()


class HeadSignatures:
    def __init__(self, node: LedgerNode) -> None:
        self._node = node
        self._cluster_id = node.genesis.cluster_id
        self._validator_keys = {spec.name: spec.public_key for spec in node.genesis.validators}
        self._is_validator = node.spec.role is NodeRole.VALIDATOR
        self._own: dict[int, bytes] = {}
        self._early: OrderedDict[int, list[tuple[str, bytes]]] = OrderedDict()
        self._pending_writes: list[tuple[int, str, bytes]] = []
        self._flush_scheduled = False
        self._clients: dict[str, AsyncClient] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heads")
        self._tasks: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        for client in self._clients.values():
            client.close()

    # Tick thread ----------------------------------------------------------------------------------------

    def sign_in_apply(self, transaction: StateTransaction, head: HeadRecord) -> None:
        """A validator signs a head in the transaction that computed it: no extra commit, never lost."""
        if not self._is_validator:
            return
        signature = self._node.node_key.sign(head_payload(self._cluster_id, head)).signature
        put_head(transaction, replace(head, signatures=((self._node.spec.name, signature),)))
        self._own[head.index] = signature

    # Event loop -------------------------------------------------------------------------------------------

    def on_applied(self, head: HeadRecord) -> None:
        signature = self._own.pop(head.index, None)
        if signature is not None:
            self._share(head.index, signature)
        for validator, early in self._early.pop(head.index, []):
            self._accept(head, validator, early)

    def receive(self, index: int, validator: str, signature: bytes) -> str:
        """A validator's signature over this node's head at `index`: stored only if it verifies."""
        if validator not in self._validator_keys:
            return "unknown_validator"
        with self._node.store.read() as transaction:
            head = get_head(transaction, index)
            applied = transaction.applied_index()
        if head is None:
            if index <= applied:
                return "no_head_at_index"
            self._early.setdefault(index, []).append((validator, signature))
            while len(self._early) > early_signatures_max:
                self._early.popitem(last=False)
            return "buffered"
        return self._accept(head, validator, signature)

    def _accept(self, head: HeadRecord, validator: str, signature: bytes) -> str:
        if any(name == validator for name, _ in head.signatures):
            return "duplicate"
        try:
            crypto_sign_open(signature + head_payload(self._cluster_id, head), self._validator_keys[validator])
        except (BadSignatureError, ValueError):
            logger.warning("head signature from %s for index %d does not verify", validator, head.index)
            return "invalid"
        self._pending_writes.append((head.index, validator, signature))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._node.loop.call_later(flush_interval_seconds, self._flush)
        return "stored"

    def _flush(self) -> None:
        self._flush_scheduled = False
        writes, self._pending_writes = self._pending_writes, []
        if writes:
            self._node.loop.run_in_executor(self._writer, self._write, writes)

    def _write(self, writes: list[tuple[int, str, bytes]]) -> None:
        with self._node.store.write() as transaction:
            for index, validator, signature in writes:
                head = get_head(transaction, index)
                if head is not None and all(name != validator for name, _ in head.signatures):
                    put_head(transaction, replace(head, signatures=(*head.signatures, (validator, signature))))

    def _share(self, index: int, signature: bytes) -> None:
        with self._node.store.read() as transaction:
            peers = {record.name: record.client_address for record in list_nodes(transaction)}
        for name, address in peers.items():
            if name == self._node.spec.name:
                continue
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = AsyncClient(address)
            task = self._node.loop.create_task(self._send(client, index, signature))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, client: AsyncClient, index: int, signature: bytes) -> None:
        try:
            await client.request(
                "head_signature", share_timeout_seconds, index=index, validator=self._node.spec.name, signature=signature
            )
        except (ClientError, OSError, asyncio.TimeoutError):
            client.close()  # a peer that is down misses this head; it takes signatures of later ones
