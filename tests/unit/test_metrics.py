"""The node's own collectors: CPU by thread job, read from /proc on each scrape."""

from __future__ import annotations

import threading
import time

from node.metrics import NodeMetrics, ThreadCpuCollector, thread_role

deadline_seconds = 30.0
busy_cpu_seconds = 0.3


def cpu_of(collector: ThreadCpuCollector, role: str) -> float:
    (family,) = list(collector.collect())
    return sum(sample.value for sample in family.samples if sample.labels["thread"] == role)


def test_threads_are_grouped_by_the_job_their_names_give():
    assert thread_role("MainThread") == "event_loop"
    assert thread_role("tonle-apply-v1") == "apply"
    assert thread_role("Thread-1 (_autoTickThread)") == "raft"
    assert thread_role("verify_0") == "verify"
    assert thread_role("tonle-snapshot") == "snapshot"
    assert thread_role("heads_0") == "receipts"
    assert thread_role("entry-hash-indexer") == "index"
    assert thread_role("asyncio_0") == "other"


def test_a_busy_thread_is_counted_under_its_job_and_stays_counted_after_it_exits():
    collector = ThreadCpuCollector()
    before = cpu_of(collector, "verify")
    burned = threading.Event()
    release = threading.Event()
    used: list[float] = []

    def burn() -> None:
        while time.thread_time() < busy_cpu_seconds:
            pass
        used.append(time.thread_time())
        burned.set()
        release.wait(deadline_seconds)

    thread = threading.Thread(target=burn, name="verify_9")
    thread.start()
    assert burned.wait(deadline_seconds), "the busy thread did not burn its CPU in time"
    while_alive = cpu_of(collector, "verify")
    release.set()
    thread.join(deadline_seconds)
    after_exit = cpu_of(collector, "verify")
    # /proc counts in clock ticks (10 ms): allow two of them below the thread's own clock.
    assert while_alive - before >= used[0] - 0.02
    assert after_exit >= while_alive, "a thread's CPU left the counter when the thread exited"


def test_every_job_and_mode_is_exported_from_the_start():
    metrics = NodeMetrics("v1", "validator")
    (family,) = [family for family in metrics.registry.collect() if family.name == "tonle_thread_cpu_seconds"]
    labels = {(sample.labels["thread"], sample.labels["mode"]) for sample in family.samples}
    assert labels == {(role, mode) for role in ("event_loop", "raft", "apply", "verify", "snapshot", "receipts", "index", "other")
                      for mode in ("user", "system")}
    assert all(sample.name == "tonle_thread_cpu_seconds_total" for sample in family.samples)
