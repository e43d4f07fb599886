"""The `tonle verify` command: check a receipt offline, against a genesis file and nothing else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config.loader import load_genesis
from config.schema import ConfigError
from consensus.receipts import Verification, receipt_json_bytes_max, text_prefix, verify_receipt

exit_code_valid = 0
exit_code_invalid = 1
# Not a verdict: the genesis or the receipt file could not be read at all.
exit_code_unreadable = 2
# The largest receipt form is JSON; one byte more is read so an oversized input is seen, and refused.
receipt_input_bytes_max = receipt_json_bytes_max


def add_receipt_commands(subparsers: argparse._SubParsersAction) -> None:
    verify = subparsers.add_parser("verify", help="check a transfer receipt offline (prints VALID or INVALID)")
    verify.add_argument(
        "receipt",
        metavar="RECEIPT",
        help=f"a receipt file (JSON, binary or text), the text itself ({text_prefix}...), or - for standard input",
    )
    genesis = verify.add_mutually_exclusive_group(required=True)
    genesis.add_argument("--genesis", help="the network's genesis.toml")
    genesis.add_argument("--dir", help="a local network's directory: its genesis.toml is used")
    verify.set_defaults(handler=command_verify)


def _read_receipt(source: str) -> bytes:
    if source.startswith(text_prefix):
        return source.encode("ascii", errors="replace")
    if source == "-":
        return sys.stdin.buffer.read(receipt_input_bytes_max + 1)
    with open(source, "rb") as file:
        return file.read(receipt_input_bytes_max + 1)


def _render(verification: Verification) -> str:
    verdict = "VALID" if verification.valid else f"INVALID: {verification.reason}"
    lines = [verdict] + [f"  {key}: {value}" for key, value in verification.details.items()]
    return "\n".join(lines)


def command_verify(arguments: argparse.Namespace) -> int:
    genesis_path = Path(arguments.genesis) if arguments.genesis else Path(arguments.dir) / "genesis.toml"
    try:
        genesis = load_genesis(genesis_path)
        data = _read_receipt(arguments.receipt)
    except ConfigError as error:
        print(f"tonle verify: cannot load the genesis:\n{error}", file=sys.stderr)
        return exit_code_unreadable
    except OSError as error:
        print(f"tonle verify: cannot read {arguments.receipt}: {error.strerror or error}", file=sys.stderr)
        return exit_code_unreadable
    verification = verify_receipt(data, genesis)
    print(_render(verification))
    return exit_code_valid if verification.valid else exit_code_invalid
