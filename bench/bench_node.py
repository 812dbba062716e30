"""Replicated shard benchmark: 3 node processes on loopback with fsync, driven through ``engine.client.Client``.

    python -m bench.bench_node                   # full run (2 to 4 minutes on 2 cores)
    python -m bench.bench_node --quick           # smoke run (under a minute)
    python -m bench.bench_node --write-results   # also replace the node section of bench/RESULTS.md

Setup: ``NodeCluster(3, tmpdir)`` (engine/devtools/cluster.py) with its defaults (fsync on every Raft log commit), then
``--accounts`` USD accounts created in 8190-record batches, each with no lower limit (``lower_limit=None``),
so every transfer between them succeeds and any non-OK result code is a failure of the system.
Measured, in one run on one cluster:

1. Throughput: ``--connections`` Client objects, each in its own thread, each keeping ``--inflight`` batches
   of 8190 transfers in flight (``Client.apply_batch_async``); transfers/s are counted at the client when
   replies arrive, per timed window of ``--window-s`` after a warm-up; the median window is reported.
   Every result code must be OK. Bar: median >= 200K transfers/s.
2. Latency of single-transfer requests (one transfer record per request). First the floor: requests one at a
   time (closed loop, ``Client.apply_batch``). Then fixed offered loads of 1K/s and 10K/s, free of coordinated
   omission: request i is due at t0 + i/rate and is sent then whatever happened to earlier requests; its
   latency runs from that due time to its reply, so a late sender counts too. The open-loop sender is a
   bare DEALER to the leader on one thread (``run_latency``), not ``Client``: the replicas and the load
   share 2 cores, and the Client's I/O thread and futures (~65 us a request) would take a third of a core
   from the replicas at 10K/s. Before the latency phases the machine settles (``settle``: the batch load's
   dirty pages are written back, else every fsync queues behind gigabytes of writeback). The first
   ``--latency-warmup-s`` are sent but not counted. Bar: p99 < 5 ms at 10K/s.
3. Failover under load: while a lighter batch load than (1) runs (``--failover-connections`` x
   ``--failover-inflight``), kill -9 the leader and measure the time from the kill to the first commit by a
   new leader, seen by a probe client that sends a fresh one-transfer request to the survivors every
   ``PROBE_INTERVAL_S``; also the load's longest stall (the longest gap between two replies around the
   kill). The killed replica is then restarted and caught up before the next run. ``--failovers`` runs;
   median reported.
4. Peak memory (VmHWM) of each replica: after phases 1-2 (the processes that ran them), and at the end; with
   the resident set split into anonymous memory and file pages (LMDB maps count in VmHWM too).

After all that the replicas' state digests must be equal. For phases 1-2 the CPU used by the client process,
by each replica, by the kernel and by everything else on the machine is recorded: other users of the machine
make the numbers noisy, and the "others" column says how much.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from bench.bench_raft import machine_info
from bench.loadgen import wait_for_reply_or
from bench.results import write_section
from bench.zw_load import field_offset
from engine import records as R
from engine import wire as W
from engine._ledger import OpEncoder
from engine.client import Client, ClientError
from engine.devtools.cluster import NodeCluster
from engine.stalls import replicas_text, stall_delta
from engine.zmq_io import recv_message

SETTLE_PAUSE_S = 2.0                  # after the batch load, before latency (see settle())
SECTION_BEGIN = "<!-- node-bench:begin -->"
SECTION_END = "<!-- node-bench:end -->"

REPLICAS = 3
CURRENCY = "USD"
BATCH_RECORDS = R.BATCH_SIZE_MAX                 # transfers per throughput batch (8190)
TRANSFER_AMOUNT = 1                              # minor units moved by each transfer
TEMPLATES_PER_CONNECTION = 8                     # random (from, to) batches a throughput connection rotates
SEED = 20261125

THROUGHPUT_BAR_PER_S = 200_000
LATENCY_BAR_RATE_PER_S = 10_000
LATENCY_BAR_P99_MS = 5.0
LATENCY_RATES_PER_S = (1_000, 10_000)
PHASES = ("throughput", "latency", "failover")
EXTRA_PHASES = ("unbatched", "percall")         # run only when named in --only (not part of the recorded run)
PERCALL_THREADS = 16                             # percall: threads calling Client.transfer (the README's path) ...
PERCALL_S = 10.0                                 # ... for this long, sharing one Client
UNBATCHED_CLIENTS = 64                           # unbatched: closed-loop clients (zwallet bench's number) ...
UNBATCHED_PROCESSES = 2                          # ... in this many load processes
REPLY_WAIT_S = 30.0                              # how long the end of a phase waits for outstanding replies

PROBE_INTERVAL_S = 0.010                         # failover: a new probe request this often
PROBE_ATTEMPT_TIMEOUT_S = 0.05                   # failover: probe client re-sends elsewhere after this
FAILOVER_TIMEOUT_S = 30.0                        # no commit by a new leader within this: the run fails
FAILOVER_LOAD_WARMUP_S = 2.0                     # load runs this long before the kill
FAILOVER_LOAD_AFTER_S = 3.0                      # ... and this long after the new leader's first commit
CATCH_UP_TIMEOUT_S = 60.0                        # restarted replica: applied index equal to the others'
STATUS_TIMEOUT_S = 2.0

DEFAULTS = dict(accounts=100_000, connections=4, inflight=4, warmup_s=2.0, window_s=2.0, windows=10,
                closed_loop_requests=2_000, latency_s=15.0, latency_warmup_s=1.0,
                failovers=5, failover_connections=2, failover_inflight=2, unbatched_s=10.0)
QUICK = dict(accounts=20_000, warmup_s=1.0, window_s=1.0, windows=4, closed_loop_requests=300,
             latency_s=3.0, latency_warmup_s=0.5, failovers=2)

# dedup ids: disjoint ranges per purpose so no two operations of a run ever share one
DEDUP_CREATE_BASE = 1
DEDUP_BATCH_BASE = 1 << 40          # + batch number * BATCH_RECORDS
DEDUP_SINGLE_BASE = 1 << 56         # + request number (latency and failover probes)


class Ids:
    """Thread-safe allocator of fresh dedup ids (never repeated within a run)."""

    def __init__(self) -> None:
        self._next_batch = 0
        self._next_single = 0
        self._lock = threading.Lock()

    def batch_base(self) -> int:
        """The first of BATCH_RECORDS consecutive fresh ids."""
        with self._lock:
            k, self._next_batch = self._next_batch, self._next_batch + 1
        return DEDUP_BATCH_BASE + k * BATCH_RECORDS

    def singles(self, n: int) -> np.ndarray:
        with self._lock:
            first, self._next_single = self._next_single, self._next_single + n
        return np.arange(DEDUP_SINGLE_BASE + first, DEDUP_SINGLE_BASE + first + n, dtype=np.int64)


ISSUED_AT = R.field_offset(R.OP_DTYPE, "issued_ms")      # a single-record payload: its issued_ms, set when sent


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q, method="higher")) if len(values) else float("nan")


# --- setup -------------------------------------------------------------------------------------------------
def create_accounts(client: Client, accounts: int) -> float:
    """Accounts 1..accounts, USD, no lower limit (may go negative). Returns seconds taken."""
    template = OpEncoder().create_account(DEDUP_CREATE_BASE, 1, CURRENCY, lower_limit=None)
    t0 = time.perf_counter()
    futures = []
    for start in range(0, accounts, BATCH_RECORDS):
        ids = np.arange(start + 1, min(start + BATCH_RECORDS, accounts) + 1, dtype=np.int64)
        ops = np.repeat(template, len(ids))
        R.put_u128(ops["dedup_id"], ids - 1 + DEDUP_CREATE_BASE)
        R.put_u128(ops["account_id"], ids)
        futures.append(client.apply_batch_async(ops))
    for fut in futures:
        codes = fut.result(REPLY_WAIT_S)["code"]
        if np.count_nonzero(codes != R.Code.OK):
            raise RuntimeError(f"account creation failed: codes {sorted(set(codes.tolist()))}")
    return time.perf_counter() - t0


def random_pairs(rng: np.random.Generator, n: int, accounts: int) -> tuple[np.ndarray, np.ndarray]:
    """n (from, to) account pairs, uniform, never from == to."""
    src = rng.integers(1, accounts + 1, n)
    dst = (src - 1 + rng.integers(1, accounts, n)) % accounts + 1
    return src, dst


def single_transfers(ids: Ids, rng: np.random.Generator, n: int, accounts: int) -> np.ndarray:
    """n TRANSFER records between random accounts, each with a fresh dedup id (sent one per request)."""
    src, dst = random_pairs(rng, n, accounts)
    dedup = ids.singles(n)
    return np.concatenate([R.transfers(dedup[k:k + BATCH_RECORDS], src[k:k + BATCH_RECORDS], dst[k:k + BATCH_RECORDS],
                                       np.full(min(BATCH_RECORDS, n - k), TRANSFER_AMOUNT), CURRENCY)
                           for k in range(0, n, BATCH_RECORDS)])


# --- 1. pipelined batch load --------------------------------------------------------------------------------
@dataclass
class BatchLoad:
    """``connections`` threads, each with its own Client keeping ``inflight`` batches of BATCH_RECORDS
    transfers in flight until ``stop()``. Replies are recorded as (time, transfers, transfers not OK)."""
    addresses: list[str]
    accounts: int
    ids: Ids
    connections: int
    inflight: int
    seed: int = SEED
    completions: list[tuple[float, int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duplicates: int = 0
    keys: Any = None                    # CURVE client keys (engine.service.security.ClientKeys; None: insecure)
    batch_records: int = BATCH_RECORDS  # transfers per request (1: unbatched, bench/bench_curve.py)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: list[Client] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        for k in range(self.connections):
            client = Client(self.addresses, keys=self.keys)
            self._clients.append(client)
            t = threading.Thread(target=self._run, args=(client, self.seed + k), name=f"batch-load-{k}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REPLY_WAIT_S + 5)
        for c in self._clients:
            c.close()
        self._threads.clear()
        self._clients.clear()

    def _run(self, client: Client, seed: int) -> None:
        rng = np.random.default_rng(seed)
        templates = []
        n = self.batch_records
        for _ in range(TEMPLATES_PER_CONNECTION):
            src, dst = random_pairs(rng, n, self.accounts)
            templates.append(R.transfers(np.zeros(n, dtype=np.int64), src, dst, np.full(n, TRANSFER_AMOUNT), CURRENCY))
        offsets = np.arange(n, dtype=np.uint64)
        pending: list[Future] = []
        sent = 0
        try:
            while True:
                while not self._stop.is_set() and len(pending) < self.inflight:
                    ops = templates[sent % TEMPLATES_PER_CONNECTION]
                    ops["dedup_id"][:, 0] = offsets + np.uint64(self.ids.batch_base())
                    ops["issued_ms"] = int(time.time() * 1000)     # as a client stamps a batch it sends
                    pending.append(client.apply_batch_async(ops))     # copies ops: the template is reusable
                    sent += 1
                if not pending:
                    return
                results = pending.pop(0).result(REPLY_WAIT_S)
                done = time.perf_counter()
                not_ok = int(np.count_nonzero(results["code"] != R.Code.OK))
                dup = int(np.count_nonzero(results["flags"] & R.ResultFlag.DUPLICATE))
                with self._lock:
                    self.completions.append((done, len(results), not_ok))
                    self.duplicates += dup
        except Exception as exc:  # noqa: BLE001 - a reply that never came, a closed client: the run reports it
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def records_between(self, t_from: float, t_to: float) -> int:
        with self._lock:
            return sum(n for t, n, _ in self.completions if t_from <= t < t_to)


def run_throughput(addresses: list[str], ids: Ids, args: argparse.Namespace) -> dict[str, Any]:
    load = BatchLoad(addresses, args.accounts, ids, args.connections, args.inflight)
    load.start()
    try:
        t_start = time.perf_counter() + args.warmup_s
        windows = []
        for k in range(args.windows):
            t_end = t_start + (k + 1) * args.window_s
            time.sleep(max(0.0, t_end - time.perf_counter()))
            rate = load.records_between(t_end - args.window_s, t_end) / args.window_s
            windows.append(rate)
            print(f"  window {k + 1}/{args.windows}: {rate:,.0f} transfers/s", flush=True)
    finally:
        load.stop()
    not_ok = sum(bad for _, _, bad in load.completions)
    return {"windows_per_s": windows, "median_per_s": statistics.median(windows), "min_per_s": min(windows),
            "max_per_s": max(windows), "batches": len(load.completions),
            "transfers": sum(n for _, n, _ in load.completions), "not_ok": not_ok,
            "duplicates": load.duplicates, "errors": load.errors,
            "connections": args.connections, "inflight": args.inflight}


# --- 2. open-loop latency ----------------------------------------------------------------------------------
def run_latency(leader_address: str, ids: Ids, args: argparse.Namespace, rate: float,
                keys: Any = None) -> dict[str, Any]:
    """Requests of one transfer each, due at t0 + i/rate, latency measured from the due time to the reply.

    The load generator is a bare DEALER on this thread (the wire protocol of docs/protocol.md, headers
    encoded as requests go out, replies matched by req_id), not ``Client``: on this 2-core machine the
    replicas and the load share the CPU, and the Client's I/O thread, futures and callbacks cost ~65 us per
    request, which at 10K/s would take a third of a core from the replicas and make the sender itself late.
    It talks to the leader only; a NOT_LEADER or ERROR reply counts as not OK."""
    warmup = int(rate * args.latency_warmup_s)
    total = warmup + int(rate * args.latency_s)
    ops = single_transfers(ids, np.random.default_rng(SEED + int(rate)), total, args.accounts)
    payloads = [bytearray(ops[i:i + 1].tobytes()) for i in range(total)]     # issued_ms stamped when sent
    latency_s = np.full(total, np.nan)
    code = np.full(total, -1, dtype=np.int64)
    sent_late_s = np.zeros(total)
    due_s = np.zeros(total)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    if keys is not None:                                    # CURVE (bench/bench_curve.py)
        keys.configure_client(sock)
    sock.connect(leader_address)
    encode = W.encode
    code_offset = field_offset(R.RESULT_DTYPE, "code")
    answered = 0

    def drain(block_ms: int) -> int:
        got = 0
        while sock.poll(block_ms if got == 0 else 0):
            frames = recv_message(sock)        # (getsockopt(RCVMORE) pays pyzmq's enum on every call)
            head = frames[0]
            body = frames[1].bytes if len(frames) > 1 else b""
            now = time.perf_counter()
            reply = W.decode_reply(head)
            i = reply.req_id - 1
            if 0 <= i < total and np.isnan(latency_s[i]):
                latency_s[i] = now - due_s[i]
                code[i] = (int.from_bytes(body[code_offset:code_offset + 2], "little")
                           if reply.status == W.Status.OK and len(body) >= R.RESULT_DTYPE.itemsize else -2)
                got += 1
            block_ms = 0
        return got

    try:
        time.sleep(0.2)                                     # let the connection come up
        t0 = time.perf_counter() + 0.05
        i = 0
        while i < total:
            now = time.perf_counter()
            while i < total and t0 + i / rate <= now:        # send everything that is due, even if late
                due = t0 + i / rate
                due_s[i] = due
                sock.send(encode(W.Request(i + 1, W.Op.APPLY)), zmq.SNDMORE)
                struct.pack_into("<Q", payloads[i], ISSUED_AT, int(time.time() * 1000))
                sock.send(payloads[i])
                sent_late_s[i] = now - due
                i += 1
            answered += drain(0)
            if i < total and wait_for_reply_or(sock, t0 + i / rate):
                answered += drain(0)
        send_s = time.perf_counter() - t0
        deadline = time.perf_counter() + REPLY_WAIT_S
        while answered < total and time.perf_counter() < deadline:
            answered += drain(50)
    finally:
        sock.close(0)
        ctx.term()
    lat_ms = 1000 * latency_s[warmup:]
    was_answered = ~np.isnan(lat_ms)
    answered_ms = lat_ms[was_answered]
    return {"rate_per_s": rate, "requests": total - warmup, "achieved_send_per_s": total / send_s,
            "answered": len(answered_ms), "not_ok": int(np.count_nonzero(code[warmup:][was_answered] != R.Code.OK)),
            "p50_ms": pct(answered_ms, 50), "p90_ms": pct(answered_ms, 90), "p99_ms": pct(answered_ms, 99),
            "p999_ms": pct(answered_ms, 99.9),
            "max_ms": float(answered_ms.max()) if len(answered_ms) else float("nan"),
            "sender_late_ms_p99": 1000 * pct(sent_late_s[warmup:], 99),
            "sender_late_ms_max": 1000 * float(sent_late_s[warmup:].max())}


def settle(status_client: Client, cluster: NodeCluster) -> float:
    """Let the batch load's aftermath pass before latency is measured: snapshots the load triggered finish
    (wait_snapshots_done), and the gigabytes of log and events the kernel is still writing back reach the
    disk (an fsync queued behind that writeback takes tens of milliseconds): ``os.sync()``, a pause, again."""
    t = time.perf_counter()
    wait_snapshots_done(status_client, cluster)
    os.sync()
    time.sleep(SETTLE_PAUSE_S)
    os.sync()
    return time.perf_counter() - t


def run_closed_loop(addresses: list[str], ids: Ids, args: argparse.Namespace) -> dict[str, Any]:
    """The floor under the open-loop numbers: one single-transfer request at a time, each sent when the
    previous one is answered (``Client.apply_batch``), on an otherwise idle cluster."""
    ops = single_transfers(ids, np.random.default_rng(SEED - 1), args.closed_loop_requests, args.accounts)
    latency_ms = np.zeros(len(ops))
    not_ok = 0
    with Client(addresses) as client:
        for i in range(len(ops)):
            t = time.perf_counter()
            results = client.apply_batch(ops[i:i + 1])
            latency_ms[i] = 1000 * (time.perf_counter() - t)
            not_ok += int(results["code"][0] != R.Code.OK)
    return {"requests": len(latency_ms), "not_ok": not_ok, "p50_ms": pct(latency_ms, 50),
            "p99_ms": pct(latency_ms, 99), "max_ms": float(latency_ms.max())}


# --- 3. failover under load --------------------------------------------------------------------------------
def statuses(status_client: Client, cluster: NodeCluster) -> dict[int, dict[str, Any]]:
    """STATUS of every live replica (node id -> status); a replica that does not answer is left out."""
    out = {}
    for k, node in enumerate(cluster.ids):
        if not cluster.alive(node):
            continue
        try:
            out[node] = status_client.status(k)
        except ClientError:
            pass
    return out


def leader_and_term(status_client: Client, cluster: NodeCluster,
                    timeout_s: float = FAILOVER_TIMEOUT_S) -> tuple[int, int]:
    """(leader id, its term); the leader of the newest term if a deposed one has not noticed yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leaders = [(st["term"], node) for node, st in statuses(status_client, cluster).items()
                   if st.get("role") == "leader"]
        if leaders:
            term, node = max(leaders)
            return node, term
        time.sleep(0.02)
    raise TimeoutError("no leader")


def run_unbatched(cluster: NodeCluster, status_client: Client, ids: Ids, args: argparse.Namespace) -> dict[str, Any]:
    """zwallet bench's unbatched workload against this cluster: UNBATCHED_CLIENTS closed-loop clients, one
    transfer per request (``bench.zw_load.run_unbatched``); with the leader's counters around it, the
    requests each log entry carried."""
    from bench import zw_load
    rng = np.random.default_rng(SEED + 7)
    ops = single_transfers(ids, rng, int(args.unbatched_s * 60_000), args.accounts)
    leader = find_leader(status_client, cluster)                  # a node id
    before = status_client.status(cluster.ids.index(leader))["counters"]
    r = zw_load.run_unbatched(cluster.client_addr[leader], ops, connections=UNBATCHED_CLIENTS,
                              processes=UNBATCHED_PROCESSES, duration_s=args.unbatched_s)
    after = status_client.status(cluster.ids.index(leader))["counters"]
    entries = after["entries_proposed"] - before["entries_proposed"]
    lat = r["latency_s"] * 1000
    return {"requests": r["count"], "wall_s": r["wall_s"], "per_s": r["count"] / r["wall_s"] if r["wall_s"] else 0.0,
            "requests_per_entry": (after["entries_batches"] - before["entries_batches"]) / max(1, entries),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "not_ok": int(np.count_nonzero(r["codes"] != R.Code.OK)), "client_cpu_s": r["client_cpu_s"]}


def run_percall(addresses: list[str], accounts: int) -> dict[str, Any]:
    """The README's per-call path: PERCALL_THREADS threads sharing one ``Client``, each calling
    ``client.transfer(...)`` in a closed loop (the client coalesces concurrent calls into batches and asks
    for their events, which the leader cuts from the entry's own); calls/s and per-call latency."""
    lat: list[float] = []
    not_ok = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + PERCALL_S
    with Client(addresses, timeout_s=30) as client:
        def worker(k: int) -> None:
            rng = np.random.default_rng(SEED + 100 + k)
            mine: list[float] = []
            bad = 0
            d = (1 << 62) + (k << 40)
            while time.perf_counter() < stop:
                a = int(rng.integers(1, accounts + 1))
                b = a % accounts + 1
                t0 = time.perf_counter()
                r = client.transfer(d, a, b, TRANSFER_AMOUNT, CURRENCY)
                mine.append(time.perf_counter() - t0)
                bad += r.code != R.Code.OK
                d += 1
            with lock:
                lat.extend(mine)
                not_ok[0] += bad
        t_start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(PERCALL_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
    arr = np.array(lat) * 1000
    return {"calls": len(lat), "wall_s": wall, "per_s": len(lat) / wall, "p50_ms": pct(arr, 50),
            "p99_ms": pct(arr, 99), "not_ok": not_ok[0]}


def find_leader(status_client: Client, cluster: NodeCluster) -> int:
    return leader_and_term(status_client, cluster)[0]


def wait_caught_up(status_client: Client, cluster: NodeCluster) -> None:
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        sts = statuses(status_client, cluster)
        if len(sts) == len(cluster.ids) and len({st["applied"] for st in sts.values()}) == 1 \
                and any(st["role"] == "leader" for st in sts.values()):
            return
        time.sleep(0.05)
    raise TimeoutError("the replicas did not reach the same applied index")


def wait_snapshots_done(status_client: Client, cluster: NodeCluster, timeout_s: float = 60.0) -> float:
    """Wait until no replica is making a snapshot (a child serializing and writing it: seconds of CPU and a
    large file write after a heavy load, which a latency measurement would otherwise share the machine
    with); returns the seconds waited. Gives up quietly after ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        sts = statuses(status_client, cluster)
        if not any(st.get("snapshot_in_progress") for st in sts.values()):
            break
        time.sleep(0.1)
    return time.monotonic() - t0


def probe_new_leader(probe: Client, ops: np.ndarray, t_kill: float) -> float:
    """Seconds from t_kill to the first OK reply to a one-transfer request sent to the survivors: a fresh
    request (the next record of ``ops``) every PROBE_INTERVAL_S, each retried by the client on its own, so the
    first commit the new leader can make is seen within about that interval."""
    first_ok: list[float] = []
    done = threading.Event()

    def record(fut: Future) -> None:
        try:
            ok = int(fut.result()["code"][0]) == R.Code.OK
        except ClientError:
            return
        if ok:
            first_ok.append(time.perf_counter())
            done.set()

    for i in range(len(ops)):
        probe.apply_batch_async(ops[i:i + 1]).add_done_callback(record)
        if done.wait(PROBE_INTERVAL_S):
            return min(first_ok) - t_kill
    raise TimeoutError(f"no commit by a new leader within {len(ops) * PROBE_INTERVAL_S:.0f} s")


def run_failovers(cluster: NodeCluster, status_client: Client, ids: Ids, args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for run in range(args.failovers):
        probe_ops = single_transfers(ids, np.random.default_rng(SEED + run),
                                     int(FAILOVER_TIMEOUT_S / PROBE_INTERVAL_S), args.accounts)
        wait_caught_up(status_client, cluster)
        load = BatchLoad(cluster.client_addresses, args.accounts, ids, args.failover_connections,
                         args.failover_inflight, seed=SEED + 100 * (run + 1))
        load.start()
        try:
            time.sleep(FAILOVER_LOAD_WARMUP_S)
            leader = find_leader(status_client, cluster)
            survivors = [cluster.client_addr[n] for n in cluster.ids if n != leader]
            probe = Client(survivors, timeout_s=FAILOVER_TIMEOUT_S, attempt_timeout_s=PROBE_ATTEMPT_TIMEOUT_S)
            try:
                t_kill = time.perf_counter()
                cluster.kill(leader)
                new_leader_s = probe_new_leader(probe, probe_ops, t_kill)
            finally:
                probe.close()
            time.sleep(FAILOVER_LOAD_AFTER_S)
        finally:
            load.stop()
        times = sorted(t for t, _, _ in load.completions)
        last_before = max([t for t in times if t <= t_kill], default=t_kill)
        after = [t for t in times if t > t_kill]
        longest_gap_s = float(np.diff([last_before] + after).max()) if after else float("nan")
        r: dict[str, Any] = {"killed": leader, "new_leader_commit_ms": 1000 * new_leader_s,
                             "load_longest_gap_ms": 1000 * longest_gap_s,
                             "load_not_ok": sum(bad for _, _, bad in load.completions), "load_errors": load.errors,
                             "load_batches_after_kill": len(after)}
        runs.append(r)
        print(f"  failover {run + 1}/{args.failovers}: killed {leader}, new leader committed after "
              f"{r['new_leader_commit_ms']:.0f} ms; load's longest gap {r['load_longest_gap_ms']:.0f} ms, "
              f"{len(after)} batches after the kill, not OK {r['load_not_ok']}, errors {len(load.errors)}",
              flush=True)
        cluster.start_replica(leader)
    wait_caught_up(status_client, cluster)
    new_leader = [r["new_leader_commit_ms"] for r in runs]
    gaps = [r["load_longest_gap_ms"] for r in runs]
    return {"runs": runs, "median_ms": statistics.median(new_leader), "min_ms": min(new_leader),
            "max_ms": max(new_leader), "load_gap_median_ms": statistics.median(gaps),
            "load_gap_max_ms": max(gaps), "not_ok": sum(r["load_not_ok"] for r in runs),
            "errors": [e for r in runs for e in r["load_errors"]]}


# --- CPU accounting: what else used this machine meanwhile? -------------------------------------------------
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000                          # /proc/<pid>/stat flags: a kernel thread


def machine_cpu_s() -> tuple[float, float]:
    """(CPU seconds all cores spent busy, of which in interrupts and softirqs) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS_PER_S, (irq + softirq) / CLOCK_TICKS_PER_S


def process_cpu_s(pid: int | str) -> tuple[float, bool]:
    """(utime + stime of a process, all its threads; whether it is a kernel thread); (0, False) if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, False
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S, bool(int(fields[6]) & PF_KTHREAD)


def kernel_threads_cpu_s() -> float:
    """CPU seconds used by kernel threads (disk writeback, journaling, network softirq threads ...)."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            cpu, kernel = process_cpu_s(pid)
            if kernel:
                total += cpu
    return total


class CpuShare:
    """Cores used during a phase: by the whole machine; by this benchmark (this process, i.e. the clients, and
    each replica); by the kernel (its threads and interrupts: mostly the work our disk writes and loopback
    traffic cause); and by everything else, i.e. other users of the machine, who make the numbers noisier."""

    def __init__(self, cluster: NodeCluster) -> None:
        self.pids = {n: cluster.procs[n].pid for n in cluster.ids if cluster.alive(n)}
        self.t0 = time.perf_counter()
        self.machine0, self.irq0 = machine_cpu_s()
        self.kthreads0 = kernel_threads_cpu_s()
        self.client0 = self._client()
        self.replicas0 = {n: process_cpu_s(pid)[0] for n, pid in self.pids.items()}

    @staticmethod
    def _client() -> float:
        t = os.times()
        return t.user + t.system

    def stop(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t0
        machine, irq = machine_cpu_s()
        kernel = (kernel_threads_cpu_s() - self.kthreads0 + irq - self.irq0) / elapsed
        machine = (machine - self.machine0) / elapsed
        client = (self._client() - self.client0) / elapsed
        replicas = {n: (process_cpu_s(pid)[0] - self.replicas0[n]) / elapsed for n, pid in self.pids.items()}
        ours = client + sum(replicas.values())
        return {"machine_cores": round(machine, 2), "bench_cores": round(ours, 2), "kernel_cores": round(kernel, 2),
                "other_cores": round(max(0.0, machine - ours - kernel), 2), "client_cores": round(client, 2),
                "replica_cores": {n: round(c, 2) for n, c in replicas.items()}}


def memory_mib(cluster: NodeCluster) -> dict[int, dict[str, float]]:
    """Per live replica: peak RSS (VmHWM, ``NodeCluster.peak_rss_bytes``) and the current resident set split
    into anonymous memory (heap, ledger arrays) and file pages (LMDB maps: the log and the event store)."""
    out = {}
    for node in cluster.ids:
        peak = cluster.peak_rss_bytes(node)
        if peak is None:
            continue
        row = {"peak": round(peak / (1 << 20), 1)}
        try:
            with open(f"/proc/{cluster.procs[node].pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("RssAnon", "RssFile", "RssShmem"):
                        row[key[3:].lower()] = round(int(value.split()[0]) / 1024, 1)
        except OSError:
            pass
        out[node] = row
    return out


def log_store_text(stores: dict[int, dict[str, int] | None]) -> str:
    """One line on each replica's Raft log files (engine/raft/log_store.py) after the batch load."""
    parts = []
    for rid, ls in sorted(stores.items()):
        if ls:
            parts.append(f"replica {rid}: {ls['segments']} segments, {ls['segments_removed']} removed, "
                         f"{ls['segments_without_spare']} made without a spare, "
                         f"{ls['bytes_written'] / 1e9:.2f} GB written")
    return "log store: " + ("; ".join(parts) or "no report")


def digests_equal(cluster: NodeCluster, status_client: Client) -> bool:
    wait_caught_up(status_client, cluster)
    digests = {status_client.status(k, with_digest=True)["digest"] for k in range(len(cluster.ids))}
    return len(digests) == 1


# --- reporting ---------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def throughput_ok(tp: dict[str, Any]) -> bool:
    return tp["median_per_s"] >= THROUGHPUT_BAR_PER_S and tp["not_ok"] == 0 and not tp["errors"]


def latency_ok(r: dict[str, Any]) -> bool:
    return r["p99_ms"] < LATENCY_BAR_P99_MS and r["answered"] == r["requests"] and r["not_ok"] == 0


def leader_changes(phase: dict[str, Any]) -> str:
    before, after = phase["terms"]
    return "no election" if before == after else f"Raft term {before} -> {after} (elections during the load)"


def cpu_text(phase: str, c: dict[str, Any]) -> str:
    replicas = ", ".join(f"{n}{'*' if n == c['leader'] else ''} {v}" for n, v in c["replica_cores"].items())
    return (f"{phase}: machine {c['machine_cores']} = client process {c['client_cores']} + replicas ({replicas}) "
            f"+ kernel {c['kernel_cores']} + others {c['other_cores']}")


def memory_text(when: str, mem: dict[int, dict[str, float]]) -> str:
    return f"{when}: " + ", ".join(f"replica {n} peak {v['peak']:,.0f} (anon {v.get('anon', 0):,.0f}, "
                                   f"file {v.get('file', 0):,.0f})" for n, v in mem.items())


def render(res: dict[str, Any], command: str, args: argparse.Namespace) -> str:
    m = res["machine"]
    tp = res["throughput"]
    cl = res["closed_loop"]
    fo = res["failover"]
    mem = res["memory_mib"]
    lines = [SECTION_BEGIN, "## Replicated shard (engine/node.py, engine/client.py)", "",
             f"Command: `{command}`  ",
             (f"Machine: {m['cpus']} cores ({m['cpu']}), Python {m['python']}, Linux {m['kernel']}; {m['date_utc']}; "
              f"load average before/after: {m['loadavg_1_5_15']} / {res.get('loadavg_after')}  "),
             (f"Setup: `NodeCluster(3)`: 3 node processes on 127.0.0.1 with the default config (fsync on every Raft "
              f"log commit); {args.accounts:,} USD accounts without a lower limit; the clients (this benchmark's "
              f"process) and the replicas share the {m['cpus']} cores."), "",
             "| measurement | result | bar | verdict |", "|---|---|---|---|"]
    lines.append(f"| throughput: 8190-transfer batches, {tp['connections']} connections x {tp['inflight']} in "
                 f"flight, median of {len(tp['windows_per_s'])} windows of {args.window_s:g} s | "
                 f"**{tp['median_per_s']:,.0f} transfers/s** (min {tp['min_per_s']:,.0f}, max {tp['max_per_s']:,.0f}); "
                 f"{tp['not_ok']} not OK; {leader_changes(tp)} | >= {THROUGHPUT_BAR_PER_S:,}/s, all OK | "
                 f"**{verdict(throughput_ok(tp))}** |")
    lines.append(f"| latency floor: one request at a time, closed loop ({cl['requests']:,} requests) | p50 "
                 f"{cl['p50_ms']:.1f} / p99 {cl['p99_ms']:.1f} / max {cl['max_ms']:.1f} ms; {cl['not_ok']} not OK "
                 f"| - | - |")
    for r in res["latency"]:
        rate = int(r["rate_per_s"])
        bar, ok = (f"p99 < {LATENCY_BAR_P99_MS:g} ms", f"**{verdict(latency_ok(r))}**") \
            if rate == LATENCY_BAR_RATE_PER_S else ("-", "-")
        lines.append(f"| latency, one transfer per request, open loop at {rate:,}/s ({r['requests']:,} requests, "
                     f"a bare DEALER at the leader) | p50 {r['p50_ms']:.1f} / "
                     f"p99 **{r['p99_ms']:.1f}** / p99.9 {r['p999_ms']:.1f} / max {r['max_ms']:.1f} ms; "
                     f"{r['requests'] - r['answered']} unanswered, {r['not_ok']} not OK; {leader_changes(r)} "
                     f"| {bar} | {ok} |")
    lines.append(f"| failover under load: kill -9 leader -> first commit by the new leader, {len(fo['runs'])} runs | "
                 f"median **{fo['median_ms']:.0f} ms** (min {fo['min_ms']:.0f}, max {fo['max_ms']:.0f}) | - | - |")
    lines.append(f"| failover: the load's longest gap between replies around the kill | median "
                 f"{fo['load_gap_median_ms']:.0f} ms (max {fo['load_gap_max_ms']:.0f}); {fo['not_ok']} not OK, "
                 f"{len(fo['errors'])} client errors | - | - |")
    peaks = ", ".join(f"replica {n}: {v['peak']:,.0f} MiB" for n, v in mem["after_load"].items())
    lines.append(f"| peak RSS (VmHWM) per replica after throughput + latency | {peaks} | - | - |")
    windows = ", ".join(f"{w / 1000:.0f}K" for w in tp["windows_per_s"])
    lines += ["", (f"Throughput windows (transfers/s): {windows}; "
                   f"{tp['transfers']:,} transfers in {tp['batches']:,} batches, {tp['duplicates']} duplicate "
                   f"results (client retries).  ")]
    for r in res["latency"]:
        lines.append(f"Latency at {int(r['rate_per_s']):,}/s: sender achieved {r['achieved_send_per_s']:,.0f}/s; "
                     f"p90 {r['p90_ms']:.1f} ms; the sender was late by p99 {r['sender_late_ms_p99']:.2f} ms, "
                     f"max {r['sender_late_ms_max']:.1f} ms (counted in the latency: it runs from the due time).  ")
    lines.append("Failover runs (new leader's first commit / load's longest gap, ms): "
                 + ", ".join(f"{r['new_leader_commit_ms']:.0f}/{r['load_longest_gap_ms']:.0f}" for r in fo["runs"])
                 + f"; load during failover: {args.failover_connections} connections x {args.failover_inflight} "
                 f"batches in flight; the load's clients re-send after their 1 s attempt timeout.  ")
    lines.append("Memory (MiB; peak = VmHWM, which counts LMDB's mapped file pages too; anon / file = resident "
                 f"now): {memory_text('after throughput + latency', mem['after_load'])}; "
                 f"{memory_text('at the end, killed replicas restarted', mem['end'])}.  ")
    phases = [("throughput", tp["cpu"])] + [(f"latency {int(r['rate_per_s']):,}/s", r["cpu"]) for r in res["latency"]]
    lines.append(f"CPU (cores busy of {m['cpus']}; replicas by id, * = leader; kernel = kernel threads and "
                 "interrupts, mostly disk writeback and loopback traffic; others = other users of the machine): "
                 + "; ".join(cpu_text(name, c) for name, c in phases) + ".  ")
    lines.append("Stalls of 5 ms or more on the replicas' latency path (engine/stalls.py), during "
                 + "; during ".join(stalls_text(f"latency {int(r['rate_per_s']):,}/s", r) for r in res["latency"])
                 + ".  ")
    lines.append(f"Replicas' state digests equal at the end: {res['digests_equal']}")
    if res.get("note"):
        lines += ["", res["note"]]
    lines += ["", SECTION_END]
    return "\n".join(lines)


def write_results(section: str) -> None:
    write_section(SECTION_BEGIN, SECTION_END, section)


# --- main --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="replicated shard benchmark (3 node processes, fsync, loopback)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer accounts, shorter phases, 2 failovers")
    p.add_argument("--write-results", action="store_true", help="replace the node section of bench/RESULTS.md")
    p.add_argument("--note", default="", help="free text added to the results")
    p.add_argument("--accounts", type=int)
    p.add_argument("--connections", type=int, help="throughput: Client objects, one thread each")
    p.add_argument("--inflight", type=int, help="throughput: batches in flight per connection")
    p.add_argument("--warmup-s", type=float, help="throughput: load before the first window")
    p.add_argument("--window-s", type=float, help="throughput: length of one timed window")
    p.add_argument("--windows", type=int, help="throughput: timed windows (median reported)")
    p.add_argument("--closed-loop-requests", type=int, help="latency: requests sent one at a time first")
    p.add_argument("--latency-s", type=float, help="latency: measured seconds per offered rate")
    p.add_argument("--latency-warmup-s", type=float, help="latency: seconds sent first and not counted")
    p.add_argument("--failovers", type=int, help="failover runs")
    p.add_argument("--failover-connections", type=int, help="failover: load connections")
    p.add_argument("--failover-inflight", type=int, help="failover: batches in flight per load connection")
    default_rates = ",".join(str(r) for r in LATENCY_RATES_PER_S)
    p.add_argument("--rates", help=f"latency: comma-separated offered rates per second (default {default_rates}); "
                   f"the bar is judged at {LATENCY_BAR_RATE_PER_S:,}/s")
    p.add_argument("--unbatched-s", type=float, help="unbatched: seconds of closed-loop load")
    p.add_argument("--only", help="comma-separated phases to run (throughput, latency, failover; default all): "
                   "e.g. 'latency' to iterate on latency alone, 'throughput,latency' to measure it on a ledger "
                   "the batch load has filled (snapshots as large as in a full run); also 'unbatched' (only "
                   f"when named): {UNBATCHED_CLIENTS} closed-loop clients, one transfer per request, as in "
                   "zwallet bench, with the leader's requests per log entry")
    args = p.parse_args(argv)
    if args.only is not None and args.write_results:
        p.error("--write-results needs every phase (no --only)")
    args.phases = set(PHASES if args.only is None else (x.strip() for x in args.only.split(",") if x.strip()))
    if args.phases - set(PHASES + EXTRA_PHASES):
        p.error(f"--only: unknown phase(s) {sorted(args.phases - set(PHASES + EXTRA_PHASES))}; known: "
                f"{', '.join(PHASES + EXTRA_PHASES)}")
    args.rates = tuple(int(x) for x in args.rates.split(",")) if args.rates else LATENCY_RATES_PER_S
    if args.rates != LATENCY_RATES_PER_S and args.write_results:
        p.error("--write-results needs the default --rates")
    for name, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def measured(cluster: NodeCluster, status_client: Client, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result with the CPU used meanwhile, the leader at the end and the elections meanwhile."""
    _, term_before = leader_and_term(status_client, cluster)
    stalls_before = stall_reports(status_client, cluster)
    cpu = CpuShare(cluster)
    result = run()
    result["cpu"] = cpu.stop()
    result["cpu"]["leader"], term_after = leader_and_term(status_client, cluster)
    result["terms"] = (term_before, term_after)
    result["stalls"] = stalls_since(stalls_before, status_client, cluster)
    return result


def stall_reports(status_client: Client, cluster: NodeCluster) -> dict[int, dict[str, Any]]:
    """Every live replica's stall log (engine/stalls.py), by node id."""
    return {n: st.get("stalls", {}) for n, st in statuses(status_client, cluster).items()}


def stalls_since(before: dict[int, dict[str, Any]], status_client: Client,
                 cluster: NodeCluster) -> dict[int, dict[str, Any]]:
    """Each replica's stalls recorded since ``before`` (a ``stall_reports``), by cause."""
    return {n: stall_delta(before.get(n, {}), rep) for n, rep in stall_reports(status_client, cluster).items()}


def stalls_text(phase: str, r: dict[str, Any]) -> str:
    return f"{phase}: " + replicas_text(r.get("stalls", {}), r["cpu"]["leader"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = "python -m bench.bench_node " + " ".join(argv)
    res: dict[str, Any] = {"machine": machine_info(), "note": args.note}
    base = tempfile.mkdtemp(prefix="bench-node-")
    cluster = NodeCluster(REPLICAS, base, insecure=True)   # CURVE's cost: bench/bench_curve.py
    ids = Ids()
    status_client: Client | None = None
    try:
        t0 = time.perf_counter()
        cluster.start()
        status_client = Client(cluster.client_addresses, timeout_s=STATUS_TIMEOUT_S,
                               attempt_timeout_s=STATUS_TIMEOUT_S)
        with Client(cluster.client_addresses) as setup:
            seconds = create_accounts(setup, args.accounts)
        print(f"cluster of {REPLICAS} up, {args.accounts:,} accounts created in {seconds:.1f} s", flush=True)
        if "throughput" in args.phases:
            print(f"throughput ({args.connections} connections x {args.inflight} batches of {BATCH_RECORDS} "
                  f"in flight) ...", flush=True)
            res["throughput"] = measured(cluster, status_client,
                                         lambda: run_throughput(cluster.client_addresses, ids, args))
            settle_s = settle(status_client, cluster)
            print(f"settled after the batch load in {settle_s:.1f} s (dirty pages written back)", flush=True)
            res["settle_s"] = settle_s
            res["log_store"] = {rid: st.get("log_store") for rid, st in statuses(status_client, cluster).items()}
            print("  " + log_store_text(res["log_store"]), flush=True)
        if "latency" in args.phases:
            print(f"closed-loop latency, {args.closed_loop_requests:,} requests one at a time ...", flush=True)
            res["closed_loop"] = run_closed_loop(cluster.client_addresses, ids, args)
            print(f"  p50 {res['closed_loop']['p50_ms']:.2f}  p99 {res['closed_loop']['p99_ms']:.2f} ms", flush=True)
            res["latency"] = []
            for rate in args.rates:
                print(f"latency at {rate:,}/s for {args.latency_s:g} s ...", flush=True)
                leader_address = cluster.client_addr[find_leader(status_client, cluster)]
                r = measured(cluster, status_client, functools.partial(run_latency, leader_address, ids, args, rate))
                res["latency"].append(r)
                print(f"  p50 {r['p50_ms']:.2f}  p99 {r['p99_ms']:.2f}  p99.9 {r['p999_ms']:.2f}  "
                      f"max {r['max_ms']:.2f} ms  (answered {r['answered']}/{r['requests']}, not OK {r['not_ok']}; "
                      f"sender late p99 {r['sender_late_ms_p99']:.2f} max {r['sender_late_ms_max']:.1f} ms; "
                      f"terms {r['terms']})", flush=True)
                print("  cores " + cpu_text("used", r["cpu"]), flush=True)
                print("  " + stalls_text("stalls >= 5 ms", r), flush=True)
        if "unbatched" in args.phases:
            print(f"unbatched: {UNBATCHED_CLIENTS} closed-loop clients for {args.unbatched_s:g} s ...", flush=True)
            res["unbatched"] = r = measured(cluster, status_client, lambda: run_unbatched(cluster, status_client, ids,
                                                                                         args))
            print(f"  {r['requests']:,} requests in {r['wall_s']:.1f} s: {r['per_s']:,.0f}/s; "
                  f"{r['requests_per_entry']:.1f} requests per log entry; latency p50 {r['p50_ms']:.2f} "
                  f"p99 {r['p99_ms']:.2f} ms; not OK {r['not_ok']}", flush=True)
            print("  cores " + cpu_text("used", r["cpu"]) + f" (the {UNBATCHED_PROCESSES} load processes, among the "
                  f"others: {r['client_cpu_s'] / max(r['wall_s'], 1e-9):.2f})", flush=True)
        if "percall" in args.phases:
            print(f"percall: {PERCALL_THREADS} threads calling Client.transfer for {PERCALL_S:g} s ...", flush=True)
            res["percall"] = r = run_percall(cluster.client_addresses, args.accounts)
            print(f"  {r['calls']:,} calls in {r['wall_s']:.1f} s: {r['per_s']:,.0f}/s; latency p50 {r['p50_ms']:.2f} "
                  f"p99 {r['p99_ms']:.2f} ms; not OK {r['not_ok']}", flush=True)
        res["memory_mib"] = {"after_load": memory_mib(cluster)}
        if "failover" in args.phases:
            print(f"failover under load x{args.failovers} ...", flush=True)
            res["failover"] = run_failovers(cluster, status_client, ids, args)
        res["memory_mib"]["end"] = memory_mib(cluster)
        res["digests_equal"] = digests_equal(cluster, status_client)
        res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        if status_client is not None:
            status_client.close()
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
    if args.phases != set(PHASES):
        print(f"phases run: {', '.join(p for p in PHASES + EXTRA_PHASES if p in args.phases)}; "
              f"digests equal: {res['digests_equal']}")
        bar = next((r for r in res.get("latency", []) if r["rate_per_s"] == LATENCY_BAR_RATE_PER_S), None)
        ok = res["digests_equal"] and ("throughput" not in res or throughput_ok(res["throughput"])) \
            and (bar is None or latency_ok(bar))
        return 0 if ok else 1
    section = render(res, command, args)
    print()
    print(section)
    if args.write_results:
        write_results(section)
    tp = res["throughput"]
    bar = next(r for r in res["latency"] if r["rate_per_s"] == LATENCY_BAR_RATE_PER_S)
    ok = throughput_ok(tp) and latency_ok(bar) and res["digests_equal"]
    return 0 if ok else 1

if __name__ == "__main__":
    raise SystemExit(main())
