"""Helpers shared by the command-line modules: JSON output, finding the local network and a node."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from node.cluster import ClusterError, LocalCluster

exit_code_failure = 1


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True, default=json_default))


def json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__}")


def cluster_of(arguments: argparse.Namespace) -> LocalCluster:
    return LocalCluster.load(Path(arguments.dir))


def pick_node(cluster: LocalCluster, requested: str | None) -> str:
    if requested is not None:
        if requested not in cluster.nodes:
            raise ClusterError(f"no node named {requested!r}; nodes: {', '.join(cluster.nodes)}")
        return requested
    for name in cluster.nodes:
        if cluster.is_running(name):
            return name
    raise ClusterError("no node of this network is running (tonle cluster up / restart)")


def transfer_id_argument(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be hexadecimal") from None
    if len(value) != 16:
        raise argparse.ArgumentTypeError("must be 32 hexadecimal characters (128 bits)")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value
