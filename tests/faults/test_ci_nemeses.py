"""The CI subset of the fault suite: partitions, crashes, pauses and a full disk, each shown to really happen."""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_sound, faults_of

pytestmark = pytest.mark.faults


def test_partitions_depose_the_isolated_leader_and_lose_or_duplicate_nothing(chaos):
    document = chaos(("partition",), seed=8101, duration_seconds=55)
    assert_sound(document)
    assert document["mode"] == "namespaces"
    assert len(document["faults"]) >= 2
    for fault in faults_of(document):
        evidence = fault["evidence"]
        assert evidence["blocked_links"] > 0 and all(count > 0 for count in evidence["rules_in_force"].values())
        if fault["variant"] == "majority-split":
            assert evidence["majority_leader"] not in fault["targets"]
            assert evidence["majority_applied_index"] > evidence["minority_applied_index"]
        else:
            (isolated,) = fault["targets"]
            assert evidence["new_leader"] != isolated
            assert evidence["isolated_role"] != "leader"


def test_killed_leaders_followers_and_replicas_restart_with_every_acknowledged_transfer(chaos):
    document = chaos(("kill",), seed=8202, duration_seconds=40)
    assert_sound(document)
    killed = faults_of(document)
    assert len(killed) >= 3
    for fault in killed:
        assert set(fault["evidence"]["exit_codes"].values()) == {-9}
        assert fault["evidence"]["state_survived"]


def test_a_paused_node_falls_behind_and_a_paused_leader_is_replaced(chaos):
    document = chaos(("pause",), seed=8303, duration_seconds=40)
    assert_sound(document)
    paused = faults_of(document)
    assert {fault["variant"] for fault in paused} == {"leader", "follower"}
    for fault in paused:
        evidence = fault["evidence"]
        assert evidence["fell_behind"] and not evidence["paused_answered"]
        assert evidence["others_applied_index"] > evidence["applied_index_when_paused"]
        if evidence["was_leader"]:
            assert evidence["new_leader"] not in fault["targets"]


def test_a_full_disk_stops_the_node_with_enospc_and_it_catches_up_once_space_returns(chaos):
    document = chaos(("disk-full",), seed=8404, duration_seconds=35)
    assert_sound(document)
    full = faults_of(document)
    assert any(fault["evidence"]["enospc_logged"] for fault in full), "the node's log never named the full disk"
    for fault in full:
        evidence = fault["evidence"]
        assert evidence["ballast_bytes"] > 0 and evidence["line"] is not None
        # An apply that cannot commit stops the node (exit 70); a snapshot it cannot store is only retried.
        assert evidence.get("exit_code") in (None, 70)
        assert fault["recovery_seconds"] is not None
