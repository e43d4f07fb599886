"""Group commit: batches close by bytes or by time, never exceed their limit, and the queue is bounded."""

import pytest

from consensus.batch import BatchError, Batch, batch_bytes_max, decode_batch, encode_batch
from consensus.proposer import Proposer, ProposerLimits


def entries(count: int, size: int = 160) -> list[bytes]:
    return [bytes([number % 251]) * size for number in range(count)]


def singles(count: int, size: int = 160) -> list[tuple[bytes, ...]]:
    return [(entry,) for entry in entries(count, size)]


def test_a_full_queue_refuses_the_whole_offer():
    proposer = Proposer(ProposerLimits(queue_entries_max=10))
    assert proposer.offer(singles(8), 0)
    assert not proposer.offer(singles(3), 0)
    assert len(proposer) == 8


def test_batches_stay_under_the_byte_limit_and_keep_order():
    proposer = Proposer(ProposerLimits(batch_bytes_max=4096))
    queued = entries(100)
    proposer.offer([(entry,) for entry in queued], 0)
    taken = []
    while (cut := proposer.take_batch(1, None, 0)) is not None:
        raw, batch_entries = cut
        assert len(raw) <= 4096
        assert list(decode_batch(raw).entries) == batch_entries
        taken += batch_entries
    assert taken == queued


def test_the_window_closes_after_the_delay_of_the_oldest_entry():
    proposer = Proposer(ProposerLimits(batch_delay_microseconds=1000))
    assert proposer.due_microseconds() is None
    proposer.offer(singles(1), 5_000)
    proposer.offer(singles(1), 5_500)
    assert proposer.due_microseconds() == 6_000
    assert not proposer.has_full_batch()


def test_a_queue_larger_than_one_batch_reports_a_full_batch():
    proposer = Proposer(ProposerLimits(batch_bytes_max=2048))
    proposer.offer(singles(20), 0)
    assert proposer.has_full_batch()


def test_a_batch_over_the_format_limit_is_refused_both_ways():
    with pytest.raises(BatchError):
        encode_batch(Batch(0, None, tuple(entries(400, 160))))
    with pytest.raises(BatchError):
        decode_batch(b"\x00" * (batch_bytes_max + 1))
    with pytest.raises(ValueError):
        Proposer(ProposerLimits(batch_bytes_max=batch_bytes_max + 1))


def test_taking_everything_empties_the_queue():
    proposer = Proposer(ProposerLimits())
    proposer.offer(singles(5), 0)
    assert len(proposer.take_all()) == 5
    assert len(proposer) == 0 and proposer.due_microseconds() is None


def test_a_linked_chain_is_never_split_across_batches():
    proposer = Proposer(ProposerLimits(batch_bytes_max=2048))
    chain = tuple(entries(6, 150))
    proposer.offer(singles(8, 150) + [chain] + singles(4, 150), 0)
    batches = []
    while (cut := proposer.take_batch(1, None, 0)) is not None:
        batches.append(cut[1])
    assert any(all(member in batch for member in chain) for batch in batches)
    assert sum(len(batch) for batch in batches) == 18


def test_a_unit_larger_than_a_batch_is_refused():
    proposer = Proposer(ProposerLimits(batch_bytes_max=2048))
    assert not proposer.fits(tuple(entries(30, 150)))
    with pytest.raises(ValueError):
        proposer.offer([tuple(entries(30, 150))], 0)
