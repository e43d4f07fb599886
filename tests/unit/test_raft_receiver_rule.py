"""Raft's receiver rule applied before pysyncobj sees an append: keep held entries, cut only at a conflict."""

from __future__ import annotations

from consensus.raft.adapter import reconcile_append_entries

# Our log: indexes 1..10, term 1 up to 6 and term 2 after.
held_terms = {index: (1 if index <= 6 else 2) for index in range(1, 11)}


def _append(previous_index, previous_term, entries, commit_index):
    return {"type": "append_entries", "term": 3, "commit_index": commit_index, "prevLogIdx": previous_index,
            "prevLogTerm": previous_term, "entries": entries}


def _entries(first, terms):
    return [(b"\x00batch%d" % (first + offset), first + offset, term) for offset, term in enumerate(terms)]


def test_a_resend_of_held_entries_leaves_nothing_to_write_and_keeps_the_log():
    message = _append(4, 1, _entries(5, [1, 1, 2]), commit_index=10)
    reconciled, keep = reconcile_append_entries(message, held_terms.get)
    assert keep is True
    assert reconciled["entries"] == []
    assert (reconciled["prevLogIdx"], reconciled["prevLogTerm"]) == (7, 2)
    assert reconciled["commit_index"] == 7, "only what the message proves may count as committed"
    assert message["entries"] == _entries(5, [1, 1, 2]), "the original message is not changed"


def test_a_heartbeat_behind_the_log_end_keeps_the_log_and_caps_the_commit_index():
    reconciled, keep = reconcile_append_entries(_append(6, 1, [], commit_index=9), held_terms.get)
    assert keep is True
    assert reconciled["prevLogIdx"] == 6
    assert reconciled["commit_index"] == 6


def test_entries_past_the_held_ones_are_written_after_them():
    reconciled, keep = reconcile_append_entries(_append(8, 2, _entries(9, [2, 2, 3, 3]), commit_index=11), held_terms.get)
    assert keep is False
    assert reconciled["entries"] == _entries(11, [3, 3])
    assert (reconciled["prevLogIdx"], reconciled["prevLogTerm"]) == (10, 2)
    assert reconciled["commit_index"] == 11


def test_the_log_is_cut_at_the_first_conflicting_term():
    reconciled, keep = reconcile_append_entries(_append(5, 1, _entries(6, [1, 3, 3]), commit_index=8), held_terms.get)
    assert keep is False
    assert reconciled["entries"] == _entries(7, [3, 3])
    assert (reconciled["prevLogIdx"], reconciled["prevLogTerm"]) == (6, 1)
    assert reconciled["commit_index"] == 8


def test_a_gap_or_a_conflict_at_the_previous_index_is_left_to_pysyncobj():
    for message in (_append(12, 2, _entries(13, [3]), commit_index=13), _append(8, 1, _entries(9, [3]), commit_index=9)):
        reconciled, keep = reconcile_append_entries(message, held_terms.get)
        assert reconciled is message and keep is False


def test_non_consecutive_entries_are_left_to_pysyncobj():
    message = _append(4, 1, [(b"\x00a", 5, 1), (b"\x00b", 7, 2)], commit_index=7)
    reconciled, keep = reconcile_append_entries(message, held_terms.get)
    assert reconciled is message and keep is False
