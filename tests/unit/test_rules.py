"""The deterministic apply against real LMDB: every result, its precedence, replay and the state hash."""

import pytest
from nacl.signing import SigningKey

from consensus.entries import Issue, OpenAccount, Transfer
from storage import queries
from storage.rules import ApplyGap, apply_batch, apply_no_op
from storage.state import StorageCorrupted
from tests.ledger_fixtures import Ledger, batch, make_network, tid

from consensus.entries import signature_is_valid


@pytest.fixture
def network():
    return make_network()


@pytest.fixture
def ledger(tmp_path, network):
    ledger = Ledger(tmp_path / "state", network)
    sign = network.sign
    assert ledger.results(
        sign(OpenAccount("sokha@aba", "KHR"), "aba"),
        sign(OpenAccount("dara@acleda", "KHR"), "acleda"),
        sign(OpenAccount("vanna@aba", "USD"), "aba"),
        sign(Issue(tid(1), "settlement.khr@aba", 1_000_000, "KHR"), "nbc"),
        sign(Transfer(tid(2), "settlement.khr@aba", "sokha@aba", 500_000, "KHR"), "aba"),
    ) == ["ok"] * 5
    yield ledger
    ledger.store.close()


def test_transfer_moves_money_between_institutions(ledger, network):
    assert ledger.results(network.sign(Transfer(tid(10), "sokha@aba", "dara@acleda", 1200, "KHR"), "aba")) == ["ok"]
    assert ledger.net("sokha@aba") == 500_000 - 1200
    assert ledger.net("dara@acleda") == 1200


def test_totals_are_conserved_and_double_entry_sums_to_zero(ledger, network):
    ledger.apply(network.sign(Transfer(tid(10), "sokha@aba", "dara@acleda", 7, "KHR"), "aba"))
    with ledger.store.read() as transaction:
        totals = queries.totals(transaction)
    assert totals["KHR"] == {"issued": 1_000_000, "held": 1_000_000, "net": 0}
    assert totals["USD"] == {"issued": 0, "held": 0, "net": 0}


@pytest.mark.parametrize(
    ("transfer", "signer", "result"),
    [
        (Transfer(tid(20), "sokha@aba", "sokha@aba", 1, "KHR"), "aba", "accounts_must_be_different"),
        (Transfer(tid(21), "nobody@aba", "dara@acleda", 1, "KHR"), "aba", "debit_account_not_found"),
        (Transfer(tid(22), "sokha@aba", "nobody@acleda", 1, "KHR"), "aba", "credit_account_not_found"),
        (Transfer(tid(23), "sokha@aba", "dara@acleda", 1, "KHR"), "acleda", "signer_must_own_debit_account"),
        (Transfer(tid(24), "sokha@aba", "vanna@aba", 1, "KHR"), "aba", "accounts_must_have_the_same_currency"),
        (Transfer(tid(25), "sokha@aba", "dara@acleda", 1, "USD"), "aba", "transfer_must_have_the_same_currency_as_accounts"),
        (Transfer(tid(26), "sokha@aba", "dara@acleda", 500_001, "KHR"), "aba", "exceeds_credits"),
        (Transfer(tid(27), "dara@acleda", "sokha@aba", 1, "KHR"), "acleda", "exceeds_credits"),
    ],
)
def test_each_failing_rule_has_its_result_and_moves_nothing(ledger, network, transfer, signer, result):
    before = ledger.summary().state_hash
    balances = (ledger.net("sokha@aba"), ledger.net("dara@acleda"))
    assert ledger.results(network.sign(transfer, signer)) == [result]
    assert (ledger.net("sokha@aba"), ledger.net("dara@acleda")) == balances
    # The failure itself is pinned under the id, so the state hash moves, but no balance does.
    assert ledger.summary().state_hash != before


def test_precedence_first_failing_rule_wins(ledger, network):
    # Unknown debit account AND wrong signer AND currency mismatch: the account lookup comes first.
    wrong_everything = Transfer(tid(30), "nobody@aba", "dara@acleda", 1, "USD")
    assert ledger.results(network.sign(wrong_everything, "acleda")) == ["debit_account_not_found"]


def test_a_retry_with_the_same_body_answers_exists(ledger, network):
    entry = network.sign(Transfer(tid(40), "sokha@aba", "dara@acleda", 5, "KHR"), "aba")
    assert ledger.results(entry) == ["ok"]
    assert ledger.results(entry) == ["exists"]
    assert ledger.net("dara@acleda") == 5


def test_a_retry_with_a_different_body_answers_exists_with_different_fields(ledger, network):
    assert ledger.results(network.sign(Transfer(tid(41), "sokha@aba", "dara@acleda", 5, "KHR"), "aba")) == ["ok"]
    changed = network.sign(Transfer(tid(41), "sokha@aba", "dara@acleda", 6, "KHR"), "aba")
    assert ledger.results(changed) == ["exists_with_different_fields"]
    assert ledger.net("dara@acleda") == 5


def test_a_failed_id_stays_failed_even_when_it_could_now_succeed(ledger, network):
    too_much = network.sign(Transfer(tid(42), "dara@acleda", "sokha@aba", 10, "KHR"), "acleda")
    assert ledger.results(too_much) == ["exceeds_credits"]
    ledger.apply(network.sign(Transfer(tid(43), "sokha@aba", "dara@acleda", 100, "KHR"), "aba"))
    outcome = ledger.apply(too_much).outcomes[0]
    assert (outcome.result, outcome.original_result) == ("id_already_failed", "exceeds_credits")
    assert ledger.net("dara@acleda") == 100


def test_bad_signatures_and_foreign_keys_are_not_pinned(ledger, network):
    stranger = SigningKey.generate()
    forged = network.sign(Transfer(tid(50), "sokha@aba", "dara@acleda", 5, "KHR"), "aba", key=stranger)
    assert ledger.results(forged) == ["signer_key_not_authorized"]
    # The genuine transfer with that id still goes through: the forgery did not squat on the id.
    genuine = network.sign(Transfer(tid(50), "sokha@aba", "dara@acleda", 5, "KHR"), "aba")
    assert ledger.results(genuine) == ["ok"]


def test_an_entry_from_another_network_is_refused(ledger, network):
    foreign = network.sign(Transfer(tid(51), "sokha@aba", "dara@acleda", 5, "KHR"), "aba", network="tonle-other")
    assert ledger.results(foreign) == ["wrong_network"]
    assert ledger.net("dara@acleda") == 0


def test_an_invalid_signature_is_refused_by_the_apply(ledger, network):
    raw = network.sign(Transfer(tid(52), "sokha@aba", "dara@acleda", 5, "KHR"), "aba")
    corrupted = raw[:-1] + bytes([raw[-1] ^ 1])
    assert ledger.results(corrupted) == ["signature_invalid"]


def test_only_the_central_bank_issues_and_only_to_settlement_accounts(ledger, network):
    assert ledger.results(network.sign(Issue(tid(60), "settlement.khr@aba", 5, "KHR"), "aba")) == [
        "signer_must_be_central_bank"
    ]
    assert ledger.results(network.sign(Issue(tid(61), "sokha@aba", 5, "KHR"), "nbc")) == [
        "credit_account_must_be_settlement"
    ]


@pytest.mark.parametrize(
    ("body", "signer", "result"),
    [
        (OpenAccount("sokha@aba", "KHR"), "aba", "exists"),
        (OpenAccount("sokha@aba", "USD"), "aba", "exists_with_different_fields"),
        (OpenAccount("new@aba", "KHR"), "acleda", "signer_must_own_account"),
        (OpenAccount("settlement.usd@aba", "USD"), "aba", "exists_with_different_fields"),
        (OpenAccount("settlement.eur@aba", "KHR"), "aba", "account_name_reserved"),
        (OpenAccount("new@aba", "EUR"), "aba", "currency_not_found"),
    ],
)
def test_open_account_rules(ledger, network, body, signer, result):
    assert ledger.results(network.sign(body, signer)) == [result]


def test_replaying_an_applied_index_changes_nothing(ledger, network):
    entry = network.sign(Transfer(tid(70), "sokha@aba", "dara@acleda", 9, "KHR"), "aba")
    ledger.apply(entry)
    before = ledger.summary()
    with ledger.store.write() as transaction:
        assert apply_batch(transaction, ledger.index, batch(entry), signature_is_valid, network.genesis.cluster_id) is None
        assert apply_no_op(transaction, ledger.index) is False
    assert ledger.summary() == before
    assert ledger.net("dara@acleda") == 9


def test_a_gap_in_indexes_stops_the_apply(ledger, network):
    with ledger.store.write() as transaction, pytest.raises(ApplyGap):
        apply_batch(transaction, ledger.index + 2, batch(), signature_is_valid, network.genesis.cluster_id)


def test_a_malformed_batch_is_recorded_and_skipped_deterministically(ledger, network):
    ledger.index += 1
    with ledger.store.write() as transaction:
        applied = apply_batch(transaction, ledger.index, b"\xc1garbage", signature_is_valid, network.genesis.cluster_id)
    assert applied.batch_error is not None
    assert ledger.summary().applied_index == ledger.index


def test_running_state_hash_equals_a_full_recomputation(ledger, network):
    ledger.apply(network.sign(Transfer(tid(80), "sokha@aba", "dara@acleda", 3, "KHR"), "aba"))
    with ledger.store.read() as transaction:
        assert transaction.recompute_state_hash() == transaction.state_hash()


def test_two_stores_applying_the_same_batches_reach_the_same_state_hash(tmp_path, network):
    entries = [
        network.sign(OpenAccount("sokha@aba", "KHR"), "aba"),
        network.sign(Issue(tid(1), "settlement.khr@aba", 100, "KHR"), "nbc"),
        network.sign(Transfer(tid(2), "settlement.khr@aba", "sokha@aba", 40, "KHR"), "aba"),
    ]
    first, second = Ledger(tmp_path / "a", network), Ledger(tmp_path / "b", network)
    for entry in entries:
        first.apply(entry)
        second.apply(entry)
    with first.store.read() as a, second.store.read() as b:
        assert a.recompute_state_hash() == b.recompute_state_hash() == a.state_hash() == b.state_hash()


def test_a_flipped_bit_in_a_stored_balance_is_detected_on_read(ledger):
    key = b"sokha@aba"
    with ledger.store.environment.begin(write=True) as raw:
        database = ledger.store.databases["accounts"]
        stored = bytearray(raw.get(key, db=database))
        stored[-12] ^= 0x01  # inside the balance counters, before the 8-byte seal
        raw.put(key, bytes(stored), db=database)
    with pytest.raises(StorageCorrupted, match="checksum"):
        ledger.net("sokha@aba")


def test_a_transfer_record_points_at_its_entry_in_the_archived_batch_instead_of_copying_it(ledger, network):
    sign = network.sign
    first = sign(Transfer(tid(20), "sokha@aba", "dara@acleda", 100, "KHR"), "aba")
    second = sign(Transfer(tid(21), "sokha@aba", "dara@acleda", 200, "KHR", reference="invoice-21"), "aba")
    assert ledger.results(first, second) == ["ok", "ok"]
    with ledger.store.environment.begin() as raw:
        stored = raw.get(tid(21), db=ledger.store.databases["transfers"])
    assert len(stored) < len(second) // 2  # kind, position, result, index, time, amount, leaf, and the seal
    assert ledger.transfer(tid(20))["entry"] == first
    assert ledger.transfer(tid(21))["entry"] == second
    assert ledger.results(second) == ["exists"]  # a retry is compared with the archived bytes


def test_a_transfer_record_whose_archived_batch_is_gone_is_reported_as_corruption(ledger, network):
    assert ledger.results(network.sign(Transfer(tid(30), "sokha@aba", "dara@acleda", 100, "KHR"), "aba")) == ["ok"]
    with ledger.store.environment.begin(write=True) as raw:
        assert raw.delete(ledger.index.to_bytes(8, "big"), db=ledger.store.databases["archive"])
    with pytest.raises(StorageCorrupted, match="archive record"):
        ledger.transfer(tid(30))
