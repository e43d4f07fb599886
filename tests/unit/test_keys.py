"""Tests for config/keys.py: key files are created once, owner-only, and refused when unsafe or malformed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from config import ConfigError, generate_key_file, load_signing_key, public_key_hex
from config.keys import key_file_bytes_max


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(previous)


def only_message(error: ConfigError) -> str:
    assert len(error.problems) == 1
    return error.problems[0].message


def test_generated_key_file_is_owner_only_hex_seed_and_loads_to_the_returned_key(
    tmp_path: Path, permissive_umask: None
) -> None:
    path = tmp_path / "node.key"
    public_key = generate_key_file(path)
    content = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(content) == 65 and content.endswith(b"\n")
    assert bytes.fromhex(content[:64].decode("ascii"))
    signing_key = load_signing_key(path)
    assert signing_key.verify_key.encode() == public_key
    assert public_key_hex(signing_key) == public_key.hex() == public_key_hex(signing_key.verify_key)


def test_generated_key_file_is_readable_by_its_owner_under_a_strict_umask(tmp_path: Path) -> None:
    previous = os.umask(0o777)
    try:
        public_key = generate_key_file(tmp_path / "node.key")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    assert load_signing_key(tmp_path / "node.key").verify_key.encode() == public_key


def test_two_generated_keys_differ(tmp_path: Path) -> None:
    assert generate_key_file(tmp_path / "a.key") != generate_key_file(tmp_path / "b.key")


def test_key_file_overwrite_is_refused_and_the_existing_key_kept(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    public_key = generate_key_file(path)
    content = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key_file(path)
    assert path.read_bytes() == content
    assert load_signing_key(path).verify_key.encode() == public_key


def test_key_file_generation_refuses_to_follow_a_symlink_over_another_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "node.key").symlink_to(victim)
    with pytest.raises(FileExistsError):
        generate_key_file(tmp_path / "node.key")
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o601, 0o610])
def test_key_file_accessible_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    generate_key_file(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        load_signing_key(path)
    assert caught.value.problems[0].source == str(path)
    assert f"mode is {mode:04o}" in only_message(caught.value)


def test_key_file_with_owner_only_read_permission_loads(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    public_key = generate_key_file(path)
    path.chmod(0o400)
    assert load_signing_key(path).verify_key.encode() == public_key


def test_missing_key_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(ConfigError) as caught:
        load_signing_key(path)
    assert caught.value.problems[0].source == str(path)
    assert "cannot open key file" in only_message(caught.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"ab" * 31 + b"\n",
        b"ab" * 33 + b"\n",
        b"zz" * 32 + b"\n",
        b"ab" * 32 + b"\n\n",
        b" " + b"ab" * 32,
        b"ab" * 32 + b"\r\n",
        b"ab" * 16 + b" " + b"ab" * 16,
        b"ab" * 32 + b"\n" + b"x" * 4096,
    ],
)
def test_key_file_with_wrong_length_or_non_hex_content_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
    with pytest.raises(ConfigError) as caught:
        load_signing_key(path)
    assert caught.value.problems[0].source == str(path)
    assert "64 hex characters" in only_message(caught.value)


def test_key_file_one_byte_over_its_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(b"ab" * 32 + b"\n" + b"\n")
    assert path.stat().st_size == key_file_bytes_max + 1
    with pytest.raises(ConfigError):
        load_signing_key(path)


def test_key_file_without_trailing_newline_or_in_upper_case_loads(tmp_path: Path) -> None:
    seed = bytes(range(32))
    path = tmp_path / "node.key"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(seed.hex().upper().encode("ascii"))
    assert load_signing_key(path).encode() == SigningKey(seed).encode()


def test_directory_or_fifo_in_place_of_key_file_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "keydir"
    directory.mkdir(mode=0o700)
    fifo = tmp_path / "keyfifo"
    os.mkfifo(fifo, 0o600)
    for path in (directory, fifo):
        with pytest.raises(ConfigError) as caught:
            load_signing_key(path)
        assert "not a regular file" in only_message(caught.value)


def test_public_key_hex_is_lower_case_and_64_characters() -> None:
    key = SigningKey(bytes(range(32)))
    text = public_key_hex(key)
    assert len(text) == 64 and text == text.lower() and bytes.fromhex(text) == key.verify_key.encode()
