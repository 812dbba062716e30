"""bench/report.py: Markdown, JSON and PNGs from a synthetic results dict (no servers, no PostgreSQL)."""
from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np
import pytest

from bench import report

pytestmark = pytest.mark.bench      # benchmark-only: run with `pytest -m bench` (CI runs them)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMAND = "zwallet bench --quick"


def timeline(rate: float, seconds: float = 3.0, dip_at: float | None = None) -> dict:
    t = np.arange(0.0, seconds, 0.25)
    per_s = np.full_like(t, rate) * (1 + 0.05 * np.sin(t))
    if dip_at is not None:
        per_s[(t >= dip_at) & (t < dip_at + 0.5)] = 0.0
    return {"t_s": t, "per_s": per_s}


def system(per_s: float, **extra) -> dict:
    d = {"per_s": np.float64(per_s), "ops": np.int64(1_000_000), "wall_s": 1_000_000 / per_s, "not_ok": 0,
         "connections": 4, "request_latency_ms": {"p50": 4.0, "p99": 12.5, "p999": float("nan"), "max": 99.0},
         "timeline": timeline(per_s)}
    d.update(extra)
    return d


def open_loop(p50: float, unanswered: int = 0) -> dict:
    q = np.array([0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0])
    ms = p50 * np.array([0.3, 1.0, 1.6, 2.5, 4.0, 6.0, 9.0])
    edges = np.geomspace(0.05, 200.0, 31)
    centers = np.sqrt(edges[:-1] * edges[1:])
    counts = np.round(10_000 * np.exp(-np.log(centers / p50) ** 2)).astype(np.int64)
    return {"achieved_per_s": 1000.0, "requests": 10_000, "answered": 10_000 - unanswered, "not_ok": 0,
            "unanswered": unanswered, "p50_ms": p50, "p90_ms": ms[2], "p99_ms": ms[3], "p999_ms": ms[4],
            "max_ms": None if unanswered else ms[6],      # the suite: a percentile unanswered requests reach
            "cdf": {"q": q, "ms": ms}, "hist": {"edges_ms": edges, "counts": counts}}


@pytest.fixture
def res() -> dict:
    workloads = [
        {"name": "bank_batched", "title": "Bank, batched (8190 transfers per request)", "unit": "transfers/s",
         "description": "uniform random transfers among 1,000,000 accounts",
         "systems": {"zwallet": system(377_000.0, cpu_cores={"server": 1.6, "client": 0.2}),
                     "postgresql": system(47_700.0, retries=np.int64(3))},
         "ratio": np.float64(7.9), "bar": {"ratio_min": 50, "pass": np.bool_(False)}},
        {"name": "bank_unbatched", "title": "Bank, one transfer per request", "unit": "transfers/s",
         "systems": {"zwallet": system(9_500.0), "postgresql": system(3_100.0, retries=0)},
         "ratio": 3.06, "bar": {"ratio_min": 2, "pass": True}},
        {"name": "hot_batched", "title": "Hot accounts, batched", "unit": "transfers/s",     # --no-pg style
         "systems": {"zwallet": system(350_000.0)}, "ratio": None, "bar": None},
        {"name": "hot_unbatched", "title": "Hot accounts, one transfer per request", "unit": "transfers/s",
         "systems": {"zwallet": system(8_000.0),
                     "postgresql": {"error": "psycopg.errors.SerializationFailure: could not serialize | retry"}},
         "ratio": None, "bar": None},
        {"name": "mixed", "title": "Mixed operations", "unit": "ops/s",
         "systems": {"zwallet": system(float("nan")), "postgresql": system(1_240.0)},
         "ratio": float("nan"), "bar": None},
    ]
    return {
        "meta": {"command": COMMAND, "date": "2026-11-25 12:00 UTC", "quick": True,
                 "machine": {"cores": 2, "cpu": "AMD EPYC 7B13", "python": "3.11.7", "kernel": "6.1.0",
                             "memory_gib": np.float64(23.4)},
                 "elapsed_s": 55.0, "accounts": 1_000_000, "replicas": 3,
                 "postgresql": {"version": "15.5", "settings": {"fsync": "on", "synchronous_commit": "on"}},
                 "notes": ["2-core VM, otherwise idle"]},
        "workloads": workloads,
        "latency": [{"rate_per_s": 1000, "duration_s": 10.0,
                     "systems": {"zwallet": open_loop(1.2), "postgresql": open_loop(3.0)},
                     "bar": {"p99_ms_max": 5.0, "pass": True}},
                    {"rate_per_s": 10_000, "duration_s": 10.0,
                     "systems": {"zwallet": open_loop(4.1, unanswered=3), "postgresql": {"error": "timed out"}},
                     "bar": None}],
        "failover": {"system": "zwallet", "timeline": timeline(300_000.0, 8.0, dip_at=3.0),
                     "events": [{"t_s": 3.0, "label": "kill -9 leader (replica 2)"},
                                {"t_s": 3.45, "label": "new leader commits"},
                                {"t_s": 5.0, "label": "old leader restarted"}],
                     "failover_ms": 450.0, "longest_gap_ms": 950.0, "not_ok": 0},
        "scaling": {"accounts": [{"accounts": n, "per_s": 400_000.0 / (1 + i / 10), "p99_ms": 3.0 + i,
                                  "rss_mib": {"1": 300.0 + 50 * i, "2": 290.0 + 50 * i, "3": 280.0 + 50 * i},
                                  "create_s": 0.1 * 10 ** i} for i, n in enumerate([10_000, 100_000, 1_000_000])],
                    "batch_size": [{"batch": b, "per_s": 5_000.0 * b ** 0.8, "requests_per_s": 5_000.0 / b ** 0.2,
                                    "p99_ms": 3.0 + b / 1000} for b in (1, 10, 100, 1000, 8190)]},
        "anchors": [{"system": "Auticuro", "claim": "p99 < 20 ms at 10K TPS", "hardware": "five 8-vCPU nodes",
                     "ours": "p99 4.1 ms at 10K/s offered on one 2-core VM", "source": "https://example.org"}],
        "bars": [{"what": "bank batched: zwallet >= 50x PostgreSQL", "measured": "7.9x", "pass": False},
                 {"what": "p99 <= 5 ms at 1K/s", "measured": "3.00 ms", "pass": True}],
        "checks": {"zwallet_digests_equal": True, "zwallet_money_conserved": np.bool_(True),
                   "postgresql_money_conserved": True},
        "extra_key_to_ignore": {"whatever": [1, 2, 3]},
    }


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC, path
    assert os.path.getsize(path) > 10_000, path


def test_write_report(res: dict, tmp_path) -> None:
    out = tmp_path / "report"
    paths = report.write_report(res, str(out))

    expected = {"throughput.png", "timeline.png", "failover.png", "latency_cdf.png", "latency_hist.png",
                "scaling.png"}
    assert set(res["plots"]) == expected
    assert sorted(os.path.basename(p) for p in paths["plots"]) == sorted(expected)
    for p in paths["plots"]:
        assert_png(p)

    md = pathlib.Path(paths["markdown"]).read_text()
    for w in res["workloads"]:
        assert w["title"] in md
    assert "7.9x" in md and "3.1x" in md                  # ratios
    assert "**PASS**" in md and "**FAIL**" in md
    assert "377,000" in md and "47,700" in md               # thousands separators
    assert "1.20" in md and "12.5" in md                    # ms: 2 decimals under 10, else 1
    assert "error: psycopg.errors.SerializationFailure" in md
    assert "could not serialize \\| retry" in md             # a pipe in an error does not break the table
    assert "timed out" in md
    assert "| 9,997 / 10,000 | 0 | 4.10 | 6.56 | 10.2 | 16.4 | overloaded |" in md
    assert "| 10,000 / 10,000 | 0 | 1.20 | 1.92 | 3.00 | 4.80 | 10.8 | zwallet p99 < 5.00 ms | **PASS** |" in md
    assert "| 27.0 | - | - |" in md                       # the latency bar is zwallet's: not on PostgreSQL's row
    for name in expected:
        assert f"]({name})" in md
    assert "Auticuro" in md and "kill -9 leader (replica 2)" in md and "300 / 290 / 280" in md

    data = json.loads(pathlib.Path(paths["json"]).read_text())
    assert data["workloads"][0]["systems"]["zwallet"]["per_s"] == 377_000.0
    assert data["workloads"][0]["systems"]["zwallet"]["request_latency_ms"]["p999"] is None   # NaN -> null
    assert data["workloads"][4]["ratio"] is None
    assert data["plots"] == res["plots"]
    assert isinstance(data["latency"][0]["systems"]["zwallet"]["hist"]["counts"], list)


def test_table_rows(res: dict) -> None:
    md = report.render_markdown(res)
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    hot = [c.strip() for c in rows["Hot accounts, batched"].strip("|").split("|")]
    assert hot[2:5] == ["350,000", "-", "-"]               # no PostgreSQL: "-" for its number and the ratio
    mixed = [c.strip() for c in rows["Mixed operations"].strip("|").split("|")]
    assert mixed[2:5] == ["-", "1,240", "-"]             # NaN throughput and ratio
    assert rows["Bank, batched (8190 transfers per request)"].rstrip().endswith(
        "| 7.9x | >= 50x PostgreSQL | **FAIL** |")


def test_results_section(res: dict) -> None:
    text = report.results_section(res, "zwallet bench --write-results")
    assert text.startswith(report.SECTION_BEGIN) and text.endswith(report.SECTION_END)
    assert "`zwallet bench --write-results`" in text
    assert "7.9x" in text and "**FAIL**" in text and "**PASS**" in text
    assert "Auticuro" in text and "2 cores (AMD EPYC 7B13)" in text and "2026-11-25 12:00 UTC" in text
    assert "By number of accounts" in text and "By batch size" in text
    assert "![" not in text
    assert report.SECTION_BEGIN not in report.results_section(res, "x", markers=False)


def test_missing_sections(tmp_path) -> None:
    for res in ({}, {"workloads": [], "meta": {"postgresql": None}},
                {"workloads": [{"name": "w", "systems": {"zwallet": {"error": "boom"}}}], "failover": {"error": "x"},
                 "latency": [{"rate_per_s": 10, "systems": {}}], "scaling": {"accounts": [], "batch_size": []}}):
        paths = report.write_report(res, str(tmp_path / "r"))
        assert paths["plots"] == []
        md = pathlib.Path(paths["markdown"]).read_text()
        assert md.startswith("# zwallet benchmark report")
        assert "](" not in md
        report.results_section(res, COMMAND)
    assert "error: boom" in md


def test_formatting() -> None:
    assert report.fmt_num(1234567.8) == "1,234,568"
    assert report.fmt_num(np.int64(42)) == "42"
    assert report.fmt_num(12.34) == "12.3"
    assert report.fmt_num(None) == report.fmt_num(float("nan")) == report.fmt_num("x") == "-"
    assert report.fmt_ms(1.234) == "1.23" and report.fmt_ms(12.34) == "12.3"
    assert report.fmt_ms(12345.0) == "12,345.0"
    assert report.fmt_ratio(12.345) == "12.3x" and report.fmt_ratio(np.float32(1234.5)) == "1,234.5x"
    assert report.fmt_verdict(None) == "-"
    assert report.jsonable({1: (np.float32(math.inf), np.arange(2))}) == {"1": [None, [0, 1]]}
    assert report.jsonable({"nan": np.array([np.nan, 1.5]), "p": pathlib.Path("/x")}) == {"nan": [None, 1.5], "p": "/x"}


def test_cli_rerenders(res: dict, tmp_path) -> None:
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(report.jsonable(res)))
    assert report.main([str(saved), "--out", str(tmp_path / "b")]) == 0
    md = (tmp_path / "b" / "report.md").read_text()
    assert "![Latency CDF (open loop)](latency_cdf.png)" in md
    assert md == report.render_markdown(json.loads((tmp_path / "b" / "report.json").read_text()))
    assert_png(str(tmp_path / "b" / "latency_cdf.png"))


def test_stall_lines_under_the_latency_table(res: dict) -> None:
    res = report.jsonable(res)
    entry = res["latency"][0]
    entry["systems"]["zwallet"]["stalls"] = {"1": {"raft-snapshot": {"count": 2, "total_ms": 51.5}}, "2": {}}
    lines = report.stall_lines(res)
    assert lines[0].startswith(f"zwallet stalls of 5 ms or more during {report.fmt_num(entry['rate_per_s'])}/s:")
    assert "replica 1: raft-snapshot 2 (51.5 ms); replica 2: none" in lines[0]
    assert lines[0] in report.render_markdown(res) and lines[0] in report.results_section(res, "zwallet bench")
