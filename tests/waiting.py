"""Waiting in tests: poll a condition until it holds, failing with what was awaited once the deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable

poll_seconds = 0.01


def wait_until(condition: Callable[[], bool], timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")
        time.sleep(poll_seconds)
