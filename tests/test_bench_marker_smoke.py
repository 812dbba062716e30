"""bench_marker runs end to end on a small system (a smoke run; its numbers are not judged here, its checks
are: every transfer OK, money conserved over both shards, nothing left in flight, digests equal)."""
from __future__ import annotations

import pytest

from bench import bench_marker

pytestmark = pytest.mark.bench      # benchmark-only: run with `pytest -m bench` (CI runs them)


def test_bench_marker_quick_runs(capsys):
    assert bench_marker.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "cross-shard via the Marker, batched" in out and "one per SUBMIT" in out
    assert "marker in_flight == 0 at the end: yes" in out
    assert "money conserved per currency over both shards, nothing reserved or pending: yes" in out
