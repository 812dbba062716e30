"""``zwallet bench --quick`` end to end, once: a real 3-replica cluster and a real PostgreSQL, every workload,
the report and the plots. The bars are the benchmark's business (bench/RESULTS.md), not this test's: it checks
that the tool runs, measures both systems, and that its own correctness checks pass (every command OK, money
conserved in both systems, equal replica digests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.bench      # benchmark-only: run with `pytest -m bench` (CI runs them)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
def test_quick_bench_runs_and_reports(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "report.json").read_text())
    names = [w["name"] for w in res["workloads"]]
    assert names == ["bank_batched", "bank_unbatched", "hot_batched", "hot_unbatched", "mixed"]
    for w in res["workloads"]:
        for system in ("zwallet", "postgresql"):
            row = w["systems"][system]
            assert "error" not in row, (w["name"], system, row)
            assert row["ops"] > 0 and row["per_s"] > 0 and row["not_ok"] == 0, (w["name"], system, row)
            assert row["timeline"]["per_s"], (w["name"], system)
        assert w["ratio"] == pytest.approx(w["systems"]["zwallet"]["per_s"] / w["systems"]["postgresql"]["per_s"])
    assert [e["rate_per_s"] for e in res["latency"]] == [1000, 10000]
    for e in res["latency"]:
        zw = e["systems"]["zwallet"]
        assert zw["answered"] > 0 and zw["not_ok"] == 0 and zw["p50_ms"] is not None
    assert {ev["label"].split(" ")[0] for ev in res["failover"]["events"]} >= {"kill"}
    assert res["failover"]["not_ok"] == 0 and res["failover"]["failover_ms"] > 0
    assert [r["accounts"] for r in res["scaling"]["accounts"]] == [10_000, 20_000]
    assert [r["batch"] for r in res["scaling"]["batch_size"]] == [1, 8190]
    checks = res["checks"]
    assert checks["zwallet_money_conserved"] and checks["postgresql_money_conserved"]
    assert checks["zwallet_digests_equal"] and checks["all_commands_ok"]
    assert res["meta"]["postgresql"]["settings"]["fsync"] == "on"
    assert res["meta"]["postgresql"]["settings"]["synchronous_commit"] == "on"
    md = (out / "report.md").read_text()
    for w in res["workloads"]:
        assert w["title"] in md
    for png in res["plots"]:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert res["meta"]["elapsed_s"] < 120, "--quick must stay a smoke run"
