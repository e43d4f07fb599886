"""The leader's group-commit rule: when a batch that is not full may be proposed."""

from __future__ import annotations

from node.server import partial_batch_may_go, partial_batches_in_flight_max

now_microseconds = 1_000_000


def test_a_partial_batch_goes_at_once_when_nothing_is_in_flight():
    assert partial_batch_may_go(0, now_microseconds + 10_000, now_microseconds)
    assert partial_batch_may_go(0, None, now_microseconds)


def test_a_partial_batch_waits_for_its_gathering_delay_below_the_limit():
    assert not partial_batch_may_go(1, now_microseconds + 1, now_microseconds)
    assert partial_batch_may_go(1, now_microseconds, now_microseconds)
    assert partial_batch_may_go(partial_batches_in_flight_max - 1, now_microseconds - 1, now_microseconds)


def test_a_partial_batch_waits_at_and_beyond_the_limit_even_when_due():
    for in_flight in (partial_batches_in_flight_max, partial_batches_in_flight_max + 1, 32):
        assert not partial_batch_may_go(in_flight, now_microseconds - 1, now_microseconds)
        assert not partial_batch_may_go(in_flight, None, now_microseconds)
