"""Log set-up for a node: plain text for people, JSON lines for log pipelines, with consensus context."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

# Attributes a LogRecord always has; anything else was passed with `extra=` and is structured context.
_standard_attributes = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, node, message and every `extra=` field."""

    def __init__(self, node_name: str, context: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._node_name = node_name
        self._context = context

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": self._node_name,
            "message": record.getMessage(),
            **self._context(),
        }
        for key, value in vars(record).items():
            if key not in _standard_attributes:
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, node_name: str, context: Callable[[], dict[str, Any]]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(node)s term=%(term)s index=%(index)s] %(message)s")
        self._node_name = node_name
        self._context = context

    def format(self, record: logging.LogRecord) -> str:
        context = self._context()
        record.node = self._node_name
        record.term = getattr(record, "term", context.get("term"))
        record.index = getattr(record, "index", context.get("index"))
        return super().format(record)


def configure_logging(node_name: str, level: str, log_format: str, context: Callable[[], dict[str, Any]]) -> None:
    """`context()` returns the node's current term and applied index, added to every line."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonLinesFormatter(node_name, context) if log_format == "json" else TextFormatter(node_name, context)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pysyncobj.syncobj").addFilter(_downgrade_routine_truncation)


def _downgrade_routine_truncation(record: logging.LogRecord) -> bool:
    """pysyncobj logs "truncating already-applied log entries" at CRITICAL whenever a leader resends
    entries a follower already has (research/pysyncobj.md B6). The apply is idempotent by index and real
    divergence is caught by the state-hash checkpoints, so the line is kept but as a warning, where it
    cannot hide a real critical event."""
    if record.levelno == logging.CRITICAL and "truncating already-applied" in record.msg:
        record.levelno = logging.WARNING
        record.levelname = "WARNING"
    return True
