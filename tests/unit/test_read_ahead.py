"""Reading accounts ahead of the apply: which accounts an entry names, their pages brought into memory off
the apply's thread, and a bounded queue that drops a read-ahead rather than wait."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from config.loader import load_node_config
from consensus.entries import Issue, OpenAccount, Redeem, RegisterAlias, RotateKey, Transfer, TransferFlags, decode_entry
from node import verifier as verifier_module
from node.cluster import LocalCluster
from node.metrics import thread_usage
from node.server import LedgerNode
from node.verifier import SignatureVerifier
from storage.records import read_accounts_ahead
from storage.rules import accounts_read_by
from storage.state import LedgerStore
from tests.ledger_fixtures import Ledger, batch, make_network, put_random_accounts, tid
from tests.waiting import wait_until

deadline_seconds = 20.0
map_size_bytes = 64 << 20


def test_an_entry_names_the_accounts_its_apply_reads_by_name():
    assert accounts_read_by(Transfer(tid(1), "a@aba", "+85512345678", 5, "KHR")) == ("a@aba", "+85512345678")
    assert accounts_read_by(Issue(tid(2), "settlement.khr@aba", 5, "KHR")) == ("settlement.khr@aba",)
    assert accounts_read_by(Redeem(tid(3), "settlement.khr@aba", 5, "KHR")) == ("settlement.khr@aba",)
    # A transfer that posts or voids a pending one reaches its accounts through the pending record.
    for flag in (TransferFlags.POST_PENDING, TransferFlags.VOID_PENDING):
        assert accounts_read_by(Transfer(tid(4), "", "", 0, "KHR", flags=int(flag), pending_id=tid(1))) == ()
    assert accounts_read_by(OpenAccount("new@aba", "KHR")) == ()
    assert accounts_read_by(RotateKey("aba", bytes(32))) == ()


def test_reading_ahead_resolves_aliases_and_finds_only_accounts_that_exist(tmp_path):
    network = make_network()
    ledger = Ledger(tmp_path / "ledger", network)
    sign = network.sign
    ledger.apply(sign(OpenAccount("dara@aba", "KHR"), "aba"), sign(OpenAccount("sok@aba", "KHR"), "aba"))
    ledger.apply(sign(RegisterAlias("+85512345678", "sok@aba"), "aba"))
    with ledger.store.read() as transaction:
        names = ["dara@aba", "+85512345678", "missing@aba", "+85599999999", "settlement.khr@aba"]
        assert read_accounts_ahead(transaction, names) == 3


def _store_of_accounts(path: Path, count: int) -> None:
    store = LedgerStore(path, map_size_bytes=map_size_bytes, sync=True)
    try:
        put_random_accounts(store, count)
    finally:
        store.close()


def _major_faults_of_this_thread() -> int:
    usage = thread_usage(threading.get_native_id())
    assert usage is not None
    return usage[2]


def _contains_all(store: LedgerStore, names: list[str]) -> None:
    with store.read() as transaction:
        assert all(transaction.contains("accounts", name.encode()) for name in names)


def test_accounts_read_ahead_on_another_thread_are_in_memory_when_the_apply_reads_them(tmp_path):
    accounts = 40_000
    _store_of_accounts(tmp_path / "state", accounts)
    with open(tmp_path / "state" / "data.mdb", "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # nothing maps it: all of it leaves memory
    store = LedgerStore(tmp_path / "state", map_size_bytes=map_size_bytes, sync=True)
    try:
        # Two ends of the key space, so the pages of one are not the pages of the other.
        ahead = ["account-%06d" % number for number in range(0, 2_000, 7)]
        not_ahead = ["account-%06d" % number for number in range(accounts - 2_000, accounts, 7)]
        reader = threading.Thread(target=read_ahead_on, args=(store, ahead))
        reader.start()
        reader.join(deadline_seconds)
        assert not reader.is_alive(), "the read-ahead did not finish in time"
        before = _major_faults_of_this_thread()
        _contains_all(store, ahead)
        after_ahead = _major_faults_of_this_thread()
        _contains_all(store, not_ahead)
        after_control = _major_faults_of_this_thread()
    finally:
        store.close()
    if after_control == after_ahead:
        pytest.skip("the kernel kept the state file cached (a page cache that ignores DONTNEED): no read from disk to move")
    assert after_ahead == before, "the reader waited for the disk for accounts that were read ahead"


def read_ahead_on(store: LedgerStore, names: list[str]) -> None:
    with store.read() as transaction:
        assert read_accounts_ahead(transaction, names) == len(names)


def test_read_aheads_beyond_the_queue_limit_are_dropped_and_counted_never_waited_for(monkeypatch):
    monkeypatch.setattr(verifier_module, "read_aheads_pending_max", 3)
    release = threading.Event()
    seen: list[list] = []
    dropped: list[int] = []

    def slow(bodies: list) -> None:
        seen.append(bodies)
        release.wait(deadline_seconds)

    verifier = SignatureVerifier(threads=2, read_ahead=slow, count_dropped_read_ahead=lambda: dropped.append(1))
    try:
        body = Transfer(tid(1), "a@aba", "b@aba", 5, "KHR")
        assert [verifier.read_ahead([body]) for _ in range(5)] == [True, True, True, False, False]
        assert len(dropped) == 2
        release.set()
        wait_until(lambda: len(seen) == 3, deadline_seconds, "the three queued read-aheads to run")
        wait_until(lambda: verifier.read_ahead([body]), deadline_seconds, "the queue to take a read-ahead again")
        wait_until(lambda: len(seen) == 4, deadline_seconds, "the read-ahead queued after the others to run")
        assert verifier.read_ahead([]) is False, "nothing to read is not queued"
    finally:
        release.set()
        verifier.close()


def test_a_read_ahead_that_fails_is_logged_and_frees_its_place_in_the_queue(monkeypatch, caplog):
    monkeypatch.setattr(verifier_module, "read_aheads_pending_max", 1)
    calls: list[int] = []

    def failing(bodies: list) -> None:
        calls.append(len(bodies))
        raise ValueError("a bug in the read-ahead")

    verifier = SignatureVerifier(threads=2, read_ahead=failing)
    body = Transfer(tid(1), "a@aba", "b@aba", 5, "KHR")
    try:
        with caplog.at_level(logging.ERROR, logger="tonle.verifier"):
            assert verifier.read_ahead([body])
            wait_until(lambda: verifier.read_ahead([body, body]), deadline_seconds, "the failed read-ahead to free its place")
            wait_until(lambda: calls == [1, 2], deadline_seconds, "both read-aheads to run")
    finally:
        verifier.close()
    assert "reading 1 entries' accounts ahead failed" in caplog.text
    assert "ValueError: a bug in the read-ahead" in caplog.text


def test_a_batch_arriving_from_the_leader_has_its_entries_accounts_read_ahead_and_close_waits_for_the_read():
    network = make_network()
    entries = [network.sign(Transfer(tid(number + 1), f"c{number}@aba", "d@aba", 5, "KHR"), "aba") for number in range(10)]
    started = threading.Event()
    release = threading.Event()
    finished: list[bool] = []

    def reading(bodies: list) -> None:
        assert [name for body in bodies for name in accounts_read_by(body)] == [
            name for number in range(10) for name in (f"c{number}@aba", "d@aba")
        ]
        started.set()
        release.wait(deadline_seconds)
        finished.append(True)

    verifier = SignatureVerifier(threads=2, read_ahead=reading)
    verifier.prefetch(batch(*entries))
    assert started.wait(deadline_seconds), "the batch's accounts were not read ahead"
    closing = threading.Thread(target=verifier.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive(), "close returned while a read-ahead was inside the store"
    release.set()
    closing.join(deadline_seconds)
    assert not closing.is_alive() and finished == [True]


def test_a_follower_that_took_entries_in_itself_does_not_read_their_accounts_ahead_again_when_their_batch_arrives():
    network = make_network()
    entries = [network.sign(Transfer(tid(number + 1), f"c{number}@aba", "d@aba", 5, "KHR"), "aba") for number in range(10)]
    read: list[list[str]] = []
    verifier = SignatureVerifier(threads=2, read_ahead=lambda bodies: read.append([name for body in bodies for name in accounts_read_by(body)]))
    try:
        # The first eight came in through this node's client API, verified (and read ahead) there.
        for future in verifier.verify_many([decode_entry(raw) for raw in entries[:8]]):
            assert future.result(timeout=deadline_seconds) == [True] * 8
        raw_batch = batch(*entries)
        assert len(raw_batch) >= verifier_module.prefetch_batch_bytes_min, "a batch this small is left to the apply"
        verifier.prefetch(raw_batch)
        verifier.wait_for_batch(raw_batch)
    finally:
        verifier.close()
    assert read == [["c8@aba", "d@aba", "c9@aba", "d@aba"]]


def test_a_node_reads_ahead_unless_its_config_turns_it_off(tmp_path):
    cluster = LocalCluster.create(tmp_path / "network", validators=1, institutions=0)
    node = next(iter(cluster.nodes.values()))
    for environ, expected in (({}, True), ({"TONLE_STORAGE__READ_AHEAD": "false"}, False)):
        config, genesis = load_node_config(node.config, environ=environ)
        assert config.storage.read_ahead is expected
        ledger_node = LedgerNode(config, genesis)
        try:
            assert ledger_node.verifier.reads_ahead is expected
        finally:
            ledger_node.close()
