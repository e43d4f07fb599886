"""The leader's group-commit rule: when a batch that is not full may be proposed."""

from __future__ import annotations

import pytest

from config import schema
from node.server import partial_batch_may_go, proposals_in_flight_max

now_microseconds = 1_000_000


@pytest.mark.parametrize("limit", [1, 3, schema.partial_batches_in_flight_max_max])
def test_a_partial_batch_goes_at_once_when_nothing_is_in_flight(limit: int):
    assert partial_batch_may_go(0, now_microseconds + 10_000, now_microseconds, limit)
    assert partial_batch_may_go(0, None, now_microseconds, limit)


def test_a_partial_batch_waits_for_its_gathering_delay_below_the_limit():
    assert not partial_batch_may_go(1, now_microseconds + 1, now_microseconds, 3)
    assert partial_batch_may_go(1, now_microseconds, now_microseconds, 3)
    assert partial_batch_may_go(2, now_microseconds - 1, now_microseconds, 3)


@pytest.mark.parametrize("limit", [1, 3, schema.partial_batches_in_flight_max_max])
def test_a_partial_batch_waits_at_and_beyond_the_limit_even_when_due(limit: int):
    for in_flight in (limit, limit + 1, proposals_in_flight_max):
        assert not partial_batch_may_go(in_flight, now_microseconds - 1, now_microseconds, limit)
        assert not partial_batch_may_go(in_flight, None, now_microseconds, limit)


def test_the_setting_allows_no_more_partial_batches_than_the_node_keeps_in_flight():
    assert schema.partial_batches_in_flight_max_max == proposals_in_flight_max
    assert schema.partial_batches_in_flight_max_min <= schema.partial_batches_in_flight_max_default <= proposals_in_flight_max
