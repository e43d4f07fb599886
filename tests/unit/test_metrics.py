"""The node's own collectors: CPU and major page faults by thread job, read from /proc on each scrape."""

from __future__ import annotations

import mmap
import os
import threading
import time

import pytest

from node.metrics import NodeMetrics, ThreadCpuCollector, thread_role

deadline_seconds = 30.0
busy_cpu_seconds = 0.3


def cpu_of(collector: ThreadCpuCollector, role: str) -> float:
    (family,) = [family for family in collector.collect() if family.name == "tonle_thread_cpu_seconds"]
    return sum(sample.value for sample in family.samples if sample.labels["thread"] == role)


def test_threads_are_grouped_by_the_job_their_names_give():
    assert thread_role("MainThread") == "event_loop"
    assert thread_role("tonle-apply-v1") == "apply"
    assert thread_role("Thread-1 (_autoTickThread)") == "raft"
    assert thread_role("verify_0") == "verify"
    assert thread_role("read-ahead_0") == "read_ahead"
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


def test_a_thread_no_scrape_saw_alive_is_counted_under_other_and_the_jobs_add_up_to_the_process():
    collector = ThreadCpuCollector()
    before = cpu_of(collector, "other")
    used: list[float] = []

    def burn() -> None:
        while time.thread_time() < busy_cpu_seconds:
            pass
        used.append(time.thread_time())

    thread = threading.Thread(target=burn, name="verify_8")
    thread.start()
    thread.join(deadline_seconds)
    assert not thread.is_alive() and used, "the busy thread did not burn its CPU in time"
    after = cpu_of(collector, "other")
    assert after - before >= used[0] - 0.03
    assert cpu_of(collector, "other") >= after, "the counter went down"
    (family,) = [family for family in collector.collect() if family.name == "tonle_thread_cpu_seconds"]
    jobs = sum(sample.value for sample in family.samples)
    process = sum(os.times()[:2])
    assert abs(process - jobs) < 0.1, f"jobs add up to {jobs} s, the process used {process} s"


def test_a_thread_that_reads_an_uncached_page_from_disk_counts_a_major_fault_under_its_job(tmp_path):
    collector = ThreadCpuCollector()

    def faults_of(role: str) -> float:
        (family,) = [family for family in collector.collect() if family.name == "tonle_thread_major_page_faults"]
        return sum(sample.value for sample in family.samples if sample.labels["thread"] == role)

    path = tmp_path / "pages"
    page_bytes = mmap.PAGESIZE
    path.write_bytes(os.urandom(64 * page_bytes))
    with open(path, "rb") as file:
        os.fsync(file.fileno())
        # Dropped from the page cache, so touching it through a mapping reads it from disk.
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        before = faults_of("index")
        touched = threading.Event()
        release = threading.Event()

        def touch() -> None:
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
                sum(mapping[offset] for offset in range(0, len(mapping), page_bytes))
            touched.set()
            release.wait(deadline_seconds)

        thread = threading.Thread(target=touch, name="entry-hash-indexer")
        thread.start()
        assert touched.wait(deadline_seconds), "the reading thread did not finish in time"
        while_alive = faults_of("index")  # a thread is counted by a scrape that sees it alive
        release.set()
        thread.join(deadline_seconds)
    assert faults_of("index") >= while_alive, "a thread's faults left the counter when the thread exited"
    if while_alive == before:
        pytest.skip("the kernel kept the file cached (tmpfs or a page cache that ignores DONTNEED): no read from disk to count")
    assert while_alive >= before + 1


def test_every_job_and_mode_is_exported_from_the_start():
    metrics = NodeMetrics("v1", "validator")
    (family,) = [family for family in metrics.registry.collect() if family.name == "tonle_thread_cpu_seconds"]
    labels = {(sample.labels["thread"], sample.labels["mode"]) for sample in family.samples}
    assert labels == {(role, mode) for role in ("event_loop", "raft", "apply", "verify", "read_ahead", "snapshot", "receipts", "index", "other")
                      for mode in ("user", "system")}
    assert all(sample.name == "tonle_thread_cpu_seconds_total" for sample in family.samples)
    (faults,) = [family for family in metrics.registry.collect() if family.name == "tonle_thread_major_page_faults"]
    assert {sample.labels["thread"] for sample in faults.samples} == {"event_loop", "raft", "apply", "verify", "read_ahead", "snapshot", "receipts", "index", "other"}
    assert all(sample.name == "tonle_thread_major_page_faults_total" for sample in faults.samples)
