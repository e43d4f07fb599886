"""Signed entries: canonical encodings, strict decoding, domain-separated signatures."""

import msgpack
import pytest
from nacl.signing import SigningKey

from consensus.codec import CodecError, pack, unpack
from consensus.entries import (
    EntryError,
    EntryKind,
    Issue,
    OpenAccount,
    Transfer,
    decode_body,
    decode_entry,
    encode_body,
    entry_bytes_max,
    signature_is_valid,
    sign_entry,
)

key = SigningKey.generate()
transfer_id = bytes(range(1, 17))


def signed(body, cluster="tonle-test-1", signer="aba", signing_key=key) -> bytes:
    return sign_entry(body, cluster_id=cluster, signer=signer, signing_key=signing_key)


def reencode_envelope(raw: bytes, **changes) -> bytes:
    version, cluster, kind, body, signer, public_key, signature = msgpack.unpackb(raw)
    fields = {"version": version, "cluster": cluster, "kind": kind, "body": body, "signer": signer,
              "public_key": public_key, "signature": signature, **changes}
    return pack([fields[name] for name in ("version", "cluster", "kind", "body", "signer", "public_key", "signature")])


@pytest.mark.parametrize(
    "body",
    [
        Transfer(transfer_id, "sokha@aba", "dara@acleda", 1500, "KHR"),
        OpenAccount("sokha@aba", "USD"),
        Issue(transfer_id, "settlement.khr@aba", 10**12, "KHR"),
    ],
)
def test_every_kind_round_trips_and_verifies(body):
    entry = decode_entry(signed(body))
    assert entry.body() == body
    assert signature_is_valid(entry)


def test_canonical_decoder_refuses_a_non_minimal_integer():
    canonical = pack([1, 5])
    padded = b"\x92\x01\xcf" + (5).to_bytes(8, "big")  # 5 as uint64: decodes to the same value
    assert unpack(canonical) == [1, 5]
    with pytest.raises(CodecError, match="canonical"):
        unpack(padded)


def test_canonical_decoder_refuses_trailing_bytes_and_extension_types():
    with pytest.raises(CodecError):
        unpack(pack([1]) + b"\x00")
    with pytest.raises(CodecError):
        unpack(msgpack.packb(msgpack.ExtType(5, b"x")))


def _body_with_amount(amount) -> bytes:
    # id, debit, credit, amount, currency, flags, pending_id, timeout, reference, code, rate numerator/denominator
    return pack([1, transfer_id, "sokha@aba", "dara@aba", amount, "KHR", 0, b"", 0, "", 0, 0, 0])


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        (0, "amount_must_be_positive"),
        (-5, "amount_must_be_positive"),
        (1.5, "malformed_entry"),
        (1.0, "malformed_entry"),
        (True, "malformed_entry"),
        (2**63, "amount_out_of_range"),
        (2**64 - 1, "amount_out_of_range"),
    ],
)
def test_bad_amounts_are_refused_with_a_typed_error(amount, code):
    with pytest.raises(EntryError) as error:
        decode_body(EntryKind.TRANSFER, _body_with_amount(amount))
    assert error.value.code == code


def test_largest_amount_is_accepted():
    assert decode_body(EntryKind.TRANSFER, _body_with_amount(2**63 - 1)).amount == 2**63 - 1


@pytest.mark.parametrize(("bad_id", "code"), [(bytes(16), "id_must_not_be_zero"), (b"\xff" * 16, "id_must_not_be_int_max")])
def test_reserved_ids_are_refused(bad_id, code):
    with pytest.raises(EntryError) as error:
        signed(Transfer(bad_id, "sokha@aba", "dara@aba", 1, "KHR"))
    assert error.value.code == code


@pytest.mark.parametrize("name", ["Sokha@aba", "sokha", "sokha@aba\n", "sokha@@aba", "a" * 33 + "@aba", "sokha@a"])
def test_invalid_account_names_are_refused(name):
    with pytest.raises(EntryError) as error:
        signed(Transfer(transfer_id, name, "dara@aba", 1, "KHR"))
    assert error.value.code == "invalid_debit_account"


def test_signature_does_not_verify_in_another_network():
    raw = signed(Transfer(transfer_id, "sokha@aba", "dara@aba", 1, "KHR"), cluster="tonle-alpha")
    moved = reencode_envelope(raw, cluster="tonle-beta")
    assert not signature_is_valid(decode_entry(moved))


def test_signature_does_not_verify_as_another_kind():
    # An issue body and a transfer body differ in shape, so reuse the bytes of an open-account body, which
    # decodes as nothing else: the point is that the kind is inside the signed payload.
    raw = signed(OpenAccount("sokha@aba", "KHR"))
    relabelled = reencode_envelope(raw, kind=int(EntryKind.ISSUE))
    assert not signature_is_valid(decode_entry(relabelled))


def test_signature_from_another_key_does_not_verify():
    raw = signed(Transfer(transfer_id, "sokha@aba", "dara@aba", 1, "KHR"))
    other = bytes(SigningKey.generate().verify_key)
    assert not signature_is_valid(decode_entry(reencode_envelope(raw, public_key=other)))


def test_tampered_body_does_not_verify():
    raw = signed(Transfer(transfer_id, "sokha@aba", "dara@aba", 1, "KHR"))
    tampered = encode_body(Transfer(transfer_id, "sokha@aba", "dara@aba", 1000, "KHR"))
    assert not signature_is_valid(decode_entry(reencode_envelope(raw, body=tampered)))


def test_oversized_entry_is_refused_before_decoding():
    with pytest.raises(EntryError) as error:
        decode_entry(b"\x00" * (entry_bytes_max + 1))
    assert error.value.code == "entry_too_large"


@pytest.mark.parametrize(
    "changes",
    [{"version": 2}, {"signature": b"\x00" * 63}, {"public_key": b"\x00" * 31}, {"signer": 7}, {"kind": 99}],
)
def test_malformed_envelopes_are_refused(changes):
    raw = signed(Transfer(transfer_id, "sokha@aba", "dara@aba", 1, "KHR"))
    with pytest.raises(EntryError):
        decode_entry(reencode_envelope(raw, **changes))
