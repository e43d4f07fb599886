"""Shipped monitoring: alert rules and their tests, runbook, scrape configs, dashboard, metrics, status page data."""

# promtool comes from Debian's `prometheus` package, which .ci/run installs: a missing promtool fails these
# tests instead of skipping them, so CI can never pass without checking the rules.

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from node.admin import PeerStatusError, fetch_status, history_samples_max, peer_status_bytes_max
from node.cluster import LocalCluster
from node.metrics import NodeMetrics, latency_buckets_seconds
from node.monitoring import render_prometheus_config, write_prometheus_config
from node.status_page import (
    CommitHistory,
    HistorySample,
    NodeReport,
    content_security_policy,
    page_html,
    summarize_cluster,
)

repository = Path(__file__).resolve().parents[2]
monitoring = repository / "config" / "monitoring"
runbook = repository / "docs" / "runbook.md"
promtool_timeout_seconds = 120.0
# The commit-path stages the issue names; the dashboard must chart every one of them.
commit_path_histograms = (
    "tonle_commit_queue_wait_seconds",
    "tonle_commit_batch_build_seconds",
    "tonle_commit_signature_verification_seconds",
    "tonle_commit_replication_seconds",
    "tonle_journal_fsync_seconds",
    "tonle_commit_apply_seconds",
    "tonle_state_commit_seconds",
)


def promtool(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    if executable is None:
        pytest.fail("promtool is not on PATH: install Debian's `prometheus` package (.ci/run does)")
    return subprocess.run(
        [executable, *arguments],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=promtool_timeout_seconds,
        check=False,
    )


def exported_series_names() -> set[str]:
    """Every series name a node's /metrics can contain (with _total, _bucket, _info... suffixes)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}
    names = set()
    for family in NodeMetrics("v1", "validator").registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def metric_names_in(expression: str) -> set[str]:
    return set(re.findall(r"\btonle_[a-z0-9_]+", expression))


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", (monitoring / "alerts.yml").read_text(), flags=re.MULTILINE)


def dashboard() -> dict[str, Any]:
    return json.loads((monitoring / "grafana-dashboard.json").read_text())


def dashboard_expressions() -> list[str]:
    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("expr", "definition") and isinstance(item, str):
                    yield item
                else:
                    yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)

    return list(walk(dashboard()))


# Alert rules ---------------------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(monitoring / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_every_alert_behaves_as_its_promtool_unit_tests_expect():
    result = promtool("test", "rules", str(monitoring / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_issue_s_seven_alerts_exist_with_the_entry_hash_index_s():
    assert alert_names() == [
        "TonleNoLeader",
        "TonleInsufficientMembers",
        "TonleHighNumberOfLeaderChanges",
        "TonleHighCommitLatency",
        "TonleApplyLag",
        "TonleEntryHashIndexBehind",
        "TonleStateDivergence",
        "TonleStorageNearlyFull",
        "TonleStorageReaderHeld",
    ]


def test_every_alert_has_a_firing_case_and_a_quiet_case():
    cases: dict[str, set[str]] = {name: set() for name in alert_names()}
    lines = (monitoring / "alerts_test.yml").read_text().splitlines()
    for position, line in enumerate(lines):
        match = re.match(r"^\s+alertname: (\w+)$", line)
        if match is None:
            continue
        expectation = next(later.strip() for later in lines[position + 1 :] if "exp_alerts:" in later)
        assert match.group(1) in cases, f"test for an alert that does not exist: {match.group(1)}"
        cases[match.group(1)].add("quiet" if expectation.endswith("[]") else "firing")
    assert {name: kinds for name, kinds in cases.items() if kinds != {"firing", "quiet"}} == {}


def test_every_alert_links_to_its_own_runbook_section_with_what_to_check_and_do():
    text = (monitoring / "alerts.yml").read_text()
    links = re.findall(r'runbook_url: "docs/runbook\.md#([a-z0-9-]+)"', text)
    assert links == [name.lower() for name in alert_names()]
    sections = re.split(r"^## ", runbook.read_text(), flags=re.MULTILINE)[1:]
    by_anchor = {section.splitlines()[0].strip().lower(): section for section in sections}
    for anchor in links:
        assert anchor in by_anchor, f"docs/runbook.md has no section for #{anchor}"
        for part in ("**What it means.**", "**What to check.**", "**What to do.**"):
            assert part in by_anchor[anchor], f"runbook section #{anchor} lacks {part}"


def test_alert_rules_reference_only_metrics_the_node_exports():
    unknown = metric_names_in((monitoring / "alerts.yml").read_text()) - exported_series_names()
    assert unknown == set()


# Scrape configuration ------------------------------------------------------------------------------------


def test_prometheus_template_is_valid_and_loads_the_alert_rules():
    result = promtool("check", "config", str(monitoring / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_a_local_network_gets_a_prometheus_config_scraping_every_node_admin_listener(tmp_path):
    cluster = LocalCluster.create(tmp_path / "network", validators=3, institutions=2)
    path = write_prometheus_config(cluster)
    assert path == cluster.directory / "prometheus.yml"
    assert (cluster.directory / "alerts.yml").read_bytes() == (monitoring / "alerts.yml").read_bytes()
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.read_text()
    assert text == render_prometheus_config(cluster)
    for node in cluster.nodes.values():
        target = f'- targets: ["{node.admin_address}"]\n'
        labels = f'labels: {{cluster: "{cluster.cluster_id}", node: "{node.name}", node_role: "{node.role}"}}'
        assert target + "        " + labels in text, node.name
    assert text.count("- targets:") == len(cluster.nodes) == 5


# Grafana dashboard ---------------------------------------------------------------------------------------


def test_dashboard_references_only_metrics_the_node_exports():
    referenced = set().union(*(metric_names_in(expression) for expression in dashboard_expressions()))
    assert referenced, "the dashboard queries no tonle_ metric at all"
    assert referenced - exported_series_names() == set()


def test_dashboard_charts_every_commit_path_stage_at_p50_and_p99():
    expressions = dashboard_expressions()
    for metric in commit_path_histograms:
        for quantile in ("0.5", "0.99"):
            assert any(
                f"histogram_quantile({quantile}," in expression and f"{metric}_bucket" in expression
                for expression in expressions
            ), f"no p{quantile} panel for {metric}"


def test_dashboard_covers_throughput_batch_size_leader_terms_fsync_and_apply_lag():
    titles = {panel["title"] for panel in dashboard()["panels"]}
    for title in ("Entries applied / s by result", "Batch size", "Leader", "Raft term", "Journal fsync", "Apply lag"):
        assert title in titles


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every query as a recording rule, with Grafana's variables filled in."""
    substitutions = {"$__rate_interval": "5m", "$cluster": "net", "$node": ".*"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, expression in enumerate(dashboard_expressions()):
        if expression.startswith("label_values("):
            continue
        for variable, value in substitutions.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, expression
        lines += [f"      - record: dashboard_query_{number}", f"        expr: {json.dumps(expression)}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_panels_have_unique_ids_fit_the_grid_and_use_the_datasource_variable():
    panels = dashboard()["panels"]
    identifiers = [panel["id"] for panel in panels]
    assert len(identifiers) == len(set(identifiers))
    for panel in panels:
        position = panel["gridPos"]
        assert 0 <= position["x"] and position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


# Metric catalogue ----------------------------------------------------------------------------------------


def test_exposition_passes_promtool_metric_lint():
    metrics = NodeMetrics("v1", "validator")
    metrics.peer_connected.labels("v2").set(1)
    metrics.peer_round_trip.labels("v2").observe(0.0004)
    metrics.entries_applied.labels("ok").inc()
    metrics.entries_rejected.labels("signature_invalid").inc()
    metrics.api_requests.labels("submit", "ok").inc()
    metrics.health_checks.labels("leader", "passed").inc()
    result = promtool("check", "metrics", stdin=generate_latest(metrics.registry).decode())
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_latency_histograms_use_one_millisecond_times_powers_of_two_and_say_when_they_start_lower():
    metrics = NodeMetrics("v1", "validator")
    metrics.peer_round_trip.labels("v2")  # a labelled histogram exports its buckets once a child exists
    checked = 0
    for family in metrics.registry.collect():
        if family.type != "histogram" or not family.name.endswith("_seconds"):
            continue
        checked += 1
        bounds = [float(sample.labels["le"]) for sample in family.samples if sample.name.endswith("_bucket")]
        finite = [bound for bound in bounds if bound != float("inf")]
        assert all(any(abs(bound - 0.001 * 2.0**k) < 1e-12 for k in range(-10, 20)) for bound in finite), family.name
        assert set(latency_buckets_seconds) <= set(finite), family.name
        if min(finite) < 0.001:
            assert "62.5 us" in family.documentation, family.name
    assert checked == len(commit_path_histograms) + 3  # the stages, the peer round trip, snapshot write and install


def test_every_proposal_failure_reason_is_exported_at_zero_before_any_failure():
    from pysyncobj.config import FAIL_REASON

    reasons = {name.lower() for name in vars(FAIL_REASON) if not name.startswith("_") and name != "SUCCESS"}
    text = generate_latest(NodeMetrics("v1", "validator").registry).decode()
    for reason in reasons | {"timeout"}:
        assert f'tonle_proposals_failed_total{{reason="{reason}"}} 0.0' in text


def test_build_info_labels_do_not_clash_with_scrape_target_labels():
    families = NodeMetrics("v7", "institution").registry.collect()
    (family,) = [family for family in families if family.name == "tonle_build"]
    (sample,) = family.samples
    assert {"node", "node_role", "cluster", "instance", "job"}.isdisjoint(sample.labels)
    assert (sample.labels["name"], sample.labels["role"]) == ("v7", "institution")


# Status page data ----------------------------------------------------------------------------------------


def _sample(second: int, applied_index: int, entries_applied: int) -> HistorySample:
    return HistorySample(1_700_000_000.0 + second, 1000.0 + second, applied_index, entries_applied)


def test_commit_history_holds_at_most_its_limit_and_drops_the_oldest():
    history = CommitHistory(history_samples_max)
    for second in range(history_samples_max + 15):
        history.add(_sample(second, applied_index=second * 3, entries_applied=second * 30))
    assert len(history) == history_samples_max
    rates = history.rates()
    assert len(rates) == history_samples_max - 1
    assert rates[0]["time"] == 1_700_000_000.0 + 16
    assert {(rate["batches_per_second"], rate["entries_per_second"]) for rate in rates} == {(3.0, 30.0)}


def test_commit_history_refuses_a_limit_too_small_for_a_rate():
    with pytest.raises(ValueError, match="at least 2 samples"):
        CommitHistory(samples_max=1)


def _status(name: str, role: str, commit_index: int, applied_index: int, term: int = 3) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "term": term,
        "leader": "v1",
        "commit_index": commit_index,
        "applied_index": applied_index,
        "ready": applied_index >= commit_index - 64,
        "diverged": False,
        "connected_peers": ["v2"],
    }


def test_cluster_view_measures_lag_against_the_highest_commit_index_and_lists_unreachable_nodes():
    reports = [
        NodeReport("v1", "validator", _status("v1", "leader", 900, 900), None),
        NodeReport("v2", "validator", _status("v2", "follower", 880, 700), None),
        NodeReport("v3", "validator", None, "no answer within 1.0 s"),
        NodeReport("aba-1", "institution", _status("aba-1", "replica", 900, 899), None),
    ]
    view = summarize_cluster("v2", "net", reports, [], 300.0, 1_700_000_000.0)
    assert view["leader"] == "v1" and view["commit_index"] == 900 and view["served_by"] == "v2"
    lags = [(node["name"], node.get("lag")) for node in view["nodes"]]
    assert lags == [("v1", 0), ("v2", 200), ("v3", None), ("aba-1", 1)]
    unreachable = {"name": "v3", "node_role": "validator", "reachable": False, "error": "no answer within 1.0 s"}
    assert view["nodes"][2] == unreachable


def test_cluster_view_picks_the_leader_of_the_highest_term():
    reports = [
        NodeReport("v1", "validator", _status("v1", "leader", 10, 10, term=4), None),
        NodeReport("v2", "validator", _status("v2", "leader", 12, 12, term=5), None),
    ]
    assert summarize_cluster("v1", "net", reports, [], 300.0, 0.0)["leader"] == "v2"


def test_status_page_loads_nothing_from_outside_and_its_policy_admits_exactly_its_own_script_and_style():
    html = page_html.decode()
    assert re.search(r"\b(src|href)=\"(?!data:)", html) is None
    assert "@import" not in html and "url(" not in html
    for tag in ("script", "style"):
        (source,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in content_security_policy
    assert "connect-src 'self'" in content_security_policy and "default-src 'none'" in content_security_policy


# Peer status fetch (a fake peer stands in for another node's admin listener) -----------------------------


async def _serve_once(answer: bytes) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _fetch_from_fake_peer(answer: bytes) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        server, port = await _serve_once(answer)
        try:
            return await asyncio.wait_for(fetch_status("127.0.0.1", port), 30.0)
        finally:
            server.close()

    return asyncio.run(run())


def _http(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def test_a_peer_status_is_read_when_it_is_well_formed():
    status = _status("v2", "follower", 10, 10)
    assert _fetch_from_fake_peer(_http(json.dumps(status).encode())) == status


def test_a_peer_status_larger_than_the_limit_is_refused():
    status = {**_status("v2", "follower", 10, 10), "padding": "x" * peer_status_bytes_max}
    with pytest.raises(PeerStatusError, match=f"larger than {peer_status_bytes_max} bytes"):
        _fetch_from_fake_peer(_http(json.dumps(status).encode()))


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (_http(b"not json"), "not JSON"),
        (_http(b"[1, 2]"), "not a JSON object"),
        (_http(json.dumps({"name": "v2"}).encode()), "'role' is missing"),
        (
            _http(json.dumps({**_status("v2", "follower", 1, 1), "term": "3"}).encode()),
            "'term' is missing or of the wrong type",
        ),
        (_http(b"{}", "503 Service Unavailable"), "unexpected answer"),
    ],
)
def test_a_peer_answer_that_is_not_a_status_is_refused_with_the_reason(answer, problem):
    with pytest.raises(PeerStatusError, match=problem):
        _fetch_from_fake_peer(answer)
