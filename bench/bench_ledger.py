"""Embedded ledger benchmark: apply_batch, the per-call API and the pure-Python reference model, side by side.

    python -m bench.bench_ledger              # 1M accounts, the bars of issue 2
    python -m bench.bench_ledger --quick      # 100K accounts, fewer batches (seconds)

Batches are built with numpy outside the timed regions. Each workload runs several repetitions; the
median is reported (this machine is shared and noisy), with ratios and PASS/FAIL against the bars.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # idle BLAS threads spin and steal a core

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

from engine import Code, Ledger
from engine import records as R
from engine.devtools.workload import Workload

BATCH = R.BATCH_SIZE_MAX
BARS = {"apply_batch_uniform_per_s": 3_000_000, "vs_model_ratio": 100, "per_call_per_s": 300_000,
        "bytes_per_account": 160}


class DedupIds:
    def __init__(self, start: int = 1) -> None:
        self.next = start

    def take(self, n: int) -> np.ndarray:
        ids = np.arange(self.next, self.next + n, dtype=np.int64)
        self.next += n
        return ids


_CLOCK = [1_000_000]        # the benchmark's clock (ms): every batch is issued, and applied, one ms later


def tick() -> int:
    """The next ms of the benchmark's clock: commands carry increasing issue times, as real ones do (the
    dedup window's horizon refuses a command issued before the newest evicted one)."""
    _CLOCK[0] += 1
    return _CLOCK[0]


def create_accounts(led: Ledger, n: int, ids: DedupIds) -> None:
    for start in range(0, n, BATCH):
        k = min(BATCH, n - start)
        ops = R.empty_ops(k)
        R.put_u128(ops["dedup_id"], ids.take(k))
        R.put_u128(ops["account_id"], np.arange(start + 1, start + k + 1, dtype=np.int64))
        ops["kind"] = R.Kind.CREATE_ACCOUNT
        ops["group_size"] = 1
        ops["currency"] = b"USD"
        ops["flags"] = R.OpFlag.HAS_EXPECTED_A | R.OpFlag.LOWER_UNBOUNDED   # may go negative: every transfer applies
        ops["issued_ms"] = now = tick()
        res = led.apply_batch(ops, now)
        assert (res["code"] == Code.OK).all()


def transfer_batches(rng, n_accounts: int, count: int, ids: DedupIds, hot: float = 0.0) -> list[np.ndarray]:
    out = []
    for _ in range(count):
        src = rng.integers(1, n_accounts + 1, BATCH)
        dst = rng.integers(1, n_accounts + 1, BATCH)
        if hot:
            mask = rng.random(BATCH) < hot        # one side of these is the hot (merchant) account
            flip = rng.random(BATCH) < 0.5
            src = np.where(mask & flip, 1, src)
            dst = np.where(mask & ~flip, 1, dst)
        dst = np.where(dst == src, dst % n_accounts + 1, dst)
        out.append(R.transfers(ids.take(BATCH), src, dst, rng.integers(1, 100, BATCH), "USD"))
    return out


def mixed_batches(rng, n_accounts: int, count: int, ids: DedupIds) -> list[np.ndarray]:
    """Per batch: ~70% transfers, batch balance operations, reserve + release, TCC try + confirm."""
    work = Workload(n_accounts, seed=int(rng.integers(1 << 30)), first_account=1)
    work.next_dedup = int(ids.take(1)[0]) << 24        # ids never collide with the other workloads
    work.next_txn = work.next_dedup
    return [work.mixed(BATCH) for _ in range(count)]


_RESULTS = np.empty(BATCH, dtype=R.RESULT_DTYPE)


def timed_batches(led: Ledger, batches: list[np.ndarray]) -> float:
    ops = sum(len(b) for b in batches)
    stamps = []
    for b in batches:                              # (outside the timed loop)
        b["issued_ms"] = now = tick()
        stamps.append(now)
    t0 = time.perf_counter()
    for b, now in zip(batches, stamps):
        res = led.apply_batch(b, now, _RESULTS)
    dt = time.perf_counter() - t0
    assert (res["code"] == Code.OK).all(), np.unique(res["code"])
    return ops / dt


def per_call(led, n_accounts: int, count: int, start_dedup: int, rng) -> float:
    src = rng.integers(1, n_accounts + 1, count).tolist()
    dst = rng.integers(1, n_accounts + 1, count).tolist()
    now = tick()
    t0 = time.perf_counter()
    for k in range(count):
        led.transfer(start_dedup + k, src[k], dst[k] if dst[k] != src[k] else src[k] % n_accounts + 1, 5, "USD",
                     timestamp=now)
    return count / (time.perf_counter() - t0)


def model_rates(n_accounts: int, batches: list[np.ndarray], count: int, rng) -> tuple[float, float]:
    """The pure-Python reference model: (records/s on the same op-record batches apply_batch takes,
    transfers/s through its per-call methods)."""
    sys.path.insert(0, ".")
    from tests.ledger_model import ModelLedger
    model = ModelLedger()
    for aid in range(1, n_accounts + 1):
        model.create_account(10 ** 9 + aid, aid, "USD", lower_limit=None)
    t0 = time.perf_counter()
    for b in batches:
        model.apply_batch(b)
    batch_rate = sum(len(b) for b in batches) / (time.perf_counter() - t0)
    src = rng.integers(1, n_accounts + 1, count).tolist()
    dst = [d if d != s else s % n_accounts + 1 for s, d in zip(src, rng.integers(1, n_accounts + 1, count).tolist())]
    t0 = time.perf_counter()
    for k in range(count):
        model.transfer(10 ** 14 + k, src[k], dst[k], 5, "USD")
    return batch_rate, count / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=1_000_000)
    p.add_argument("--batches", type=int, default=40, help="8190-record batches per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    if args.quick:
        args.accounts, args.batches, args.reps = 100_000, 8, 3
    rng = np.random.default_rng(7)
    ids = DedupIds()
    cpu = platform.processor() or platform.machine()
    print(f"zwallet ledger benchmark: {args.accounts:,} accounts, {args.batches} x {BATCH} records per rep, "
          f"{args.reps} reps (median)  [{cpu}, python {platform.python_version()}]")

    led = Ledger()
    t0 = time.perf_counter()
    create_accounts(led, args.accounts, ids)
    create_s = time.perf_counter() - t0
    mem = led.memory_bytes()
    bytes_per_account = (mem["accounts"] + mem["index"]) / args.accounts
    print(f"  create accounts            {args.accounts / create_s:>14,.0f} accounts/s   "
          f"memory {bytes_per_account:.1f} bytes/account (capacity {mem['account_capacity']:,})")

    results: dict[str, float] = {"bytes_per_account": bytes_per_account}
    # warm-up until the dedup and event rings have reached their retention (steady state: they evict)
    warm = led.dedup_retention // BATCH + 2
    for start in range(0, warm, 16):
        timed_batches(led, transfer_batches(rng, args.accounts, min(16, warm - start), ids))
    n = args.accounts
    for name, make in (("apply_batch_uniform_per_s", lambda: transfer_batches(rng, n, args.batches, ids)),
                       ("apply_batch_hot_per_s", lambda: transfer_batches(rng, n, args.batches, ids, hot=0.5)),
                       ("apply_batch_mixed_per_s", lambda: mixed_batches(rng, n, max(2, args.batches // 4), ids))):
        rates = [timed_batches(led, make()) for _ in range(args.reps)]
        results[name] = statistics.median(rates)
        reps = ", ".join(f"{r / 1e6:.2f}M" for r in rates)
        print(f"  {name:<26} {results[name]:>14,.0f} records/s   (reps: {reps})")

    count = 200_000 if not args.quick else 50_000
    rates = [per_call(led, args.accounts, count, 10 ** 15 + rep * count, rng) for rep in range(args.reps)]
    results["per_call_per_s"] = statistics.median(rates)
    print(f"  {'per-call transfer()':<26} {results['per_call_per_s']:>14,.0f} ops/s")

    model_count = 30_000 if not args.quick else 10_000
    model_batches = transfer_batches(rng, args.accounts, 2 if args.quick else 4, ids)
    results["apply_batch_same_batches_per_s"] = statistics.median(
        [timed_batches(led, model_batches) for _ in range(1)])
    mb, mc = model_rates(args.accounts, model_batches, model_count, rng)
    results["model_batch_per_s"], results["model_per_s"] = mb, mc
    results["vs_model_ratio"] = results["apply_batch_uniform_per_s"] / mb
    results["per_call_vs_model_ratio"] = results["per_call_per_s"] / mc
    print(f"  {'model: same op batches':<26} {mb:>14,.0f} records/s   "
          f"apply_batch/model = {results['vs_model_ratio']:.0f}x")
    print(f"  {'model: per-call transfer':<26} {mc:>14,.0f} ops/s       "
          f"per-call/model = {results['per_call_vs_model_ratio']:.1f}x")

    print("bars:")
    checks = [("apply_batch uniform >= 3M transfers/s (goal 5M)",
               results["apply_batch_uniform_per_s"] >= BARS["apply_batch_uniform_per_s"]),
              ("apply_batch >= 100x the reference model", results["vs_model_ratio"] >= BARS["vs_model_ratio"]),
              ("per-call API >= 300K ops/s", results["per_call_per_s"] >= BARS["per_call_per_s"]),
              ("memory <= 160 bytes/account", bytes_per_account <= BARS["bytes_per_account"])]
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
