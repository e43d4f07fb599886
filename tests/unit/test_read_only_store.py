"""A read-only LedgerStore opened beside a running node (`tonle export --data-dir`, index checks): its
readers must be registered in LMDB's lock table, or the node's writer reuses the pages they still read."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from storage.state import LedgerStore

repository_root = Path(__file__).resolve().parents[2]
writer_seconds_max = 60.0
map_size_bytes = 64 << 20

# Another process, as a node is: rewrites one record many times and churns pages around it, each commit
# freeing the pages the one before wrote, which LMDB hands out again unless a registered reader still
# needs them.
_writer = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from storage.state import LedgerStore
    store = LedgerStore(Path(sys.argv[1]), map_size_bytes=int(sys.argv[2]), sync=False)
    for round in range(2_000):
        with store.write() as transaction:
            transaction.put("meta", b"watched", b"round %d" % round)
            for number in range(20):
                transaction.put("meta", b"filler-%d" % number, bytes([round % 251]) * 300)
    store.close()
    """
)


def test_a_read_only_store_keeps_its_snapshot_while_another_process_writes(tmp_path: Path) -> None:
    path = tmp_path / "state"
    seeded = LedgerStore(path, map_size_bytes=map_size_bytes, sync=False)
    with seeded.write() as transaction:
        transaction.put("meta", b"watched", b"before")
    seeded.close()
    reader = LedgerStore(path, map_size_bytes=map_size_bytes, readonly=True)
    try:
        with reader.read() as transaction:
            assert transaction.get("meta", b"watched") == b"before"
            subprocess.run(
                [sys.executable, "-c", _writer, str(path), str(map_size_bytes)],
                cwd=repository_root, check=True, timeout=writer_seconds_max,
            )
            # Same transaction: the same snapshot, whatever was committed since (a reader the writer did not
            # know about would now read pages it rewrote, and fail their checksums or see other values).
            assert transaction.get("meta", b"watched") == b"before"
            assert transaction.get("meta", b"filler-0") is None
        with reader.read() as transaction:
            assert transaction.get("meta", b"watched") == b"round 1999"
    finally:
        reader.close()
