"""Test helper: a memory cgroup to run a process in, or the test skipped where the machine gives none."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.memory_limit import MemoryCgroup, MemoryLimitUnavailable


def memory_cgroup_or_skip(limit_bytes: int) -> MemoryCgroup:
    """A new memory cgroup limited to `limit_bytes` (the caller removes it), or skip: making one needs root and
    a memory controller, which a developer's machine may not give."""
    try:
        return MemoryCgroup.create("test", limit_bytes)
    except MemoryLimitUnavailable as error:
        pytest.skip(f"memory cgroups need root and a memory controller: {error}")


@pytest.fixture
def cgroups() -> Iterator[list[MemoryCgroup]]:
    """A list a test appends the cgroups it made to; each is removed after the test (its processes gone)."""
    made: list[MemoryCgroup] = []
    yield made
    for cgroup in made:
        cgroup.remove()
