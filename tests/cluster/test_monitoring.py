"""What an SRE sees of a real network: metrics that move, health endpoints, the status page, leader loss."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from config.schema import StorageConfig
from node.admin import (
    admin_connections_max,
    peer_status_timeout_seconds,
    request_head_bytes_max,
    request_read_timeout_seconds,
)
from node.cluster import LocalCluster, local_map_size_bytes, local_raft
from node.metrics import NodeMetrics
from node.monitoring import write_prometheus_config
from node.server import stale_reader_check_interval_seconds
from node.status_page import browser_window_size_default, load_in_chromium
from tests.cluster.conftest import start_cluster, stop_everything
from tests.unit.test_stale_readers import leave_a_dead_reader

pytestmark = pytest.mark.cluster

deadline_seconds = 120.0
poll_interval_seconds = 0.05
http_timeout_seconds = 5.0
transfers_per_node = 30
transfers_per_request = 10
# /readyz may fail for at most the election plus this: the 50 ms polling step on both sides of the outage,
# a follower hearing the new leader's first heartbeat (100 ms in local_raft) and applying its no-op entry,
# and scheduling slack on a loaded 2-core machine.
readiness_margin_seconds = 0.75
election_settle_seconds = 2.0
# Without a quorum a node must stop answering ready within a few election timeouts (local_raft: 0.8-1.6 s).
unready_deadline_seconds = 3 * local_raft.election_timeout_max_ms / 1000 + readiness_margin_seconds

Families = dict[str, Metric]


# Helpers ------------------------------------------------------------------------------------------------


def scrape(cluster: LocalCluster, name: str) -> Families:
    code, text = cluster.admin_get(name, "/metrics", timeout_seconds=http_timeout_seconds)
    assert code == 200, f"/metrics of {name} answered {code}"
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: Families, family: str, sample: str | None = None, **labels: str) -> float:
    """Sum of the family's samples named `sample` (default: the family's own) whose labels include `labels`."""
    wanted = sample or family
    return sum(
        item.value
        for item in families[family].samples
        if item.name == wanted and all(item.labels.get(key) == expected for key, expected in labels.items())
    )


def drive_transfers(cluster: LocalCluster, names: Iterable[str], per_node: int) -> None:
    """Submit transfers through every named node at once (followers forward, so every node verifies)."""
    failures: list[str] = []

    def submit_through(name: str) -> None:
        try:
            with cluster.client(name) as client:
                for _ in range(per_node // transfers_per_request):
                    entries = [
                        cluster.transfer("c1.khr@aba", "c2.khr@acleda", 1, "KHR") for _ in range(transfers_per_request)
                    ]
                    results = client.submit(entries, deadline_seconds=deadline_seconds)
                    failures.extend(f"{name}: {result}" for result in results if result["result"] != "ok")
        except Exception as error:  # noqa: BLE001 - reported below with the node's name
            failures.append(f"{name}: {error!r}")

    threads = [threading.Thread(target=submit_through, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(deadline_seconds)
    assert not any(thread.is_alive() for thread in threads), "transfers did not finish within the deadline"
    assert failures == []


def http_code(address: str, path: str) -> int | None:
    """The status code of GET path, or None if the node did not answer within the timeout."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=http_timeout_seconds) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, urllib.error.URLError):
        return None


def raw_exchange(address: str, request: bytes, *, timeout_seconds: float = 30.0) -> tuple[bytes, float]:
    """Send raw bytes to an admin listener; return everything it answered before closing, and how long it took."""
    host, port = address.rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout_seconds) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received, time.monotonic() - started


# Metrics ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """Every node's /metrics before and after transfers went in through every node."""

    before: dict[str, Families]
    after: dict[str, Families]
    leader: str
    refused_through: str
    driven: int

    def grew(self, name: str, family: str, sample: str | None = None, **labels: str) -> float:
        return value(self.after[name], family, sample, **labels) - value(self.before[name], family, sample, **labels)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """This module's network, its nodes set to drop their dead page copies: unconfined, as here, `auto` leaves
    them to the kernel, and the counter must be seen to count."""
    storage = StorageConfig(map_size_bytes=local_map_size_bytes, sync=True, drop_dead_copies=True)
    network = start_cluster(tmp_path_factory.mktemp("shared") / "network", storage=storage)
    try:
        yield network
    finally:
        stop_everything(network)


@pytest.fixture(scope="module")
def traffic(shared_cluster: LocalCluster) -> Traffic:
    network = shared_cluster
    nodes = list(network.nodes)
    leader = network.wait_for_leader(timeout_seconds=deadline_seconds)
    network.wait_converged(timeout_seconds=deadline_seconds)
    before = {name: scrape(network, name) for name in nodes}
    drive_transfers(network, nodes, transfers_per_node)
    refused_through = next(name for name in network.validators() if name != leader)
    good = network.transfer("c1.khr@aba", "c2.khr@acleda", 1, "KHR")
    with network.client(refused_through) as client:
        (refused,) = client.submit([good[:-1] + bytes([good[-1] ^ 1])])
        assert client.balance("c2.khr@acleda") is not None
    assert refused["result"] == "signature_invalid"
    for name in nodes:
        assert network.admin_get(name, "/readyz")[0] == 200
    network.wait_converged(timeout_seconds=deadline_seconds)
    after = {name: scrape(network, name) for name in nodes}
    return Traffic(before, after, leader, refused_through, transfers_per_node * len(nodes))


def test_every_node_exports_every_metric_family(network, traffic):
    expected = {family.name for family in NodeMetrics("v1", "validator").registry.collect()}
    expected = {"tonle_build_info" if name == "tonle_build" else name for name in expected}
    for name in network.nodes:
        missing = expected - set(traffic.after[name])
        assert missing == set(), f"{name} does not export {sorted(missing)}"
        (build,) = traffic.after[name]["tonle_build_info"].samples
        assert build.value == 1 and build.labels["name"] == name and build.labels["version"], name


def test_every_node_builds_its_entry_hash_index_behind_the_apply(network, traffic):
    applied = value(traffic.after[traffic.leader], "tonle_raft_applied_index")
    deadline = time.monotonic() + deadline_seconds
    for name in network.nodes:
        while (indexed := value(scrape(network, name), "tonle_entry_hash_index_raft_index")) < applied:
            assert time.monotonic() < deadline, f"{name}: entry-hash index at {indexed}, applied {applied}"
            time.sleep(0.1)
        now = scrape(network, name)
        entries = ("tonle_entry_hash_index_entries", "tonle_entry_hash_index_entries_total")
        assert value(now, *entries) - value(traffic.before[name], *entries) >= traffic.driven, name
        assert value(now, "tonle_entry_hash_index_errors", "tonle_entry_hash_index_errors_total") == 0, name
        # What an SRE runs beside the live node: its index holds exactly what its state logged.
        checked = subprocess.run(
            [sys.executable, "-m", "node", "index-check", "--dir", str(network.directory), "--node", name],
            capture_output=True, text=True, timeout=deadline_seconds,
        )
        assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"
        report = json.loads(checked.stdout)
        assert report["consistent"] and report["indexed_pairs"] == report["logged_pairs"] >= traffic.driven, report


def test_one_leader_known_to_every_node_in_one_term(network, traffic):
    after, validators = traffic.after, network.validators()
    assert sum(value(after[name], "tonle_raft_is_leader") for name in validators) == 1
    assert value(after[traffic.leader], "tonle_raft_is_leader") == 1
    assert {value(after[name], "tonle_raft_has_leader") for name in network.nodes} == {1}
    changes = ("tonle_raft_leader_changes_seen", "tonle_raft_leader_changes_seen_total")
    assert min(value(after[name], *changes) for name in network.nodes) >= 1
    assert len({value(after[name], "tonle_raft_term") for name in validators}) == 1
    assert value(after[traffic.leader], "tonle_raft_term") >= 1
    for name in validators:
        for peer in validators:
            if peer != name:
                assert value(after[name], "tonle_raft_peer_connected", peer=peer) == 1, (name, peer)


def test_every_node_applies_verifies_and_counts_the_transfers(network, traffic):
    after, grew, driven = traffic.after, traffic.grew, traffic.driven
    leader_applied = value(after[traffic.leader], "tonle_raft_applied_index")
    for name in network.nodes:
        assert grew(name, "tonle_raft_commit_index") >= 1 and grew(name, "tonle_raft_applied_index") >= 1, name
        assert value(after[name], "tonle_raft_applied_index") == leader_applied, name
        assert value(after[name], "tonle_raft_last_log_index") >= value(after[name], "tonle_raft_commit_index"), name
        assert grew(name, "tonle_entries_applied", "tonle_entries_applied_total", result="ok") == driven, name
        assert grew(name, "tonle_batch_entries", "tonle_batch_entries_count") >= 1, name
        assert grew(name, "tonle_batch_entries", "tonle_batch_entries_sum") >= driven, name
        assert grew(name, "tonle_commit_apply_seconds", "tonle_commit_apply_seconds_count") >= 1, name
        assert grew(name, "tonle_state_commit_seconds", "tonle_state_commit_seconds_count") >= 1, name
        assert grew(name, "tonle_signatures_verified", "tonle_signatures_verified_total") >= transfers_per_node, name
        # Every node read ahead the two accounts of each transfer it took in, and dropped no read-ahead.
        assert grew(name, "tonle_accounts_read_ahead", "tonle_accounts_read_ahead_total") >= 2 * transfers_per_node, name
        assert grew(name, "tonle_read_aheads_dropped", "tonle_read_aheads_dropped_total") == 0, name
        # Every node's apply commits freed the pages they replaced, and the node dropped them from memory.
        assert grew(name, "tonle_state_dead_pages_dropped", "tonle_state_dead_pages_dropped_total") >= 1, name
        # Every node took requests, so every node timed the verification of an intake request.
        verification = "tonle_commit_signature_verification_seconds"
        assert grew(name, verification, verification + "_count") >= 1, name
        requests = transfers_per_node // transfers_per_request
        submits = grew(name, "tonle_api_requests", "tonle_api_requests_total", operation="submit", result="ok")
        assert submits >= requests, name
        readiness = grew(name, "tonle_health_checks", "tonle_health_checks_total", check="leader", result="passed")
        assert readiness >= 1, name
    for name in network.validators():
        assert grew(name, "tonle_journal_fsync_seconds", "tonle_journal_fsync_seconds_count") >= 1, name


def test_every_node_reports_cpu_by_thread_job_and_the_counters_only_grow(network, traffic):
    family, sample = "tonle_thread_cpu_seconds", "tonle_thread_cpu_seconds_total"
    for name in network.nodes:
        for role in ("event_loop", "raft", "apply", "verify", "snapshot", "receipts", "other"):
            before = value(traffic.before[name], family, sample, thread=role)
            assert value(traffic.after[name], family, sample, thread=role) >= before, f"{name}: {role} CPU went down"
        # /proc counts whole 10 ms clock ticks and this test's traffic is light, so only the thread that
        # started the node (imports, configuration, then the event loop) is sure to show.
        assert value(traffic.after[name], family, sample, thread="event_loop") > 0, f"{name} reports no event-loop CPU"


def test_a_reader_killed_beside_a_node_is_freed_by_the_node_counted_and_logged(network, traffic):
    # An institution node: its state is the same as a validator's, and its role weighs least on the shared network.
    name = next(node for node in network.nodes if node not in network.validators())
    path = network.nodes[name].data_dir / "state"
    cleared_before = value(scrape(network, name), "tonle_storage_stale_readers_cleared", "tonle_storage_stale_readers_cleared_total")
    leave_a_dead_reader(path, local_map_size_bytes)
    # Housekeeping checks every stale_reader_check_interval_seconds; the lag is read at each scrape.
    deadline = time.monotonic() + stale_reader_check_interval_seconds + deadline_seconds
    while True:
        families = scrape(network, name)
        cleared = value(families, "tonle_storage_stale_readers_cleared", "tonle_storage_stale_readers_cleared_total")
        if cleared > cleared_before or time.monotonic() > deadline:
            break
        time.sleep(poll_interval_seconds * 10)
    assert cleared == cleared_before + 1, f"{name} did not free the dead reader's slot within the deadline"
    assert "held by processes that died inside a read transaction" in network.nodes[name].log.read_text()
    assert value(families, "tonle_storage_oldest_reader_lag_transactions") < 100


def test_the_leader_times_every_commit_stage_and_hears_from_every_peer(network, traffic):
    after, grew, leader = traffic.after, traffic.grew, traffic.leader
    stages = ("tonle_commit_queue_wait_seconds", "tonle_commit_batch_build_seconds", "tonle_commit_replication_seconds")
    for family in stages:
        assert grew(leader, family, family + "_count") >= 1, family
    assert grew(leader, "tonle_proposals", "tonle_proposals_total") >= 1
    assert value(after[leader], "tonle_proposals_pending") == 0
    assert value(after[leader], "tonle_proposer_queue_entries") == 0
    for peer in network.validators():
        if peer != leader:
            round_trip = "tonle_raft_peer_round_trip_seconds"
            assert grew(leader, round_trip, round_trip + "_count", peer=peer) >= 1, peer


def test_refusals_are_counted_by_reason_and_healthy_nodes_report_no_trouble(network, traffic):
    after, grew = traffic.after, traffic.grew
    through = traffic.refused_through
    assert grew(through, "tonle_entries_rejected", "tonle_entries_rejected_total", reason="signature_invalid") == 1
    assert grew(through, "tonle_api_requests", "tonle_api_requests_total", operation="balance", result="ok") >= 1
    for name in network.nodes:
        assert value(after[name], "tonle_state_diverged") == 0, name
        assert value(after[name], "tonle_state_divergence", "tonle_state_divergence_total") == 0, name
        assert value(after[name], "tonle_raft_recovering") == 0, name
        assert value(after[name], "tonle_proposals_failed", "tonle_proposals_failed_total") == 0, name
        assert value(after[name], "tonle_storage_map_size_bytes") == local_map_size_bytes, name
        assert 0 < value(after[name], "tonle_storage_used_bytes") <= local_map_size_bytes, name


# Health endpoints ---------------------------------------------------------------------------------------


def test_readyz_names_its_checks_and_honours_check_paths_verbose_and_exclude(network):
    name = network.validators()[0]
    code, body = network.admin_get(name, "/readyz?verbose")
    assert code == 200
    checks = re.findall(r"^\[\+\](\w+) ok: ", body, flags=re.MULTILINE)
    assert checks == ["storage", "leader", "caught_up", "apply_lag", "not_diverged"]
    assert body.rstrip().endswith("readyz check passed")
    assert network.admin_get(name, "/readyz") == (200, "ok\n")
    assert network.admin_get(name, "/readyz/leader") == (200, "ok\n")
    assert network.admin_get(name, "/readyz/leader?verbose")[1].startswith("[+]leader ok: leader ")
    code, body = network.admin_get(name, "/readyz/nonexistent")
    assert code == 404 and "caught_up" in body
    code, body = network.admin_get(name, "/readyz?verbose&exclude=leader,caught_up")
    assert code == 200 and re.findall(r"^\[\+\](\w+)", body, flags=re.MULTILINE) == ["storage", "apply_lag", "not_diverged"]
    assert network.admin_get(name, "/livez") == (200, "ok\n")


def test_admin_listener_allows_only_get_and_head(network):
    address = network.nodes[network.validators()[0]].admin_address
    answer, _ = raw_exchange(address, b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET, HEAD\r\n" in answer
    answer, _ = raw_exchange(address, b"HEAD /status HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b""
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) > 0


def test_a_request_head_over_the_limit_is_closed_without_an_answer(network):
    address = network.nodes[network.validators()[0]].admin_address
    oversized = b"GET /status HTTP/1.1\r\nX-Padding: " + b"a" * request_head_bytes_max + b"\r\n\r\n"
    answer, _ = raw_exchange(address, oversized)
    assert answer == b""
    fitting = b"GET /status HTTP/1.1\r\nX-Padding: " + b"a" * (request_head_bytes_max // 2) + b"\r\n\r\n"
    assert raw_exchange(address, fitting)[0].startswith(b"HTTP/1.1 200 ")


def test_a_silent_connection_is_closed_after_the_read_timeout(network):
    address = network.nodes[network.validators()[0]].admin_address
    unfinished = b"GET /livez HTTP/1.1\r\n"
    answer, elapsed = raw_exchange(address, unfinished, timeout_seconds=request_read_timeout_seconds + 30)
    assert answer == b""
    assert request_read_timeout_seconds - 0.5 <= elapsed < request_read_timeout_seconds + 10


def test_connections_over_the_limit_are_closed_at_once_and_the_listener_recovers(network):
    address = network.nodes[network.validators()[0]].admin_address
    host, port = address.rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(admin_connections_max)]
    try:
        time.sleep(0.5)  # let the node accept every held connection before the next one arrives
        answer, elapsed = raw_exchange(address, b"GET /livez HTTP/1.1\r\n\r\n")
        assert answer == b"" and elapsed < request_read_timeout_seconds
    finally:
        for connection in held:
            # RST instead of FIN, so the node's slots free at once.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()
    deadline = time.monotonic() + deadline_seconds
    while http_code(address, "/livez") != 200 and time.monotonic() < deadline:
        time.sleep(poll_interval_seconds)
    assert http_code(address, "/livez") == 200


# Status page --------------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def test_the_status_page_renders_every_node_and_the_commit_rate_in_headless_chromium(network, tmp_path):
    drive_transfers(network, network.validators(), transfers_per_node)
    served_by = next(name for name in network.validators() if network.status(name)["role"] == "follower")
    url = f"http://{network.nodes[served_by].admin_address}/"

    dom = load_in_chromium(url)

    refreshes = int(re.search(r'<body data-refreshes="(\d+)"', dom).group(1))
    assert refreshes >= 2, "the page did not draw itself from /cluster, and refresh, in the browser"
    assert re.search(r'<span id="served-by">([^<]+)</span>', dom).group(1) == served_by
    for name in network.nodes:
        assert re.search(rf'<tr data-node="{re.escape(name)}"', dom), f"no row for {name}"
    leader = network.wait_for_leader(timeout_seconds=deadline_seconds)
    assert re.search(rf'<tr data-node="{re.escape(leader)}" class="leader">', dom)
    ready_count = re.search(r'<div class="value" id="ready-count">(\d+) / (\d+)</div>', dom)
    assert ready_count.groups() == (str(len(network.nodes)),) * 2
    chart = re.search(r'<polyline id="commit-rate-entries" class="entries" points="([^"]+)" data-points="(\d+)"', dom)
    assert chart is not None, "no commit-rate chart"
    points = [tuple(map(float, pair.split(","))) for pair in chart.group(1).split()]
    assert len(points) == int(chart.group(2)) >= 2
    baseline = max(y for _, y in points)
    assert any(y < baseline for _, y in points), "the chart is flat although transfers were committed"

    screenshot = tmp_path / "status.png"
    load_in_chromium(url, screenshot=screenshot)
    assert _png_size(screenshot) == browser_window_size_default
    assert screenshot.stat().st_size > 20_000  # a blank page compresses to a few kilobytes


def test_a_paused_node_shows_as_unreachable_without_holding_up_the_cluster_view(network):
    paused = next(name for name, node in network.nodes.items() if node.role == "institution")
    asker = network.validators()[0]
    network.pause([paused])
    try:
        started = time.monotonic()
        code, body = network.admin_get(asker, "/cluster", timeout_seconds=http_timeout_seconds)
        elapsed = time.monotonic() - started
    finally:
        network.resume([paused])
    assert code == 200
    assert elapsed < peer_status_timeout_seconds + 2.0
    rows = {row["name"]: row for row in json.loads(body)["nodes"]}
    assert rows[paused]["reachable"] is False and "no answer within" in rows[paused]["error"]
    assert all(row["reachable"] for name, row in rows.items() if name != paused)


# Prometheus itself --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def _prometheus_query(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=http_timeout_seconds) as response:  # noqa: S310
        document = json.loads(response.read())
    assert document["status"] == "success", document
    return document["data"]


def test_prometheus_scrapes_every_node_with_the_generated_config_and_evaluates_every_alert(network, tmp_path):
    config = write_prometheus_config(network)
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + deadline_seconds
        targets: list = []
        rules: list = []
        while time.monotonic() < deadline:
            try:
                targets = _prometheus_query(port, "/api/v1/query?query=up")["result"]
                rules = [rule for group in _prometheus_query(port, "/api/v1/rules")["groups"] for rule in group["rules"]]
            except (OSError, urllib.error.URLError):
                targets, rules = [], []
            evaluated = rules and all(rule["health"] == "ok" and rule["lastEvaluation"][:4] != "0001" for rule in rules)
            if len(targets) == len(network.nodes) and evaluated:
                break
            time.sleep(0.5)
        scraped = {target["metric"]["node"]: (target["metric"]["node_role"], target["value"][1]) for target in targets}
        assert scraped == {name: (node.role, "1") for name, node in network.nodes.items()}
        assert {rule["name"] for rule in rules} == set(re.findall(r"- alert: (\w+)", (config.parent / "alerts.yml").read_text()))
        assert [rule["name"] for rule in rules if rule["health"] != "ok" or rule["state"] != "inactive"] == []
        leaders = _prometheus_query(port, "/api/v1/query?query=sum(tonle_raft_is_leader)")["result"]
        assert leaders[0]["value"][1] == "1"
        info = _prometheus_query(port, "/api/v1/query?query=tonle_build_info")["result"]
        assert {series["metric"]["node"] for series in info} == set(network.nodes)
        assert all(not name.startswith("exported_") for series in info for name in series["metric"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()


# Readiness through the loss of the leader and of the quorum -----------------------------------------------


@dataclass
class Probe:
    """One node's /livez and /readyz, polled every 50 ms from its own thread."""

    name: str
    address: str
    samples: list[tuple[float, int | None, int | None]] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            moment = time.monotonic()
            self.samples.append((moment, http_code(self.address, "/livez"), http_code(self.address, "/readyz")))
            stop.wait(max(0.0, poll_interval_seconds - (time.monotonic() - moment)))

    def failed_livez(self, since: float) -> list[tuple[float, int | None]]:
        return [(round(moment - since, 3), livez) for moment, livez, _ in self.samples if livez != 200]

    def longest_readyz_outage(self) -> float:
        """Longest time from a failing /readyz to the next passing one (or the last sample)."""
        longest, failing_since = 0.0, None
        for moment, _livez, readyz in self.samples:
            if readyz != 200 and failing_since is None:
                failing_since = moment
            elif readyz == 200 and failing_since is not None:
                longest, failing_since = max(longest, moment - failing_since), None
        if failing_since is not None:
            longest = max(longest, self.samples[-1][0] - failing_since)
        return longest

    def first_readyz_failure(self, since: float) -> float | None:
        return next((moment - since for moment, _, readyz in self.samples if moment >= since and readyz != 200), None)


@contextmanager
def probing(cluster: LocalCluster, names: list[str]) -> Iterator[list[Probe]]:
    probes = [Probe(name, cluster.nodes[name].admin_address) for name in names]
    stop = threading.Event()
    threads = [threading.Thread(target=probe.run, args=(stop,), daemon=True) for probe in probes]
    for thread in threads:
        thread.start()
    try:
        yield probes
    finally:
        stop.set()
        for thread in threads:
            thread.join(deadline_seconds)
    for probe in probes:
        # A quarter of the nominal rate at least, or the figures below would mean little.
        polled_enough = len(probe.samples) >= election_settle_seconds / (poll_interval_seconds * 4)
        assert polled_enough, f"{probe.name} was hardly polled"


def _new_leader(cluster: LocalCluster, validators: list[str], old: str) -> str | None:
    statuses = {name: cluster.status(name) for name in validators}
    leaders = {status["leader"] for status in statuses.values() if status is not None}
    if len(leaders) != 1 or None in statuses.values():
        return None
    leader = leaders.pop()
    if leader is None or leader == old or statuses[leader]["role"] != "leader":
        return None
    return leader


def test_killing_the_leader_fails_readyz_no_longer_than_the_election_and_never_livez(cluster):
    old_leader = cluster.wait_for_leader(timeout_seconds=deadline_seconds)
    cluster.wait_ready(timeout_seconds=deadline_seconds)
    survivors = [name for name in cluster.nodes if name != old_leader]
    surviving_validators = [name for name in cluster.validators() if name != old_leader]
    with probing(cluster, survivors) as probes:
        time.sleep(1.0)
        killed_at = time.monotonic()
        cluster.kill([old_leader])
        new_leader, elected_at = None, killed_at
        while new_leader is None and time.monotonic() < killed_at + deadline_seconds:
            new_leader = _new_leader(cluster, surviving_validators, old_leader)
            elected_at = time.monotonic()
            if new_leader is None:
                time.sleep(poll_interval_seconds)
        assert new_leader is not None, f"no new leader within {deadline_seconds} s"
        cluster.wait_ready(survivors, timeout_seconds=deadline_seconds)
        time.sleep(election_settle_seconds)

    election_seconds = elected_at - killed_at
    outages = {probe.name: probe.longest_readyz_outage() for probe in probes}
    print(
        f"\nleader {old_leader} killed; {new_leader} elected after {election_seconds:.3f} s; longest /readyz outage: "
        + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in outages.items())
        + f" (polled every {poll_interval_seconds} s, {min(len(probe.samples) for probe in probes)}+ samples per node)"
    )
    for probe in probes:
        assert probe.failed_livez(killed_at) == [], f"/livez of {probe.name} failed"
    for name, outage in outages.items():
        assert outage <= election_seconds + readiness_margin_seconds, (
            f"/readyz of {name} failed for {outage:.3f} s; the election took {election_seconds:.3f} s"
        )


def _lose_the_quorum(cluster: LocalCluster) -> tuple[str, list[str]]:
    """Kill the leader and one more validator of three; return the last validator and the surviving nodes."""
    leader = cluster.wait_for_leader(timeout_seconds=deadline_seconds)
    cluster.wait_ready(timeout_seconds=deadline_seconds)
    last_validator = next(name for name in reversed(cluster.validators()) if name != leader)
    doomed = [name for name in cluster.validators() if name != last_validator]
    return last_validator, [name for name in cluster.nodes if name not in doomed]


def test_without_a_quorum_validators_turn_unready_and_livez_stays_up(cluster):
    last_validator, survivors = _lose_the_quorum(cluster)
    with probing(cluster, survivors) as probes:
        time.sleep(1.0)
        killed_at = time.monotonic()
        cluster.kill([name for name in cluster.validators() if name != last_validator])
        time.sleep(unready_deadline_seconds + election_settle_seconds)
        code, body = cluster.admin_get(last_validator, "/readyz?verbose")
    (validator_probe,) = [probe for probe in probes if probe.name == last_validator]
    unready_after = validator_probe.first_readyz_failure(killed_at)
    print(f"\nquorum lost: {last_validator} answered /readyz 503 after {unready_after and round(unready_after, 3)} s")
    for probe in probes:
        assert probe.failed_livez(killed_at) == [], f"/livez of {probe.name} failed without a quorum"
    assert unready_after is not None and unready_after <= unready_deadline_seconds
    assert code == 503 and "[-]leader failed: no leader known" in body
    assert cluster.admin_get(last_validator, "/livez") == (200, "ok\n")


def test_without_a_quorum_institution_nodes_turn_unready_too(cluster):
    last_validator, survivors = _lose_the_quorum(cluster)
    institutions = [name for name in survivors if name != last_validator]
    with probing(cluster, institutions) as probes:
        time.sleep(1.0)
        killed_at = time.monotonic()
        cluster.kill([name for name in cluster.validators() if name != last_validator])
        time.sleep(unready_deadline_seconds + election_settle_seconds)
    for probe in probes:
        assert probe.failed_livez(killed_at) == [], f"/livez of {probe.name} failed without a quorum"
        unready_after = probe.first_readyz_failure(killed_at)
        assert unready_after is not None and unready_after <= unready_deadline_seconds, probe.name
        contact = value(scrape(cluster, probe.name), "tonle_raft_leader_last_contact_timestamp_seconds")
        assert time.time() - contact >= unready_deadline_seconds, probe.name
