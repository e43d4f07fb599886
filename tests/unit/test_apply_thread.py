"""The apply thread: order, the bound on its queue, draining, and what happens when an apply fails."""

from __future__ import annotations

import threading
import time

import pytest

from consensus.raft.apply_thread import (
    ApplyStopped,
    ApplyThread,
    Grouping,
    apply_queue_entries_max,
    follower_grouping,
    group_command_bytes_max,
    leader_grouping,
)
from config.schema import batch_bytes_max_default
from consensus.batch import batch_bytes_max
from tests.waiting import wait_until

wait_seconds = 10.0


def _wait(condition, what: str) -> None:
    wait_until(condition, wait_seconds, what)


class _HeldApply:
    """An apply that records what it is given and waits while `hold` is clear."""

    def __init__(self) -> None:
        self.applied: list[tuple[int, bytes]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

        self.groups: list[int] = []  # entries per call

    def __call__(self, group: list[tuple[int, bytes]]) -> None:
        self.started.set()
        if not self.release.wait(wait_seconds):
            raise AssertionError("the test never released the apply")
        self.applied.extend(group)
        self.groups.append(len(group))


def _held_thread(
    entries: int, queue_entries_max: int = 8, grouping: Grouping = follower_grouping, command: bytes = b"x"
) -> tuple[ApplyThread, _HeldApply]:
    """An apply thread holding entry 1 in its apply (alone), with entries 2..`entries` (each `command`) queued
    behind it."""
    apply = _HeldApply()
    apply.release.clear()
    thread = ApplyThread(apply, queue_entries_max=queue_entries_max, grouping=grouping)
    thread.hand(1, b"x")
    assert apply.started.wait(wait_seconds)
    for index in range(2, entries + 1):
        thread.hand(index, command)
    return thread, apply


def test_entries_apply_once_each_in_the_order_they_were_handed_over():
    apply = _HeldApply()
    thread = ApplyThread(apply, queue_entries_max=4)
    for index in range(1, 101):
        thread.hand(index, index.to_bytes(2, "big"))
    thread.drain()
    assert apply.applied == [(index, index.to_bytes(2, "big")) for index in range(1, 101)]
    assert thread.last_applied_index == 100
    assert thread.stop(wait_seconds)


def test_handing_over_more_than_the_queue_holds_waits_for_the_apply():
    apply = _HeldApply()
    apply.release.clear()
    limit = 3
    thread = ApplyThread(apply, queue_entries_max=limit)
    thread.hand(1, b"first")  # taken by the thread, which now waits inside the apply
    assert apply.started.wait(wait_seconds)
    for index in range(2, 2 + limit):
        thread.hand(index, b"queued")  # fills the queue
    handed_over = threading.Event()

    def hand_one_more() -> None:
        thread.hand(2 + limit, b"over the limit")
        handed_over.set()

    producer = threading.Thread(target=hand_one_more)
    producer.start()
    assert not handed_over.wait(0.3), "a full queue took one more entry"
    apply.release.set()
    assert handed_over.wait(wait_seconds)
    producer.join(wait_seconds)
    thread.drain()
    assert [index for index, _ in apply.applied] == list(range(1, 3 + limit))
    assert thread.stop(wait_seconds)


def test_the_default_queue_bound_is_the_readiness_checks_apply_lag():
    from node.server import apply_lag_entries_max

    assert apply_queue_entries_max <= apply_lag_entries_max


def test_drain_returns_only_when_everything_handed_over_is_applied():
    thread, apply = _held_thread(5)
    drained = threading.Event()
    drainer = threading.Thread(target=lambda: (thread.drain(), drained.set()))
    drainer.start()
    assert not drained.wait(0.3), "drain returned while entries were unapplied"
    apply.release.set()
    assert drained.wait(wait_seconds)
    assert len(apply.applied) == 5
    drainer.join(wait_seconds)
    assert thread.stop(wait_seconds)


def test_a_failed_apply_makes_handing_over_and_draining_raise_instead_of_waiting_forever():
    def failing_apply(group: list[tuple[int, bytes]]) -> None:
        if any(index == 2 for index, _ in group):
            raise RuntimeError("disk gone")

    thread = ApplyThread(failing_apply, queue_entries_max=2, grouping=Grouping(1, 1))
    thread.hand(1, b"ok")
    thread.hand(2, b"fails")
    with pytest.raises(ApplyStopped, match="disk gone"):
        thread.drain()
    with pytest.raises(ApplyStopped):
        for index in range(3, 10):  # more than the queue holds: must raise, not block
            thread.hand(index, b"after the failure")
    assert thread.last_applied_index == 1


def test_stop_applies_what_is_queued_then_ends_the_thread():
    thread, apply = _held_thread(4)
    threading.Timer(0.1, apply.release.set).start()
    assert thread.stop(wait_seconds)
    assert [index for index, _ in apply.applied] == [1, 2, 3, 4]
    with pytest.raises(ApplyStopped):
        thread.hand(5, b"after stop")


def test_a_function_waiting_for_an_index_runs_once_that_index_is_applied_and_not_before():
    thread, apply = _held_thread(3)
    calls: list[str] = []
    thread.after_applied(2, lambda: calls.append(f"after 2, index 2 applied: {2 in [i for i, _ in apply.applied]}"))
    time.sleep(0.2)
    assert calls == []
    apply.release.set()
    thread.drain()
    _wait(lambda: calls, "the function to run")
    assert calls == ["after 2, index 2 applied: True"]
    thread.after_applied(1, lambda: calls.append("already applied"))  # runs at once, on this thread
    assert calls[-1] == "already applied"
    assert thread.stop(wait_seconds)


def test_entries_waiting_behind_a_slow_apply_are_taken_together_up_to_the_group_bound():
    thread, apply = _held_thread(8, queue_entries_max=16, grouping=Grouping(entries_max=3, backlog_entries_min=1))
    apply.release.set()
    thread.drain()
    assert [index for index, _ in apply.applied] == list(range(1, 9))
    assert apply.groups == [1, 3, 3, 1]
    assert thread.last_applied_index == 8
    assert thread.stop(wait_seconds)


def test_an_entry_handed_over_to_an_idle_thread_is_applied_alone():
    apply = _HeldApply()
    thread = ApplyThread(apply)
    for index in range(1, 4):
        thread.hand(index, b"x")
        thread.drain()
    assert apply.groups == [1, 1, 1]
    assert follower_grouping.entries_max > 1
    assert thread.stop(wait_seconds)


def test_a_grouping_below_one_entry_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        Grouping(entries_max=0, backlog_entries_min=1)
    with pytest.raises(ValueError, match="at least 1"):
        Grouping(entries_max=8, backlog_entries_min=0)
    with pytest.raises(ValueError, match="command_bytes_max cannot be negative"):
        Grouping(entries_max=8, backlog_entries_min=1, command_bytes_max=-1)


@pytest.mark.parametrize(
    ("command_bytes_max", "groups"),
    [
        # 2..4 reach 300 bytes, over 250 after the third: the group ends there, whatever entries_max allows.
        (250, [1, 3, 3, 1]),
        # An entry larger than the bound is still applied, alone.
        (50, [1, 1, 1, 1, 1, 1, 1, 1]),
    ],
)
def test_a_group_ends_with_the_entry_that_takes_it_to_its_byte_bound(command_bytes_max: int, groups: list[int]):
    grouping = Grouping(entries_max=8, backlog_entries_min=1, command_bytes_max=command_bytes_max)
    thread, apply = _held_thread(8, queue_entries_max=16, grouping=grouping, command=bytes(100))
    apply.release.set()
    thread.drain()
    assert apply.groups == groups
    assert [index for index, _ in apply.applied] == list(range(1, 9))
    assert thread.stop(wait_seconds)


def test_full_batches_are_applied_two_to_a_transaction_on_leader_and_follower():
    """LMDB keeps the heap pages of the largest transaction a node ever wrote: groups of up to 8 full batches
    kept 16 MiB of it at 1 million accounts. Full batches of the default and of the largest size group by two."""
    for batch_bytes in (batch_bytes_max_default, batch_bytes_max):
        # The leader groups only while 3 wait behind: 6 and 7 find fewer and go alone.
        for grouping, groups in ((follower_grouping, [1, 2, 2, 2]), (leader_grouping, [1, 2, 2, 1, 1])):
            thread, apply = _held_thread(7, queue_entries_max=16, grouping=grouping, command=bytes(batch_bytes))
            apply.release.set()
            thread.drain()
            assert apply.groups == groups, (batch_bytes, grouping)
            assert thread.stop(wait_seconds)
    assert 2 * batch_bytes_max_default >= group_command_bytes_max > batch_bytes_max


def test_with_a_backlog_minimum_entries_are_grouped_only_once_that_many_wait():
    thread, apply = _held_thread(6, queue_entries_max=16, grouping=Grouping(entries_max=8, backlog_entries_min=3))
    apply.release.set()
    thread.drain()
    # Entry 2 finds 4 waiting: a group of 2..6. Then nothing waits.
    assert apply.groups == [1, 5]
    apply.release.clear()
    apply.started.clear()
    thread.hand(7, b"held")
    assert apply.started.wait(wait_seconds)
    for index in (8, 9, 10):
        thread.hand(index, b"two wait behind the next")
    apply.release.set()
    thread.drain()
    # Entry 8 finds 2 waiting, fewer than 3: alone; then entries 9 and 10 alone too.
    assert apply.groups == [1, 5, 1, 1, 1, 1]
    assert thread.stop(wait_seconds)


def test_the_leader_groups_fewer_entries_than_a_follower_and_only_once_it_has_fallen_behind():
    assert leader_grouping.entries_max < follower_grouping.entries_max
    assert leader_grouping.backlog_entries_min > follower_grouping.backlog_entries_min == 1
    thread, apply = _held_thread(8, queue_entries_max=16)
    thread.grouping = leader_grouping  # the node became leader while its apply was behind
    apply.release.set()
    thread.drain()
    assert apply.groups == [1, 3, 3, 1]  # 2..4 and 5..7 grouped; 8 finds nothing waiting
    assert thread.stop(wait_seconds)
