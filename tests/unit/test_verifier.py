"""The node's verifier: signatures checked once per node, decodes handed to the apply, both caches bounded."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from consensus.entries import Issue, OpenAccount, Transfer, TransferFlags, decode_entry
from node import verifier as verifier_module
from node.verifier import SignatureVerifier
from storage.rules import apply_batch
from tests.ledger_fixtures import Ledger, batch, make_network, tid


@pytest.fixture
def verifier():
    instance = SignatureVerifier(threads=2)
    yield instance
    instance.close()


def funded_ledger(path: Path, network) -> Ledger:
    ledger = Ledger(path, network)
    sign = network.sign
    accounts = [f"c{number}@aba" for number in range(8)]
    ledger.apply(*(sign(OpenAccount(account, "KHR", tier="full"), "aba") for account in accounts))
    ledger.apply(sign(Issue(tid(1), "settlement.khr@aba", 10**9, "KHR"), "nbc"))
    ledger.apply(*(sign(Transfer(tid(2 + n), "settlement.khr@aba", a, 10**6, "KHR"), "aba") for n, a in enumerate(accounts)))
    return ledger


def workload(network, count: int) -> list[bytes]:
    """Transfers of every shape the decode matters for: plain, linked chains, failures, a forged signature."""
    generator = random.Random(5)
    accounts = [f"c{number}@aba" for number in range(8)]
    entries = []
    for number in range(count):
        debit, credit = generator.sample(accounts, 2)
        flags = int(TransferFlags.LINKED) if number % 7 == 3 else 0
        amount = generator.choice([1, 50, 10**7])  # 10**7 exceeds the balance: a failure, pinned
        entries.append(network.sign(Transfer(tid(1000 + number), debit, credit, amount, "KHR", flags=flags), "aba"))
    forged = bytearray(entries[5])
    forged[-1] ^= 1
    entries[5] = bytes(forged)
    return entries


def test_applying_remembered_decodes_gives_the_same_outcomes_and_state_as_decoding_again(tmp_path, verifier):
    network = make_network()
    decoding = funded_ledger(tmp_path / "decoding", network)
    remembering = funded_ledger(tmp_path / "remembering", network)
    entries = workload(network, 300)
    taken = []
    results = []

    def take(raw: bytes):
        found = verifier.take_decoded(raw)
        taken.append(found is not None)
        return found

    for start in range(0, len(entries), 60):
        raw_batch = batch(*entries[start : start + 60])
        verifier.prefetch(raw_batch)
        verifier.wait_for_batch(raw_batch)
        expected = decoding.apply(*entries[start : start + 60])
        remembering.index += 1
        with remembering.store.write() as transaction:
            applied = apply_batch(
                transaction, remembering.index, raw_batch, verifier.is_valid, network.genesis.cluster_id, decoded=take
            )
        assert applied.outcomes == expected.outcomes
        assert applied.state_hash == expected.state_hash
        results += [outcome.result for outcome in applied.outcomes]
    assert all(taken) and len(taken) == len(entries)
    # The workload exercised what matters: the forged entry, chains, failures and successes.
    assert results.count("signature_invalid") == 1
    assert {"ok", "exceeds_credits", "linked_event_failed"} <= set(results)
    assert verifier.take_decoded(entries[0]) is None, "a decode is handed to the apply once, then dropped"


def test_a_prefetched_batch_is_verified_once_the_apply_uses_each_verification_once_and_a_forged_entry_is_not_remembered(verifier):
    network = make_network()
    entries = workload(network, 40)
    raw_batch = batch(*entries)
    verifier.prefetch(raw_batch)
    verifier.wait_for_batch(raw_batch)
    results = [verifier.is_valid(decode_entry(raw)) for raw in entries]
    assert results == [number != 5 for number in range(40)]
    assert verifier.cache_hits == 39
    # Nothing stays remembered once applied: checked again, every entry is verified again, with the same answer.
    assert [verifier.is_valid(decode_entry(raw)) for raw in entries] == results
    assert verifier.cache_hits == 39


def test_the_verified_cache_keeps_at_most_its_limit_dropping_the_oldest(verifier, monkeypatch):
    monkeypatch.setattr(verifier_module, "verified_cache_entries_max", 10)
    network = make_network()
    entries = [raw for number, raw in enumerate(workload(network, 25)) if number != 5]
    for future in verifier.verify_many([decode_entry(raw) for raw in entries]):
        future.result()
    assert [verifier.is_valid(decode_entry(raw)) for raw in entries] == [True] * len(entries)
    assert verifier.cache_hits == 10


def test_the_decode_cache_keeps_at_most_its_limit_dropping_the_oldest(verifier, monkeypatch):
    monkeypatch.setattr(verifier_module, "decoded_cache_entries_max", 10)
    network = make_network()
    entries = workload(network, 25)
    verifier.remember_decoded([(decode_entry(raw), decode_entry(raw).body()) for raw in entries])
    assert verifier.take_decoded(entries[14]) is None
    assert all(verifier.take_decoded(raw) is not None for raw in entries[15:])


def test_a_lone_entry_is_verified_on_the_callers_thread_only_while_the_pool_is_idle_and_at_most_once_a_millisecond(monkeypatch):
    network = make_network()
    entries = [decode_entry(raw) for raw in workload(network, 8)]
    checked_on: list[str] = []
    real_check = verifier_module.signature_is_valid
    release = threading.Event()

    def recording_check(entry):
        checked_on.append(threading.current_thread().name)
        if entry is entries[7]:
            release.wait(timeout=10)  # holds a pool thread: the pool has a verification under way
        return real_check(entry)

    monkeypatch.setattr(verifier_module, "signature_is_valid", recording_check)
    now = [100.0]
    verifier = SignatureVerifier(threads=2, clock=lambda: now[0])
    caller = threading.current_thread().name
    try:
        assert verifier.verify_now_if_idle([entries[0]]) == [True]
        assert checked_on == [caller]
        assert verifier.is_valid(entries[0]) and verifier.cache_hits == 1  # remembered for the apply, as from the pool

        # Within the interval the next lone entry goes to the pool (a burst must not queue behind the loop).
        now[0] += verifier_module.inline_interval_seconds_min / 2
        assert verifier.verify_now_if_idle([entries[1]]) is None
        now[0] += verifier_module.inline_interval_seconds_min
        assert verifier.verify_now_if_idle([entries[5]]) == [False]  # the forged one

        # More than inline_entries_max entries always go to the pool.
        now[0] += 1
        assert verifier.verify_now_if_idle(entries[1:3]) is None

        checked_on.clear()
        held = verifier.verify_many([entries[7]])
        assert verifier.verify_now_if_idle([entries[1]]) is None
        release.set()
        assert held[0].result(timeout=10) == [True]
        assert all(name.startswith("verify") for name in checked_on)
        deadline = time.monotonic() + 10
        while verifier.verify_now_if_idle([entries[2]]) is None:  # the pool's done-callback may run a moment later
            assert time.monotonic() < deadline, "the pool never became idle again"
            time.sleep(0.01)
        assert checked_on[-1] == caller
    finally:
        release.set()
        verifier.close()


def _batch_sizes_around_the_prefetch_bound(network) -> tuple[list[bytes], list[bytes]]:
    """The longest run of transfers whose batch stays below the bound, and the same run with one more."""
    entries: list[bytes] = []
    while True:
        number = len(entries)
        entry = network.sign(Transfer(tid(5000 + number), f"c{number % 8}@aba", "settlement.khr@aba", 5, "KHR"), "aba")
        if len(batch(*entries, entry)) >= verifier_module.prefetch_batch_bytes_min:
            return entries, [*entries, entry]
        entries.append(entry)


def test_a_batch_below_the_prefetch_bound_is_left_to_the_apply_which_checks_every_signature_itself(tmp_path):
    network = make_network()
    small, large = _batch_sizes_around_the_prefetch_bound(network)
    assert len(batch(*small)) < verifier_module.prefetch_batch_bytes_min <= len(batch(*large))
    forged = bytearray(small[1])
    forged[-1] ^= 1
    small[1] = bytes(forged)
    verified: list[int] = []
    read_ahead: list[int] = []
    verifier = SignatureVerifier(threads=2, count_verified=verified.append, read_ahead=lambda bodies: read_ahead.append(len(bodies)))
    try:
        raw_small = batch(*small)
        verifier.prefetch(raw_small)
        verifier.wait_for_batch(raw_small)
        assert verified == [] and read_ahead == [], "a small batch was handed to the pool"
        ledger = funded_ledger(tmp_path / "ledger", network)
        ledger.index += 1
        with ledger.store.write() as transaction:
            applied = apply_batch(
                transaction, ledger.index, raw_small, verifier.is_valid, network.genesis.cluster_id, decoded=verifier.take_decoded
            )
        results = [outcome.result for outcome in applied.outcomes]
        assert results[1] == "signature_invalid" and results.count("ok") == len(small) - 1
        assert sum(verified) == len(small) and verifier.cache_hits == 0, "the apply checked each signature once"

        # One entry more crosses the bound: the batch is verified (and its accounts read) ahead of the apply.
        raw_large = batch(*large)
        verifier.prefetch(raw_large)
        verifier.wait_for_batch(raw_large)
        assert sum(verified) == len(small) + len(large) and read_ahead
        assert all(verifier.is_valid(decode_entry(raw)) for raw in large) and verifier.cache_hits == len(large)
    finally:
        verifier.close()
