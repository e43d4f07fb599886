"""Test helpers: a small genesis with real keys, signing shortcuts and batch building."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nacl.signing import SigningKey

from config.schema import Address, Currency, Genesis, Institution, NodeRole, NodeSpec, Role
from consensus.batch import Batch, encode_batch
from consensus.entries import Body, sign_entry, signature_is_valid
from storage import queries
from storage.rules import AppliedBatch, apply_batch, genesis_applied_index, initialize
from storage.state import LedgerStore

cluster_id = "tonle-test-1"


def stored_records(store: LedgerStore) -> list[tuple[str, bytes, bytes]]:
    """Every record of every database of `store`, sealed bytes as stored, each database in key order."""
    with store.environment.begin() as transaction:
        return [(name, key, stored) for name, handle in store.databases.items() for key, stored in transaction.cursor(handle)]


def put_random_accounts(store: LedgerStore, count: int) -> None:
    """`count` records of 100 random bytes under keys account-000000..., in one write transaction: a state
    whose account pages a test can drop from memory or age (not account records the apply could read)."""
    with store.write() as transaction:
        for number in range(count):
            transaction.put("accounts", b"account-%06d" % number, os.urandom(100))


@dataclass
class Network:
    genesis: Genesis
    keys: dict[str, SigningKey] = field(default_factory=dict)

    def sign(self, body: Body, signer: str, *, key: SigningKey | None = None, network: str | None = None) -> bytes:
        return sign_entry(
            body, cluster_id=network or self.genesis.cluster_id, signer=signer, signing_key=key or self.keys[signer]
        )


def make_network(institutions: tuple[tuple[str, Role], ...] = (("aba", Role.BANK), ("acleda", Role.BANK)),
                 network_id: str = cluster_id) -> Network:
    keys = {"nbc": SigningKey.generate()}
    records = [Institution("nbc", "National Bank of Cambodia", Role.CENTRAL_BANK, bytes(keys["nbc"].verify_key))]
    for institution_id, role in institutions:
        keys[institution_id] = SigningKey.generate()
        records.append(Institution(institution_id, institution_id.upper(), role, bytes(keys[institution_id].verify_key)))
    validator = NodeSpec(
        name="v1",
        role=NodeRole.VALIDATOR,
        institution=None,
        raft_address=Address("127.0.0.1", 7001),
        client_address=Address("127.0.0.1", 8001),
        admin_address=Address("127.0.0.1", 9001),
        public_key=bytes(SigningKey.generate().verify_key),
    )
    genesis = Genesis(
        format_version=1,
        cluster_id=network_id,
        currencies=(Currency("KHR", 0), Currency("USD", 2)),
        institutions=tuple(records),
        validators=(validator,),
        institution_nodes=(),
    )
    return Network(genesis, keys)


def batch(*entries: bytes, time_ms: int = 1_700_000_000_000) -> bytes:
    return encode_batch(Batch(time_ms, None, tuple(entries)))


def tid(number: int) -> bytes:
    return number.to_bytes(16, "big")


class Ledger:
    """A real LMDB store initialised from a test genesis, applying batches at consecutive indexes."""

    def __init__(self, path, network: Network, *, start_ms: int = 1_700_000_000_000) -> None:
        self.network = network
        self.store = LedgerStore(path, map_size_bytes=256 << 20)
        with self.store.write() as transaction:
            initialize(transaction, network.genesis)
        self.index = genesis_applied_index
        self.time_ms = start_ms

    def apply(self, *entries: bytes, time_ms: int | None = None) -> AppliedBatch:
        self.index += 1
        if time_ms is not None:
            self.time_ms = time_ms
        with self.store.write() as transaction:
            applied = apply_batch(
                transaction, self.index, batch(*entries, time_ms=self.time_ms), signature_is_valid, self.network.genesis.cluster_id
            )
        assert applied is not None
        return applied

    def results(self, *entries: bytes, time_ms: int | None = None) -> list[str]:
        return [outcome.result for outcome in self.apply(*entries, time_ms=time_ms).outcomes]

    def balance(self, account: str, as_of_index: int | None = None) -> dict:
        with self.store.read() as transaction:
            return queries.balance(transaction, account, as_of_index)

    def net(self, account: str) -> int:
        return self.balance(account)["balance"]

    def transfer(self, transfer_id: bytes) -> dict | None:
        with self.store.read() as transaction:
            return queries.transfer(transaction, transfer_id)

    def summary(self):
        return self.store.summary()
