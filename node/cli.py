"""The `tonle` command line: run a node, manage a local network, submit transfers and read state."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from config.keys import generate_key_file
from node.client import ClientError
from node.cluster import ClusterError, LocalCluster

exit_code_failure = 1
exit_code_usage = 2


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _cluster(arguments: argparse.Namespace) -> LocalCluster:
    return LocalCluster.load(Path(arguments.dir))


def _pick_node(cluster: LocalCluster, requested: str | None) -> str:
    if requested is not None:
        if requested not in cluster.nodes:
            raise ClusterError(f"no node named {requested!r}; nodes: {', '.join(cluster.nodes)}")
        return requested
    for name in cluster.nodes:
        if cluster.is_running(name):
            return name
    raise ClusterError("no node of this network is running (tonle cluster up / restart)")


# Commands ---------------------------------------------------------------------------------------------


def command_node_start(arguments: argparse.Namespace) -> int:
    from node.runner import run_node

    return run_node(Path(arguments.config))


def command_keygen(arguments: argparse.Namespace) -> int:
    public_key = generate_key_file(Path(arguments.out))
    print(public_key.hex())
    return 0


def command_cluster_up(arguments: argparse.Namespace) -> int:
    directory = Path(arguments.dir)
    cluster = LocalCluster.create(
        directory,
        validators=arguments.validators,
        institutions=arguments.institutions,
        accounts_per_currency=arguments.accounts,
        log_format=arguments.log_format,
    )
    cluster.start()
    try:
        leader = cluster.wait_for_leader()
        cluster.wait_ready()
        cluster.open_and_fund_accounts(via=leader)
    except (ClusterError, ClientError):
        cluster.kill()
        raise
    print(f"network {cluster.cluster_id} is up in {cluster.directory}: leader {leader}", file=sys.stderr)
    _print_json({"cluster_id": cluster.cluster_id, "leader": leader, "nodes": list(cluster.nodes)})
    return 0


def command_cluster_action(arguments: argparse.Namespace) -> int:
    cluster = _cluster(arguments)
    names = [arguments.node] if arguments.node else None
    if names:
        _pick_node(cluster, arguments.node)
    action = arguments.action
    if action == "down":
        cluster.stop(names)
    elif action == "kill":
        cluster.kill(names)
    elif action == "restart":
        cluster.restart(names)
    elif action == "pause":
        cluster.pause(names or list(cluster.nodes))
    elif action == "resume":
        cluster.resume(names or list(cluster.nodes))
    _print_json({"action": action, "nodes": names or list(cluster.nodes)})
    return 0


_status_columns = ("name", "node_role", "role", "term", "leader", "commit_index", "applied_index", "state_hash", "ready")


def command_status(arguments: argparse.Namespace) -> int:
    cluster = _cluster(arguments)
    rows = {}
    for name, node in cluster.nodes.items():
        status = cluster.status(name)
        rows[name] = status if status is not None else {"name": name, "node_role": node.role, "role": "down"}
    if arguments.output == "json":
        _print_json(rows)
        return 0
    table = [list(_status_columns)]
    for row in rows.values():
        cells = []
        for column in _status_columns:
            value = row.get(column, "")
            if column == "state_hash" and value:
                value = value[:16]
            cells.append("" if value is None else str(value))
        table.append(cells)
    widths = [max(len(line[column]) for line in table) for column in range(len(_status_columns))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def command_transfer(arguments: argparse.Namespace) -> int:
    cluster = _cluster(arguments)
    transfer_id = bytes.fromhex(arguments.id) if arguments.id else None
    if transfer_id is not None and len(transfer_id) != 16:
        raise ClusterError("--id must be 32 hexadecimal characters (128 bits)")
    entry = cluster.transfer(arguments.from_account, arguments.to_account, arguments.amount, arguments.currency, transfer_id)
    with cluster.client(_pick_node(cluster, arguments.node)) as client:
        (result,) = client.submit([entry])
    from consensus.entries import decode_entry

    body = decode_entry(entry).body()
    _print_json({"id": body.id.hex(), **result})
    return 0 if result["status"] == "applied" and result["result"] in ("ok", "exists") else exit_code_failure


def command_balance(arguments: argparse.Namespace) -> int:
    cluster = _cluster(arguments)
    with cluster.client(_pick_node(cluster, arguments.node)) as client:
        balance = client.balance(arguments.account)
    if balance is None:
        _print_json({"account": arguments.account, "found": False})
        return exit_code_failure
    _print_json(balance)
    return 0


def command_load(arguments: argparse.Namespace) -> int:
    from node.load import run_load

    cluster = _cluster(arguments)
    summary = run_load(
        cluster,
        transfers=arguments.transfers,
        concurrency=arguments.concurrency,
        batch_size=arguments.batch_size,
        nodes=arguments.node or None,
        seed=arguments.seed,
    )
    if arguments.output == "json":
        _print_json(summary.document)
    else:
        print(summary.render())
    return 0 if summary.conserved else exit_code_failure


# Parser -------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tonle", description="Tonle: a Raft-replicated payment ledger node.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="run a node")
    node_commands = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    start = node_commands.add_parser("start", help="start a node from its configuration file")
    start.add_argument("--config", required=True, help="the node's TOML configuration file")
    start.set_defaults(handler=command_node_start)

    keygen = commands.add_parser("keygen", help="write a new Ed25519 key file (mode 0600) and print its public key")
    keygen.add_argument("--out", required=True)
    keygen.set_defaults(handler=command_keygen)

    cluster = commands.add_parser("cluster", help="a local network of node processes on this machine")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = cluster_commands.add_parser("up", help="generate a network in DIR, start it and fund some accounts")
    up.add_argument("--dir", required=True)
    up.add_argument("--validators", type=_positive, default=3)
    up.add_argument("--institutions", type=int, default=2, help="institution nodes (one per institution)")
    up.add_argument("--accounts", type=_positive, default=4, help="customer accounts per institution and currency")
    up.add_argument("--log-format", choices=("text", "json"), default="text")
    up.set_defaults(handler=command_cluster_up)
    for action, text in (
        ("down", "stop nodes (SIGTERM)"),
        ("kill", "kill nodes (SIGKILL)"),
        ("restart", "stop and start nodes"),
        ("pause", "pause nodes (SIGSTOP)"),
        ("resume", "resume paused nodes (SIGCONT)"),
    ):
        sub = cluster_commands.add_parser(action, help=text)
        sub.add_argument("--dir", required=True)
        sub.add_argument("node", nargs="?", help="one node (default: all)")
        sub.set_defaults(handler=command_cluster_action, action=action)

    status = commands.add_parser("status", help="every node's role, term, leader, indexes and state hash")
    status.add_argument("--dir", required=True)
    status.add_argument("--output", choices=("table", "json"), default="table")
    status.set_defaults(handler=command_status)

    transfer = commands.add_parser("transfer", help="sign (as the debtor's institution) and submit a transfer")
    transfer.add_argument("--dir", required=True)
    transfer.add_argument("--from", dest="from_account", required=True)
    transfer.add_argument("--to", dest="to_account", required=True)
    transfer.add_argument("--amount", type=int, required=True, help="in minor units (riel, cents)")
    transfer.add_argument("--currency", required=True)
    transfer.add_argument("--id", help="128-bit transfer id in hex (default: a new time-ordered id)")
    transfer.add_argument("--node", help="node to submit to (default: the first running node)")
    transfer.set_defaults(handler=command_transfer)

    balance = commands.add_parser("balance", help="an account's balance")
    balance.add_argument("--dir", required=True)
    balance.add_argument("account")
    balance.add_argument("--node")
    balance.set_defaults(handler=command_balance)

    load = commands.add_parser("load", help="drive random transfers and check conservation on every node")
    load.add_argument("--dir", required=True)
    load.add_argument("--transfers", type=_positive, default=10_000)
    load.add_argument("--concurrency", type=_positive, default=32)
    load.add_argument("--batch-size", type=_positive, default=1, help="transfers per request")
    load.add_argument("--node", action="append", help="submit only to this node (repeatable; default: all)")
    load.add_argument("--seed", type=int)
    load.add_argument("--output", choices=("json", "summary"), default="json")
    load.set_defaults(handler=command_load)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        return arguments.handler(arguments)
    except (ClusterError, ClientError, FileExistsError, ValueError) as error:
        print(f"tonle: {error}", file=sys.stderr)
        return exit_code_failure
    except KeyboardInterrupt:
        return 130
