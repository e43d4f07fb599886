"""The state hashes a replica keeps to compare with the checkpoints batches carry: bounded, newest kept."""

from __future__ import annotations

import pytest

from node.server import StateHashHistory, proposals_in_flight_max, state_hash_history_entries_max


def test_the_newest_entries_are_kept_and_the_oldest_forgotten_past_the_bound() -> None:
    history = StateHashHistory(entries_max=3)
    for index in range(1, 6):
        history.record(index, bytes([index]) * 32)
    assert len(history) == 3
    assert history.get(1) is None and history.get(2) is None
    assert [history.get(index) for index in (3, 4, 5)] == [bytes([index]) * 32 for index in (3, 4, 5)]


def test_a_checkpoint_as_old_as_the_proposals_a_leader_keeps_in_flight_is_still_compared() -> None:
    history = StateHashHistory(entries_max=state_hash_history_entries_max)
    newest = 10 * state_hash_history_entries_max
    for index in range(1, newest + 1):
        history.record(index, index.to_bytes(32, "big"))
    assert len(history) == state_hash_history_entries_max
    # A batch names the leader's last applied index, at most the proposals in flight behind it, with room
    # for an election's no-op entries.
    oldest_named = newest - 4 * proposals_in_flight_max
    assert history.get(oldest_named) == oldest_named.to_bytes(32, "big")


def test_a_history_that_could_hold_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="entries_max must be positive"):
        StateHashHistory(entries_max=0)
