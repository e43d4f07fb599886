"""pysyncobj's tracebacks for a full disk, folded into one line per interval."""

from __future__ import annotations

import errno
import logging

from consensus.raft import adapter as adapter_module
from consensus.raft.adapter import _DiskFullLogs, disk_full_log_interval_seconds


def _log_failure(logger: logging.Logger, error: OSError) -> None:
    try:
        raise error
    except OSError:
        logger.exception("failed _onTick in _autoTickThread")  # what pysyncobj logs


def test_disk_full_tracebacks_from_pysyncobj_become_one_line_per_interval_with_a_count(caplog):
    now = [1000.0]
    logger = logging.getLogger("tests.pysyncobj-disk-full")
    logger.addFilter(_DiskFullLogs(clock=lambda: now[0]))
    caplog.set_level(logging.ERROR, logger=logger.name)
    full = OSError(errno.ENOSPC, "No space left on device")
    for _ in range(50):
        _log_failure(logger, full)
    assert len(caplog.records) == 1
    first = caplog.records[0]
    assert first.exc_info is None and "No space left on device" in first.getMessage()
    assert "1 such failure(s)" in first.getMessage()
    now[0] += disk_full_log_interval_seconds
    _log_failure(logger, full)
    assert len(caplog.records) == 2
    assert "50 such failure(s)" in caplog.records[1].getMessage()  # the 49 folded and this one


def test_other_errors_from_pysyncobj_keep_their_tracebacks(caplog):
    logger = logging.getLogger("tests.pysyncobj-other-error")
    logger.addFilter(_DiskFullLogs())
    caplog.set_level(logging.ERROR, logger=logger.name)
    for _ in range(3):
        _log_failure(logger, OSError(errno.EIO, "Input/output error"))
    assert len(caplog.records) == 3
    assert all(record.exc_info is not None for record in caplog.records)


def test_the_fold_is_installed_on_the_pysyncobj_loggers_that_log_disk_writes():
    for name in ("pysyncobj.syncobj", "pysyncobj.serializer"):
        assert any(isinstance(entry, adapter_module._DiskFullLogs) for entry in logging.getLogger(name).filters), name


def test_an_lmdb_io_error_on_a_full_file_system_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    class Status:
        f_frsize = 4096
        f_bavail = 0

    monkeypatch.setattr(adapter_module.os, "statvfs", lambda path: Status)
    hint = adapter_module.full_disk_hint(tmp_path, Exception("mdb_txn_commit: Input/output error"))
    assert "No space left on device" in hint and str(tmp_path) in hint and "0 bytes free" in hint
    Status.f_bavail = adapter_module.full_disk_free_bytes_max // Status.f_frsize  # exactly the limit: not full
    assert adapter_module.full_disk_hint(tmp_path, Exception("mdb_txn_commit: Input/output error")) == ""


def test_other_apply_errors_get_no_disk_hint(tmp_path):
    assert adapter_module.full_disk_hint(tmp_path, ValueError("bad batch")) == ""
    # A real I/O error on a disk with room (the file system of tmp_path has more than a megabyte free).
    assert adapter_module.full_disk_hint(tmp_path, OSError(errno.EIO, "Input/output error")) == ""
