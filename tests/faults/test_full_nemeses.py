"""The rest of the fault suite (TONLE_FAULTS=full): clocks, failing fsync, flipped bits, and every nemesis mixed."""

from __future__ import annotations

import pytest

from node.chaos import nemesis_names
from tests.faults.conftest import assert_sound, faults_of

pytestmark = [pytest.mark.faults, pytest.mark.faults_full]


def test_a_node_restarted_under_a_jumped_and_rescaled_clock_changes_nothing(chaos, preload_libraries_available):
    document = chaos(("clock",), seed=8505, duration_seconds=60)
    assert_sound(document)
    shifted = faults_of(document)
    assert len(shifted) >= 3
    for fault in shifted:
        evidence = fault["evidence"]
        assert evidence["library_loaded"], "libfaketime must be loaded in the node process itself"
        assert abs(evidence["observed_offset_seconds"] - evidence["expected_offset_seconds"]) < 60


def test_a_failing_fsync_stops_the_node_loudly_and_it_recovers_without_it(chaos, preload_libraries_available):
    document = chaos(("fsync",), seed=8606, duration_seconds=40)
    assert_sound(document)
    for fault in faults_of(document):
        assert fault["evidence"]["exit_code"] == 70
        assert "Input/output error" in fault["evidence"]["line"]


def test_a_flipped_bit_in_a_journal_record_or_an_account_record_is_detected_and_never_applied(chaos):
    document = chaos(("bitflip",), seed=8707, duration_seconds=50)
    assert_sound(document)
    flips = faults_of(document)
    assert {fault["variant"] for fault in flips} == {"journal", "state"}
    for fault in faults_of(document, "journal"):
        assert "is damaged" in fault["evidence"]["line"]
    detected = [fault for fault in faults_of(document, "state") if fault["evidence"]["line"] is not None]
    assert detected, "no flipped account record was read back, so detection was not shown"
    for fault in detected:
        evidence = fault["evidence"]
        assert evidence["copies_flipped"] >= 1
        assert "fails its checksum" in evidence["line"] and evidence["exit_code"] == 70
        assert evidence["state_rebuilt"]


def test_every_nemesis_mixed_from_one_seed(chaos, preload_libraries_available):
    document = chaos(nemesis_names, seed=8808, duration_seconds=180)
    assert_sound(document)
    assert {fault["kind"] for fault in document["faults"]} == set(nemesis_names)
