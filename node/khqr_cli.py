"""The `tonle khqr` commands: decode, verify and generate Bakong KHQR payloads from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from node.khqr import (
    KhqrError,
    KhqrPayload,
    TlvField,
    decode,
    default_merchant_category_code,
    generate,
    md5_hex,
    verify,
)

exit_code_failure = 1
generate_expires_in_seconds_default = 600  # a checkout QR should die with the checkout, not linger for a day
milliseconds_per_second = 1000
stdin_payload = "-"


def add_khqr_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `khqr` and its sub-commands on the `tonle` parser's sub-command set."""
    khqr = subparsers.add_parser("khqr", help="decode, verify and generate Bakong KHQR payloads")
    commands = khqr.add_subparsers(dest="khqr_command", required=True, metavar="ACTION")

    decode_command = commands.add_parser("decode", help="print a payload's fields as JSON (checks structure only)")
    decode_command.add_argument("payload", help="the KHQR string, or - to read it from standard input")
    decode_command.set_defaults(handler=command_khqr_decode)

    verify_command = commands.add_parser("verify", help="check a payload against every KHQR rule, now")
    verify_command.add_argument("payload", help="the KHQR string, or - to read it from standard input")
    verify_command.set_defaults(handler=command_khqr_verify)

    generate_command = commands.add_parser("generate", help="build a KHQR payload (dynamic with --amount)")
    generate_command.add_argument("--account", required=True, help="Bakong account ID, name@bank")
    generate_command.add_argument("--name", required=True, help="merchant name")
    generate_command.add_argument("--city", required=True, help="merchant city")
    generate_command.add_argument("--currency", required=True, choices=("KHR", "USD"))
    generate_command.add_argument("--amount", type=int, help="in minor units (riel, cents); makes the QR dynamic")
    generate_command.add_argument("--merchant-id", help="makes it a merchant (tag 30) QR; needs --acquiring-bank")
    generate_command.add_argument("--acquiring-bank")
    generate_command.add_argument("--mcc", default=default_merchant_category_code, help="merchant category code")
    generate_command.add_argument("--bill-number")
    generate_command.add_argument("--mobile")
    generate_command.add_argument("--store-label")
    generate_command.add_argument("--terminal-label")
    generate_command.add_argument("--purpose")
    generate_command.add_argument(
        "--expires-in-seconds",
        type=_positive,
        help=f"lifetime of a dynamic QR (default {generate_expires_in_seconds_default})",
    )
    generate_command.add_argument("--output", choices=("text", "json"), default="text")
    generate_command.set_defaults(handler=command_khqr_generate)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _read_payload(argument: str) -> str:
    # Only what arrives on standard input is stripped: `echo` adds a newline that no payload contains,
    # while an argument is taken exactly as given.
    return sys.stdin.read().strip() if argument == stdin_payload else argument


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def payload_document(payload: KhqrPayload) -> dict[str, Any]:
    """A decoded payload as plain JSON-ready values."""
    document: dict[str, Any] = {
        name: getattr(payload, name) for name in KhqrPayload.__dataclass_fields__ if name != "tags"
    }
    if payload.merchant_type is not None:
        document["merchant_type"] = payload.merchant_type.value
    document["tags"] = [_field_document(field) for field in payload.tags]
    return document


def _field_document(field: TlvField) -> dict[str, Any]:
    document: dict[str, Any] = {"tag": field.tag, "value": field.value}
    if field.subfields:
        document["subfields"] = [_field_document(subfield) for subfield in field.subfields]
    return document


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False))


def _report(error: KhqrError) -> None:
    print(f"tonle khqr: {error.code} {error.name}: {error.message}", file=sys.stderr)


def command_khqr_decode(arguments: argparse.Namespace) -> int:
    try:
        payload = decode(_read_payload(arguments.payload))
    except KhqrError as error:
        _report(error)
        return exit_code_failure
    _print_json(payload_document(payload))
    return 0


def command_khqr_verify(arguments: argparse.Namespace) -> int:
    text = _read_payload(arguments.payload)
    try:
        payload = verify(text, now_ms=_now_ms())
    except KhqrError as error:
        print(f"INVALID {error.code} {error.name}: {error.message}")
        return exit_code_failure
    print("VALID")
    _print_json({"md5": md5_hex(text), "payload": payload_document(payload)})
    return 0


def command_khqr_generate(arguments: argparse.Namespace) -> int:
    if arguments.expires_in_seconds is not None and arguments.amount is None:
        print("tonle khqr: --expires-in-seconds needs --amount (a static QR does not expire)", file=sys.stderr)
        return exit_code_failure
    created_ms = expires_ms = None
    if arguments.amount is not None:
        created_ms = _now_ms()
        lifetime_seconds = arguments.expires_in_seconds
        if lifetime_seconds is None:
            lifetime_seconds = generate_expires_in_seconds_default
        expires_ms = created_ms + lifetime_seconds * milliseconds_per_second
    try:
        text = generate(
            bakong_account_id=arguments.account,
            merchant_name=arguments.name,
            merchant_city=arguments.city,
            currency=arguments.currency,
            amount_minor=arguments.amount,
            created_ms=created_ms,
            expires_ms=expires_ms,
            merchant_id=arguments.merchant_id,
            acquiring_bank=arguments.acquiring_bank,
            bill_number=arguments.bill_number,
            mobile_number=arguments.mobile,
            store_label=arguments.store_label,
            terminal_label=arguments.terminal_label,
            purpose=arguments.purpose,
            merchant_category_code=arguments.mcc,
        )
    except KhqrError as error:
        _report(error)
        return exit_code_failure
    if arguments.output == "json":
        _print_json({"qr": text, "md5": md5_hex(text)})
    else:
        print(text)
    return 0
