"""Prometheus set-up for a local network: DIR/prometheus.yml scraping every node, next to a copy of the alert rules."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from node.cluster import LocalCluster

monitoring_directory = Path(__file__).resolve().parent.parent / "config" / "monitoring"
alert_rules_file = monitoring_directory / "alerts.yml"
# Local networks change fast (demos, tests): scrape more often than the 15 s of the production template.
local_scrape_interval_seconds = 5
local_scrape_timeout_seconds = 4


def write_prometheus_config(cluster: LocalCluster) -> Path:
    """Write DIR/prometheus.yml and DIR/alerts.yml for `cluster`; return the path of prometheus.yml.

    Run `prometheus --config.file=DIR/prometheus.yml --storage.tsdb.path=DIR/prometheus-data` to watch it.
    """
    directory = cluster.directory
    shutil.copyfile(alert_rules_file, directory / "alerts.yml")
    path = directory / "prometheus.yml"
    temporary = directory / "prometheus.yml.tmp"
    temporary.write_text(render_prometheus_config(cluster))
    os.replace(temporary, path)
    return path


def render_prometheus_config(cluster: LocalCluster) -> str:
    # JSON strings are valid YAML double-quoted scalars: names and addresses need no escaping of our own.
    directory = cluster.directory
    lines = [
        f"# Written by `tonle cluster up` for network {cluster.cluster_id}: scrapes every node's admin listener.",
        f"# prometheus --config.file={directory / 'prometheus.yml'} --storage.tsdb.path={directory / 'prometheus-data'}",
        "global:",
        f"  scrape_interval: {local_scrape_interval_seconds}s",
        f"  scrape_timeout: {local_scrape_timeout_seconds}s",
        f"  evaluation_interval: {local_scrape_interval_seconds}s",
        "rule_files:",
        "  - alerts.yml",
        "scrape_configs:",
        "  - job_name: tonle",
        "    metrics_path: /metrics",
        "    scheme: http",
        "    static_configs:",
    ]
    for node in cluster.nodes.values():
        labels = {"cluster": cluster.cluster_id, "node": node.name, "node_role": node.role}
        lines.append(f"      - targets: [{json.dumps(node.admin_address)}]")
        pairs = ", ".join(f"{key}: {json.dumps(value)}" for key, value in labels.items())
        lines.append(f"        labels: {{{pairs}}}")
    return "\n".join(lines) + "\n"
