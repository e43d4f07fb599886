"""Creates and reads a node's Ed25519 key file: a hex seed that only its owner may read."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import nacl.bindings
from nacl.signing import SigningKey, VerifyKey

from config.schema import ConfigError, ConfigProblem

key_file_mode = 0o600
# Any permission bit for group or others makes the file refused: the seed is the node's identity.
key_file_shared_mode_mask = 0o077
key_seed_bytes = nacl.bindings.crypto_sign_SEEDBYTES
key_seed_pattern = re.compile(rb"[0-9a-fA-F]{%d}\n?" % (2 * key_seed_bytes))
key_file_bytes_max = 2 * key_seed_bytes + 1  # hex seed and a newline


def generate_key_file(path: Path) -> bytes:
    """Writes a new seed to `path` (mode 0600, never overwriting: FileExistsError); returns the public key."""
    signing_key = SigningKey.generate()
    write_secret_file(path, signing_key.encode().hex().encode("ascii") + b"\n")
    return signing_key.verify_key.encode()


def write_secret_file(path: Path, content: bytes) -> None:
    """Writes a secret (a key seed, an API token) to a new file, mode 0600, durably; never overwrites."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, key_file_mode)
    try:
        with os.fdopen(descriptor, "wb") as file:
            # The umask can only remove bits, but it may remove the owner's; set the mode exactly.
            os.fchmod(file.fileno(), key_file_mode)
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        # Never leave a half-written secret behind: the next attempt would refuse to overwrite it.
        path.unlink(missing_ok=True)
        raise
    # The new entry must survive a crash, or the node could restart without its identity.
    sync_directory(path.parent)


def load_signing_key(path: Path) -> SigningKey:
    """Reads a key file written by generate_key_file; raises ConfigError naming the path if it is unusable."""
    try:
        # O_NONBLOCK: opening a FIFO planted at the key path must fail the checks below, not hang.
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise _key_file_error(path, f"cannot open key file: {error.strerror or error}") from error
    try:
        # fstat of the open file, not stat of the path: the file checked is the file read.
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise _key_file_error(path, "key file is not a regular file")
        if mode & key_file_shared_mode_mask:
            raise _key_file_error(
                path,
                f"key file mode is {stat.S_IMODE(mode):04o}; group and others must have no access (chmod 600)",
            )
        content = os.read(descriptor, key_file_bytes_max + 1)
    finally:
        os.close(descriptor)
    if len(content) > key_file_bytes_max or not key_seed_pattern.fullmatch(content):
        raise _key_file_error(path, f"key file must hold {2 * key_seed_bytes} hex characters and an optional newline")
    return SigningKey(bytes.fromhex(content.decode("ascii").rstrip("\n")))


def public_key_hex(key: SigningKey | VerifyKey) -> str:
    """The public key as 64 lower-case hex characters, the form genesis files use."""
    verify_key = key.verify_key if isinstance(key, SigningKey) else key
    return verify_key.encode().hex()


def _key_file_error(path: Path, message: str) -> ConfigError:
    return ConfigError((ConfigProblem(str(path), "", message),))


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that a file created or renamed in it survives a crash."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
