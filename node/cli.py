"""The `tonle` command line: run a node, manage a local network, submit transfers and read state."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config.keys import generate_key_file
from node.audit import add_audit_commands
from node.bench import add_bench_commands
from node.chaos import add_chaos_commands
from node.cli_support import cluster_of, exit_code_failure, pick_node, positive, print_json
from node.client import ClientError
from node.cluster import ClusterError, LocalCluster
from node.cross_border import add_cross_border_commands
from node.khqr_cli import add_khqr_commands
from node.ledger_commands import add_ledger_commands
from node.open_api import add_open_api_commands
from node.pay import add_pay_commands
from node.monitoring import write_prometheus_config
from node.receipt_cli import add_receipt_commands



# Commands ---------------------------------------------------------------------------------------------


def command_node_start(arguments: argparse.Namespace) -> int:
    from node.runner import run_node

    return run_node(Path(arguments.config))


def command_node_compact(arguments: argparse.Namespace) -> int:
    """Rewrite a node's state databases with full B-tree pages (`LedgerStore.compact`)."""
    from config.loader import load_node_config
    from config.schema import ConfigError
    from storage.state import open_store

    try:
        config, _genesis = load_node_config(Path(arguments.config))
    except ConfigError as error:
        print(f"tonle: invalid configuration\n{error}", file=sys.stderr)
        return exit_code_failure
    if not (config.data_dir / "state" / "data.mdb").is_file():
        raise ValueError(f"no node state under {config.data_dir}: nothing to compact")
    store = open_store(config.data_dir, map_size_bytes=config.storage.map_size_bytes, sync=config.storage.sync)
    try:
        page_bytes = store.environment.stat()["psize"]
        compacted = store.compact(tuple(arguments.database) if arguments.database else None)
        used_bytes = store.used_bytes()
    finally:
        store.close()
    print_json(
        {
            "databases": [
                {"name": item.name, "entries": item.entries, "pages_before": item.pages_before, "pages_after": item.pages_after}
                for item in compacted
            ],
            "pages_before": sum(item.pages_before for item in compacted),
            "pages_after": sum(item.pages_after for item in compacted),
            "page_bytes": page_bytes,
            "file_used_bytes": used_bytes,
        }
    )
    return 0


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
    prometheus_config = write_prometheus_config(cluster)
    cluster.start()
    try:
        leader = cluster.wait_for_leader()
        cluster.wait_ready()
        cluster.open_and_fund_accounts(via=leader)
    except (ClusterError, ClientError):
        cluster.kill()
        raise
    print(f"network {cluster.cluster_id} is up in {cluster.directory}: leader {leader}", file=sys.stderr)
    print(f"Prometheus scrape config (with alert rules): {prometheus_config}", file=sys.stderr)
    print_json({"cluster_id": cluster.cluster_id, "leader": leader, "nodes": list(cluster.nodes)})
    return 0


def command_cluster_add_node(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    name = cluster.add_institution_node(arguments.institution)
    cluster.wait_ready([name])
    print_json({"action": "add-node", "node": name, "institution": arguments.institution})
    return 0


def command_cluster_action(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    names = [arguments.node] if arguments.node else None
    if names:
        pick_node(cluster, arguments.node)
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
    print_json({"action": action, "nodes": names or list(cluster.nodes)})
    return 0


_status_columns = ("name", "node_role", "role", "term", "leader", "commit_index", "applied_index", "state_hash", "ready")


def command_status(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    rows = {}
    for name, node in cluster.nodes.items():
        status = cluster.status(name)
        rows[name] = status if status is not None else {"name": name, "node_role": node.role, "role": "down"}
    if arguments.output == "json":
        print_json(rows)
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


def command_load(arguments: argparse.Namespace) -> int:
    from node.load import run_load

    cluster = cluster_of(arguments)
    summary = run_load(
        cluster,
        transfers=arguments.transfers,
        concurrency=arguments.concurrency,
        batch_size=arguments.batch_size,
        nodes=arguments.node or None,
        seed=arguments.seed,
    )
    if arguments.output == "json":
        print_json(summary.document)
    else:
        print(summary.render())
    return 0 if summary.conserved else exit_code_failure


# Parser -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tonle", description="Tonle: a Raft-replicated payment ledger node.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="run a node")
    node_commands = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    start = node_commands.add_parser("start", help="start a node from its configuration file")
    start.add_argument("--config", required=True, help="the node's TOML configuration file")
    start.set_defaults(handler=command_node_start)
    compact = node_commands.add_parser(
        "compact",
        help="rewrite the node's state databases with full B-tree pages (records and state hash unchanged; "
        "best with the node stopped: its apply waits while each database is rewritten)",
    )
    compact.add_argument("--config", required=True, help="the node's TOML configuration file")
    compact.add_argument("--database", action="append", help="only this database (repeatable; default: all)")
    compact.set_defaults(handler=command_node_compact)

    keygen = commands.add_parser("keygen", help="write a new Ed25519 key file (mode 0600) and print its public key")
    keygen.add_argument("--out", required=True)
    keygen.set_defaults(handler=command_keygen)

    cluster = commands.add_parser("cluster", help="a local network of node processes on this machine")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = cluster_commands.add_parser("up", help="generate a network in DIR, start it and fund some accounts")
    up.add_argument("--dir", required=True)
    up.add_argument("--validators", type=positive, default=3)
    up.add_argument("--institutions", type=int, default=2, help="institution nodes (one per institution)")
    up.add_argument("--accounts", type=positive, default=4, help="customer accounts per institution and currency")
    up.add_argument("--log-format", choices=("text", "json"), default="text")
    up.set_defaults(handler=command_cluster_up)
    add_node = cluster_commands.add_parser(
        "add-node", help="admit and start a new read-only node for an institution, without restarting the network"
    )
    add_node.add_argument("--dir", required=True)
    add_node.add_argument("--institution", required=True)
    add_node.set_defaults(handler=command_cluster_add_node)
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

    add_ledger_commands(commands)
    add_khqr_commands(commands)
    add_receipt_commands(commands)
    add_pay_commands(commands)
    add_cross_border_commands(commands)
    add_open_api_commands(commands)
    add_audit_commands(commands)
    add_bench_commands(commands)
    add_chaos_commands(commands)

    load = commands.add_parser("load", help="drive random transfers and check conservation on every node")
    load.add_argument("--dir", required=True)
    load.add_argument("--transfers", type=positive, default=10_000)
    load.add_argument("--concurrency", type=positive, default=32)
    load.add_argument("--batch-size", type=positive, default=1, help="transfers per request")
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
