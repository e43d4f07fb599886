"""The status page at / of the admin listener: the network at a glance, drawn from /cluster, no external assets."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The page asks /cluster this often; each ask costs the serving node one /status request per peer.
page_refresh_seconds = 2.0
# Headless Chromium gets this long to start, render and exit; a cold start on a loaded 2-core CI machine is slow.
browser_timeout_seconds = 120.0
# Virtual time the browser lets the page run before it dumps the DOM or takes the screenshot: long enough
# for several refreshes, so what it captures was drawn from live /cluster answers.
browser_virtual_time_milliseconds = 8000
browser_window_size_default = (1280, 860)
# Headless and sandbox-less (CI runs as root), and quiet: no update, sync or background requests leave the
# machine, so the only traffic is the page under test.
_chromium_flags = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


@dataclass(frozen=True, slots=True)
class HistorySample:
    """What the node had applied at one moment; consecutive samples give the commit rate."""

    unix_seconds: float  # for the chart's time axis
    monotonic_seconds: float  # for rates, immune to wall-clock steps
    applied_index: int
    entries_applied: int


class CommitHistory:
    """A bounded ring of samples: the oldest is dropped once `samples_max` are held."""

    def __init__(self, samples_max: int) -> None:
        if samples_max < 2:
            raise ValueError(f"a commit rate needs at least 2 samples, samples_max is {samples_max}")
        self._samples: deque[HistorySample] = deque(maxlen=samples_max)

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample: HistorySample) -> None:
        self._samples.append(sample)

    def rates(self) -> list[dict[str, float]]:
        """Per interval: its end time, Raft batches applied per second and entries applied per second."""
        points = []
        samples = list(self._samples)
        for earlier, later in zip(samples, samples[1:]):
            # Samples are taken history_sample_interval_seconds apart on the monotonic clock: elapsed > 0.
            elapsed = later.monotonic_seconds - earlier.monotonic_seconds
            # Both figures only grow within one process, and the history lives and dies with the process.
            batches = later.applied_index - earlier.applied_index
            entries = later.entries_applied - earlier.entries_applied
            points.append(
                {
                    "time": round(later.unix_seconds, 3),
                    "batches_per_second": round(batches / elapsed, 3),
                    "entries_per_second": round(entries / elapsed, 3),
                }
            )
        return points


@dataclass(frozen=True, slots=True)
class NodeReport:
    """One node as the serving node saw it: its /status, or why there is none."""

    name: str
    node_role: str
    status: dict[str, Any] | None
    error: str | None


def summarize_cluster(
    self_name: str,
    cluster_id: str,
    reports: list[NodeReport],
    history: list[dict[str, float]],
    history_window_seconds: float,
    now_unix_seconds: float,
) -> dict[str, Any]:
    """The /cluster document: every node with its lag behind the highest commit index anyone reported."""
    reachable = [report.status for report in reports if report.status is not None]
    commit_index_max = max((status["commit_index"] for status in reachable), default=0)
    leaders = [status for status in reachable if status["role"] == "leader"]
    leader = max(leaders, key=lambda status: status["term"])["name"] if leaders else None
    nodes = []
    for report in reports:
        status = report.status
        row: dict[str, Any] = {"name": report.name, "node_role": report.node_role, "reachable": status is not None}
        if status is None:
            row["error"] = report.error
        else:
            row.update(
                role=status["role"],
                term=status["term"],
                leader=status["leader"],
                commit_index=status["commit_index"],
                applied_index=status["applied_index"],
                lag=max(0, commit_index_max - status["applied_index"]),
                ready=status["ready"],
                diverged=status["diverged"],
                connected_peers=len(status["connected_peers"]),
            )
        nodes.append(row)
    return {
        "served_by": self_name,
        "cluster_id": cluster_id,
        "time": round(now_unix_seconds, 3),
        "leader": leader,
        "commit_index": commit_index_max,
        "nodes": nodes,
        "history": history,
        "history_window_seconds": history_window_seconds,
        "refresh_seconds": page_refresh_seconds,
    }


_style = """
:root { color-scheme: light; --ink: #1c2430; --muted: #5b6675; --line: #d9dee5; --ok: #1f7a3f; --bad: #b3261e;
        --accent: #0b6e99; --panel: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--ink); background: #fff; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 15px; margin: 24px 0 8px; }
.muted { color: var(--muted); }
#banner { margin: 12px 0; padding: 8px 12px; border-radius: 6px; background: #fdecea; color: var(--bad); }
#banner:empty { display: none; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin-top: 16px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
        min-width: 150px; }
.card .label { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
td.number { text-align: right; }
tr.leader td:first-child { font-weight: 600; }
.yes { color: var(--ok); font-weight: 600; }
.no { color: var(--bad); font-weight: 600; }
.role-leader { color: var(--accent); font-weight: 600; }
.role-candidate { color: var(--bad); }
#commit-rate { width: 100%; max-width: 960px; height: 200px; background: var(--panel);
               border: 1px solid var(--line); border-radius: 8px; }
#commit-rate .area { fill: rgba(11, 110, 153, .18); stroke: none; }
#commit-rate .entries { fill: none; stroke: var(--accent); stroke-width: 2; }
#commit-rate .batches { fill: none; stroke: #8a5a00; stroke-width: 1.5; stroke-dasharray: 4 3; }
#commit-rate .grid { stroke: var(--line); stroke-width: 1; }
#commit-rate text { fill: var(--muted); font-size: 11px; }
.legend-entries { color: var(--accent); }
.legend-batches { color: #8a5a00; }
"""

_script = """
"use strict";
const columns = ["name", "node_role", "role", "leader", "term", "commit_index", "applied_index", "lag", "ready"];
const numeric = new Set(["term", "commit_index", "applied_index", "lag"]);
const svgNamespace = "http://www.w3.org/2000/svg";
let refreshMilliseconds = 2000;

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function cellFor(node, column) {
  const cell = document.createElement("td");
  if (!node.reachable && column !== "name" && column !== "node_role") {
    if (column === "role") {
      cell.textContent = "unreachable";
      cell.className = "no";
      cell.title = node.error || "";
    }
    return cell;
  }
  const value = node[column];
  if (column === "ready") {
    cell.textContent = value ? "yes" : "no";
    cell.className = value ? "yes" : "no";
  } else if (column === "role") {
    cell.textContent = value;
    cell.className = "role-" + value;
  } else {
    cell.textContent = value === null || value === undefined ? "\\u2014" : String(value);
    if (numeric.has(column)) cell.className = "number";
  }
  return cell;
}

function renderNodes(view) {
  const rows = view.nodes.map((node) => {
    const row = document.createElement("tr");
    row.dataset.node = node.name;
    if (node.reachable && node.role === "leader") row.className = "leader";
    for (const column of columns) row.appendChild(cellFor(node, column));
    return row;
  });
  document.getElementById("node-rows").replaceChildren(...rows);
}

function svgElement(name, attributes, content) {
  const element = document.createElementNS(svgNamespace, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (content !== undefined) element.textContent = content;
  return element;
}

function niceCeiling(value) {
  if (value <= 1) return 1;
  const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 5, 10]) if (value <= step * magnitude) return step * magnitude;
  return 10 * magnitude;
}

function renderChart(history, windowSeconds, now) {
  const svg = document.getElementById("commit-rate");
  const width = 960, height = 200, left = 56, right = 12, top = 12, bottom = 24;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const children = [];
  const latest = history.length ? history[history.length - 1] : null;
  const end = latest ? latest.time : now;
  // A young node's history fills a shorter window (at least a minute) so a short burst stays readable.
  const span = history.length ? Math.min(windowSeconds, Math.max(60, end - history[0].time)) : windowSeconds;
  const earliest = history.length ? Math.max(end - span, history[0].time) : end;
  const ceiling = niceCeiling(Math.max(1, ...history.map((point) => point.entries_per_second)));
  const x = (time) => left + ((time - (end - span)) / span) * plotWidth;
  const y = (rate) => top + plotHeight - (rate / ceiling) * plotHeight;
  for (const fraction of [0, 0.5, 1]) {
    const level = top + plotHeight - fraction * plotHeight;
    children.push(svgElement("line", {class: "grid", x1: left, x2: width - right, y1: level, y2: level}));
    children.push(svgElement("text", {x: left - 6, y: level + 4, "text-anchor": "end"}, String(ceiling * fraction)));
  }
  if (history.length) {
    const entries = history.map((point) => x(point.time).toFixed(1) + "," + y(point.entries_per_second).toFixed(1));
    const batches = history.map((point) => x(point.time).toFixed(1) + "," + y(point.batches_per_second).toFixed(1));
    const base = (top + plotHeight).toFixed(1);
    const area = "M" + x(earliest).toFixed(1) + "," + base + " L" + entries.join(" L")
      + " L" + x(latest.time).toFixed(1) + "," + base + " Z";
    children.push(svgElement("path", {class: "area", d: area}));
    children.push(svgElement("polyline",
      {id: "commit-rate-entries", class: "entries", points: entries.join(" "), "data-points": history.length}));
    children.push(svgElement("polyline", {id: "commit-rate-batches", class: "batches", points: batches.join(" ")}));
  } else {
    children.push(svgElement("text", {x: left + 8, y: top + 20}, "collecting samples\\u2026"));
  }
  const ago = span >= 120 ? (span / 60).toFixed(0) + " min ago" : span.toFixed(0) + " s ago";
  children.push(svgElement("text", {x: left, y: height - 6}, ago));
  children.push(svgElement("text", {x: width - right, y: height - 6, "text-anchor": "end"}, "now"));
  svg.replaceChildren(...children);
  text("rate-now", latest ? latest.entries_per_second.toFixed(0) : "\\u2014");
  text("rate-batches", latest ? latest.batches_per_second.toFixed(1) : "\\u2014");
}

function render(view) {
  document.title = "Tonle \\u00b7 " + view.cluster_id;
  text("cluster-id", view.cluster_id);
  text("served-by", view.served_by);
  text("refreshed", new Date(view.time * 1000).toLocaleTimeString());
  const leaderNode = view.nodes.find((node) => node.name === view.leader);
  text("leader", view.leader || "none");
  text("term", leaderNode ? String(leaderNode.term) : "\\u2014");
  text("commit-index", String(view.commit_index));
  const ready = view.nodes.filter((node) => node.reachable && node.ready).length;
  text("ready-count", ready + " / " + view.nodes.length);
  renderNodes(view);
  renderChart(view.history, view.history_window_seconds, view.time);
  refreshMilliseconds = Math.max(500, view.refresh_seconds * 1000);
}

async function refresh() {
  try {
    const response = await fetch("/cluster", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    text("banner", "");
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || "0") + 1);
  } catch (error) {
    text("banner", "cannot refresh from " + location.host + ": " + error.message);
  } finally {
    setTimeout(refresh, refreshMilliseconds);
  }
}

refresh();
"""

_body = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>Tonle status</title>
<style>{style}</style>
</head>
<body data-refreshes="0">
<header>
  <h1>Tonle network <span id="cluster-id">&hellip;</span></h1>
  <span class="muted">served by <span id="served-by">&hellip;</span> &middot; refreshed <span id="refreshed">never</span></span>
</header>
<noscript><p id="banner-static">This page draws itself with JavaScript; /cluster has the same data as JSON.</p></noscript>
<div id="banner"></div>
<section class="cards">
  <div class="card"><div class="label">Leader</div><div class="value" id="leader">&hellip;</div></div>
  <div class="card"><div class="label">Term</div><div class="value" id="term">&hellip;</div></div>
  <div class="card"><div class="label">Commit index</div><div class="value" id="commit-index">&hellip;</div></div>
  <div class="card"><div class="label">Nodes ready</div><div class="value" id="ready-count">&hellip;</div></div>
  <div class="card"><div class="label">Entries / s</div><div class="value" id="rate-now">&hellip;</div></div>
  <div class="card"><div class="label">Batches / s</div><div class="value" id="rate-batches">&hellip;</div></div>
</section>
<h2>Nodes</h2>
<table id="nodes">
<thead><tr><th>Node</th><th>Kind</th><th>Raft role</th><th>Leader</th><th>Term</th><th>Commit</th><th>Applied</th>
<th>Lag</th><th>Ready</th></tr></thead>
<tbody id="node-rows"></tbody>
</table>
<h2>Commit rate <span class="muted">(<span class="legend-entries">entries applied / s</span>,
<span class="legend-batches">Raft batches / s</span>, as applied by the serving node)</span></h2>
<svg id="commit-rate" viewBox="0 0 960 200" preserveAspectRatio="none" role="img" aria-label="commit rate"></svg>
<script>{script}</script>
</body>
</html>
"""


def _source_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


page_html = _body.format(style=_style, script=_script).encode()
# Only the page's own inline style and script (by hash) may run, and it may only talk to its own origin:
# the browser itself enforces "no external assets".
content_security_policy = (
    "default-src 'none'; "
    f"script-src {_source_hash(_script)}; "
    f"style-src {_source_hash(_style)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def chromium_arguments(
    url: str,
    user_data_dir: Path,
    *,
    screenshot: Path | None = None,
    window_size: tuple[int, int] = browser_window_size_default,
) -> list[str]:
    """A headless Chromium that loads `url`, lets it run, then saves a screenshot or prints the DOM."""
    arguments = [
        "chromium",
        *_chromium_flags,
        f"--user-data-dir={user_data_dir}",
        f"--window-size={window_size[0]},{window_size[1]}",
        f"--virtual-time-budget={browser_virtual_time_milliseconds}",
    ]
    arguments.append(f"--screenshot={screenshot}" if screenshot is not None else "--dump-dom")
    arguments.append(url)
    return arguments


class BrowserError(RuntimeError):
    """Headless Chromium could not load the page; the message says why (exit code and its stderr)."""


def load_in_chromium(
    url: str, *, screenshot: Path | None = None, window_size: tuple[int, int] = browser_window_size_default
) -> str:
    """Load the page in headless Chromium; return the rendered DOM (or Chromium's output, for a screenshot)."""
    with tempfile.TemporaryDirectory(prefix="tonle-chromium-") as profile:
        arguments = chromium_arguments(url, Path(profile), screenshot=screenshot, window_size=window_size)
        try:
            # Its own session, so a hung browser can be killed with every renderer it started.
            process = subprocess.Popen(
                arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
        except FileNotFoundError:
            raise BrowserError("chromium is not on PATH: install Debian's `chromium` package (.ci/run does)") from None
        try:
            stdout, stderr = process.communicate(timeout=browser_timeout_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise BrowserError(f"chromium did not finish within {browser_timeout_seconds} s") from None
    if process.returncode != 0:
        raise BrowserError(f"chromium exited with {process.returncode}: {stderr[-2000:]}")
    if screenshot is not None and not screenshot.is_file():
        raise BrowserError(f"chromium wrote no screenshot to {screenshot}: {stderr[-2000:]}")
    return stdout
