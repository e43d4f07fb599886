"""The chaos checker, schedule and options on hand-made histories: each invariant catches its violation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from consensus.entries import Transfer
from node.chaos import (
    AppliedTransfer,
    Baseline,
    ChaosOptions,
    NodeState,
    Operation,
    _longest_gap,
    _offset_seconds,
    check,
    classify,
    duration_seconds_max,
    duration_seconds_min,
    fault_seconds,
    nemesis_names,
    nemesis_variants,
    plan_faults,
    tail_seconds,
    validators_max,
    validators_min,
    warmup_seconds,
    workers_max,
    workers_min,
)

first_id = bytes([1]) * 16
second_id = bytes([2]) * 16
baseline = Baseline(
    index=10,
    balances={"a@bank": 100, "b@bank": 100, "c@bank": 50},
    currencies={"a@bank": "KHR", "b@bank": "KHR", "c@bank": "USD"},
    negative_forbidden=frozenset({"a@bank", "b@bank", "c@bank"}),
)
# Raw entries are opaque to the checker: it only matches bytes. Short stand-ins keep the cases readable.
first = b"entry-1"
second = b"entry-2"
second_other_body = b"entry-2-other-amount"
bodies = {
    first: Transfer(first_id, "a@bank", "b@bank", 30, "KHR"),
    second: Transfer(second_id, "b@bank", "a@bank", 5, "KHR"),
    second_other_body: Transfer(second_id, "b@bank", "a@bank", 7, "KHR"),
}
totals = {"KHR": {"issued": 200, "held": 200, "net": 0}, "USD": {"issued": 50, "held": 50, "net": 0}}


def transfer(entry: bytes, outcome: str, invoked: float, completed: float, kind: str = "transfer") -> Operation:
    return Operation(kind, 1, "v1", outcome, "ok" if outcome == "ok" else "x", invoked, completed, bodies[entry].id, entry)


def read(index: int, balances: dict[str, int], invoked: float, completed: float) -> Operation:
    return Operation("read", 2, "v2", "ok", "exists_with_different_fields", invoked, completed, index=index,
                     balances=tuple(sorted(balances.items())))


def state(name: str = "v1", **changes) -> NodeState:
    """A node where the first transfer applied at index 12 and the second at 14 (a: 75, b: 125)."""
    healthy = NodeState(
        name=name,
        applied_index=20,
        state_hash="aa" * 32,
        balances={"a@bank": 75, "b@bank": 125, "c@bank": 50},
        totals=totals,
        transfers={first_id: AppliedTransfer("ok", 12, first, 30), second_id: AppliedTransfer("ok", 14, second, 5)},
        history={
            "a@bank": ((first_id, 12, -30), (second_id, 14, 5)),
            "b@bank": ((first_id, 12, 30), (second_id, 14, -5)),
            "c@bank": (),
        },
    )
    return replace(healthy, **changes)


healthy_history = [
    transfer(first, "ok", 1.0, 1.2),
    read(12, {"a@bank": 70, "b@bank": 130, "c@bank": 50}, 1.3, 1.4),
    transfer(second, "ok", 1.5, 1.7),
    read(14, {"a@bank": 75, "b@bank": 125, "c@bank": 50}, 1.8, 1.9),
]
converged = {"v1": (20, "aa" * 32), "v2": (20, "aa" * 32)}


def verdict(operations=healthy_history, states=None, positions=converged):
    return check(baseline, bodies, operations, states or [state("v1"), state("v2")], positions)


def test_a_healthy_history_passes_every_invariant():
    result = verdict()
    assert all(result.invariants.values()), result.examples
    assert result.counts["acknowledged"] == 2 and result.counts["reads_ok"] == 2


def test_an_acknowledged_transfer_missing_on_one_node_is_lost():
    missing = state("v2", transfers={first_id: None, second_id: AppliedTransfer("ok", 14, second, 5)},
                    balances={"a@bank": 105, "b@bank": 95, "c@bank": 50})
    result = verdict(states=[state("v1"), missing])
    assert not result.invariants["no_lost_acknowledged"]
    assert result.counts["lost"] == 1
    assert "lost_on_v2" in result.examples


def test_an_acknowledgement_for_a_body_that_did_not_apply_is_lost():
    # The node answered ok for entry-2-other-amount, but the id holds entry-2: the client was lied to.
    history = [*healthy_history, transfer(second_other_body, "ok", 2.0, 2.1, kind="conflict")]
    result = verdict(operations=history)
    assert not result.invariants["no_lost_acknowledged"]
    assert "other body" in result.examples["lost_on_v1"][0]


def test_a_transfer_applied_twice_is_duplicated_and_breaks_the_model():
    twice = state(
        history={**state().history, "a@bank": ((first_id, 12, -30), (first_id, 13, -30), (second_id, 14, 5))},
        balances={"a@bank": 45, "b@bank": 125, "c@bank": 50},
    )
    result = verdict(states=[twice, state("v2")])
    assert not result.invariants["no_duplicate_application"]
    assert not result.invariants["model_agreement"]
    assert not result.invariants["conservation"]
    assert result.counts["duplicated"] == 1


def test_a_movement_nobody_submitted_is_a_phantom():
    phantom_id = bytes([9]) * 16
    intruded = state(history={**state().history, "c@bank": ((phantom_id, 15, 1),)})
    result = verdict(states=[intruded, state("v2")])
    assert not result.invariants["no_phantom_or_refused_applied"]
    assert result.counts["phantom"] == 1


def test_a_refused_transfer_found_applied_is_flagged():
    history = [*healthy_history, transfer(second, "fail", 2.0, 2.1, kind="duplicate")]
    result = verdict(operations=history)
    assert not result.invariants["no_phantom_or_refused_applied"]
    assert result.counts["refused_applied"] == 2  # on both nodes


def test_a_read_that_sees_half_a_transfer_breaks_conservation():
    history = [*healthy_history, read(14, {"a@bank": 75, "b@bank": 130, "c@bank": 50}, 2.0, 2.1)]
    result = verdict(operations=history)
    assert not result.invariants["conservation"]
    assert not result.invariants["reads_linearizable"]


def test_a_read_missing_a_transfer_completed_before_it_began_is_not_linearizable():
    # Balances that match index 12 exactly, but the read was labelled 12 after index 14 had been acknowledged.
    history = [*healthy_history, read(12, {"a@bank": 70, "b@bank": 130, "c@bank": 50}, 2.0, 2.1)]
    result = verdict(operations=history)
    assert not result.invariants["reads_linearizable"]
    assert result.counts["read_real_time"] >= 1
    assert result.counts["read_stale"] == 0


def test_a_read_whose_balances_differ_from_the_log_at_its_index_is_stale():
    history = [*healthy_history, read(14, {"a@bank": 70, "b@bank": 130, "c@bank": 50}, 2.0, 2.1)]
    result = verdict(operations=history)
    assert result.counts["read_stale"] == 1


def test_a_transfer_begun_after_a_read_ended_must_not_be_visible_to_it():
    early_read = read(14, {"a@bank": 75, "b@bank": 125, "c@bank": 50}, 0.1, 0.2)
    result = verdict(operations=[early_read, *healthy_history])
    assert result.counts["read_real_time"] >= 1


def test_a_negative_balance_where_forbidden_is_flagged():
    overdrawn = state(balances={"a@bank": -5, "b@bank": 205, "c@bank": 50})
    result = verdict(states=[overdrawn, state("v2")])
    assert not result.invariants["no_negative_balance"]


def test_nodes_at_different_positions_did_not_converge():
    result = verdict(positions={"v1": (20, "aa" * 32), "v2": (20, "bb" * 32)})
    assert not result.invariants["converged"]
    assert not verdict(positions={}).invariants["converged"]


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        ({"status": "applied", "result": "ok"}, "ok"),
        ({"status": "applied", "result": "exists"}, "ok"),
        ({"status": "applied", "result": "exists_with_different_fields"}, "fail"),
        ({"status": "applied", "result": "exceeds_credits"}, "fail"),
        ({"status": "rejected", "result": "signature_invalid"}, "fail"),
        ({"status": "rejected", "result": "no_leader"}, "info"),
        ({"status": "unknown", "result": "timeout"}, "info"),
    ],
)
def test_outcomes_are_classified_so_that_only_certain_ones_count(reply, outcome):
    assert classify(reply) == outcome


def test_the_longest_unavailability_counts_from_the_start_and_to_the_end():
    operations = [transfer(first, "ok", 0.5, 3.0), transfer(second, "ok", 3.0, 4.0)]
    assert _longest_gap(operations, 20.0) == 16.0


def test_a_seed_always_draws_the_same_schedule_within_the_run():
    first_plan = plan_faults(7, nemesis_names, 300.0)
    assert first_plan == plan_faults(7, nemesis_names, 300.0)
    assert first_plan != plan_faults(8, nemesis_names, 300.0)
    assert {plan.kind for plan in first_plan} == set(nemesis_names)
    assert first_plan[0].start_seconds == warmup_seconds
    for plan in first_plan:
        assert plan.variant in nemesis_variants[plan.kind]
        low, high = fault_seconds[plan.kind]
        assert low <= plan.duration_seconds <= high
        assert plan.start_seconds + plan.duration_seconds + tail_seconds <= 300.0


def test_every_variant_of_a_nemesis_comes_before_any_repeats():
    plans = plan_faults(3, ("partition",), 300.0)
    assert {plan.variant for plan in plans[:3]} == set(nemesis_variants["partition"])


def test_clock_settings_name_their_offsets():
    assert [_offset_seconds(setting) for setting in nemesis_variants["clock"]] == [3600, -86400, 900, -7200]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"duration_seconds": duration_seconds_min - 1}, "duration"),
        ({"duration_seconds": duration_seconds_max + 1}, "duration"),
        ({"validators": validators_min - 1}, "validators"),
        ({"validators": validators_max + 1}, "validators"),
        ({"workers": workers_min - 1}, "workers"),
        ({"workers": workers_max + 1}, "workers"),
        ({"nemeses": ("partition", "meteor")}, "unknown nemeses"),
        ({"nemeses": ()}, "at least one"),
        ({"nemeses": ("partition",), "duration_seconds": duration_seconds_min}, "fits in"),
    ],
)
def test_options_beyond_their_limits_are_refused(tmp_path, changes, message):
    options = replace(ChaosOptions(tmp_path, 1, 60.0), **changes)
    with pytest.raises(ValueError, match=message):
        options.validate()
