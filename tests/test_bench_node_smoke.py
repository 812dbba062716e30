"""bench_node's optional unbatched phase runs end to end (a short smoke run; numbers are not judged here)."""
from __future__ import annotations

import pytest

from bench import bench_node

pytestmark = pytest.mark.bench      # benchmark-only: run with `pytest -m bench` (CI runs them)


def test_bench_node_unbatched_phase_runs(capsys):
    assert bench_node.main(["--quick", "--only", "unbatched", "--unbatched-s", "1"]) == 0
    out = capsys.readouterr().out
    assert "closed-loop clients" in out and "requests per log entry" in out and "not OK 0" in out
    assert "phases run: unbatched; digests equal: True" in out
