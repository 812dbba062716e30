"""Markdown report and PNG plots from the results dict of ``zwallet bench`` (bench/suite.py).

``write_report(res, out_dir)`` writes ``report.md``, ``report.json`` and the plots; ``results_section(res, command)``
is the shorter section for bench/RESULTS.md (the caller writes it with ``bench.results.write_section``).
``python -m bench.report results.json --out DIR`` re-renders a report from a saved ``report.json``.

Every part of the results dict may be missing (a workload without PostgreSQL under ``--no-pg``, a run that
failed and carries ``{"error": "..."}``, a section that was not run): it shows as "-" or as the error text and
its plot is skipped. Numpy scalars/arrays and NaN are accepted anywhere; NaN shows as "-" and is ``null`` in
the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")                           # no display; must come before pyplot is imported
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

SYSTEMS = ("zwallet", "postgresql")          # display order; other systems follow, sorted
LABELS = {"zwallet": "zwallet", "postgresql": "PostgreSQL"}
COLORS = {"zwallet": "tab:blue", "postgresql": "tab:orange"}
EVENT_COLORS = ("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")   # the fault first
SECTION_BEGIN = "<!-- suite-bench:begin -->"
SECTION_END = "<!-- suite-bench:end -->"
PLOT_TITLES = {
    "throughput.png": "Throughput per workload",
    "timeline.png": "Throughput over time",
    "failover.png": "Failover under load",
    "latency_cdf.png": "Latency CDF (open loop)",
    "latency_hist.png": "Latency histograms (open loop)",
    "scaling.png": "Scaling with accounts and batch size",
}
NINES_TICKS = [(0.5, "50%"), (0.9, "90%"), (0.99, "99%"), (0.999, "99.9%"), (0.9999, "99.99%"),
               (0.99999, "99.999%")]


# --- values ----------------------------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that json.dumps accepts strictly: numpy -> Python, NaN/inf -> None, tuples and sets ->
    lists, anything else JSON has no type for -> its str()."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def num(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing, not a number, or NaN/inf."""
    if isinstance(x, (bool, np.bool_)) or x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def positive(x: Any) -> bool:
    """``x`` is a finite number above 0."""
    v = num(x)
    return v is not None and v > 0


def series(values: Any) -> np.ndarray:
    """A float array for plotting; missing values become NaN (a gap in a line)."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        values = []
    return np.array([np.nan if num(v) is None else num(v) for v in values], dtype=float)


def fmt_num(x: Any) -> str:
    """Thousands separators; one decimal below 100 unless it is a whole number."""
    f = num(x)
    if f is None:
        return "-"
    if abs(f) >= 100 or f == int(f):
        return f"{f:,.0f}"
    return f"{f:,.1f}"


def fmt_ms(x: Any) -> str:
    """Milliseconds: 2 decimals under 10, else 1."""
    f = num(x)
    if f is None:
        return "-"
    return f"{f:.2f}" if abs(f) < 10 else f"{f:,.1f}"


def fmt_s(x: Any) -> str:
    """Seconds: 2 decimals under 100, else whole seconds."""
    f = num(x)
    if f is None:
        return "-"
    return f"{f:.2f}" if abs(f) < 100 else f"{f:,.0f}"


def fmt_ratio(x: Any) -> str:
    f = num(x)
    return "-" if f is None else f"{f:,.1f}x"


def fmt_verdict(ok: Any) -> str:
    return "-" if ok is None else ("**PASS**" if ok else "**FAIL**")


def cell(text: Any, limit: int = 120) -> str:
    """Text safe inside a Markdown table cell: one line, no bare pipes, at most ``limit`` characters."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[:limit - 3] + "..."


def as_dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def entries(x: Any) -> list[dict]:
    """The dict items of a list (a malformed entry is skipped rather than crashing the report)."""
    return [e for e in x if isinstance(e, dict)] if isinstance(x, list) else []


def texts(x: Any) -> list[str]:
    return [str(t) for t in x] if isinstance(x, list) else ([str(x)] if x else [])


def dig(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...`` or None when any level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def systems_of(entry: dict) -> list[str]:
    """The systems present in a workload or latency entry, in display order."""
    present = {k for k, v in as_dict(entry.get("systems")).items() if isinstance(v, dict)}
    return [s for s in SYSTEMS if s in present] + sorted(present - set(SYSTEMS))


def all_systems(res: dict) -> list[str]:
    """zwallet and PostgreSQL always (their columns show "-" when absent), then any other system seen."""
    seen = {s for entry in entries(res.get("workloads")) + entries(res.get("latency")) for s in systems_of(entry)}
    return list(SYSTEMS) + sorted(seen - set(SYSTEMS))


def label(system: str) -> str:
    return LABELS.get(system, system)


def system_result(entry: dict, system: str) -> tuple[dict | None, str | None]:
    """(the system's numbers, None), (None, error text), or (None, None) when the system did not run."""
    r = dig(entry, "systems", system)
    if not isinstance(r, dict):
        return None, None
    if r.get("error"):
        return None, str(r["error"])
    return r, None


def value_cell(entry: dict, system: str, key: str, fmt=fmt_num) -> str:
    r, err = system_result(entry, system)
    if err is not None:
        return "error: " + cell(err, 60)
    return fmt(r.get(key)) if r else "-"


def ratio_of(w: dict) -> float | None:
    """The workload's ratio; computed from per_s only when the suite did not give the key at all."""
    if "ratio" in w:
        return num(w["ratio"])
    z, _ = system_result(w, "zwallet")
    p, _ = system_result(w, "postgresql")
    zp, pp = num(dig(z, "per_s")), num(dig(p, "per_s"))
    return zp / pp if zp is not None and pp else None


def bar_text(bar: Any) -> str:
    if not isinstance(bar, dict):
        return "-"
    parts = []
    if num(bar.get("ratio_min")) is not None:
        parts.append(f">= {fmt_num(bar['ratio_min'])}x PostgreSQL")
    if num(bar.get("p99_ms_max")) is not None:
        parts.append(f"zwallet p99 < {fmt_ms(bar['p99_ms_max'])} ms")
    parts += [f"{k} {v}" for k, v in bar.items() if k not in ("ratio_min", "p99_ms_max", "pass")]
    return cell("; ".join(parts)) if parts else "-"


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """Markdown table lines; ``align`` has one letter per column, "r" for right-aligned (default left)."""
    spec = ["---:" if i < len(align) and align[i] == "r" else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(spec) + "|"] + ["| " + " | ".join(r) + " |"
                                                                          for r in rows]


# --- Markdown parts shared by the report and the RESULTS.md section ----------------------------------------------
def machine_line(res: dict) -> str:
    meta = as_dict(res.get("meta"))
    m = as_dict(meta.get("machine"))
    parts = []
    if m.get("cores") is not None:
        parts.append(f"{m['cores']} cores" + (f" ({m['cpu']})" if m.get("cpu") else ""))
    if num(m.get("memory_gib")) is not None:
        parts.append(f"{num(m['memory_gib']):.1f} GiB RAM")
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    if m.get("kernel"):
        parts.append(f"Linux {m['kernel']}")
    if meta.get("date"):
        parts.append(str(meta["date"]))
    return "Machine: " + ("; ".join(parts) if parts else "-")


def setup_lines(res: dict) -> list[str]:
    meta = as_dict(res.get("meta"))
    setup = []
    if meta.get("replicas") is not None:
        setup.append(f"zwallet cluster of {meta['replicas']} replicas")
    if num(meta.get("accounts")) is not None:
        setup.append(f"{fmt_num(meta['accounts'])} accounts")
    if meta.get("quick"):
        setup.append("quick run (`--quick`)")
    if num(meta.get("elapsed_s")) is not None:
        setup.append(f"run took {fmt_s(meta['elapsed_s'])} s")
    pg = meta.get("postgresql")
    if isinstance(pg, dict):
        settings = ", ".join(f"{k}={v}" for k, v in as_dict(pg.get("settings")).items())
        pg_text = f"PostgreSQL {pg.get('version', '?')}" + (f" ({settings})" if settings else "")
    else:
        pg_text = "PostgreSQL not run"
    return [f"Setup: {'; '.join(setup) if setup else '-'}; {pg_text}"]


def throughput_table(res: dict) -> list[str]:
    systems = all_systems(res)
    rows = []
    for w in entries(res.get("workloads")):
        bar = w.get("bar")
        rows.append([cell(w.get("title") or w.get("name", "?")), cell(w.get("unit", "-"))]
                    + [value_cell(w, s, "per_s") for s in systems]
                    + [fmt_ratio(ratio_of(w)), bar_text(bar), fmt_verdict(dig(bar, "pass"))])
    header = ["workload", "unit"] + [label(s) for s in systems] + ["ratio", "bar", "verdict"]
    return table(header, rows, "ll" + "r" * (len(systems) + 1)) if rows else ["No workloads were run."]


def unanswered(r: dict) -> float:
    """Requests never answered (the suite's ``unanswered``, else sent minus answered; 0 when unknown)."""
    given = num(r.get("unanswered"))
    if given is not None:
        return given
    sent, answered = num(r.get("requests")), num(r.get("answered"))
    return sent - answered if sent is not None and answered is not None else 0.0


def latency_table(res: dict) -> list[str]:
    """One row per offered rate and system; the rate's bar (about zwallet) on zwallet's row. A percentile that
    is missing while requests went unanswered is one those requests reached (they count as infinitely late):
    it shows as "overloaded"."""
    pcts = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
    rows = []
    for entry in entries(res.get("latency")):
        rate = fmt_num(entry.get("rate_per_s"))
        for s in systems_of(entry) or ["-"]:
            bar = entry.get("bar") if s == "zwallet" else None
            r, err = system_result(entry, s)
            if err is not None:
                rows.append([rate, label(s), "error: " + cell(err, 80)] + ["-"] * (2 + len(pcts))
                            + [bar_text(bar), fmt_verdict(False) if bar else "-"])
                continue
            r = r or {}
            answered = f"{fmt_num(r.get('answered'))} / {fmt_num(r.get('requests'))}"
            missing = "overloaded" if unanswered(r) > 0 else "-"
            rows.append([rate, label(s), fmt_num(r.get("achieved_per_s")), answered, fmt_num(r.get("not_ok"))]
                        + [fmt_ms(r.get(k)) if num(r.get(k)) is not None else missing for k in pcts]
                        + [bar_text(bar), fmt_verdict(dig(bar, "pass"))])
    header = ["offered /s", "system", "achieved /s", "answered / sent", "not OK", "p50 ms", "p90 ms", "p99 ms",
              "p99.9 ms", "max ms", "bar", "verdict"]
    return table(header, rows, "rlrrrrrrrr") if rows else []


def stall_lines(res: dict) -> list[str]:
    """Under the latency table: the pauses of 5 ms or more each zwallet replica recorded during each rate's
    run (engine/stalls.py), the usual cause of a tail."""
    out = []
    for entry in entries(res.get("latency")):
        r, err = system_result(entry, "zwallet")
        stalls = as_dict(r).get("stalls") if err is None else None
        if not isinstance(stalls, dict):
            continue
        parts = []
        for node, by_cause in sorted(stalls.items(), key=lambda kv: str(kv[0])):
            causes = [f"{c} {fmt_num(v.get('count'))} ({fmt_num(v.get('total_ms'))} ms)"
                      for c, v in sorted(as_dict(by_cause).items()) if isinstance(v, dict)]
            parts.append(f"replica {node}: {', '.join(causes) or 'none'}")
        out.append(f"zwallet stalls of 5 ms or more during {fmt_num(entry.get('rate_per_s'))}/s: "
                   + "; ".join(parts) + "  ")
    return out + [""] if out else []


def rss_text(rss: Any) -> str:
    if not isinstance(rss, dict) or not rss:
        return "-"
    return " / ".join(fmt_num(v) for _, v in sorted(rss.items(), key=lambda kv: str(kv[0])))


def scaling_tables(res: dict) -> list[str]:
    sc = as_dict(res.get("scaling"))
    lines: list[str] = []
    acc = entries(sc.get("accounts"))
    if acc:
        rows = [[fmt_num(a.get("accounts")), fmt_num(a.get("per_s")), fmt_ms(a.get("p99_ms")),
                 rss_text(a.get("rss_mib")), fmt_s(a.get("create_s"))] for a in acc]
        rates = {fmt_num(a.get("p99_at_rate_per_s")) for a in acc} - {"-"}
        lines += ["By number of accounts" + (f" (p99 at {', '.join(sorted(rates))}/s offered)" if rates else "")
                  + ":", ""]
        lines += table(["accounts", "transfers/s", "p99 ms", "RSS per replica MiB", "create s"], rows, "rrrrr")
        lines.append("")
    bs = entries(sc.get("batch_size"))
    if bs:
        rows = [[fmt_num(b.get("batch")), fmt_num(b.get("per_s")), fmt_num(b.get("requests_per_s")),
                 fmt_ms(b.get("p99_ms"))] for b in bs]
        lines += ["By batch size (transfers per request):", ""]
        lines += table(["batch", "transfers/s", "requests/s", "p99 ms"], rows, "rrrr")
        lines.append("")
    return lines


def anchors_table(res: dict) -> list[str]:
    rows = [[cell(a.get(k, "-")) for k in ("system", "claim", "hardware", "ours", "source")]
            for a in entries(res.get("anchors"))]
    return table(["system", "their claim", "their hardware", "zwallet here", "source"], rows) if rows else []


def bars_table(res: dict) -> list[str]:
    rows = [[cell(b.get("what", "-")), cell(b.get("measured", "-")), fmt_verdict(b.get("pass"))]
            for b in entries(res.get("bars"))]
    return table(["bar", "measured", "verdict"], rows, "lr") if rows else []


def failover_lines(res: dict) -> list[str]:
    fo = res.get("failover")
    if not isinstance(fo, dict):
        return []
    if fo.get("error"):
        return [f"Failover ({fo.get('system', 'zwallet')}): error: {cell(fo['error'], 300)}"]
    events = "; ".join(f"{fmt_s(e.get('t_s'))} s {e.get('label', '')}" for e in entries(fo.get("events")))
    return [f"Failover ({fo.get('system', 'zwallet')}, kill -9 the leader under load): failover "
            f"**{fmt_ms(fo.get('failover_ms'))} ms**, longest gap between replies {fmt_ms(fo.get('longest_gap_ms'))} "
            f"ms, {fmt_num(fo.get('not_ok'))} not OK" + (f"; events: {events}" if events else "")]


def checks_lines(res: dict) -> list[str]:
    checks = as_dict(res.get("checks"))
    return [f"- {k.replace('_', ' ')}: {fmt_verdict(v) if isinstance(v, bool) else cell(v)}"
            for k, v in checks.items()]


# --- the full report -----------------------------------------------------------------------------------------
def workload_details(w: dict) -> list[str]:
    lines = [f"### {w.get('title') or w.get('name', '?')}", ""]
    if w.get("description"):
        lines += [str(w["description"]), ""]
    rows = []
    for s in systems_of(w):
        r, err = system_result(w, s)
        if err is not None:
            lines += [f"{label(s)}: error: `{cell(err, 2000)}`", ""]
            continue
        if r is None:                    # not run (systems_of lists only those with a result)
            continue
        lat = as_dict(r.get("request_latency_ms"))
        cpu = as_dict(r.get("cpu_cores"))
        cpu_text = ", ".join(f"{k} {num(v):.2f}" for k, v in cpu.items() if num(v) is not None) or "-"
        rows.append([label(s), fmt_num(r.get("per_s")), fmt_num(r.get("ops")),
                     fmt_s(r.get("wall_s")), fmt_num(r.get("not_ok")),
                     fmt_num(r.get("retries")), fmt_num(r.get("connections"))]
                    + [fmt_ms(lat.get(k)) for k in ("p50", "p99", "p999", "max")] + [cpu_text])
    if rows:
        header = ["system", f"{w.get('unit', 'ops/s')}", "ops", "wall s", "not OK", "retries", "connections",
                  "p50 ms", "p99 ms", "p99.9 ms", "max ms", "CPU cores"]
        lines += table(header, rows, "lrrrrrrrrrr") + [""]
    if not systems_of(w):
        lines += ["No system ran this workload.", ""]
    return lines


def render_markdown(res: dict) -> str:
    """The whole report: setup, throughput, latency, failover, scaling, anchors, bars, checks, plots."""
    res = jsonable(res)
    meta = as_dict(res.get("meta"))
    lines = ["# zwallet benchmark report", ""]
    if meta.get("command"):
        lines.append(f"Command: `{meta['command']}`  ")
    lines += [machine_line(res) + "  "] + setup_lines(res) + [""]
    for note in texts(meta.get("notes")):
        lines.append(f"> {note}")
    if meta.get("notes"):
        lines.append("")

    plots = texts(res.get("plots"))

    def plot_link(name: str) -> list[str]:
        return [f"![{PLOT_TITLES.get(name, name)}]({name})", ""] if name in plots else []

    lines += ["## Throughput", ""] + throughput_table(res) + [""] + plot_link("throughput.png")
    for w in entries(res.get("workloads")):
        lines += workload_details(w)
    lines += plot_link("timeline.png")

    if res.get("latency"):
        lines += ["## Latency (open loop, one transfer per request)", "",
                  ("Each request's latency runs from its due time, so a late sender counts against the system "
                   "(no coordinated omission)."), ""]
        lines += latency_table(res) + [""] + stall_lines(res) + plot_link("latency_cdf.png") \
            + plot_link("latency_hist.png")
    if failover_lines(res):
        lines += ["## Failover", ""] + failover_lines(res) + [""] + plot_link("failover.png")
    if scaling_tables(res):
        lines += ["## Scaling", ""] + scaling_tables(res) + plot_link("scaling.png")
    if anchors_table(res):
        lines += ["## Published figures of other systems (anchors)", ""] + anchors_table(res) + [""]
    if bars_table(res):
        lines += ["## Bars", ""] + bars_table(res) + [""]
    if checks_lines(res):
        lines += ["## Checks", ""] + checks_lines(res) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def results_section(res: dict, command: str, markers: bool = True) -> str:
    """The section for bench/RESULTS.md; with ``markers`` it starts with SECTION_BEGIN and ends with
    SECTION_END, as ``bench.results.write_section(SECTION_BEGIN, SECTION_END, text)`` expects."""
    res = jsonable(res)
    lines = ["## zwallet cluster vs PostgreSQL (zwallet bench)", "", f"Command: `{command}`  ",
             machine_line(res) + "  "] + setup_lines(res) + [""]
    lines += throughput_table(res) + [""]
    if latency_table(res):
        lines += ["Latency, open loop, one transfer per request:", ""] + latency_table(res) + [""]
        lines += stall_lines(res)
    lines += failover_lines(res) + ([""] if failover_lines(res) else [])
    lines += scaling_tables(res)
    if anchors_table(res):
        lines += ["Anchors (published figures of other systems, on their hardware):", ""] + anchors_table(res) + [""]
    if bars_table(res):
        lines += ["Bars:", ""] + bars_table(res) + [""]
    if checks_lines(res):
        lines += checks_lines(res) + [""]
    for note in texts(as_dict(res.get("meta")).get("notes")):
        lines.append(f"{note}  ")
    text = "\n".join(lines).rstrip("\n") + "\n"
    return f"{SECTION_BEGIN}\n{text}\n{SECTION_END}" if markers else text


# --- plots ---------------------------------------------------------------------------------------------------
def figure(title: str, panels: int, ncols: int = 2, panel_size: tuple[float, float] = (6.0, 4.0)):
    """A titled figure with ``panels`` axes in a grid (unused grid cells removed); returns (fig, axes list)."""
    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows + 0.6),
                             squeeze=False)
    axes = list(grid.flat)
    for ax in axes[panels:]:
        fig.delaxes(ax)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    for ax in axes[:panels]:
        ax.grid(True, which="major", alpha=0.3)
    return fig, axes[:panels]


def tick_text(v: float) -> str:
    """Short axis tick labels: 0.5, 2, 5,000, 400K, 2.5M."""
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:g}K"
    return f"{v:,.0f}" if abs(v) >= 1 else f"{v:g}"


def thousands(ax, which: str = "y") -> None:
    """Linear axis ticks as 5,000 / 400K rather than 400000 or 4e5."""
    getattr(ax, f"{which}axis").set_major_formatter(FuncFormatter(lambda v, _: tick_text(v)))


def log_axis(ax, which: str = "x") -> None:
    """Log scale with plain tick labels (0.5, 1, 10, 1,000); the minor ticks 2 and 5 are labelled too when the
    axis spans fewer than ~2.5 decades, and all minor ticks when it spans less than ~half a decade, so a narrow
    range still has readable ticks."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")

    def minor(v: float, _pos) -> str:
        lo, hi = getattr(ax, f"get_{which}lim")()
        lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        span = hi / lo if lo > 0 else math.inf
        return tick_text(v) if span < 4 or (span < 300 and lead in (2, 5)) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: tick_text(v)))
    axis.set_minor_formatter(FuncFormatter(minor))


def legend(ax, **kw) -> None:
    """A legend, unless nothing labelled was drawn (a panel whose data was all unusable)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def timeline_of(r: Any) -> tuple[np.ndarray, np.ndarray] | None:
    t, y = series(dig(r, "timeline", "t_s")), series(dig(r, "timeline", "per_s"))
    n = min(len(t), len(y))
    return (t[:n], y[:n]) if n else None


def plot_throughput(res: dict, out_dir: str) -> str | None:
    workloads = entries(res.get("workloads"))
    systems = all_systems(res)
    values = [[num(dig(system_result(w, s)[0], "per_s")) for s in systems] for w in workloads]
    if not any(v is not None and v > 0 for row in values for v in row):
        return None
    fig, (ax,) = figure("Throughput per workload (zwallet vs PostgreSQL)", 1,
                        panel_size=(max(7.0, 1.9 * len(workloads)), 5.0))
    width = 0.8 / len(systems)
    for j, s in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(workloads))]
        hs = [x if (x := v[j]) is not None and x > 0 else np.nan for v in values]
        bars = ax.bar(xs, hs, width, label=label(s), color=COLORS.get(s))
        for x, h, w in zip(xs, hs, workloads):
            if np.isnan(h):     # not run, failed, or zero: say so at the bottom of the chart
                _, err = system_result(w, s)
                ax.annotate("error" if err else "not run", (x, 0), xycoords=("data", "axes fraction"),
                            xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8, color="gray")
        ax.bar_label(bars, labels=[fmt_num(h) if not np.isnan(h) else "" for h in hs], fontsize=7, padding=1)
    for i, w in enumerate(workloads):
        top = max((v for v in values[i] if v is not None and v > 0), default=None)
        if top is not None and ratio_of(w) is not None:
            ax.annotate(fmt_ratio(ratio_of(w)), (i, top), xytext=(0, 14), textcoords="offset points", ha="center",
                        fontsize=10, fontweight="bold")
    log_axis(ax, "y")
    ax.margins(y=0.25)
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([f"{w.get('name', '?')}\n({w.get('unit', 'ops/s')})" for w in workloads], fontsize=8)
    ax.set_ylabel("throughput per second (log scale)")
    legend(ax)
    return save(fig, out_dir, "throughput.png")


def plot_timelines(res: dict, out_dir: str) -> str | None:
    panels = [w for w in entries(res.get("workloads"))
              if any(timeline_of(system_result(w, s)[0]) for s in systems_of(w))]
    if not panels:
        return None
    fig, axes = figure("Throughput over time, per workload", len(panels))
    for ax, w in zip(axes, panels):
        for s in systems_of(w):
            tl = timeline_of(system_result(w, s)[0])
            if tl:
                ax.plot(*tl, label=label(s), color=COLORS.get(s), drawstyle="steps-post")
        ax.set_title(w.get("title") or w.get("name", "?"), fontsize=10)
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel(w.get("unit", "ops/s"))
        ax.set_ylim(bottom=0)
        thousands(ax)
        legend(ax, fontsize=8)
    return save(fig, out_dir, "timeline.png")


def plot_failover(res: dict, out_dir: str) -> str | None:
    fo = res.get("failover")
    if not isinstance(fo, dict):
        return None
    tl = timeline_of(fo)
    if not tl:
        return None
    system = str(fo.get("system") or "zwallet")
    fig, (ax,) = figure(f"Failover under load ({label(system)}): failover {fmt_ms(fo.get('failover_ms'))} ms, "
                        f"longest gap {fmt_ms(fo.get('longest_gap_ms'))} ms", 1, panel_size=(10.0, 4.5))
    ax.plot(*tl, color=COLORS.get(system, "tab:blue"), drawstyle="steps-post", label=f"{label(system)} throughput")
    ax.set_ylim(bottom=0)
    thousands(ax)
    events = [e for e in entries(fo.get("events")) if num(e.get("t_s")) is not None]
    for k, e in enumerate(events):
        color = EVENT_COLORS[k % len(EVENT_COLORS)]
        ax.axvline(num(e["t_s"]), color=color, linestyle="--", linewidth=1.2)
        ax.annotate(str(e.get("label", "")), (num(e["t_s"]), 0.97 - 0.09 * (k % 3)),   # staggered, not overlapping
                    xycoords=("data", "axes fraction"), xytext=(3, 0), textcoords="offset points", fontsize=8,
                    color=color, va="top",
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 0.85})
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("transfers/s")
    legend(ax, loc="lower right", fontsize=8)
    return save(fig, out_dir, "failover.png")


def latency_entries(res: dict, key: str) -> list[dict]:
    """Latency entries with at least one system that has the given curve (``cdf`` or ``hist``)."""
    return [e for e in entries(res.get("latency")) if any(dig(system_result(e, s)[0], key) for s in systems_of(e))]


def rate_title(entry: dict) -> str:
    return f"offered {fmt_num(entry.get('rate_per_s'))} requests/s"


def nines(q: np.ndarray) -> np.ndarray:
    """Percentile on the "nines" scale: -log10(1 - q); 0.99 -> 2, 0.999 -> 3. q = 1 becomes inf."""
    with np.errstate(divide="ignore"):
        return -np.log10(1.0 - np.clip(q, 0.0, 1.0))


def plot_latency_cdf(res: dict, out_dir: str) -> str | None:
    rates = latency_entries(res, "cdf")
    if not rates:
        return None
    fig, axes = figure("Latency CDF, open loop, one transfer per request", len(rates))
    for ax, e in zip(axes, rates):
        curves = []
        for s in systems_of(e):
            cdf = as_dict(dig(system_result(e, s)[0], "cdf"))
            q, ms = series(cdf.get("q")), series(cdf.get("ms"))
            n = min(len(q), len(ms))
            if n:
                curves.append((s, nines(q[:n]), np.clip(ms[:n], 1e-3, None)))
        finite = [y[np.isfinite(y)].max() for _, y, _ in curves if np.isfinite(y).any()]
        top = math.ceil(max(finite, default=0.0) - 1e-6) + 1       # q = 1 (the maximum) is drawn one nine higher
        for s, y, ms in curves:
            ax.plot(ms, np.where(np.isfinite(y), y, top), marker="o", markersize=3, label=label(s),
                    color=COLORS.get(s))
        ticks = [(nines(np.array(q))[()], t) for q, t in NINES_TICKS if nines(np.array(q))[()] < top]
        ax.set_yticks([t for t, _ in ticks] + [top], [t for _, t in ticks] + ["max"])
        ax.set_ylim(0, top + 0.2)
        log_axis(ax)
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("percentile")
        ax.set_title(rate_title(e), fontsize=10)
        legend(ax, fontsize=8, loc="upper left")
    return save(fig, out_dir, "latency_cdf.png")


def plot_latency_hist(res: dict, out_dir: str) -> str | None:
    rates = latency_entries(res, "hist")
    if not rates:
        return None
    fig, axes = figure("Latency histograms, open loop, one transfer per request", len(rates))
    for ax, e in zip(axes, rates):
        for s in systems_of(e):
            hist = as_dict(dig(system_result(e, s)[0], "hist"))
            edges, counts = series(hist.get("edges_ms")), np.nan_to_num(series(hist.get("counts")))
            if len(counts) and len(edges) == len(counts) + 1 and np.all(np.diff(edges) > 0):   # NaN fails too
                ax.stairs(counts, np.clip(edges, 1e-3, None), fill=True, alpha=0.35, color=COLORS.get(s))
                ax.stairs(counts, np.clip(edges, 1e-3, None), label=label(s), color=COLORS.get(s), linewidth=1.2)
        log_axis(ax)
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("requests per bin")
        ax.set_title(rate_title(e), fontsize=10)
        legend(ax, fontsize=8)
    return save(fig, out_dir, "latency_hist.png")


def scaling_panel(ax, rows: list[dict], x_key: str, xlabel: str, title: str, rss: bool) -> None:
    """Throughput (left axis, log) and p99 (right axis) against ``x_key`` on a log x-axis; RSS per replica
    written along the bottom of the panel under each point."""
    rows = [r for r in rows if positive(r.get(x_key))]
    xs = series([r[x_key] for r in rows])
    ax.plot(xs, series([r.get("per_s") for r in rows]), marker="o", color="tab:blue", label="transfers/s")
    if any(num(r.get("requests_per_s")) is not None for r in rows):
        ax.plot(xs, series([r.get("requests_per_s") for r in rows]), marker="s", linestyle=":", color="tab:cyan",
                label="requests/s")
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.margins(x=0.15, y=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("per second (log scale)")
    ax.set_title(title, fontsize=10)
    ax2 = ax.twinx()
    ax2.plot(xs, series([r.get("p99_ms") for r in rows]), marker="^", linestyle="--", color="tab:red",
             label="p99 latency")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_ylim(bottom=0)
    ax2.margins(y=0.3)
    if rss:
        for x, r in zip(xs, rows):
            if rss_text(r.get("rss_mib")) != "-":
                ax.annotate(f"RSS/replica\n{rss_text(r['rss_mib'])} MiB", (x, 0.02), xycoords=("data", "axes fraction"),
                            ha="center", va="bottom", fontsize=7, color="dimgray")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")


def plot_scaling(res: dict, out_dir: str) -> str | None:
    sc = as_dict(res.get("scaling"))
    panels = [(entries(sc.get("accounts")), "accounts", "accounts (log scale)", "vs number of accounts", True),
              (entries(sc.get("batch_size")), "batch", "transfers per request (log scale)", "vs batch size", False)]
    panels = [p for p in panels if p[0]]
    if not panels:
        return None
    fig, axes = figure("Scaling: throughput and p99 latency", len(panels))
    for ax, (rows, key, xlabel, title, rss) in zip(axes, panels):
        scaling_panel(ax, rows, key, xlabel, title, rss)
    return save(fig, out_dir, "scaling.png")


PLOTTERS = (plot_throughput, plot_timelines, plot_failover, plot_latency_cdf, plot_latency_hist, plot_scaling)


def make_plots(res: dict, out_dir: str) -> list[str]:
    """Write the PNGs whose data is present into ``out_dir``; return their file names. A plot that fails on
    malformed data is skipped with a warning on stderr, so the report is still written."""
    res = jsonable(res)
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for plot in PLOTTERS:
        try:
            name = plot(res, out_dir)
        except Exception as exc:  # noqa: BLE001 - one bad plot must not lose the report
            plt.close("all")
            print(f"bench.report: {plot.__name__} skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if name:
            names.append(name)
    return names


def write_report(res: dict, out_dir: str) -> dict[str, Any]:
    """Write plots, ``report.md`` and ``report.json`` into ``out_dir``; sets ``res["plots"]``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    res["plots"] = make_plots(res, out_dir)
    md_path, json_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.json")
    with open(md_path, "w") as f:
        f.write(render_markdown(res))
    with open(json_path, "w") as f:
        json.dump(jsonable(res), f, indent=1, allow_nan=False)
        f.write("\n")
    return {"markdown": md_path, "json": json_path, "plots": [os.path.join(out_dir, p) for p in res["plots"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results JSON file (e.g. a report.json written by zwallet bench)")
    p.add_argument("--out", help="output directory (default: the results file's directory)")
    args = p.parse_args(argv)
    with open(args.results) as f:
        res = json.load(f)
    paths = write_report(res, args.out or os.path.dirname(os.path.abspath(args.results)))
    print(f"markdown: {paths['markdown']}\njson: {paths['json']}")
    for path in paths["plots"]:
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
