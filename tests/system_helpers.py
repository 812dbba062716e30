"""Helpers for the whole-system tests (tests/test_system*.py, test_marker_groups.py)."""
from __future__ import annotations

from engine.system import System


def accounts_by_shard(system: System, per_shard: int, start: int = 1) -> dict[int, list[int]]:
    """The first ``per_shard`` account ids from ``start`` that the shard map gives to each shard."""
    out: dict[int, list[int]] = {s: [] for s in system.shards}
    a = start
    while min(len(v) for v in out.values()) < per_shard:
        s = system.shard_map.shard_of(a)
        if len(out[s]) < per_shard:
            out[s].append(a)
        a += 1
    return out
