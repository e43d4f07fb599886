"""Test helper: a memory cgroup to run a process in, or the test skipped where the machine gives none."""

from __future__ import annotations

import pytest

from node.memory_limit import MemoryCgroup, MemoryLimitUnavailable


def memory_cgroup_or_skip(limit_bytes: int) -> MemoryCgroup:
    """A new memory cgroup limited to `limit_bytes` (the caller removes it), or skip: making one needs root and
    a memory controller, which a developer's machine may not give."""
    try:
        return MemoryCgroup.create("test", limit_bytes)
    except MemoryLimitUnavailable as error:
        pytest.skip(f"memory cgroups need root and a memory controller: {error}")
