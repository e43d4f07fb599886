"""Named failure points for fault tests, switched on only through the TONLE_FAILPOINTS variable (etcd-style)."""

from __future__ import annotations

import os
from collections.abc import Mapping

failpoints_variable = "TONLE_FAILPOINTS"

# Each failpoint makes this node misbehave in one precise way, so a test can show the rest of the system
# notices. None is reachable unless an operator sets the variable.
known_failpoints = {
    "apply_extra_record": "write one record no other node writes, in the first batch applied after start, "
    "so this node's state hash diverges",
}


class FailpointError(ValueError):
    """TONLE_FAILPOINTS names a failpoint this build does not have."""


def enabled_failpoints(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    text = (environ if environ is not None else os.environ).get(failpoints_variable, "")
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = names - set(known_failpoints)
    if unknown:
        raise FailpointError(f"{failpoints_variable} names unknown failpoints {sorted(unknown)}; known: {sorted(known_failpoints)}")
    return names
