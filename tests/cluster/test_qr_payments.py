"""Pay by QR and phone on a local network, checked through the Open API of the merchant's bank's node."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.loader import load_genesis
from config.keys import load_signing_key
from consensus.entries import AdmitInstitution
from node.cli import main
from node.cluster import LocalCluster
from node.cross_border import Link, OutboundPayment, outbound_chain
from node.khqr import crc16, generate, md5_hex
from node.open_api import new_token, token_digest
from tests.cluster.conftest import _remember, stop_everything

pytestmark = pytest.mark.cluster

deadline_seconds = 30.0
merchant_node = "aba-1"  # the merchant's bank's node serves the Open API
flood_burst = 3
flood_attempts_max = 50


@dataclasses.dataclass
class QrNetwork:
    cluster: LocalCluster
    open_api_port: int
    tokens: dict[str, str]

    @property
    def directory(self) -> str:
        return str(self.cluster.directory)

    def post(self, path: str, body: Any, *, token: str | None = "aba") -> tuple[int, dict[str, str], Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.open_api_port}{path}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        if token is not None:
            request.add_header("Authorization", f"Bearer {self.tokens[token]}")
        try:
            with urllib.request.urlopen(request, timeout=deadline_seconds) as response:  # noqa: S310 - loopback
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())

    def until_found(self, path: str, body: Any, token: str = "aba") -> dict[str, Any]:
        """The merchant's node applies the payment a moment after the node it was paid through: poll."""
        deadline = time.monotonic() + deadline_seconds
        document: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, _headers, document = self.post(path, body, token=token)
            assert status == 200, document
            if document["responseCode"] == 0:
                return document
            time.sleep(0.2)
        raise AssertionError(f"not found within {deadline_seconds} s: {document}")

    def balance(self, account: str) -> int:
        with self.cluster.client(merchant_node) as client:
            return client.balance(account)["balance"]


@pytest.fixture(scope="module")
def shared_qr_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QrNetwork]:
    directory = tmp_path_factory.mktemp("qr") / "network"
    cluster = LocalCluster.create(directory)
    # A local network keeps Bakong's riel rule for cross-border payments (a genesis parameter).
    assert load_genesis(Path(cluster.description["genesis"])).cross_border_currency == "KHR"
    # `cluster up` gives every node an Open API and every institution a token; prince and sathapana, admitted
    # below, get theirs here, and sathapana a small budget for the flood test.
    tokens = {
        institution["id"]: Path(institution["open_api_token_file"]).read_text().strip()
        for institution in cluster.description["institutions"]
    }
    tokens.update({institution: new_token() for institution in ("prince", "sathapana")})
    tokens_file = directory / "open-api-tokens.toml"
    tokens_file.write_text(
        tokens_file.read_text()
        + "".join(f'\n[[tokens]]\ninstitution = "{name}"\nsha256 = "{token_digest(tokens[name]).hex()}"\n' for name in ("prince", "sathapana"))
        + f'\n[[rate_limits]]\ninstitution = "sathapana"\nrequests_per_second = 1\nburst = {flood_burst}\n'
    )
    port = int(cluster.nodes[merchant_node].open_api_address.rpartition(":")[2])
    cluster.start()
    try:
        leader = cluster.wait_for_leader()
        cluster.wait_ready()
        cluster.open_and_fund_accounts(via=leader)
        # Members with tokens but no part in the payments below; sathapana's budget is the flood test's alone.
        for institution, name in (("prince", "Prince Bank"), ("sathapana", "Sathapana Bank")):
            key = load_signing_key(cluster.new_institution_key(institution, name, "bank"))
            admit = AdmitInstitution(institution, name, "bank", bytes(key.verify_key))
            with cluster.client(leader) as client:
                (admitted,) = client.submit([cluster.sign(admit, "nbc")])
            assert admitted["result"] == "ok", admitted
        yield QrNetwork(cluster, port, tokens)
    finally:
        stop_everything(cluster)


@pytest.fixture
def network(request: pytest.FixtureRequest, shared_qr_network: QrNetwork) -> QrNetwork:
    _remember(request, shared_qr_network.cluster)
    return shared_qr_network


def cli(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, Any, str]:
    code = main(list(arguments))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def khqr(capsys: pytest.CaptureFixture[str], account: str, amount: int, *extra: str) -> tuple[str, str]:
    code, generated, _err = cli(
        capsys, "khqr", "generate", "--account", account, "--name", "Sokha Shop", "--city", "Phnom Penh",
        "--currency", "KHR", "--amount", str(amount), "--output", "json", *extra,
    )
    assert code == 0
    return generated["qr"], generated["md5"]


def test_a_dynamic_khqr_paid_from_another_institution_is_found_through_the_open_api_by_its_md5(network, capsys):
    directory = network.directory
    assert cli(capsys, "account", "open", "--dir", directory, "--account", "sokha.shop@aba", "--currency", "KHR", "--tier", "full")[0] == 0
    qr, md5 = khqr(capsys, "sokha.shop@aba", 15_000, "--bill-number", "INV-2024-001")
    code, paid, _err = cli(capsys, "pay", "--dir", directory, "--qr", qr, "--from", "c1.khr@acleda", "--node", "acleda-1")
    assert code == 0 and (paid["status"], paid["result"]) == ("applied", "ok"), paid
    assert paid["md5"] == md5 and paid["reference"] == f"md5:{md5} bill:INV-2024-001"

    found = network.until_found("/v1/check_transaction_by_md5", {"md5": md5})
    with network.cluster.client(merchant_node) as client:
        entry = client.lookup_transfer(bytes.fromhex(paid["id"]))["entry"]
    data = found["data"]
    assert found["responseMessage"] == "Getting transaction successfully." and found["errorCode"] is None
    assert (data["fromAccountId"], data["toAccountId"], data["amount"], data["currency"]) == (
        "c1.khr@acleda", "sokha.shop@aba", 15_000, "KHR",
    )
    assert data["hash"] == hashlib.sha256(entry).hexdigest() and data["externalRef"] == paid["id"]
    assert data["createdDateMs"] <= data["acknowledgedDateMs"]
    assert network.balance("sokha.shop@aba") == 15_000

    # The same payment by every other key Bakong offers, and to the payer's bank as well.
    assert network.until_found("/v1/check_transaction_by_hash", {"hash": data["hash"]})["data"] == data
    short = {"hash": data["hash"][:8], "amount": 15000, "currency": "KHR"}
    assert network.until_found("/v1/check_transaction_by_short_hash", short)["data"] == data
    assert network.until_found("/v1/check_transaction_by_external_ref", {"externalRef": "bill:INV-2024-001"})["data"] == data
    assert network.until_found("/v1/check_transaction_by_md5", {"md5": md5}, token="acleda")["data"] == data
    listed = network.until_found("/v1/check_transaction_by_md5_list", {"md5List": [md5, md5_hex("unpaid")]})
    assert [item["status"] for item in listed["data"]] == ["SUCCESS", "NOT_FOUND"]
    assert network.post("/v1/check_bakong_account", {"accountId": "sokha.shop@aba"})[2]["responseCode"] == 0
    # An institution that is not a party does not see it.
    assert network.post("/v1/check_transaction_by_md5", {"md5": md5}, token="prince")[2]["errorCode"] == 1


def test_a_code_carrying_only_a_phone_number_pays_its_alias(network, capsys):
    directory = network.directory
    assert cli(capsys, "account", "open", "--dir", directory, "--account", "kiosk@aba", "--currency", "KHR", "--tier", "full")[0] == 0
    assert cli(capsys, "alias", "register", "--dir", directory, "--alias", "+85512000111", "--account", "kiosk@aba")[0] == 0
    # A merchant known by an account id elsewhere, and its phone here.
    qr, md5 = khqr(capsys, "sokha_kiosk@devb", 2_500, "--mobile", "012000111")
    code, paid, _err = cli(capsys, "pay", "--dir", directory, "--qr", qr, "--from", "c2.khr@acleda")
    assert code == 0 and paid["credit_account"] == "+85512000111", paid
    assert network.until_found("/v1/check_transaction_by_md5", {"md5": md5})["data"]["toAccountId"] == "+85512000111"
    assert network.balance("kiosk@aba") == 2_500


def test_bad_codes_and_unknown_accounts_are_refused_before_anything_is_submitted(network, capsys):
    directory = network.directory
    now_ms = time.time_ns() // 1_000_000
    expired = generate(bakong_account_id="c1.khr@aba", merchant_name="Shop", merchant_city="Phnom Penh", currency="KHR",
                       amount_minor=900, created_ms=now_ms - 1_200_000, expires_ms=now_ms - 600_000)
    valid, _md5 = khqr(capsys, "c1.khr@aba", 900)
    altered = valid.replace("5403900", "5403990")  # the amount, 900 -> 990, under the old CRC
    assert altered != valid
    unknown, _md5 = khqr(capsys, "nobody@aba", 900)
    malformed = "000201010212" + "2950abc" + "6304"  # tag 29 claims 50 characters; 11 remain
    malformed += crc16(malformed)
    before = network.balance("c3.khr@acleda")
    for qr, reason in (
        (expired, "46 KHQR_EXPIRED"),
        (altered, "CRC mismatch"),
        (malformed, "KHQR_INVALID"),
        (unknown, "merchant_account_not_found"),
    ):
        code, output, err = cli(capsys, "pay", "--dir", directory, "--qr", qr, "--from", "c3.khr@acleda")
        assert (code, output) == (1, None) and reason in err, (reason, err)
        # Not even a failed transfer was recorded: that would answer "Transaction failed." (error 3).
        assert network.post("/v1/check_transaction_by_md5", {"md5": md5_hex(qr)})[2]["errorCode"] == 1
    assert network.balance("c3.khr@acleda") == before


def test_a_missing_token_gets_401_and_a_flood_gets_429_with_retry_after(network):
    status, headers, document = network.post("/v1/check_bakong_account", {"accountId": "c1.khr@aba"}, token=None)
    assert (status, document["errorCode"], headers.get("WWW-Authenticate")) == (401, 6, "Bearer")
    body = {"accountId": "c1.khr@aba"}
    assert [network.post("/v1/check_bakong_account", body, token="sathapana")[0] for _ in range(flood_burst)] == [200] * flood_burst
    for _attempt in range(flood_attempts_max):  # 1 a second refills; a flood outruns it at once
        status, headers, document = network.post("/v1/check_bakong_account", body, token="sathapana")
        if status == 429:
            break
    assert status == 429 and int(headers["Retry-After"]) >= 1 and document["responseCode"] == 1
    # Another institution's budget is its own.
    assert network.post("/v1/check_bakong_account", {"accountId": "c1.khr@aba"}, token="aba")[0] == 200


def test_a_cross_border_payment_from_a_khr_account_applies_all_legs_and_a_usd_one_none(network, capsys):
    directory = network.directory
    code, admitted, _err = cli(
        capsys, "institution", "admit", "--dir", directory, "--id", "promptpay", "--name", "PromptPay", "--role", "foreign_switch",
    )
    assert code == 0, admitted
    assert cli(capsys, "issue", "--dir", directory, "--to", "settlement.usd@acleda", "--amount", "100000", "--currency", "USD")[0] == 0
    code, legs, err = cli(
        capsys, "cross-border", "pay", "--dir", directory, "--from", "c4.khr@aba", "--amount", "410000",
        "--switch", "promptpay", "--sponsor", "acleda", "--settlement-currency", "USD", "--rate", "1/41",
    )
    assert code == 0 and [leg["result"] for leg in legs] == ["ok", "ok"], (legs, err)
    with network.cluster.client(merchant_node) as client:
        deadline = time.monotonic() + deadline_seconds
        while client.balance("settlement.usd@promptpay")["balance"] != 10_000 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.balance("settlement.usd@promptpay")["balance"] == 10_000

    before = network.balance("c4.usd@aba")
    code, _output, err = cli(
        capsys, "cross-border", "pay", "--dir", directory, "--from", "c4.usd@aba", "--amount", "1000",
        "--switch", "promptpay", "--sponsor", "acleda",
    )
    assert code == 1 and "cross_border_currency_not_allowed" in err
    # A client that skips its own check is refused by the ledger itself, every leg of it.
    legs = outbound_chain(OutboundPayment("c4.usd@aba", "USD", 1_000, Link("promptpay", "acleda", "USD")))
    with network.cluster.client(network.cluster.wait_for_leader()) as client:
        results = client.submit([network.cluster.sign(leg.transfer, leg.signer) for leg in legs])
    assert [result["result"] for result in results] == ["linked_event_failed", "cross_border_currency_not_allowed"]
    assert network.balance("c4.usd@aba") == before
