"""``zwallet bench``: zwallet beside PostgreSQL, on this machine, in one run, with identical command streams.

    zwallet bench                      # the default run (under 10 minutes on 2 cores); report in ./bench-report
    zwallet bench --quick              # a smoke run (under a minute); the test suite runs it once
    zwallet bench --out DIR --write-results   # report elsewhere; also replace the suite's section of RESULTS.md
    python -m bench.suite ...          # the same

It starts what it needs in a temporary directory: a 3-replica zwallet cluster (``NodeCluster``: fsync on every
Raft log commit) and a private PostgreSQL from Debian's packages (``engine.devtools.pg_server``: installed if missing;
fsync on, synchronous_commit on), loads the same accounts into both, runs every workload against zwallet and then
against PostgreSQL, and writes a Markdown + JSON report and PNG plots (``bench.report``).

The accounts are ``devtools.workload.Workload``'s: a bank (account 1, no lower limit) and customers 2..N+1, each
funded with 1,000,000 minor units (zwallet: by create and transfer commands through the cluster; PostgreSQL: by
COPY into the same rows, its fastest path). The streams are ``devtools.workload.BatchStream``s: batch i is the same
array for both systems; in a time box each system runs the prefix of the stream it reaches.

Workloads (each system for ``--duration-s``):
1. bank: uniform random transfers among the customers, batched (8190 per request; zwallet: ``--zw-connections``
   clients x ``--zw-inflight`` batches in flight; PostgreSQL: ``--pg-connections`` connections, one transaction
   per batch) and unbatched (one transfer per request from 64 concurrent clients in 2 processes: closed loop);
2. hot account: the same with half of the transfers to or from the bank account;
3. mixed: transfers, batch balance operations, reserve/release, TCC try/confirm (``Workload.mixed``), batched;
4. latency: one transfer per request at fixed offered rates (1K, 10K, 50K/s), open loop free of coordinated
   omission (``bench.loadgen``): every percentile counts the whole wait from each request's due time, and a
   request never answered counts as infinitely late (a percentile it reaches is reported as overloaded);
5. failover: a zwallet batched load while the leader is killed (kill -9) and later restarted;
6. scaling (zwallet): throughput and p99 as the accounts grow (``--scale-accounts``, the cluster grows in place)
   and as the batch size grows (``--scale-batches``); peak memory per replica.

Both systems' result records are checked: every command must be OK (the accounts have money to spare), no
duplicate, money conserved at the end (the sum of all balances, reserved and pending amounts is 0: the bank
holds the debt), and the zwallet replicas' digests equal.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from bench import loadgen, zw_load
from bench.bench_node import PROBE_ATTEMPT_TIMEOUT_S, PROBE_INTERVAL_S, digests_equal, find_leader, leader_and_term, \
    memory_mib, probe_new_leader, process_cpu_s, stall_reports, stalls_since, wait_caught_up, wait_snapshots_done
from bench.bench_raft import machine_info
from bench.results import write_section
from engine import records as R
from engine.client import Client
from engine.devtools.cluster import NodeCluster
from engine.stalls import replicas_text
from engine.devtools.workload import BANK, CURRENCY, FUNDING, BatchStream, Workload

SECTION_BEGIN = "<!-- suite-bench:begin -->"
SECTION_END = "<!-- suite-bench:end -->"
REPLICAS = 3
SEED = 20261125
STATUS_TIMEOUT_S = 2.0
DIGEST_TIMEOUT_S = 120.0
LATENCY_DRAIN_S = 5.0                 # open loop: after the window, how long a system may still answer (or, all
                                      # its connections busy, start) what fell due in it; the rest counts as
                                      # never answered
TIMELINE_BIN_S = 0.25
SETTLE_WAIT_MAX_S = 60.0              # settle(): the longest wait for autovacuum / snapshots to finish
FAILOVER_PROBE_S = 30.0              # no commit by a new leader within this: the run fails
FAILOVER_ATTEMPT_TIMEOUT_S = 0.5      # the failover load's clients re-send elsewhere after this (a light load:
                                      # its batches are answered in ~0.1 s when a leader is there)

BARS = {"bank_batched": 50.0, "hot_batched": 100.0, "hot_unbatched": 100.0, "bank_unbatched": 5.0}
LATENCY_BAR = (10_000, 5.0)                 # offered rate, p99 ms

PROFILES: dict[str, dict[str, Any]] = {
    "default": dict(accounts=1_000_000, duration_s=6.0, latency_s=8.0, latency_warmup_s=1.0,
                    latency_rates=[1_000, 10_000, 50_000], scale_accounts=[10_000, 1_000_000, 10_000_000],
                    scale_batches=[1, 10, 100, 1000, 8190], scale_duration_s=3.0, failover_s=8.0, settle_s=1.0),
    "quick": dict(accounts=20_000, duration_s=0.8, latency_s=1.0, latency_warmup_s=0.2,
                  latency_rates=[1_000, 10_000], scale_accounts=[10_000, 20_000],
                  scale_batches=[1, 8190], scale_duration_s=0.6, failover_s=2.5, settle_s=0.1),
}

ANCHORS = [
    {"system": "Auticuro (Airwallex)", "claim": "p99 < 20 ms at 10K TPS",
     "hardware": "five 8-vCPU nodes (a replicated shard on its own machines)",
     "source": "Auticuro's published design and benchmark (as quoted in zwallet's issue tracker)",
     "compare": "latency"},
    {"system": "TigerBeetle", "claim": "batches of up to 8,190 transfers per request; 'the cost of replication is paid "
     "only once per batch'; about 20 ms for a batch of ten thousand transfers; widely quoted at up to a million "
     "transfers/s", "hardware": "dedicated servers with NVMe disks and io_uring, one core per replica",
     "source": "docs.tigerbeetle.com/concepts/performance, docs.tigerbeetle.com/about/performance",
     "compare": "throughput"},
]


# ------------------------------------------------------------------------------------------------ helpers
class Progress:
    """One line per step; during a timed run, a bar on stderr when it is a terminal."""

    def __init__(self, total_steps: int) -> None:
        self.total, self.step, self.t0 = total_steps, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {text}", flush=True)

    def begin(self, text: str) -> None:
        self.step += 1
        self.say(f"({self.step}/{self.total}) {text}")

    @contextmanager
    def timed(self, label: str, seconds: float) -> Iterator[None]:
        stop = threading.Event()

        def bar() -> None:
            t = time.perf_counter()
            while not stop.wait(0.25):
                done = min(1.0, (time.perf_counter() - t) / seconds) if seconds else 1.0
                filled = int(30 * done)
                sys.stderr.write(f"\r  {label:<28} [{'#' * filled}{'.' * (30 - filled)}] "
                                 f"{time.perf_counter() - t:5.1f}/{seconds:.0f} s")
                sys.stderr.flush()
            sys.stderr.write("\r" + " " * 80 + "\r")

        th = threading.Thread(target=bar, daemon=True) if self.tty else None
        if th:
            th.start()
        try:
            yield
        finally:
            stop.set()
            if th:
                th.join()


def pct(values: np.ndarray, q: float) -> float | None:
    """Percentile q of ``values`` (infinite entries: requests never answered); None if it lands on one."""
    if not len(values):
        return None
    v = float(np.percentile(values, q, method="higher"))
    return v if math.isfinite(v) else None


def latency_summary(lat_s: np.ndarray) -> dict[str, Any]:
    ms = 1000 * np.asarray(lat_s, dtype=float)
    return {"p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99), "p999": pct(ms, 99.9), "max": pct(ms, 100)}


def timeline(t0: float, done_s: np.ndarray, weights: np.ndarray | None = None) -> dict[str, list[float]]:
    """Completions per second in bins of TIMELINE_BIN_S from t0."""
    if not len(done_s):
        return {"t_s": [], "per_s": []}
    rel = np.asarray(done_s) - t0
    nbins = max(1, int(math.ceil(rel.max() / TIMELINE_BIN_S)))
    counts, edges = np.histogram(rel, bins=nbins, range=(0, nbins * TIMELINE_BIN_S), weights=weights)
    return {"t_s": [round(float(x), 3) for x in edges[:-1]], "per_s": [float(c / TIMELINE_BIN_S) for c in counts]}


def cdf_and_hist(ms: np.ndarray) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    qs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.997,
          0.999, 0.9995, 0.9999, 1.0]
    finite = ms[np.isfinite(ms)]
    cdf: dict[str, list[float]] = {"q": [], "ms": []}
    for q in qs:
        v = pct(ms, 100 * q)
        if v is not None:
            cdf["q"].append(q)
            cdf["ms"].append(v)
    if not len(finite):
        return cdf, {"edges_ms": [], "counts": []}
    lo, hi = max(0.01, float(finite.min())), max(0.02, float(finite.max()))
    edges = np.geomspace(lo, hi * 1.0001, 41)
    counts, _ = np.histogram(finite, bins=edges)
    return cdf, {"edges_ms": edges.tolist(), "counts": counts.tolist()}


class CpuMeter:
    """CPU cores used by the server side (the replicas, or PostgreSQL's processes) and by this process."""

    def __init__(self, server_cpu_s: Callable[[], float]) -> None:
        self.server_cpu_s = server_cpu_s
        self.t0, self.s0, self.c0 = time.perf_counter(), server_cpu_s(), time.process_time()

    def stop(self, extra_client_cpu_s: float = 0.0) -> dict[str, float]:
        dt = time.perf_counter() - self.t0
        return {"server": round((self.server_cpu_s() - self.s0) / dt, 2),
                "client": round((time.process_time() - self.c0 + extra_client_cpu_s) / dt, 2)}


# --------------------------------------------------------------------------------------------- the run
class Suite:
    def __init__(self, args: argparse.Namespace, base: str) -> None:
        self.args, self.base = args, base
        self.cluster = NodeCluster(REPLICAS, os.path.join(base, "zwallet"), insecure=True)   # bench_curve: CURVE
        self.status: Client | None = None
        self.pg: Any = None
        self.led: Any = None
        self.accounts = 0                      # customers created so far in zwallet
        self.next_base = 1                     # dedup-id ranges: one per stream (<< 44 each)
        self.res: dict[str, Any] = {"workloads": [], "latency": [], "scaling": {"accounts": [], "batch_size": []},
                                    "anchors": [], "bars": [], "checks": {}}
        steps = 5 + 2 + len(args.latency_rates) + 1 + (len(args.scale_accounts) + len(args.scale_batches))
        self.progress = Progress(steps)

    # -------------------------------------------------------------------------- setup and bookkeeping
    def dedup_base(self) -> int:
        base, self.next_base = self.next_base << 44, self.next_base + 1
        return base

    def settle(self) -> None:
        """Before each measurement, the background work the previous load left in both systems is done, so
        neither measurement shares the machine with it: PostgreSQL's autovacuum workers finished (after
        millions of updates and inserts they vacuum for seconds) and a checkpoint taken; every zwallet
        replica caught up and no snapshot in progress; the dirty pages written back (else every fsync
        queues behind them); a pause."""
        if self.pg is not None:
            with self.led.connect() as conn:
                deadline = time.monotonic() + SETTLE_WAIT_MAX_S
                while time.monotonic() < deadline and conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
                        ).fetchone()[0]:
                    time.sleep(0.2)
                conn.execute("CHECKPOINT")    # else the checkpointer writes its dirty buffers meanwhile
        if self.status is not None:       # followers still applying a heavy load's backlog delay every commit
            wait_caught_up(self.status, self.cluster)
            wait_snapshots_done(self.status, self.cluster, SETTLE_WAIT_MAX_S)
        os.sync()
        time.sleep(self.args.settle_s)
        os.sync()

    def zw_cpu(self) -> float:
        return sum(process_cpu_s(self.cluster.procs[n].pid)[0] for n in self.cluster.ids if self.cluster.alive(n))

    def status_client(self) -> Client:
        """The client that asks the replicas for their status; there is one once ``start`` has run."""
        if self.status is None:
            raise RuntimeError("the zwallet cluster is not started (Suite.start)")
        return self.status

    def leader_address(self) -> str:
        return self.cluster.client_addr[find_leader(self.status_client(), self.cluster)]

    def start(self) -> None:
        a = self.args
        if not a.no_pg:
            from engine.devtools.pg_server import PostgresServer
            from bench.pg_ledger import PgLedger
            self.progress.say("starting PostgreSQL (installing it from Debian's packages if missing) ...")
            self.pg = PostgresServer(os.path.join(self.base, "pg")).start()
            self.led = PgLedger(self.pg.dsn)
            self.led.create_schema()
            s = self.pg.settings()
            self.res["meta_pg"] = {"version": s["server_version"], "settings": s}
        self.progress.say(f"starting a {REPLICAS}-replica zwallet cluster ...")
        self.cluster.start()
        self.status = Client(self.cluster.client_addresses, timeout_s=STATUS_TIMEOUT_S,
                             attempt_timeout_s=STATUS_TIMEOUT_S)

    def close(self) -> None:
        if self.status is not None:
            self.status.close()
        self.cluster.close()
        if self.led is not None:
            self.led.close()
        if self.pg is not None:
            self.pg.stop()

    def grow_zwallet(self, accounts: int, funded: bool = True) -> float:
        """Create customers up to ``accounts`` (and the bank first) through the cluster; seconds taken.
        ``funded=False`` (growing past the compared workloads' accounts, for scaling): customers with no lower
        limit and no funding transfer, half the commands (``Workload.create_batches``)."""
        if accounts <= self.accounts:
            return 0.0
        w = Workload(accounts - self.accounts, first_account=2 + self.accounts)
        w.next_dedup = self.dedup_base()
        t = time.perf_counter()
        with Client(self.cluster.client_addresses, timeout_s=120) as c:
            pending: list[Any] = []
            creating = True
            for ops in w.create_batches(with_bank=self.accounts == 0, funded=funded):
                if creating and ops["kind"][0] != R.Kind.CREATE_ACCOUNT:
                    creating = False              # the funding transfers need every account created first
                    while pending:
                        self._check_created(pending.pop(0).result(120))
                pending.append(c.apply_batch_async(ops))
                if len(pending) >= 8:
                    self._check_created(pending.pop(0).result(120))
            for f in pending:
                self._check_created(f.result(120))
        self.accounts = accounts
        return time.perf_counter() - t

    @staticmethod
    def _check_created(results: np.ndarray) -> None:
        bad = results["code"] != R.Code.OK
        if bad.any():
            raise RuntimeError(f"account set-up failed: codes {sorted(set(results['code'][bad].tolist()))}")

    def load_pg(self) -> float:
        t = time.perf_counter()
        n = self.accounts
        self.led.load_accounts(np.arange(2, n + 2, dtype=np.int64), CURRENCY, lower_limit=0,
                               initial_available=FUNDING)
        self.led.load_accounts([BANK], CURRENCY, lower_limit=None, initial_available=-n * FUNDING)
        return time.perf_counter() - t

    # ------------------------------------------------------------------------------------ workloads
    def system_row(self, r: dict[str, Any], cpu: dict[str, float], connections: int, batched: bool) -> dict[str, Any]:
        records = r["records"] if batched else r["count"]
        # unbatched: a request refused at the protocol level (NOT_LEADER after an election, OVERLOADED) has no
        # result record (loadgen.CODE_NO_RESULT): nothing was applied, so it is counted apart from a command
        # the ledger answered with a code other than OK (a wrong answer, which fails the run)
        refused = 0 if batched else int(np.count_nonzero(r["codes"] == loadgen.CODE_NO_RESULT))
        not_ok = r["not_ok"] if batched else int(np.count_nonzero(r["codes"] != R.Code.OK)) - refused
        dups = r["duplicates"] if batched else int(r["duplicate"].sum())
        weights = r["sizes"] if batched else None
        row = {"per_s": records / r["wall_s"] if r["wall_s"] else 0.0, "ops": records, "wall_s": r["wall_s"],
               "not_ok": not_ok, "refused": refused, "duplicates": dups, "connections": connections,
               "request_latency_ms": latency_summary(r["latency_s"]),
               "timeline": timeline(r["t0"], r["done_s"], weights), "cpu_cores": cpu}
        if batched:
            row["requests"] = r["batches"]
        else:
            row["requests"] = r["count"]
            row["unanswered"] = r["sent"] - r["count"]
        if r.get("retries"):
            row["retries"] = r["retries"]
        if r.get("errors"):
            row["error"] = "; ".join(r["errors"][:3])
        return row

    def throughput(self, name: str, title: str, description: str, kind: str, batched: bool) -> None:
        a = self.args
        self.progress.begin(title)
        wl: dict[str, Any] = {"name": name, "title": title, "description": description,
                              "unit": "records/s" if kind == "mixed" else "transfers/s", "systems": {}}
        base = self.dedup_base()
        if batched:
            count = 1 << 16
            stream: Any = BatchStream(kind, self.accounts, count, seed=SEED + self.next_base, first_dedup=base)
            if kind == "mixed":          # made in advance: Workload.mixed is Python, too slow to make during the run
                need = int(a.duration_s * a.mixed_batches_per_s) + 4
                stream = [stream[i] for i in range(need)]
        else:
            w = Workload(self.accounts, seed=SEED + self.next_base)
            w.next_dedup = base
            singles = w.transfers(int(a.duration_s * a.unbatched_max_per_s), hot=BANK if kind == "hot" else None)
        self.settle()
        cpu = CpuMeter(self.zw_cpu)
        with self.progress.timed("zwallet", a.duration_s):
            if batched:
                r = zw_load.run_batched(self.cluster.client_addresses, stream, connections=a.zw_connections,
                                        inflight=a.zw_inflight, duration_s=a.duration_s)
                conns = a.zw_connections
            else:
                r = zw_load.run_unbatched(self.leader_address(), singles, connections=a.clients, processes=2,
                                          duration_s=a.duration_s)
                conns = a.clients
        wl["systems"]["zwallet"] = self.system_row(r, cpu.stop(r.get("client_cpu_s", 0.0)), conns, batched)
        if self.pg is not None:
            from bench import pg_ledger
            self.settle()
            cpu = CpuMeter(self.pg.cpu_seconds)
            try:
                with self.progress.timed("PostgreSQL", a.duration_s):
                    if batched:
                        r = pg_ledger.run_batched(self.pg.dsn, stream, connections=a.pg_connections,
                                                  duration_s=a.duration_s, keep_results=False)
                        conns = a.pg_connections
                    else:
                        r = pg_ledger.run_unbatched(self.pg.dsn, singles, connections=a.clients, processes=2,
                                                    duration_s=a.duration_s)
                        conns = a.clients
                time.sleep(0.3)              # let the postmaster reap closed backends: their CPU counts
                wl["systems"]["postgresql"] = self.system_row(r, cpu.stop(r.get("client_cpu_s", 0.0)), conns,
                                                              batched)
            except Exception as exc:         # noqa: BLE001 - the report says what failed, the run goes on
                wl["systems"]["postgresql"] = {"error": f"{type(exc).__name__}: {exc}"}
        zw, pg = wl["systems"]["zwallet"], wl["systems"].get("postgresql", {})
        wl["ratio"] = zw["per_s"] / pg["per_s"] if pg.get("per_s") else None
        bar = BARS.get(name)
        wl["bar"] = {"ratio_min": bar, "pass": wl["ratio"] is not None and wl["ratio"] >= bar} if bar else None
        self.res["workloads"].append(wl)
        ratio = f"{wl['ratio']:.1f}x" if wl["ratio"] else "-"
        self.progress.say(f"  zwallet {zw['per_s']:,.0f}/s, PostgreSQL "
                          f"{pg.get('per_s', float('nan')):,.0f}/s: {ratio}"
                          + (f"; not OK: zwallet {zw['not_ok']}, PostgreSQL {pg.get('not_ok')}"
                             if zw["not_ok"] or pg.get("not_ok") else ""))

    def latency(self, rate: int) -> None:
        a = self.args
        self.progress.begin(f"latency: one transfer per request, open loop at {rate:,}/s")
        n = int(rate * (a.latency_s + a.latency_warmup_s))
        w = Workload(self.accounts, seed=SEED + rate)
        w.next_dedup = self.dedup_base()
        ops = w.transfers(n)
        entry: dict[str, Any] = {"rate_per_s": rate, "duration_s": a.latency_s, "warmup_s": a.latency_warmup_s,
                                 "systems": {}}
        window = a.latency_s + a.latency_warmup_s
        runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("zwallet", lambda: zw_load.run_unbatched(self.leader_address(), ops, connections=1,
                                                      processes=1 if rate <= 10_000 else 2, rate=rate,
                                                      duration_s=window, drain_s=LATENCY_DRAIN_S))]
        if self.pg is not None:
            from bench import pg_ledger
            runs.append(("postgresql", lambda: pg_ledger.run_unbatched(self.pg.dsn, ops, connections=a.clients,
                                                                        processes=2, rate=rate, duration_s=window,
                                                                        drain_s=LATENCY_DRAIN_S)))
        for system, run in runs:
            self.settle()
            stalls_before = stall_reports(self.status, self.cluster) if system == "zwallet" and self.status else {}
            try:
                with self.progress.timed(system, a.latency_s + a.latency_warmup_s), \
                        self.pg_autovacuum_paused(system == "zwallet"):
                    r = run()
            except Exception as exc:          # noqa: BLE001 - reported
                entry["systems"][system] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            entry["systems"][system] = self.latency_row(r, rate, n)
            if system == "zwallet" and self.status is not None:
                entry["systems"][system]["stalls"] = {
                    str(n): d for n, d in stalls_since(stalls_before, self.status, self.cluster).items()}
        zw = entry["systems"].get("zwallet", {})
        entry["bar"] = ({"p99_ms_max": LATENCY_BAR[1], "pass": zw.get("p99_ms") is not None
                         and zw["p99_ms"] < LATENCY_BAR[1] and zw.get("not_ok") == 0}
                        if rate == LATENCY_BAR[0] else None)
        self.res["latency"].append(entry)
        for system, s in entry["systems"].items():
            if "error" in s:
                self.progress.say(f"  {system}: {s['error']}")
            else:
                self.progress.say(f"  {system}: achieved {s['achieved_per_s']:,.0f}/s, p50 {fmt_ms(s['p50_ms'])} "
                                  f"p99 {fmt_ms(s['p99_ms'])} p99.9 {fmt_ms(s['p999_ms'])} max {fmt_ms(s['max_ms'])} ms"
                                  f"; unanswered {s['unanswered']}, not OK {s['not_ok']}")
                if s.get("stalls") is not None:
                    self.progress.say("  zwallet stalls >= 5 ms: " + replicas_text(s["stalls"]))

    @contextmanager
    def pg_autovacuum_paused(self, pause: bool) -> Iterator[None]:
        """While zwallet's latency is measured, PostgreSQL (idle then, but on the same disk) starts no
        autovacuum worker: after the workloads' millions of updates and inserts one would otherwise start in
        the middle of the run and vacuum for seconds, and every zwallet fsync queued behind its writes (the
        stall lines showed 15-17 fsyncs of ~12 ms per replica in one 10K/s run; 1-2 with no PostgreSQL on
        the machine). settle() has already waited for running workers."""
        if not pause or self.pg is None:
            yield
            return
        with self.led.connect() as conn:
            conn.execute("ALTER SYSTEM SET autovacuum = off")
            conn.execute("SELECT pg_reload_conf()")
        try:
            yield
        finally:
            with self.led.connect() as conn:
                conn.execute("ALTER SYSTEM RESET autovacuum")
                conn.execute("SELECT pg_reload_conf()")

    def latency_row(self, r: dict[str, Any], rate: int, n: int) -> dict[str, Any]:
        """Every request due in the measured window (after the warm-up), answered or not: one never answered
        counts as infinitely late."""
        a = self.args
        warm = int(rate * a.latency_warmup_s)
        due_in_window = np.arange(warm, min(n, int(rate * (a.latency_s + a.latency_warmup_s))))
        lat_ms = np.full(len(due_in_window), np.inf)
        codes = np.full(len(due_in_window), loadgen.CODE_NO_RESULT)
        k = np.searchsorted(r["positions"], due_in_window)
        k = np.minimum(k, max(0, len(r["positions"]) - 1))
        have = (len(r["positions"]) > 0) & (r["positions"][k] == due_in_window) if len(r["positions"]) else \
            np.zeros(len(due_in_window), dtype=bool)
        lat_ms[have] = 1000 * r["latency_s"][k[have]]
        codes[have] = r["codes"][k[have]]
        lat_ms[codes == loadgen.CODE_NO_RESULT] = np.inf     # refused (no result): not served, infinitely late
        cdf, hist = cdf_and_hist(lat_ms)
        # the rate the system answered at, over the whole run (warm-up included: an overloaded system may
        # answer nothing that fell due in the measured window)
        span = float(r["done_s"].max() - r["t0"]) if r["count"] else 0.0
        return {"requests": len(due_in_window), "answered": int(have.sum()), "unanswered": int((~have).sum()),
                "achieved_per_s": r["count"] / span if span else 0.0,
                "not_ok": int(np.count_nonzero((codes[have] != R.Code.OK) & (codes[have] != loadgen.CODE_NO_RESULT))),
                "refused": int(np.count_nonzero(codes[have] == loadgen.CODE_NO_RESULT)),
                "p50_ms": pct(lat_ms, 50), "p90_ms": pct(lat_ms, 90), "p99_ms": pct(lat_ms, 99),
                "p999_ms": pct(lat_ms, 99.9), "max_ms": pct(lat_ms, 100),
                "sender_late_ms_p99": 1000 * float(np.percentile(r["send_lag_s"], 99)) if r["count"] else None,
                "cdf": cdf, "hist": hist}

    def failover(self) -> None:
        a = self.args
        self.progress.begin("failover: zwallet batched load, kill -9 the leader, restart it")
        wait_caught_up(self.status_client(), self.cluster)
        stream = BatchStream("transfers", self.accounts, 1 << 16, seed=SEED - 1, first_dedup=self.dedup_base())
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        load = threading.Thread(target=lambda: out.update(zw_load.run_batched(
            self.cluster.client_addresses, stream, connections=2, inflight=2, duration_s=a.failover_s,
            attempt_timeout_s=FAILOVER_ATTEMPT_TIMEOUT_S)), daemon=True)
        load.start()
        time.sleep(a.failover_s * 0.3)
        leader = find_leader(self.status_client(), self.cluster)
        w = Workload(self.accounts, seed=SEED - 2)
        w.next_dedup = self.dedup_base()
        probe_ops = w.transfers(int(FAILOVER_PROBE_S / PROBE_INTERVAL_S))
        survivors = [self.cluster.client_addr[n] for n in self.cluster.ids if n != leader]
        with Client(survivors, timeout_s=FAILOVER_PROBE_S, attempt_timeout_s=PROBE_ATTEMPT_TIMEOUT_S) as probe:
            t_kill = time.perf_counter()
            self.cluster.kill(leader)
            # a fresh one-transfer request to the survivors every PROBE_INTERVAL_S: the first answered is the
            # new leader's first commit (bench_node's probe)
            first_commit = t_kill + probe_new_leader(probe, probe_ops, t_kill)
        new_leader, term = leader_and_term(self.status_client(), self.cluster)
        time.sleep(max(0.0, t0 + a.failover_s * 0.65 - time.perf_counter()))
        t_restart = time.perf_counter()
        self.cluster.start_replica(leader)
        load.join()
        after = out["done_s"][out["done_s"] > t_kill]
        before = out["done_s"][out["done_s"] <= t_kill]
        last_before = float(before.max()) if len(before) else t_kill
        gaps = np.diff(np.concatenate([[last_before], after])) if len(after) else np.array([np.nan])
        base = out["t0"]
        self.res["failover"] = {
            "system": "zwallet", "timeline": timeline(base, out["done_s"], out["sizes"]),
            "events": [{"t_s": round(t_kill - base, 3), "label": f"kill -9 leader (replica {leader})"},
                       {"t_s": round(first_commit - base, 3),
                        "label": f"new leader (replica {new_leader}, term {term}) commits"},
                       {"t_s": round(t_restart - base, 3), "label": f"replica {leader} restarted"}],
            "failover_ms": 1000 * (first_commit - t_kill), "longest_gap_ms": 1000 * float(np.nanmax(gaps)),
            "not_ok": out["not_ok"], "errors": out["errors"], "per_s": out["records"] / out["wall_s"]}
        f = self.res["failover"]
        self.progress.say(f"  killed replica {leader}; the new leader committed {f['failover_ms']:.0f} ms later; "
                          f"the load's longest gap {f['longest_gap_ms']:.0f} ms; not OK {f['not_ok']}, "
                          f"errors {len(f['errors'])}")
        wait_caught_up(self.status_client(), self.cluster)

    def scale_point(self, accounts: int, create_s: float) -> None:
        a = self.args
        stream = BatchStream("transfers", accounts, 1 << 16, seed=SEED + accounts, first_dedup=self.dedup_base())
        self.settle()
        r = zw_load.run_batched(self.cluster.client_addresses, stream, connections=a.zw_connections,
                                inflight=a.zw_inflight, duration_s=a.scale_duration_s)
        w = Workload(accounts, seed=SEED - accounts)
        w.next_dedup = self.dedup_base()
        self.settle()
        lat = zw_load.run_unbatched(self.leader_address(), w.transfers(int(1000 * a.scale_duration_s)),
                                    connections=1, processes=1, rate=1000)
        mem = memory_mib(self.cluster)
        row = {"accounts": accounts, "per_s": r["records"] / r["wall_s"], "not_ok": r["not_ok"],
               "batch_p99_ms": pct(1000 * r["latency_s"], 99),
               "p99_ms": pct(1000 * lat["latency_s"], 99), "p99_at_rate_per_s": 1000, "create_s": create_s,
               "rss_mib": {str(n): m["peak"] for n, m in mem.items()},
               "rss_now_mib": {str(n): m.get("anon", 0) + m.get("file", 0) for n, m in mem.items()}}
        self.res["scaling"]["accounts"].append(row)
        self.progress.say(f"  {accounts:,} accounts (created in {create_s:.1f} s): {row['per_s']:,.0f} transfers/s "
                          f"in 8190-batches; single-transfer p99 at 1K/s {fmt_ms(row['p99_ms'])} ms; peak RSS "
                          + ", ".join(f"{v:,.0f}" for v in row["rss_mib"].values()) + " MiB")

    def scale_batch(self, size: int) -> None:
        a = self.args
        self.progress.begin(f"scaling: batch size {size}")
        stream = BatchStream("transfers", self.accounts, 1 << 20, size=size, seed=SEED + size,
                             first_dedup=self.dedup_base())
        r = zw_load.run_batched(self.cluster.client_addresses, stream, connections=a.zw_connections,
                                inflight=a.zw_inflight, duration_s=a.scale_duration_s)
        row = {"batch": size, "per_s": r["records"] / r["wall_s"], "requests_per_s": r["batches"] / r["wall_s"],
               "p50_ms": pct(1000 * r["latency_s"], 50), "p99_ms": pct(1000 * r["latency_s"], 99),
               "not_ok": r["not_ok"]}
        self.res["scaling"]["batch_size"].append(row)
        self.progress.say(f"  batch {size}: {row['per_s']:,.0f} transfers/s ({row['requests_per_s']:,.0f} requests/s)"
                          f", request p50 {fmt_ms(row['p50_ms'])} p99 {fmt_ms(row['p99_ms'])} ms")

    # ------------------------------------------------------------------------------------------ checks
    def checks(self) -> None:
        c = self.res["checks"]
        with Client(self.cluster.client_addresses) as client:
            t = client.totals(CURRENCY)
        c["zwallet_totals"] = t
        c["zwallet_money_conserved"] = sum(int(v) for v in t.values()) == 0
        with Client(self.cluster.client_addresses, timeout_s=DIGEST_TIMEOUT_S,
                    attempt_timeout_s=DIGEST_TIMEOUT_S) as slow:        # hashing 10M accounts takes seconds
            c["zwallet_digests_equal"] = digests_equal(self.cluster, slow)
        if self.led is not None:
            t = self.led.totals(CURRENCY)
            c["postgresql_totals"] = t
            c["postgresql_money_conserved"] = sum(int(v) for v in t.values()) == 0
        # a duplicate result is not a failure: a client that re-sent a batch after its attempt timeout got the
        # original outcome back (exactly-once at work); money conserved and equal digests say nothing was doubled
        bad = [(w["name"], s) for w in self.res["workloads"] for s, row in w["systems"].items() if row.get("not_ok")]
        c["all_commands_ok"] = not bad

    def run(self) -> None:
        a = self.args
        scale = sorted(set(a.scale_accounts) | {a.accounts})
        below = [n for n in scale if n < a.accounts]
        above = [n for n in scale if n > a.accounts]
        for n in below:
            self.progress.begin(f"scaling: {n:,} accounts")
            self.scale_point(n, self.grow_zwallet(n))
        self.progress.begin(f"loading {a.accounts:,} accounts into zwallet"
                            + (" and PostgreSQL" if self.pg is not None else ""))
        create_s = self.grow_zwallet(a.accounts)
        self.progress.say(f"  zwallet: {create_s:.1f} s (commands through the cluster)")
        if self.pg is not None:
            self.progress.say(f"  PostgreSQL: {self.load_pg():.1f} s (COPY, VACUUM ANALYZE, CHECKPOINT)")
        if a.accounts in a.scale_accounts:
            self.scale_point(a.accounts, create_s)
        n = f"{a.accounts:,}"
        self.throughput("bank_batched", "Bank, batched (8190 transfers per request)",
                        f"uniform random transfers among {n} accounts", "transfers", True)
        self.throughput("bank_unbatched", f"Bank, unbatched ({a.clients} clients, one transfer per request)",
                        f"uniform random transfers among {n} accounts, closed loop", "transfers", False)
        self.throughput("hot_batched", "Hot account, batched (8190 per request)",
                        "half of the transfers to or from one account (the bank)", "hot", True)
        self.throughput("hot_unbatched", f"Hot account, unbatched ({a.clients} clients)",
                        "half of the transfers to or from one account, closed loop", "hot", False)
        self.throughput("mixed", "Mixed, batched (~8190 records per request)",
                        "70% transfers, 10% batch balance ops, 10% reserve+release, 10% TCC try+confirm", "mixed",
                        True)
        for rate in a.latency_rates:
            self.latency(rate)
        self.failover()
        for size in a.scale_batches:
            self.scale_batch(size)
        for n in above:
            self.progress.begin(f"scaling: {n:,} accounts")
            self.scale_point(n, self.grow_zwallet(n, funded=False))
        self.checks()


def fmt_ms(v: float | None) -> str:
    return "overloaded" if v is None else (f"{v:.2f}" if v < 10 else f"{v:,.1f}")


def bars(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for w in res["workloads"]:
        if w.get("bar"):
            out.append({"what": f"{w['title']}: zwallet >= {w['bar']['ratio_min']:g}x PostgreSQL",
                        "measured": f"{w['ratio']:.1f}x" if w["ratio"] else "-", "pass": w["bar"]["pass"]})
    for e in res["latency"]:
        if e.get("bar"):
            zw = e["systems"].get("zwallet", {})
            out.append({"what": f"zwallet p99 < {e['bar']['p99_ms_max']:g} ms at {e['rate_per_s']:,}/s offered",
                        "measured": f"{fmt_ms(zw.get('p99_ms'))} ms", "pass": e["bar"]["pass"]})
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zwallet bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    p.add_argument("--out", default="bench-report", help="report directory (report.md, report.json, *.png)")
    p.add_argument("--write-results", action="store_true", help="replace the suite's section of bench/RESULTS.md")
    p.add_argument("--no-pg", action="store_true", help="zwallet only (no PostgreSQL)")
    p.add_argument("--note", default="", help="free text added to the report")
    p.add_argument("--accounts", type=int)
    p.add_argument("--duration-s", type=float, help="seconds per system per throughput workload")
    p.add_argument("--latency-s", type=float, help="measured seconds per offered rate per system")
    p.add_argument("--latency-warmup-s", type=float)
    p.add_argument("--latency-rates", type=int, nargs="+")
    p.add_argument("--scale-accounts", type=int, nargs="+")
    p.add_argument("--scale-batches", type=int, nargs="+")
    p.add_argument("--scale-duration-s", type=float)
    p.add_argument("--failover-s", type=float)
    p.add_argument("--settle-s", type=float, help="pause before each measurement (after writing dirty pages back)")
    p.add_argument("--clients", type=int, default=64, help="unbatched: concurrent clients (both systems)")
    p.add_argument("--zw-connections", type=int, default=4)
    p.add_argument("--zw-inflight", type=int, default=4)
    p.add_argument("--pg-connections", type=int, default=2, help="batched: PostgreSQL connections")
    p.add_argument("--unbatched-max-per-s", type=float, default=60_000,
                   help="unbatched: transfers made in advance per second of the time box")
    p.add_argument("--mixed-batches-per-s", type=float, default=60, help="mixed: batches made in advance per second")
    args = p.parse_args(argv)
    for k, v in PROFILES["quick" if args.quick else "default"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = "zwallet bench " + " ".join(argv)
    t0 = time.perf_counter()
    machine = machine_info()
    base = tempfile.mkdtemp(prefix="zwallet-bench-")
    suite = Suite(args, base)
    try:
        suite.start()
        suite.run()
    finally:
        suite.close()
        shutil.rmtree(base, ignore_errors=True)
    res = suite.res
    memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    res["meta"] = {"command": command, "date": machine["date_utc"], "quick": args.quick,
                   "machine": {"cores": machine["cpus"], "cpu": machine["cpu"], "python": machine["python"],
                               "kernel": machine["kernel"], "loadavg_before": machine["loadavg_1_5_15"],
                               "memory_gib": memory_gib},
                   "elapsed_s": round(time.perf_counter() - t0, 1), "accounts": args.accounts, "replicas": REPLICAS,
                   "postgresql": res.pop("meta_pg", None),
                   "notes": [x for x in [args.note] if x]}
    res["anchors"] = anchors(res)
    res["bars"] = bars(res)
    from bench import report
    paths = report.write_report(res, args.out)
    print(f"\nreport: {paths['markdown']} (and report.json, {len(paths['plots'])} plots) in "
          f"{res['meta']['elapsed_s']:.0f} s")
    for b in res["bars"]:
        print(f"  {'PASS' if b['pass'] else 'FAIL'}  {b['what']}: {b['measured']}")
    if args.write_results:
        write_section(SECTION_BEGIN, SECTION_END, report.results_section(res, command))
    checks = res["checks"]
    ok = all(checks.get(k, True) for k in ("zwallet_money_conserved", "zwallet_digests_equal",
                                           "postgresql_money_conserved", "all_commands_ok"))
    if not ok:
        print(f"CHECKS FAILED: {checks}")
    return 0 if ok else 1


def anchors(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    lat = next((e for e in res["latency"] if e["rate_per_s"] == LATENCY_BAR[0]), None)
    bank = next((w for w in res["workloads"] if w["name"] == "bank_batched"), None)
    cores = res["meta"]["machine"]["cores"]
    for a in ANCHORS:
        row = dict(a)
        if a["compare"] == "latency" and lat and "zwallet" in lat["systems"]:
            row["ours"] = (f"p99 {fmt_ms(lat['systems']['zwallet'].get('p99_ms'))} ms at {LATENCY_BAR[0]:,}/s "
                           f"offered, one transfer per request, 3 replicas and the load on one {cores}-core machine")
        elif a["compare"] == "throughput" and bank:
            row["ours"] = (f"{bank['systems']['zwallet']['per_s']:,.0f} transfers/s with 8190-transfer batches, "
                           f"3 replicas and the load on one {cores}-core machine, Python + Cython")
        out.append(row)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
