"""Raft's receiver rule applied before pysyncobj sees an append: keep held entries, cut only at a conflict."""

from __future__ import annotations

from consensus.raft.adapter import reconcile_append_entries

# Our log: indexes 1..10, term 1 up to 6 and term 2 after; 5 is our commit index.
held_terms = {index: (1 if index <= 6 else 2) for index in range(1, 11)}
commit_index = 5
current_term = 3


def _append(previous_index, previous_term, entries, commit_index):
    return {"type": "append_entries", "term": 3, "commit_index": commit_index, "prevLogIdx": previous_index,
            "prevLogTerm": previous_term, "entries": entries}


def _entries(first, terms):
    return [(b"\x00batch%d" % (first + offset), first + offset, term) for offset, term in enumerate(terms)]


def _decide(message):
    return reconcile_append_entries(message, held_terms.get, commit_index, current_term)


def test_a_resend_of_held_entries_leaves_nothing_to_write_and_keeps_the_log():
    message = _append(4, 1, _entries(5, [1, 1, 2]), commit_index=10)
    decision = _decide(message)
    assert decision.keep_log_suffix is True and decision.cut_from_index is None
    assert decision.message["entries"] == []
    assert (decision.message["prevLogIdx"], decision.message["prevLogTerm"]) == (7, 2)
    assert decision.message["commit_index"] == 7, "only what the message proves may count as committed"
    assert message["entries"] == _entries(5, [1, 1, 2]), "the original message is not changed"


def test_a_heartbeat_behind_the_log_end_keeps_the_log_and_caps_the_commit_index():
    decision = _decide(_append(6, 1, [], commit_index=9))
    assert decision.keep_log_suffix is True
    assert decision.message["prevLogIdx"] == 6
    assert decision.message["commit_index"] == 6


def test_entries_past_the_held_ones_are_written_after_them():
    decision = _decide(_append(8, 2, _entries(9, [2, 2, 3, 3]), commit_index=11))
    assert decision.keep_log_suffix is False
    assert decision.message["entries"] == _entries(11, [3, 3])
    assert (decision.message["prevLogIdx"], decision.message["prevLogTerm"]) == (10, 2)
    assert decision.message["commit_index"] == 11


def test_the_log_is_cut_at_the_first_conflicting_term():
    decision = _decide(_append(5, 1, _entries(6, [1, 3, 3]), commit_index=8))
    assert decision.keep_log_suffix is False and decision.cut_from_index is None
    assert decision.message["entries"] == _entries(7, [3, 3])
    assert (decision.message["prevLogIdx"], decision.message["prevLogTerm"]) == (6, 1)
    assert decision.message["commit_index"] == 8


def test_a_conflict_at_the_previous_index_cuts_our_uncommitted_entries_from_there():
    message = _append(8, 3, _entries(9, [3]), commit_index=9)
    decision = _decide(message)
    assert decision.cut_from_index == 8
    assert decision.message is message and decision.keep_log_suffix is False


def test_a_conflict_at_or_below_our_commit_index_cuts_nothing():
    for previous_index in (commit_index, commit_index - 1):
        decision = _decide(_append(previous_index, 7, _entries(previous_index + 1, [7]), commit_index=9))
        assert decision.cut_from_index is None


def test_a_gap_past_our_log_is_left_to_pysyncobj():
    message = _append(12, 2, _entries(13, [3]), commit_index=13)
    decision = _decide(message)
    assert decision.message is message and decision.keep_log_suffix is False and decision.cut_from_index is None


def test_non_consecutive_entries_are_left_to_pysyncobj_with_the_commit_index_capped_at_the_proven_match():
    message = _append(4, 1, [(b"\x00a", 5, 1), (b"\x00b", 7, 2)], commit_index=7)
    decision = _decide(message)
    assert decision.keep_log_suffix is False and decision.cut_from_index is None
    assert decision.message["entries"] == message["entries"] and decision.message["prevLogIdx"] == 4
    assert decision.message["commit_index"] == commit_index, "nothing past our commit index is proven"


def test_a_snapshot_chunk_never_raises_our_commit_index():
    # It proves nothing about our log, whose entries past the commit index may be a deposed leader's own.
    for first, last in ((True, False), (False, False), (False, True)):
        message = {"type": "append_entries", "term": 3, "commit_index": 10, "serialized": (b"chunk", first, last)}
        decision = _decide(message)
        assert decision.message["commit_index"] == commit_index
        assert decision.message["serialized"] == message["serialized"] and message["commit_index"] == 10
        assert decision.keep_log_suffix is False and decision.cut_from_index is None
    behind = {"type": "append_entries", "term": 3, "commit_index": 2, "serialized": (b"chunk", True, False)}
    assert _decide(behind).message["commit_index"] == 2


def test_an_append_from_a_deposed_leader_changes_nothing():
    # Our entries past the commit index may be committed by the current leader without our knowing yet; an
    # older leader's log need not hold them, so its late append must not cut them.
    message = dict(_append(8, 1, _entries(9, [1]), commit_index=9), term=current_term - 1)
    decision = _decide(message)
    assert decision.message is message and decision.keep_log_suffix is False and decision.cut_from_index is None
