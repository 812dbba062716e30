"""Raft benchmark: 3 real replicas on loopback with fsync, PySyncObj side by side, failover time.

    python -m bench.bench_raft            # full run (~3-4 minutes on 2 cores)
    python -m bench.bench_raft --quick    # smoke run (~1 minute)
    python -m bench.bench_raft --write-results   # also replace the Raft section of bench/RESULTS.md

Measures, in one run on the same machine:
1. committed entries/s and MB/s for small entries (128 B, one counter increment each; proposals pipelined:
   many requests in flight, several entries per request, group-committed by the driver);
2. committed operations/s when the client batches increments into entries (``--ops-per-entry`` records of
   8 bytes per entry, the way the ledger packs operations into one log entry);
3. committed entries/s and MB/s for 1 MiB entries;
4. the leader's CPU cost per entry in the simulator (``engine.raft.sim``), if the simulator provides it;
5. PySyncObj 0.3 (from PyPI) replicating a counter on 3 local processes, pipelined the same way; ratio of
   our committed operations/s to its, PASS when >= 10x;
6. failover: time from kill -9 of the leader to the first commit acknowledged by the new leader, over
   ``--failovers`` runs (median, p90; the bar is a median under 1 s).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any


from bench.results import write_section
from engine.devtools.local_raft import ClusterClient, LocalCluster, free_ports
from engine.devtools.counter_app import counter_entry

SECTION_BEGIN = "<!-- raft-bench:begin -->"
SECTION_END = "<!-- raft-bench:end -->"


# --- our cluster -----------------------------------------------------------------------------------------
def pipelined_load(client: ClusterClient, leader: int, entry: bytes, entries_per_request: int,
                   inflight: int, seconds: float) -> dict[str, float]:
    """Keep `inflight` propose requests outstanding at the leader for `seconds`; count acknowledged entries."""
    sock = client.socks[leader]
    payloads = [entry] * entries_per_request
    outstanding: dict[bytes, float] = {}
    acked = 0
    errors = 0
    latencies = []
    t0 = time.monotonic()
    end = t0 + seconds
    while True:
        now = time.monotonic()
        while now < end and len(outstanding) < inflight:
            outstanding[client.send(leader, b"P", payloads)] = now
        if not outstanding:
            break
        if not sock.poll(max(1, int((end - now) * 1000)) if now < end else 5000):
            break
        for key, status, _body in client.take_replies(leader):
            sent = outstanding.pop(key, None)
            if sent is None:
                continue
            if status == b"OK":
                acked += entries_per_request
                latencies.append(time.monotonic() - sent)
            else:
                errors += 1
    elapsed = time.monotonic() - t0
    latencies.sort()
    return {"entries": acked, "seconds": elapsed, "entries_per_s": acked / elapsed,
            "mb_per_s": acked * len(entry) / elapsed / 1e6, "errors": errors,
            "latency_ms_p50": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
            "latency_ms_p99": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan")}


def run_throughput(args: argparse.Namespace, base: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with LocalCluster(3, os.path.join(base, "tput"), snapshot_threshold=args.snapshot_threshold,
                      map_size_gib=64) as cluster:
        cluster.start()
        client = ClusterClient(cluster.client_addr)
        try:
            leader = client.find_leader(timeout_s=30)
            warm = pipelined_load(client, leader, counter_entry([1], 128), 16, 8, 1.0)
            assert warm["entries"] > 0, f"warm-up committed nothing: {cluster.stderr_tail(leader)}"
            small = pipelined_load(client, leader, counter_entry([1], 128), args.entries_per_request,
                                   args.inflight, args.seconds)
            small["entry_bytes"] = 128
            small["ops_per_s"] = small["entries_per_s"]
            out["small"] = small
            ops_entry = counter_entry([1] * args.ops_per_entry)
            batched = pipelined_load(client, leader, ops_entry, 4, args.inflight, args.seconds)
            batched["entry_bytes"] = len(ops_entry)
            batched["ops_per_entry"] = args.ops_per_entry
            batched["ops_per_s"] = batched["entries_per_s"] * args.ops_per_entry
            out["batched"] = batched
            big_entry = counter_entry([1], 1 << 20)
            big = pipelined_load(client, leader, big_entry, 1, 4, args.seconds)
            big["entry_bytes"] = len(big_entry)
            out["big"] = big
            # consistency check after the load: every replica applied the same state
            time.sleep(0.5)
            sts = [client.status(n) for n in cluster.ids]
            out["digests_equal"] = len({(s or {}).get("digest") for s in sts}) == 1
        finally:
            client.close()
    return out


def run_failover(args: argparse.Namespace, base: str) -> dict[str, Any]:
    times = []
    with LocalCluster(3, os.path.join(base, "failover"), snapshot_threshold=args.snapshot_threshold,
                      map_size_gib=4) as cluster:
        cluster.start()
        client = ClusterClient(cluster.client_addr)
        try:
            for run in range(args.failovers):
                leader = client.find_leader(timeout_s=30)
                # the leader is committing: one acknowledged proposal first
                assert _commit_at(client, [leader], 10.0) is not None, "leader cannot commit"
                others = [n for n in cluster.ids if n != leader]
                t_kill = time.monotonic()
                cluster.kill(leader)
                got = _commit_at(client, others, 30.0)
                assert got is not None, "no commit after the leader was killed"
                times.append(got - t_kill)
                cluster.start_replica(leader)
                _wait_caught_up(client, cluster.ids, 30.0)
                print(f"  failover {run + 1}/{args.failovers}: {1000 * times[-1]:.0f} ms", flush=True)
        finally:
            client.close()
    times.sort()
    return {"runs": len(times), "median_ms": 1000 * statistics.median(times),
            "p90_ms": 1000 * times[min(len(times) - 1, int(0.9 * len(times)))],
            "max_ms": 1000 * times[-1], "min_ms": 1000 * times[0]}


def _commit_at(client: ClusterClient, nodes: list[int], timeout_s: float) -> float | None:
    """Send a proposal to every candidate every 20 ms; the time of the first acknowledgement."""
    entry = [counter_entry([1], 128)]
    deadline = time.monotonic() + timeout_s
    pending: dict[int, bytes] = {}
    while time.monotonic() < deadline:
        for n in nodes:
            if n not in pending:
                pending[n] = client.send(n, b"P", entry)
        poll_until = time.monotonic() + 0.02
        while time.monotonic() < poll_until:
            for n in nodes:
                for key, status, _body in client.take_replies(n):
                    if key != pending.get(n):
                        continue
                    del pending[n]
                    if status == b"OK":
                        return time.monotonic()
            time.sleep(0.001)
    return None


def _wait_caught_up(client: ClusterClient, nodes: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sts = [st for n in nodes if (st := client.status(n, timeout_s=0.5)) is not None]   # None: no answer
        if len(sts) == len(nodes) and len({s["applied"] for s in sts}) == 1 and any(s["role"] == "leader" for s in sts):
            return
        time.sleep(0.05)
    raise TimeoutError("restarted replica did not catch up")


# --- the simulator's CPU cost per entry --------------------------------------------------------------------
def run_sim_cost(args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        from engine.raft import sim
    except ImportError:
        return None
    for name in ("leader_cpu_cost_per_entry", "measure_leader_cpu_per_entry", "leader_cost_per_entry"):
        fn = getattr(sim, name, None)
        if fn is not None:
            result = fn()
            if isinstance(result, dict):
                return dict(result, function=f"engine.raft.sim.{name}")
            return {"us_per_entry": float(result) * (1e6 if result < 1e-2 else 1.0),
                    "function": f"engine.raft.sim.{name}"}
    return None


# --- PySyncObj -----------------------------------------------------------------------------------------
def pysyncobj_node(argv: list[str]) -> None:
    """One PySyncObj replica; the one that becomes leader runs the pipelined counter load and prints JSON."""
    from pysyncobj import SyncObj, SyncObjConf, replicated

    me, partners, seconds, journal, inflight = argv[0], argv[1].split(","), float(argv[2]), argv[3], int(argv[4])

    class Counter(SyncObj):
        def __init__(self) -> None:
            conf = SyncObjConf(journalFile=journal, appendEntriesUseBatch=True, commandsQueueSize=200_000)
            super().__init__(me, partners, conf)
            self.counter = 0

        @replicated
        def incr(self, n: int) -> int:
            self.counter += n
            return self.counter

    c = Counter()
    while c._getLeader() is None:
        time.sleep(0.05)
    if str(c._getLeader()) != me:
        time.sleep(seconds + 60)        # followers serve until the bench kills them
        return
    slots = threading.Semaphore(inflight)
    done = [0, 0]

    def callback(_result: Any, err: Any) -> None:
        done[0 if err == 0 else 1] += 1
        slots.release()
    for _ in range(min(inflight, 1000)):     # warm-up
        slots.acquire()
        c.incr(1, callback=callback)
    time.sleep(1.0)
    start_done = done[0]
    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        slots.acquire()
        c.incr(1, callback=callback)
    elapsed = time.monotonic() - t0
    ops = done[0] - start_done
    print(json.dumps({"ops": ops, "seconds": elapsed, "ops_per_s": ops / elapsed, "errors": done[1]}), flush=True)
    os._exit(0)


def run_pysyncobj(args: argparse.Namespace, base: str) -> dict[str, Any]:
    ports = free_ports(3)
    addrs = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    try:
        for i, addr in enumerate(addrs):
            partners = ",".join(a for a in addrs if a != addr)
            cmd = [sys.executable, "-m", "bench.bench_raft", "--pysyncobj-node", addr, partners,
                   str(args.seconds), os.path.join(base, f"pysyncobj-{i}.journal"), str(args.inflight_pysyncobj)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        deadline = time.monotonic() + args.seconds + 60
        result = None
        while result is None and time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None and p.stdout is not None:
                    line = p.stdout.read().strip()
                    if line:
                        result = json.loads(line.splitlines()[-1])
                        break
            time.sleep(0.1)
        if result is None:
            raise RuntimeError("PySyncObj run produced no result")
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
            if p.stdout:
                p.stdout.close()


# --- reporting -----------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_1_5_15": [round(x, 2) for x in load]}


def render(res: dict[str, Any], command: str) -> str:
    m = res["machine"]
    lines = [SECTION_BEGIN, "## Raft (engine/raft)", "",
             f"Command: `{command}`  ",
             (f"Machine: {m['cpus']} cores ({m['cpu']}), Python {m['python']}, "
              f"Linux {m['kernel']}; {m['date_utc']}; load average before/after: {m['loadavg_1_5_15']} / "
              f"{res.get('loadavg_after')}  "),
             ("Setup: 3 replica processes on 127.0.0.1, LMDB log with fsync on every commit (sync=True), "
              "ZeroMQ transport, counter state machine; the client pipelines proposals at the leader."), "",
             "| workload | entries/s | MB/s | ops/s | p50 / p99 request latency |",
             "|---|---:|---:|---:|---|"]
    for key, label in (("small", "128 B entries, 1 op each"), ("batched", None), ("big", "1 MiB entries")):
        r = res["throughput"].get(key)
        if not r:
            continue
        label = label or f"{r['entry_bytes']} B entries, {r['ops_per_entry']} ops each"
        ops = f"{r['ops_per_s']:,.0f}" if "ops_per_s" in r else "-"
        lines.append(f"| {label} | {r['entries_per_s']:,.0f} | {r['mb_per_s']:,.1f} | {ops} | "
                     f"{r['latency_ms_p50']:.1f} / {r['latency_ms_p99']:.1f} ms |")
    p = res["pysyncobj"]
    lines += ["", (f"PySyncObj {res.get('pysyncobj_version', '')} counter, 3 processes, same machine, same run "
                   f"(journalFile on, which it does not fsync): **{p['ops_per_s']:,.0f} ops/s**."), ""]
    lines += [(f"- ratio, ops/s with batched entries: **{res['ratio_batched']:.1f}x** -> "
               f"**{'PASS' if res['ratio_batched'] >= 10 else 'FAIL'}** (bar: >= 10x)"),
              (f"- ratio, one op per entry (128 B entries): {res['ratio_small']:.1f}x "
               f"({'>=' if res['ratio_small'] >= 10 else '<'} 10x)")]
    s = res.get("sim")
    lines.append("- leader CPU per entry in the simulator: "
                 + (json.dumps(s) if s else "not measured (engine.raft.sim provides no cost function)"))
    f = res["failover"]
    lines += [(f"- failover (kill -9 leader -> first commit by the new leader), {f['runs']} runs: median "
               f"**{f['median_ms']:.0f} ms**, p90 {f['p90_ms']:.0f} ms, min {f['min_ms']:.0f}, "
               f"max {f['max_ms']:.0f} -> **{'PASS' if f['median_ms'] < 1000 else 'FAIL'}** (bar: median < 1 s)"),
              f"- replicas' state digests equal after the load: {res['throughput'].get('digests_equal')}", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    lines.append(SECTION_END)
    return "\n".join(lines)


def write_results(section: str) -> None:
    write_section(SECTION_BEGIN, SECTION_END, section)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pysyncobj-node"]:
        pysyncobj_node(argv[1:])
        return 0
    p = argparse.ArgumentParser(description="Raft benchmark (3 replicas on loopback with fsync)")
    p.add_argument("--quick", action="store_true", help="short runs, 5 failovers")
    p.add_argument("--seconds", type=float, default=8.0, help="measurement window per workload")
    p.add_argument("--failovers", type=int, default=20)
    p.add_argument("--inflight", type=int, default=64, help="propose requests in flight")
    p.add_argument("--entries-per-request", type=int, default=32)
    p.add_argument("--ops-per-entry", type=int, default=1000)
    p.add_argument("--inflight-pysyncobj", type=int, default=2000)
    p.add_argument("--snapshot-threshold", type=int, default=200_000)
    p.add_argument("--skip-pysyncobj", action="store_true")
    p.add_argument("--write-results", action="store_true", help="replace the Raft section of bench/RESULTS.md")
    p.add_argument("--note", default="", help="free text added to the results (e.g. how noisy the machine was)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 3.0)
        args.failovers = min(args.failovers, 5)
    command = "python -m bench.bench_raft " + " ".join(argv)
    res: dict[str, Any] = {"machine": machine_info(), "note": args.note}
    base = tempfile.mkdtemp(prefix="bench-raft-")
    try:
        print("throughput (3 replicas, fsync) ...", flush=True)
        res["throughput"] = run_throughput(args, base)
        for key in ("small", "batched", "big"):
            print(f"  {key}: {json.dumps(res['throughput'][key])}", flush=True)
        print("PySyncObj counter (3 processes) ...", flush=True)
        import pysyncobj  # noqa: F401  (fail early and clearly when the bench extra is missing)
        res["pysyncobj_version"] = _pkg_version("pysyncobj")
        res["pysyncobj"] = run_pysyncobj(args, base)
        print(f"  {json.dumps(res['pysyncobj'])}", flush=True)
        theirs = res["pysyncobj"]["ops_per_s"]
        res["ratio_small"] = res["throughput"]["small"]["ops_per_s"] / theirs
        res["ratio_batched"] = res["throughput"]["batched"]["ops_per_s"] / theirs
        print("simulator leader CPU per entry ...", flush=True)
        res["sim"] = run_sim_cost(args)
        print(f"failover x{args.failovers} ...", flush=True)
        res["failover"] = run_failover(args, base)
        res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    section = render(res, command)
    print()
    print(section)
    if args.write_results:
        write_results(section)
    ok = res["ratio_batched"] >= 10 and res["failover"]["median_ms"] < 1000
    return 0 if ok else 1


def _pkg_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
