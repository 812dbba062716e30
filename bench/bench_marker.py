"""Cross-shard transfers through the Marker, beside single-shard transfers, on one local system.

    python -m bench.bench_marker                   # full run (~3 minutes: the headline phase is 60 s)
    python -m bench.bench_marker --quick           # smoke run (well under a minute)
    python -m bench.bench_marker --write-results   # also replace the marker section of bench/RESULTS.md

Setup: ``LocalSystem`` (engine/devtools/up.py): 2 shards x 3 replicas + a Marker group of 3, every process
with fsync on every Raft log commit, on loopback. On each shard a bank account (no lower limit) and
``--accounts`` customer accounts (lower limit 0), created and funded in 8190-record batches through
``engine.client.Client.apply_batch`` on that shard. Amounts are 1..100 minor units against 10^9 funded, so
every transfer succeeds and any non-OK outcome is a failure of the system. Measured, in one run:

a. **single-shard, batched**: 8190-transfer batches straight to shard 1 (``Client.apply_batch_async``,
   ``--single-connections`` x ``--single-inflight`` in flight), for ``--single-s``.
b. **cross-shard, batched through the Marker**: SUBMITs of ``--specs-per-submit`` two-leg TCC transfers
   (from an account of one shard to one of the other, alternating direction), ``--submits-inflight`` of
   them in flight, each with ``wait_ms`` so its reply comes once all its workflows have finished; for
   ``--cross-s`` (the headline number: 60 s by default, the bar says sustained for 60 s).
c. **cross-shard, one per request**: ``--callers`` concurrent closed-loop callers, each one SUBMIT of one
   transfer at a time (wait_ms: the reply is the outcome), for ``--unbatched-s``.
d. **latency**: one transfer per SUBMIT at fixed offered rates (``--rates``), open loop and free of
   coordinated omission (request k is due at t0 + k/rate and is sent then, whatever happened to earlier
   ones; its latency runs from the due time to the reply carrying its outcome), ``--latency-s`` each after
   ``--latency-warmup-s`` not counted. An unanswered request counts as infinitely late.

(c) and (d) use bare DEALERs (one to each Marker replica, requests to the leader, NOT_LEADER redirects
followed mid-phase with the same request) speaking docs/protocol.md (header + msgpack SUBMIT), not
``marker.Client``: the load shares the 2 cores with 9 replicas, and the client's I/O thread and futures would
take CPU from them. Transfers/s are counted at the client when the replies carrying the outcome arrive, per
1-second window; the median window and the whole phase's mean are reported.

At the end: the Marker's ``in_flight`` must reach 0, every replica of each group must report the same state
digest, and money must be conserved per currency over both shards (the sum of available over every
account, bank debts included, is 0; nothing reserved or pending).
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import msgspec
import numpy as np
import zmq

from bench.bench_raft import machine_info
from bench.loadgen import wait_for_reply_or
from bench.results import write_section
from engine import records as R
from engine._ledger import OpEncoder
from engine.client import Client
from engine.devtools.up import LocalSystem
from engine.service import protocol as P
from engine.system import System
from marker import wire as MW
from marker.client import Client as MarkerClient
from marker.commands import TccSpec, i128_bytes, u128_bytes

SECTION_BEGIN = "<!-- marker-bench:begin -->"
SECTION_END = "<!-- marker-bench:end -->"
CURRENCY = "USD"
BATCH_RECORDS = R.BATCH_SIZE_MAX
FUNDING = 10**9
SEED = 20261201
DEDUP_SETUP_BASE = 1 << 40           # shard-level dedup ids of the setup
DEDUP_SINGLE_BASE = 2 << 40          # ... of the single-shard phase
WORKFLOW_BASE = 3 << 40              # workflow ids (= the Marker's dedup ids), one counter for every phase
DEADLINE_MS = 60_000
WAIT_MS = 60_000                     # SUBMITs are held this long for their outcome
REPLY_WAIT_S = 60.0
DRAIN_WAIT_S = 60.0
FINISHED_RETAINED = 10_000           # the Marker's finished_retained_max in this benchmark (default 100,000)
BARS = {"cross_batched_per_s": 20_000, "p99_ms_at_1000": 25.0}
ANCHORS = [("Auticuro", "2,000 transactions/s per Marker shard (claimed, no benchmark published)"),
           ("DTM", "~10,900 global transactions/s with a Redis store and empty branches; 575/s with MySQL")]


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q, method="higher")) if len(values) else float("nan")


def window_rates(done_at: list[tuple[float, int]], t0: float, t1: float) -> tuple[float, float, list[float]]:
    """(mean over [t0, t1), median of 1 s windows, the windows) of (time, count) completions."""
    n_win = max(1, int(t1 - t0))
    wins = [0] * n_win
    total = 0
    for t, n in done_at:
        if t0 <= t < t1:
            total += n
            k = int(t - t0)
            if k < n_win:
                wins[k] += n
    return total / (t1 - t0), float(statistics.median(wins)), [float(w) for w in wins]


class Ids:
    def __init__(self) -> None:
        self.next_workflow = WORKFLOW_BASE
        self.lock = threading.Lock()

    def workflows(self, n: int) -> int:
        with self.lock:
            first = self.next_workflow
            self.next_workflow += n
        return first


# --------------------------------------------------------------------------------------------- setup
def split_accounts(system: System, per_shard: int) -> dict[int, np.ndarray]:
    """``per_shard`` customer ids on each shard (ids from 1 up, grouped by the shard map)."""
    out: dict[int, np.ndarray] = {}
    n = per_shard * len(system.shards) * 2 + 1000
    while True:
        ids = np.arange(1, n + 1, dtype=np.uint64)
        halves = np.zeros((n, 2), dtype="<u8")
        halves[:, 0] = ids
        owner = system.shard_map.shards_of(halves)
        out = {s: ids[owner == s][:per_shard].astype(np.int64) for s in system.shards}
        if all(len(v) == per_shard for v in out.values()):
            return out
        n *= 2


def bank_of(system: System, shard: int, start: int) -> int:
    a = start
    while system.shard_map.shard_of(a) != shard:
        a += 1
    return a


def setup_shard(client: Client, bank: int, customers: np.ndarray, dedup_base: int) -> float:
    """The bank (no lower limit) and the customers, each funded with FUNDING from the bank."""
    t0 = time.perf_counter()
    enc = OpEncoder()
    res = client.apply_batch(enc.create_account(dedup_base, bank, CURRENCY, lower_limit=None))
    if int(res["code"][0]) != R.Code.OK:
        raise RuntimeError(f"bank {bank}: {R.Code(int(res['code'][0])).name}")
    template = enc.create_account(0, 1, CURRENCY)
    futs = []
    for k in range(0, len(customers), BATCH_RECORDS):
        ids = customers[k:k + BATCH_RECORDS]
        ops = np.repeat(template, len(ids))
        R.put_u128(ops["dedup_id"], dedup_base + 1 + k + np.arange(len(ids), dtype=np.int64))
        R.put_u128(ops["account_id"], ids)
        futs.append(client.apply_batch_async(ops))
    for f in futs:
        check_ok(f.result(REPLY_WAIT_S), "create accounts")
    futs = []
    base = dedup_base + 1 + len(customers)
    for k in range(0, len(customers), BATCH_RECORDS):
        ids = customers[k:k + BATCH_RECORDS]
        ops = R.transfers(base + k + np.arange(len(ids), dtype=np.int64), np.full(len(ids), bank, np.int64), ids,
                          np.full(len(ids), FUNDING, np.int64), CURRENCY)
        futs.append(client.apply_batch_async(ops))
    for f in futs:
        check_ok(f.result(REPLY_WAIT_S), "funding")
    return time.perf_counter() - t0


def check_ok(results: np.ndarray, what: str) -> None:
    bad = results["code"] != R.Code.OK
    if bad.any():
        raise RuntimeError(f"{what}: codes {sorted(set(results['code'][bad].tolist()))}")


# ------------------------------------------------------------------------------------ CPU accounting
def process_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class CpuMeter:
    """CPU seconds used, during a phase, by each group's replicas, this (client) process and the machine."""

    def __init__(self, ls: LocalSystem) -> None:
        self.pids: dict[str, list[int]] = {name: [c.procs[i].pid for i in c.ids] for name, c in ls.groups.items()}
        self.t0 = time.perf_counter()
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        out = {name: sum(process_cpu_s(p) for p in pids) for name, pids in self.pids.items()}
        out["client"] = time.process_time()
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        out["machine"] = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        return out

    def stop(self) -> dict[str, float]:
        end, dt = self._read(), time.perf_counter() - self.t0
        used = {k: (end[k] - self.start[k]) / dt for k in end}
        used["others"] = used["machine"] - sum(v for k, v in used.items() if k != "machine")
        return {k: round(v, 2) for k, v in used.items()}


# --------------------------------------------------------------------------------------- workloads
class Pairs:
    """Random cross-shard (from, to) pairs, alternating direction, and single-shard pairs."""

    def __init__(self, accounts: dict[int, np.ndarray], seed: int) -> None:
        self.a, self.b = (accounts[s] for s in sorted(accounts))
        self.rng = np.random.default_rng(seed)

    def cross(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = self.a[self.rng.integers(0, len(self.a), n)]
        y = self.b[self.rng.integers(0, len(self.b), n)]
        flip = (np.arange(n) & 1).astype(bool)
        src, dst = np.where(flip, y, x), np.where(flip, x, y)
        return src, dst, self.rng.integers(1, 101, n)


def tcc_specs(first_id: int, src: np.ndarray, dst: np.ndarray, amounts: np.ndarray, now_ms: int) -> list[TccSpec]:
    out = []
    deadline = now_ms + DEADLINE_MS
    for k, (f, t, m) in enumerate(zip(src.tolist(), dst.tolist(), amounts.tolist())):
        out.append(TccSpec(u128_bytes(first_id + k), now_ms, deadline,
                           [(u128_bytes(f), i128_bytes(-m), CURRENCY), (u128_bytes(t), i128_bytes(m), CURRENCY)]))
    return out


def run_single_shard(addresses: list[str], accounts: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """(a): 8190-transfer batches among one shard's accounts, straight to the shard."""
    stop = threading.Event()
    done_at: list[tuple[float, int]] = []
    not_ok = [0]
    lock = threading.Lock()
    counter = [DEDUP_SINGLE_BASE]

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(addresses) as c:
            inflight: deque[Future] = deque()
            while not stop.is_set() or inflight:
                while not stop.is_set() and len(inflight) < args.single_inflight:
                    with lock:
                        base = counter[0]
                        counter[0] += BATCH_RECORDS
                    i = rng.integers(0, len(accounts), BATCH_RECORDS)
                    j = (i + rng.integers(1, len(accounts), BATCH_RECORDS)) % len(accounts)
                    ops = R.transfers(base + np.arange(BATCH_RECORDS, dtype=np.int64), accounts[i], accounts[j],
                                      rng.integers(1, 101, BATCH_RECORDS), CURRENCY)
                    inflight.append(c.apply_batch_async(ops))
                res = inflight.popleft().result(REPLY_WAIT_S)
                with lock:
                    done_at.append((time.perf_counter(), len(res)))
                    not_ok[0] += int(np.count_nonzero(res["code"] != R.Code.OK))

    threads = [threading.Thread(target=worker, args=(SEED + k,), daemon=True) for k in range(args.single_connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(args.warmup_s + args.single_s)
    stop.set()
    for t in threads:
        t.join(REPLY_WAIT_S)
    mean, median, wins = window_rates(done_at, t0 + args.warmup_s, t0 + args.warmup_s + args.single_s)
    return {"mean_per_s": mean, "median_window_per_s": median, "windows": wins, "not_ok": not_ok[0]}


def run_cross_batched(m: MarkerClient, pairs: Pairs, ids: Ids, args: argparse.Namespace) -> dict[str, Any]:
    """(b): SUBMITs of many transfers, several in flight, each answered at its workflows' outcome."""
    done_at: list[tuple[float, int]] = []
    counts = {"not_ok": 0, "not_finished": 0, "refused": 0, "errors": 0}
    lock = threading.Lock()
    slots = threading.Semaphore(args.submits_inflight)
    submit_latency: list[float] = []

    def on_done(sent: float, f: Future) -> None:
        now = time.perf_counter()
        slots.release()
        with lock:
            if f.exception() is not None:
                counts["errors"] += 1
                return
            replies = f.result()
            ok = sum(1 for r in replies if r.finished and r.code == 0)
            counts["not_ok"] += sum(1 for r in replies if r.finished and r.code != 0)
            counts["not_finished"] += sum(1 for r in replies if not r.finished and r.status != "refused")
            counts["refused"] += sum(1 for r in replies if r.status == "refused")
            done_at.append((now, ok))
            submit_latency.append(now - sent)

    n = args.specs_per_submit
    t0 = time.perf_counter()
    t_end = t0 + args.warmup_s + args.cross_s
    submitted = 0
    while time.perf_counter() < t_end:
        src, dst, amt = pairs.cross(n)
        specs: list[Any] = tcc_specs(ids.workflows(n), src, dst, amt, int(time.time() * 1000))
        slots.acquire()
        sent = time.perf_counter()
        fut = m.submit_async(specs, wait_ms=WAIT_MS)
        fut.add_done_callback(functools.partial(on_done, sent))
        submitted += n
    for _ in range(args.submits_inflight):
        slots.acquire(timeout=REPLY_WAIT_S)
    mean, median, wins = window_rates(done_at, t0 + args.warmup_s, t_end)
    lat = np.array(submit_latency) * 1000
    return {"mean_per_s": mean, "median_window_per_s": median, "windows": wins, "submitted": submitted,
            "submit_p50_ms": pct(lat, 50), "submit_p99_ms": pct(lat, 99), **counts}


class Wire:
    """Bare DEALERs to every Marker replica: SUBMIT requests out (to the one believed leader), (req_id, outcome
    OK) in. A NOT_LEADER answer is followed mid-phase: the same request (the same req_id and bytes: the same
    workflow, a duplicate if it was created) goes again to the leader the reply names, or, if it names none,
    to the next replica after ``REDIRECT_PAUSE_S``; a request's latency runs on across its redirects."""

    REDIRECT_PAUSE_S = 0.02

    def __init__(self, addresses: list[str], leader: int) -> None:
        self.ctx = zmq.Context()
        self.addresses = list(addresses)
        self.socks = []
        self.poller = zmq.Poller()
        for addr in self.addresses:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1_000_000)
            sock.setsockopt(zmq.RCVHWM, 1_000_000)
            sock.connect(addr)
            self.socks.append(sock)
            self.poller.register(sock, zmq.POLLIN)
        self.leader = leader
        self.redirects = 0
        self._bodies: dict[int, bytes] = {}            # req_id -> SUBMIT payload, until its outcome comes
        self._again: deque[tuple[float, int]] = deque()  # (not before, req_id): re-sends waiting for a leader
        self._ready: deque[Any] = deque()               # sockets with a reply waiting
        self._dec = msgspec.msgpack.Decoder(list[MW.SubmitReply])

    def send(self, req_id: int, spec: TccSpec) -> None:
        body = MW.encode(MW.SubmitRequest(WAIT_MS, [spec]))
        self._bodies[req_id] = body
        self._send(req_id, body)

    def _send(self, req_id: int, body: bytes) -> None:
        sock = self.socks[self.leader]
        sock.send(P.encode(P.Request(req_id, MW.OP_SUBMIT)), zmq.SNDMORE)
        sock.send(body)

    def _resend_due(self) -> None:
        now = time.perf_counter()
        while self._again and self._again[0][0] <= now:
            _, rid = self._again.popleft()
            body = self._bodies.get(rid)
            if body is not None:
                self._send(rid, body)

    def poll(self, timeout_ms: int) -> bool:
        """True if a reply is waiting (for ``wait_for_reply_or``); re-sends redirected requests that are due."""
        self._resend_due()
        if self._ready:
            return True
        if self._again:
            timeout_ms = min(timeout_ms, max(0, int((self._again[0][0] - time.perf_counter()) * 1000) + 1))
        self._ready.extend(s for s, _ in self.poller.poll(timeout_ms))
        return bool(self._ready)

    def recv(self, timeout_ms: int) -> tuple[int, bool] | None:
        """(req_id, outcome OK) of one answered request, or None if none came within timeout_ms."""
        deadline = time.perf_counter() + timeout_ms / 1000
        while True:
            if not self._ready:
                left_ms = max(0, int((deadline - time.perf_counter()) * 1000))
                if not self.poll(left_ms) and time.perf_counter() >= deadline:
                    return None
                if not self._ready:
                    continue
            sock = self._ready[0]
            if not sock.poll(0):
                self._ready.popleft()
                continue
            head = sock.recv()
            body = sock.recv() if sock.getsockopt(zmq.RCVMORE) else b""
            while sock.getsockopt(zmq.RCVMORE):
                sock.recv()
            reply = P.decode_reply(head)
            if reply.status == P.Status.NOT_LEADER and reply.req_id in self._bodies:
                self.redirects += 1
                if reply.leader_address in self.addresses:
                    self.leader = self.addresses.index(reply.leader_address)
                    self._send(reply.req_id, self._bodies[reply.req_id])
                else:
                    if self.socks[self.leader] is sock:   # the leader is unknown: try the next replica
                        self.leader = (self.leader + 1) % len(self.socks)
                    self._again.append((time.perf_counter() + self.REDIRECT_PAUSE_S, reply.req_id))
                continue
            self._bodies.pop(reply.req_id, None)
            ok = False
            if reply.status == P.Status.OK:
                rs = self._dec.decode(body)
                ok = len(rs) == 1 and rs[0].finished and rs[0].code == 0
            return reply.req_id, ok

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)
        self.ctx.term()


def run_cross_unbatched(addresses: list[str], leader: int, pairs: Pairs, ids: Ids,
                        args: argparse.Namespace) -> dict[str, Any]:
    """(c): ``--callers`` closed-loop callers, one transfer per SUBMIT, each waiting for its outcome."""
    w = Wire(addresses, leader)
    time.sleep(0.2)
    sent_at: dict[int, float] = {}
    done_at: list[tuple[float, int]] = []
    lat: list[float] = []
    not_ok = 0
    req = 0
    pool = deque[tuple[int, int, int]]()

    def send_one() -> None:
        nonlocal req
        if not pool:
            src, dst, amt = pairs.cross(4096)
            pool.extend(zip(src.tolist(), dst.tolist(), amt.tolist()))
        f, t, a = pool.popleft()
        req += 1
        now = int(time.time() * 1000)
        spec = TccSpec(u128_bytes(ids.workflows(1)), now, now + DEADLINE_MS,
                       [(u128_bytes(f), i128_bytes(-a), CURRENCY), (u128_bytes(t), i128_bytes(a), CURRENCY)])
        sent_at[req] = time.perf_counter()
        w.send(req, spec)

    t0 = time.perf_counter()
    t_end = t0 + args.warmup_s + args.unbatched_s
    try:
        for _ in range(args.callers):
            send_one()
        while sent_at:
            got = w.recv(int(REPLY_WAIT_S * 1000))
            if got is None:
                break
            rid, ok = got
            start = sent_at.pop(rid, None)
            if start is None:
                continue
            now = time.perf_counter()
            not_ok += not ok
            if ok:
                done_at.append((now, 1))
                if start >= t0 + args.warmup_s:
                    lat.append(now - start)
            if now < t_end:
                send_one()
    finally:
        w.close()
    redirects = w.redirects
    mean, median, wins = window_rates(done_at, t0 + args.warmup_s, t_end)
    la = np.array(lat) * 1000
    return {"mean_per_s": mean, "median_window_per_s": median, "windows": wins, "not_ok": not_ok,
            "unanswered": len(sent_at), "p50_ms": pct(la, 50), "p99_ms": pct(la, 99), "callers": args.callers,
            "redirects": redirects}


def run_latency(addresses: list[str], leader: int, pairs: Pairs, ids: Ids, args: argparse.Namespace,
                rate: float) -> dict[str, Any]:
    """(d): one transfer per SUBMIT, due at t0 + k/rate, latency from the due time to its outcome."""
    warmup = int(rate * args.latency_warmup_s)
    total = warmup + int(rate * args.latency_s)
    src, dst, amt = pairs.cross(total)
    first = ids.workflows(total)
    latency_s = np.full(total, np.nan)
    ok = np.zeros(total, dtype=bool)
    late_s = np.zeros(total)
    w = Wire(addresses, leader)
    answered = 0
    srcl, dstl, amtl = src.tolist(), dst.tolist(), amt.tolist()

    def drain(block_ms: int) -> int:
        got = 0
        while True:
            r = w.recv(block_ms if got == 0 else 0)
            if r is None:
                return got
            i = r[0] - 1
            if 0 <= i < total and np.isnan(latency_s[i]):
                latency_s[i] = time.perf_counter() - (t0 + i / rate)
                ok[i] = r[1]
                got += 1
            block_ms = 0

    try:
        time.sleep(0.2)
        t0 = time.perf_counter() + 0.05
        i = 0
        while i < total:
            now = time.perf_counter()
            while i < total and t0 + i / rate <= now:
                ms = int(time.time() * 1000)
                f, t, a = srcl[i], dstl[i], amtl[i]
                w.send(i + 1, TccSpec(u128_bytes(first + i), ms, ms + DEADLINE_MS,
                                      [(u128_bytes(f), i128_bytes(-a), CURRENCY),
                                       (u128_bytes(t), i128_bytes(a), CURRENCY)]))
                late_s[i] = now - (t0 + i / rate)
                i += 1
            answered += drain(0)
            if i < total and wait_for_reply_or(w, t0 + i / rate):
                answered += drain(0)
        send_s = time.perf_counter() - t0
        deadline = time.perf_counter() + REPLY_WAIT_S
        while answered < total and time.perf_counter() < deadline:
            answered += drain(50)
    finally:
        w.close()
    lat = 1000 * latency_s[warmup:]
    lat_all = np.where(np.isnan(lat), np.inf, lat)           # unanswered: infinitely late
    return {"rate_per_s": rate, "requests": total - warmup, "achieved_send_per_s": total / send_s,
            "answered": int(np.count_nonzero(~np.isnan(lat))),
            "not_ok": int(np.count_nonzero(~ok[warmup:] & ~np.isnan(lat))),
            "p50_ms": pct(lat_all, 50), "p90_ms": pct(lat_all, 90), "p99_ms": pct(lat_all, 99),
            "p999_ms": pct(lat_all, 99.9), "max_ms": float(lat_all.max()) if len(lat_all) else float("nan"),
            "sender_late_ms_p99": 1000 * pct(late_s[warmup:], 99), "redirects": w.redirects}


# ------------------------------------------------------------------------------------------ checks
def marker_leader(m: MarkerClient, system: System) -> tuple[int, str]:
    addrs = list(system.markers[0].clients)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for k in range(len(addrs)):
            try:
                if m.status(k).get("role") == "leader":
                    return k, addrs[k]
            except Exception:  # noqa: BLE001 - a replica that does not answer now: ask the next one
                continue
        time.sleep(0.1)
    raise RuntimeError("no Marker leader")


def raft_apply_max_ms(m: MarkerClient, since_unix: float) -> float:
    """The longest raft-apply stall any Marker replica recorded since ``since_unix`` (from the last 32 stalls
    each keeps): how long one Raft round's apply held that replica's Raft thread (its heartbeats wait)."""
    worst = 0.0
    for k in range(3):
        try:
            recent = m.status(k).get("stalls", {}).get("recent", [])
        except Exception:  # noqa: BLE001 - a replica that does not answer now
            continue
        for t, cause, ms in recent:
            if t >= since_unix and str(cause).startswith("raft-apply"):
                worst = max(worst, float(ms))
    return worst


def wait_drained(m: MarkerClient) -> dict[str, Any]:
    deadline = time.monotonic() + DRAIN_WAIT_S
    while True:
        st = m.status()
        if st["marker"]["in_flight"] == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.1)                  # STATUS takes the replica's state lock: do not spin on it


def digests(status_of: Any, n: int, key: str) -> list[str]:
    out = []
    for k in range(n):
        for _ in range(50):
            st = status_of(k)
            if st.get("applied") == st.get("commit"):
                break
            time.sleep(0.1)
        out.append(str(st.get(key)))
    return out


def conservation(shard_clients: dict[int, Client]) -> dict[str, Any]:
    totals = {s: c.totals(CURRENCY) for s, c in shard_clients.items()}
    summed = {k: sum(int(t[k]) for t in totals.values()) for k in ("available", "reserved", "pending_in",
                                                                     "pending_out")}
    return {"per_shard": totals, "sum": summed, "ok": all(v == 0 for v in summed.values())}


# -------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"machine": machine_info()}
    base = tempfile.mkdtemp(prefix="zw-bench-marker-")
    # few finished workflows kept, so every replica's STATUS digest (O(state), marker/server.py) stays cheap
    # and is computed: the end's digest check compares real digests
    settings: dict[str, Any] = {"finished_retained_max": FINISHED_RETAINED}
    if args.workflows_inflight_max:
        settings["workflows_inflight_max"] = args.workflows_inflight_max
    try:
        with LocalSystem(base, shards=2, replicas=3, sync=True, marker_settings=settings,
                         insecure=True) as ls:
            ls.start()
            system = System.load(ls.system_path)
            accounts = split_accounts(system, args.accounts)
            shard_clients = {s: Client(list(g.clients)) for s, g in system.shards.items()}
            banks = {s: bank_of(system, s, 1 << 50) for s in system.shards}
            t = time.perf_counter()
            for s, c in shard_clients.items():
                setup_shard(c, banks[s], accounts[s], DEDUP_SETUP_BASE + s * (1 << 32))
            res["setup_s"] = time.perf_counter() - t
            pairs = Pairs(accounts, SEED)
            ids = Ids()
            m = MarkerClient.from_system(ls.system_path, timeout_s=REPLY_WAIT_S)
            try:
                for name, fn in (
                        ("single", lambda: run_single_shard(list(system.shards[1].clients),
                                                            accounts[1], args)),
                        ("cross_batched", lambda: run_cross_batched(m, pairs, ids, args)),
                        ("cross_unbatched", lambda: run_cross_unbatched(list(system.markers[0].clients),
                                                                        marker_leader(m, system)[0], pairs, ids,
                                                                        args))):
                    if name not in args.only:
                        continue
                    print(f"-- {name} ...", flush=True)
                    term = m.status()["term"]
                    since = time.time()
                    cpu = CpuMeter(ls)
                    res[name] = fn()
                    res[name]["cpu"] = cpu.stop()
                    res[name]["marker_elections"] = m.status()["term"] - term
                    res[name]["raft_apply_max_ms"] = raft_apply_max_ms(m, since)
                    print(f"   {summary(name, res[name])}", flush=True)
                    wait_drained(m)
                if "latency" in args.only:
                    res["latency"] = []
                    for rate in args.rates:
                        print(f"-- latency at {rate:,.0f}/s ...", flush=True)
                        term = m.status()["term"]
                        since = time.time()
                        cpu = CpuMeter(ls)
                        r = run_latency(list(system.markers[0].clients), marker_leader(m, system)[0], pairs, ids,
                                        args, rate)
                        r["cpu"] = cpu.stop()
                        r["marker_elections"] = m.status()["term"] - term
                        r["raft_apply_max_ms"] = raft_apply_max_ms(m, since)
                        res["latency"].append(r)
                        print(f"   p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} p999 {r['p999_ms']:.2f} ms "
                              f"(answered {r['answered']}/{r['requests']}, not OK {r['not_ok']})", flush=True)
                        wait_drained(m)
                st = wait_drained(m)
                res["marker_status"] = {k: st["marker"][k] for k in ("in_flight", "stuck", "overdue", "ready_jobs",
                                                                     "phase2_retries", "ignored_results")}
                res["marker_driver"] = st.get("driver", {})
                res["marker_digests_equal"] = len(set(digests(m.status, 3, "digest"))) == 1
                res["shard_digests_equal"] = all(
                    len(set(digests(lambda k, c=c: c.status(k, with_digest=True), 3, "digest"))) == 1
                    for c in shard_clients.values())
                res["conservation"] = conservation(shard_clients)
                res["dead"] = ls.alive()
            finally:
                m.close()
                for c in shard_clients.values():
                    c.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    res["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return res


def summary(name: str, r: dict[str, Any]) -> str:
    s = (f"{r['mean_per_s']:,.0f} transfers/s (median 1-s window {r['median_window_per_s']:,.0f}); "
         f"not OK {r.get('not_ok', 0)}")
    if name == "cross_batched":
        s += (f", not finished {r['not_finished']}, refused {r['refused']}, errors {r['errors']}; "
              f"SUBMIT p50/p99 {r['submit_p50_ms']:.0f}/{r['submit_p99_ms']:.0f} ms")
    if name == "cross_unbatched":
        s += f", unanswered {r['unanswered']}; p50/p99 {r['p50_ms']:.1f}/{r['p99_ms']:.1f} ms"
    if "redirects" in r:
        s += f", NOT_LEADER redirects followed {r['redirects']}"
    return s + (f"; Marker terms moved {r['marker_elections']}, longest raft-apply {r['raft_apply_max_ms']:.0f} ms; "
                f"cpu {r['cpu']}")


def checks(res: dict[str, Any]) -> list[tuple[str, bool]]:
    out = [("marker in_flight == 0 at the end", res["marker_status"]["in_flight"] == 0),
           ("money conserved per currency over both shards, nothing reserved or pending",
            res["conservation"]["ok"]),
           ("Marker replicas' digests equal", res["marker_digests_equal"]),
           ("each shard's replicas' digests equal", res["shard_digests_equal"]),
           ("every process alive", not res["dead"])]
    for name in ("single", "cross_batched", "cross_unbatched"):
        if name in res:
            bad = res[name].get("not_ok", 0) + res[name].get("errors", 0) + res[name].get("unanswered", 0)
            out.append((f"{name}: every transfer OK", bad == 0))
    for r in res.get("latency", []):
        out.append((f"latency {r['rate_per_s']:,.0f}/s: every request answered OK",
                    r["answered"] == r["requests"] and r["not_ok"] == 0))
    return out


def render(res: dict[str, Any], command: str, args: argparse.Namespace) -> str:
    mi = res["machine"]
    lines = [SECTION_BEGIN, "## Cross-shard transfers through the Marker (marker/)", "",
             f"Command: `{command}`  ",
             (f"Machine: {mi['cpus']} cores ({mi['cpu']}), Python {mi['python']}, Linux {mi['kernel']}; "
              f"{mi['date_utc']}; load average before/after: {mi['loadavg_1_5_15']} / {mi['loadavg_after']}  "),
             (f"Setup: LocalSystem, 2 shards x 3 replicas + a Marker group of 3, fsync on every Raft log commit, "
              f"loopback; {args.accounts:,} funded accounts per shard; two-leg TCC transfers from an account of "
              f"one shard to one of the other (direction alternating)."), ""]
    lines += [("| workload | transfers/s (mean) | median 1-s window | vs single-shard batched | Marker elections "
              "| longest raft-apply ms | CPU (cores) |"), "|---|---:|---:|---:|---:|---:|---|"]
    single = res.get("single", {}).get("mean_per_s")
    labels = {"single": "single-shard, batched (8190 per APPLY, straight to shard 1)",
              "cross_batched": (f"cross-shard via the Marker, batched ({args.specs_per_submit} per SUBMIT, "
                                f"{args.submits_inflight} in flight, {args.cross_s:.0f} s)"),
              "cross_unbatched": f"cross-shard via the Marker, one per SUBMIT ({args.callers} closed-loop callers)"}
    for name, label in labels.items():
        if name not in res:
            continue
        r = res[name]
        ratio = f"1 / {single / r['mean_per_s']:.1f}" if single and r["mean_per_s"] and name != "single" else "1"
        cpu = ", ".join(f"{k} {v}" for k, v in r["cpu"].items() if k != "machine")
        lines.append(f"| {label} | {r['mean_per_s']:,.0f} | {r['median_window_per_s']:,.0f} | {ratio} | "
                     f"{r['marker_elections']} | {r.get('raft_apply_max_ms', 0):.0f} | {cpu} |")
    if "cross_unbatched" in res:
        r = res["cross_unbatched"]
        lines += ["", (f"One per SUBMIT, closed loop: request latency p50 {r['p50_ms']:.1f} ms, "
                      f"p99 {r['p99_ms']:.1f} ms; NOT_LEADER redirects followed: {r['redirects']}.")]
    if "cross_batched" in res:
        r = res["cross_batched"]
        lines += [(f"Batched: a SUBMIT's reply (at the outcome of all its transfers) p50 {r['submit_p50_ms']:.0f} "
                   f"ms, p99 {r['submit_p99_ms']:.0f} ms; 1-s windows min {min(r['windows']):,.0f}, "
                   f"max {max(r['windows']):,.0f}.")]
    if res.get("latency"):
        lines += ["", "Open-loop latency, one transfer per SUBMIT, from the due time to the reply with the outcome:",
                  "", ("| offered/s | sent/s | answered | not OK | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
                  "| elections | redirects | longest raft-apply ms | CPU (cores) |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in res["latency"]:
            cpu = ", ".join(f"{k} {v}" for k, v in r["cpu"].items() if k != "machine")
            lines.append(f"| {r['rate_per_s']:,.0f} | {r['achieved_send_per_s']:,.0f} | "
                         f"{r['answered']}/{r['requests']} | {r['not_ok']} | {r['p50_ms']:.2f} | "
                         f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['p999_ms']:.2f} | {r['max_ms']:.1f} | {r['marker_elections']} | {r['redirects']} | "
                         f"{r.get('raft_apply_max_ms', 0):.0f} | {cpu} |")
    lines += ["", "Bars:"]
    if "cross_batched" in res:
        v = res["cross_batched"]["mean_per_s"]
        passed = v >= BARS["cross_batched_per_s"] and args.cross_s >= 60
        lines.append(f"- >= 20,000 cross-shard transfers/s sustained for 60 s: {v:,.0f}/s over "
                     f"{args.cross_s:.0f} s -> **{'PASS' if passed else 'FAIL'}**")
    at1k = [r for r in res.get("latency", []) if r["rate_per_s"] == 1000]
    if at1k:
        v = at1k[0]["p99_ms"]
        verdict = "PASS" if v < BARS["p99_ms_at_1000"] else "FAIL"
        lines.append(f"- p99 < 25 ms at 1,000/s offered: {v:.2f} ms -> **{verdict}**")
    lines += ["", "Anchors (not measured here): " + "; ".join(f"{a}: {b}" for a, b in ANCHORS) + ".", "",
              "Checks: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks(res)) + ".",
              f"Marker at the end: {res['marker_status']}; money: sum over both shards {res['conservation']['sum']}."]
    if args.note:
        lines += ["", args.note]
    lines += ["", SECTION_END]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="cross-shard transfers through the Marker (2 shards x 3 + Marker x 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: few accounts, phases of a few seconds")
    p.add_argument("--write-results", action="store_true", help="replace the marker section of bench/RESULTS.md")
    p.add_argument("--note", default="", help="free text added to the results")
    p.add_argument("--only", default="single,cross_batched,cross_unbatched,latency",
                   help="comma-separated phases: single, cross_batched, cross_unbatched, latency")
    p.add_argument("--accounts", type=int, help="funded customer accounts per shard")
    p.add_argument("--warmup-s", type=float, help="load before each throughput phase's timed part")
    p.add_argument("--single-s", type=float, help="(a) single-shard batched: timed seconds")
    p.add_argument("--single-connections", type=int, default=2)
    p.add_argument("--single-inflight", type=int, default=4, help="(a) batches in flight per connection")
    p.add_argument("--cross-s", type=float, help="(b) cross-shard batched: timed seconds (the bar: 60)")
    p.add_argument("--specs-per-submit", type=int, default=256, help="(b) = the Marker's SUBMIT_ENTRY_SPECS_MAX")
    p.add_argument("--submits-inflight", type=int, default=8)
    p.add_argument("--unbatched-s", type=float, help="(c) one per SUBMIT: timed seconds")
    p.add_argument("--callers", type=int, default=256, help="(c) concurrent closed-loop callers")
    p.add_argument("--rates", help="(d) offered rates per second, comma-separated")
    p.add_argument("--latency-s", type=float, help="(d) measured seconds per rate")
    p.add_argument("--latency-warmup-s", type=float, help="(d) seconds sent first and not counted")
    p.add_argument("--workflows-inflight-max", type=int, default=0,
                   help="the Marker's workflows_inflight_max (0: its default)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"accounts": 2_000 if q else 100_000, "warmup_s": 1.0 if q else 3.0, "single_s": 2.0 if q else 10.0,
                "cross_s": 3.0 if q else 60.0, "unbatched_s": 2.0 if q else 10.0,
                "rates": "100,500" if q else "100,1000,3000", "latency_s": 2.0 if q else 10.0,
                "latency_warmup_s": 0.5 if q else 2.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if q:
        args.specs_per_submit = min(args.specs_per_submit, 256)
        args.callers = min(args.callers, 32)
    args.rates = [float(x) for x in str(args.rates).split(",") if x]
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = "python -m bench.bench_marker" + ("" if not argv else " " + " ".join(argv))
    res = run(args)
    text = render(res, command, args)
    print(text)
    if args.write_results:
        write_section(SECTION_BEGIN, SECTION_END, text)
    failed = [name for name, ok in checks(res) if not ok]
    if failed:
        print("FAILED: " + "; ".join(failed), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
