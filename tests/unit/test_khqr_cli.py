"""`tonle khqr decode|verify|generate`, driven through the handlers that add_khqr_commands registers."""

from __future__ import annotations

import argparse
import io
import json
import time

import pytest

from node import khqr_cli
from node.khqr import decode, md5_hex, verify
from node.khqr_cli import add_khqr_commands

# Manethpak/khqr-sdk README.md: a static individual KHQR, valid at any time.
static_sample = "00020101021129270015maneth_pak@aclb0204aclb5204599953031165802KH5910Maneth Pak6009Califonia63040AAC"
# ts-khqr src/__tests__/feature/timestamp/valid.test.ts "KHQR was expired" (expired 2024-09-25).
expired_sample = (
    "00020101021229180014vandoeurn@devb52045999530384054031015802KH5909Vandoeurn6010Phnom Penh"
    "9934001317272493649740113172724948497463047BD0"
)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tonle")
    add_khqr_commands(root.add_subparsers(dest="command", required=True))
    return root


def run(arguments: list[str]) -> int:
    namespace = parser().parse_args(["khqr", *arguments])
    exit_code: int = namespace.handler(namespace)
    return exit_code


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_khqr_registers_decode_verify_and_generate_each_with_its_handler() -> None:
    handlers = {
        "decode": khqr_cli.command_khqr_decode,
        "verify": khqr_cli.command_khqr_verify,
        "generate": khqr_cli.command_khqr_generate,
    }
    for action, handler in handlers.items():
        extra = (
            ["--account", "a@b", "--name", "N", "--city", "C", "--currency", "KHR"] if action == "generate" else ["x"]
        )
        assert parser().parse_args(["khqr", action, *extra]).handler is handler
    with pytest.raises(SystemExit):
        parser().parse_args(["khqr"])


def test_decode_prints_the_fields_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["decode", static_sample]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["merchant_type"] == "individual"
    assert (document["bakong_account_id"], document["acquiring_bank"]) == ("maneth_pak@aclb", "aclb")
    assert (document["currency"], document["amount_minor"], document["is_dynamic"]) == ("KHR", None, False)
    assert document["tags"][2] == {
        "tag": "29",
        "value": "0015maneth_pak@aclb0204aclb",
        "subfields": [{"tag": "00", "value": "maneth_pak@aclb"}, {"tag": "02", "value": "aclb"}],
    }


def test_decode_reads_the_payload_from_standard_input_for_a_dash(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(static_sample + "\n"))
    assert run(["decode", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["crc"] == "0AAC"


def test_decode_of_a_malformed_payload_exits_1_with_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["decode", "000201010211ZZ"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("tonle khqr: 8 KHQR_INVALID: KHQR provided is invalid")


def test_decode_shows_an_expired_payload_since_it_checks_structure_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["decode", expired_sample]) == 0
    assert json.loads(capsys.readouterr().out)["expires_ms"] == 1727249484974


def test_verify_prints_valid_and_the_payload_for_a_valid_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["verify", static_sample]) == 0
    first_line, document = capsys.readouterr().out.split("\n", 1)
    assert first_line == "VALID"
    parsed = json.loads(document)
    assert parsed["md5"] == md5_hex(static_sample)
    assert parsed["payload"]["merchant_name"] == "Maneth Pak"


@pytest.mark.parametrize(
    ("payload", "verdict"),
    [
        (expired_sample, "INVALID 46 KHQR_EXPIRED: This dynamic KHQR has expired (expired at 1727249484974 ms"),
        (static_sample[:-4] + "0AAD", "INVALID 8 KHQR_INVALID: KHQR provided is invalid (CRC mismatch"),
        (static_sample[:-8], "INVALID 24 CRC_TAG_REQUIRED: CRC tag required"),
    ],
)
def test_verify_exits_1_and_prints_the_code_name_and_reason(
    payload: str, verdict: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["verify", payload]) == 1
    assert capsys.readouterr().out.startswith(verdict)


def test_verify_reads_standard_input_for_a_dash(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(expired_sample + "\r\n"))
    assert run(["verify", "-"]) == 1
    assert capsys.readouterr().out.startswith("INVALID 46 KHQR_EXPIRED")


def test_generate_static_prints_a_payload_that_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(
            [
                "generate",
                "--account",
                "jonhsmith@nbcq",
                "--name",
                "Jonh Smith",
                "--city",
                "Phnom Penh",
                "--currency",
                "KHR",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out.strip()
    assert text == "00020101021129180014jonhsmith@nbcq5204599953031165802KH5910Jonh Smith6010Phnom Penh6304" + text[-4:]
    assert not verify(text, now_ms()).is_dynamic


def test_generate_dynamic_takes_minor_units_and_prints_the_md5_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    before_ms = now_ms()
    arguments = ["--account", "jonhsmith@devb", "--name", "Jonh Smith", "--city", "Siem Reap", "--currency", "USD"]
    assert run(["generate", *arguments, "--amount", "1050", "--expires-in-seconds", "60", "--output", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["md5"] == md5_hex(document["qr"])
    payload = verify(document["qr"], now_ms())
    assert (payload.currency, payload.amount_minor, payload.is_dynamic) == ("USD", 1050, True)
    assert "540510.50" in document["qr"]
    assert payload.created_ms is not None and payload.expires_ms is not None
    assert before_ms <= payload.created_ms <= now_ms()
    assert payload.expires_ms - payload.created_ms == 60_000


def test_generate_dynamic_expires_after_the_default_lifetime(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--account", "a@b", "--name", "N", "--city", "C", "--currency", "KHR", "--amount", "10000"]
    assert run(["generate", *arguments]) == 0
    payload = decode(capsys.readouterr().out.strip())
    assert payload.amount_minor == 10000
    assert payload.expires_ms is not None and payload.created_ms is not None
    assert payload.expires_ms - payload.created_ms == khqr_cli.generate_expires_in_seconds_default * 1000


def test_generate_a_merchant_qr_with_its_id_and_bank(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--account", "jonhsmith@devb", "--name", "Jonh Smith", "--city", "Siem Reap", "--currency", "KHR"]
    merchant = [
        "--merchant-id",
        "123456",
        "--acquiring-bank",
        "Dev Bank",
        "--bill-number",
        "INV-1",
        "--mobile",
        "85512345678",
    ]
    assert (
        run(
            [
                "generate",
                *arguments,
                *merchant,
                "--store-label",
                "S",
                "--terminal-label",
                "T",
                "--purpose",
                "P",
                "--mcc",
                "4829",
            ]
        )
        == 0
    )
    payload = verify(capsys.readouterr().out.strip(), now_ms())
    assert (payload.merchant_type, payload.merchant_id, payload.acquiring_bank) == ("merchant", "123456", "Dev Bank")
    assert (payload.bill_number, payload.mobile_number, payload.merchant_category_code) == (
        "INV-1",
        "85512345678",
        "4829",
    )
    assert (payload.store_label, payload.terminal_label, payload.purpose) == ("S", "T", "P")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--merchant-id", "123456"], "tonle khqr: 31 ACQUIRING_BANK_REQUIRED"),
        (["--amount", "0"], "tonle khqr: 4 TRANSACTION_AMOUNT_INVALID"),
        (["--name", "N" * 26], "tonle khqr: 7 MERCHANT_NAME_LENGTH_INVALID"),
        (["--expires-in-seconds", "60"], "tonle khqr: --expires-in-seconds needs --amount"),
    ],
)
def test_generate_refuses_a_bad_request_with_exit_1(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--account", "a@b", "--name", "N", "--city", "C", "--currency", "KHR"]
    assert run(["generate", *arguments, *extra]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message)


def test_generate_refuses_a_lifetime_that_is_not_positive(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--account", "a@b", "--name", "N", "--city", "C", "--currency", "KHR", "--amount", "100"]
    with pytest.raises(SystemExit) as caught:
        run(["generate", *arguments, "--expires-in-seconds", "0"])
    assert caught.value.code == 2
    assert "must be positive" in capsys.readouterr().err
