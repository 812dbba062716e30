"""What CURVE costs, side by side in one run: the same 3-replica shard (fsync on, loopback) with CURVE on
(the default: every socket authenticated and encrypted, rights checked per request) and off (``insecure``),
driven the same way, in alternating rounds (secure, insecure, insecure, secure, ...) so drift on a shared
machine hits both alike.

    python -m bench.bench_curve                  # 2 rounds of each (about 3 minutes on 2 cores)
    python -m bench.bench_curve --quick          # 1 round of each, shorter phases
    python -m bench.bench_curve --write-results  # also replace the CURVE section of bench/RESULTS.md

Each round starts a fresh ``NodeCluster(3)`` (engine/devtools/cluster.py), creates ``--accounts`` accounts,
then measures (bench/bench_node.py's load generators, with the round's client keys):
1. batched throughput: ``--connections`` clients x ``--inflight`` batches of 8190 transfers in flight;
   transfers/s per ``--window-s`` window, the median window;
2. unbatched throughput: the same, one transfer per request (the server's group commit still batches
   them into log entries: this is the per-message cost, where CURVE's per-frame crypto shows most);
3. latency at 10K/s: one-transfer requests offered open-loop at ``--rate`` (a bare DEALER to the leader,
   CURVE client when secure), p50 and p99 from each request's due time.
   Then the same at ``--low-rate`` (2K/s): on a busy shared machine 10K/s can be past what the shard
   serves in either mode, and the cost then drowns in queueing; the lower rate shows it unqueued.
Reported: the median over rounds of each number, per mode, and secure vs insecure. Bar (issue 15): batched
throughput within 15% of insecure, and p50 at 10K/s within 0.5 ms of insecure.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from bench import bench_node as BN
from bench.results import write_section
from engine.client import Client
from engine.devtools.cluster import NodeCluster

SECTION_BEGIN = "<!-- bench_curve:begin -->"
SECTION_END = "<!-- bench_curve:end -->"
DEFAULTS = dict(accounts=20_000, connections=2, inflight=4, warmup_s=2.0, window_s=2.0, windows=5,
                unbatched_connections=8, unbatched_inflight=64, latency_s=6.0, latency_warmup_s=1.0,
                rate=10_000, low_rate=2_000, rounds=2)
QUICK = dict(accounts=5_000, warmup_s=1.0, window_s=1.0, windows=3, latency_s=3.0, rounds=1)
BATCHED_BAR = 0.15            # secure batched throughput may be at most 15% below insecure
P50_BAR_MS = 0.5              # secure p50 at 10K/s may be at most 0.5 ms above insecure


def one_round(secure: bool, base: str, args: argparse.Namespace, k: int) -> dict[str, Any]:
    mode = "secure" if secure else "insecure"
    cluster = NodeCluster(3, f"{base}/{mode}-{k}", insecure=not secure)
    keys = cluster.client_keys
    try:
        cluster.start()
        ids = BN.Ids()
        with Client(cluster.client_addresses, keys=keys, timeout_s=60) as c:
            BN.create_accounts(c, args.accounts)
        out: dict[str, Any] = {"mode": mode}
        for name, n, conns, inflight in (("batched", BN.BATCH_RECORDS, args.connections, args.inflight),
                                         ("unbatched", 1, args.unbatched_connections, args.unbatched_inflight)):
            load = BN.BatchLoad(cluster.client_addresses, args.accounts, ids, conns, inflight, keys=keys,
                                batch_records=n)
            load.start()
            try:
                t_start = time.perf_counter() + args.warmup_s
                windows = []
                for w in range(args.windows):
                    t_end = t_start + (w + 1) * args.window_s
                    time.sleep(max(0.0, t_end - time.perf_counter()))
                    windows.append(load.records_between(t_end - args.window_s, t_end) / args.window_s)
            finally:
                load.stop()
            bad = sum(b for _, _, b in load.completions)
            if bad:
                raise RuntimeError(f"{mode} {name}: {bad} transfers not OK")
            out[f"{name}_per_s"] = statistics.median(windows)
            out[f"{name}_errors"] = len(load.errors)      # a connection whose call timed out stopped (reported)
            if load.errors:
                print(f"  {mode} {name}: {len(load.errors)} connection(s) stopped: {load.errors[0]}", flush=True)
            print(f"  {mode} round {k + 1}: {name} {out[f'{name}_per_s']:,.0f} transfers/s "
                  f"(windows {', '.join(f'{x:,.0f}' for x in windows)})", flush=True)
        for key, rate in (("", args.rate), ("low_", args.low_rate)):
            time.sleep(1.0)                               # the load's writeback settles before latency
            lat = latency(cluster, keys, ids, args, rate)
            out.update({f"{key}p50_ms": lat["p50_ms"], f"{key}p99_ms": lat["p99_ms"],
                        f"{key}not_ok": lat["not_ok"]})
            print(f"  {mode} round {k + 1}: {rate:,}/s p50 {lat['p50_ms']:.3f} ms p99 {lat['p99_ms']:.3f} ms"
                  + (f" ({lat['not_ok']} not OK)" if lat["not_ok"] else ""), flush=True)
        return out
    finally:
        cluster.close()


def leader_address(cluster: NodeCluster, keys: Any) -> str:
    with Client(cluster.client_addresses, keys=keys, timeout_s=30) as c:
        for _ in range(300):
            for i in cluster.ids:
                try:
                    if c.status(node=i - 1)["role"] == "leader":
                        return cluster.client_addr[i]
                except Exception:  # noqa: BLE001 - a replica busy or electing: ask again
                    pass
            time.sleep(0.1)
    raise RuntimeError("no leader")


def latency(cluster: NodeCluster, keys: Any, ids: BN.Ids, args: argparse.Namespace, rate: int) -> dict[str, Any]:
    """run_latency at the leader; once more if a leader change during it made replies NOT_LEADER (an
    election on an overloaded machine), so the numbers are of transfers that were applied."""
    for _ in range(2):
        lat = BN.run_latency(leader_address(cluster, keys), ids, args, rate, keys=keys)
        if not lat["not_ok"] and lat["answered"] == lat["requests"]:
            break
    return lat


def render(rounds: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    med = {m: {k: statistics.median(r[k] for r in rounds if r["mode"] == m)
               for k in ("batched_per_s", "unbatched_per_s", "p50_ms", "p99_ms", "low_p50_ms", "low_p99_ms")}
           for m in ("secure", "insecure")}
    s, i = med["secure"], med["insecure"]
    batched_cost = 1 - s["batched_per_s"] / i["batched_per_s"]
    unbatched_cost = 1 - s["unbatched_per_s"] / i["unbatched_per_s"]
    p50_cost = s["p50_ms"] - i["p50_ms"]
    ok_b, ok_p = batched_cost < BATCHED_BAR, p50_cost < P50_BAR_MS
    mi = BN.machine_info()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = (f"Command: `{command}` ({when}; {mi.get('cpus', '?')} CPUs, load average "
            f"{mi.get('loadavg_1_5_15', '?')})")
    setup = (f"3 replicas, fsync, loopback, {args.accounts:,} accounts; {args.rounds} round(s) of each mode, "
             f"alternating; medians over rounds (each round's throughput: the median of {args.windows} windows "
             f"of {args.window_s:g} s).")
    rows = [
        (f"batched throughput (8190/request, {args.connections}x{args.inflight} in flight)",
         f"{s['batched_per_s']:,.0f}/s", f"{i['batched_per_s']:,.0f}/s",
         f"{100 * batched_cost:+.1f}% ({'meets' if ok_b else 'MISSES'} < 15%)"),
        (f"unbatched throughput (1/request, {args.unbatched_connections}x{args.unbatched_inflight} in flight)",
         f"{s['unbatched_per_s']:,.0f}/s", f"{i['unbatched_per_s']:,.0f}/s", f"{100 * unbatched_cost:+.1f}%"),
        (f"p50 at {args.rate:,}/s (open loop)", f"{s['p50_ms']:.3f} ms", f"{i['p50_ms']:.3f} ms",
         f"{p50_cost:+.3f} ms ({'meets' if ok_p else 'MISSES'} < 0.5 ms)"),
        (f"p99 at {args.rate:,}/s", f"{s['p99_ms']:.3f} ms", f"{i['p99_ms']:.3f} ms",
         f"{s['p99_ms'] - i['p99_ms']:+.3f} ms"),
        (f"p50 at {args.low_rate:,}/s", f"{s['low_p50_ms']:.3f} ms", f"{i['low_p50_ms']:.3f} ms",
         f"{s['low_p50_ms'] - i['low_p50_ms']:+.3f} ms"),
        (f"p99 at {args.low_rate:,}/s", f"{s['low_p99_ms']:.3f} ms", f"{i['low_p99_ms']:.3f} ms",
         f"{s['low_p99_ms'] - i['low_p99_ms']:+.3f} ms"),
    ]
    stopped = sum(r["batched_errors"] + r["unbatched_errors"] for r in rounds)
    every = "; ".join(f"{r['mode']} {r['batched_per_s']:,.0f} / {r['unbatched_per_s']:,.0f} /s, "
                      f"p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms"
                      + (f" ({r['not_ok']} not OK)" if r["not_ok"] else "") for r in rounds)
    lines = [SECTION_BEGIN, "## CURVE cost, side by side (issue 15)", "", head, "", setup, "",
             "| | CURVE on (default) | insecure | cost |", "|---|---:|---:|---:|",
             *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows), "",
             f"Every round (batched / unbatched transfers/s, latency at {args.rate:,}/s): {every}.",
             *([f"Load connections stopped by a timed-out call: {stopped} (their windows count less)."]
               if stopped else []), SECTION_END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CURVE on vs off, side by side (3 node processes, fsync, loopback)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write-results", action="store_true", help="replace the CURVE section of bench/RESULTS.md")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None)
    args = p.parse_args(argv)
    for k, v in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    base = tempfile.mkdtemp(prefix="zwallet-bench-curve-")
    rounds: list[dict[str, Any]] = []
    try:
        order: list[tuple[bool, int]] = []
        for rnd in range(args.rounds):
            order += [(True, rnd), (False, rnd)] if rnd % 2 == 0 else [(False, rnd), (True, rnd)]
        for secure, rnd in order:
            rounds.append(one_round(secure, base, args, rnd))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    command = "python -m bench.bench_curve" + ("" if argv is None and len(sys.argv) < 2 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    text = render(rounds, args, command.strip())
    print("\n" + text)
    if args.write_results:
        write_section(SECTION_BEGIN, SECTION_END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
