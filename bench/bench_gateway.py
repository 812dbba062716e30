"""The gateway hop's cost: the same work direct to a shard, through the in-process router, and through the
gateway service, on one local system (``python -m bench.bench_gateway --replicas 3``).

Measures: single-shard transfers batched (apply_batch of 8190 records) and unbatched (concurrent
per-call transfers from asyncio, which the clients coalesce), the latency of one call at a time,
cross-shard transfers (Marker workflows) and payments with a fee whose payer, merchant and fee accounts
span two shards. Prints one line per measure.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time

import numpy as np

from engine import records as R
from engine._ledger import OpEncoder

CUR = "USD"


def accounts_on(smap, shard: int, n: int, start: int) -> list[int]:
    out: list[int] = []
    a = start
    while len(out) < n:
        if smap.shard_of(a) == shard:
            out.append(a)
        a += 1
    return out


def transfer_batch(enc: OpEncoder, ids: itertools.count, src: int, dst: list[int], n: int) -> np.ndarray:
    ts = int(time.time() * 1000)
    return np.concatenate([enc.transfer(next(ids), src, dst[k % len(dst)], 1, CUR, timestamp=ts) for k in range(n)])


async def unbatched(client, ids, src, dst, n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(k: int) -> None:
        async with sem:
            r = await client.transfer(next(ids), src, dst[k % len(dst)], 1, CUR)
            assert r.code == 0, r

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(n)))
    return n / (time.perf_counter() - t0)


async def payments(client, ids, payers, merchants, fees, n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(k: int) -> None:
        async with sem:
            r = await client.pay(next(ids), payers[k % len(payers)], merchants[k % len(merchants)], 10, CUR, 1,
                                 fees[k % len(fees)])
            assert r.ok, r

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(n)))
    return n / (time.perf_counter() - t0)


async def open_loop(client, ids, src, dst, rate: float, seconds: float) -> tuple[float, float, float, int]:
    """Transfers offered at ``rate`` per second for ``seconds`` (open loop: call k is due at t0 + k/rate and is
    started then, whatever happened to earlier ones; its latency runs from its due time, so a client that fell
    behind counts its own lateness: no coordinated omission). (p50 ms, p99 ms, answered per s, failures)."""
    n = int(rate * seconds)
    lat = np.full(n, np.inf)
    failures = 0

    async def one(k: int, due: float) -> None:
        nonlocal failures
        try:
            r = await client.transfer(next(ids), src, dst[k % len(dst)], 1, CUR)
            if r.code != 0:
                failures += 1
        except Exception:  # noqa: BLE001 - counted: a benchmark reports, it does not stop
            failures += 1
            return
        lat[k] = time.perf_counter() - due

    tasks = []
    t0 = time.perf_counter() + 0.05
    k = 0
    while k < n:
        now = time.perf_counter()
        while k < n and t0 + k / rate <= now:
            tasks.append(asyncio.ensure_future(one(k, t0 + k / rate)))
            k += 1
        await asyncio.sleep(max(0.0, min(0.001, t0 + k / rate - time.perf_counter())))
    await asyncio.gather(*tasks)
    t1 = time.perf_counter()
    done = lat[np.isfinite(lat)]
    if not len(done):
        return float("inf"), float("inf"), 0.0, failures
    return (float(np.percentile(done, 50)) * 1000, float(np.percentile(done, 99)) * 1000, len(done) / (t1 - t0),
            failures)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_gateway")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--sequential", type=int, default=300, help="calls one at a time, for the latency")
    p.add_argument("--rates", default="1000,10000", help="open-loop offered rates (transfers/s), comma-separated")
    p.add_argument("--open-seconds", type=float, default=5.0, help="how long each open-loop rate is offered")
    args = p.parse_args(argv)
    import gateway
    from engine.client import AsyncClient as ShardAsync
    from engine.client import Client as ShardClient
    from engine.devtools.up import LocalSystem
    from engine.system import System
    with tempfile.TemporaryDirectory() as d, LocalSystem(d, shards=2, replicas=args.replicas, gateways=1,
                                                             insecure=True) as ls:
        ls.start()
        system = System.load(ls.system_path)
        smap = system.shard_map
        s1 = accounts_on(smap, 1, 101, 1)
        s2 = accounts_on(smap, 2, 101, 1)
        svc = gateway.Client.from_system(ls.system_path)
        ids = itertools.count(1 << 40)
        for a in s1 + s2:
            assert svc.create_account(next(ids), a, CUR, lower_limit=None).ok
        src, dst = s1[0], s1[1:]
        enc = OpEncoder()
        shard = ShardClient(list(system.shards[1].clients))
        router = gateway.Client.direct(ls.system_path)
        for name, apply in (("direct", lambda b: shard.apply_batch(b)), ("router", router.apply_batch),
                            ("gateway", svc.apply_batch)):
            batches = [transfer_batch(enc, ids, src, dst, R.BATCH_SIZE_MAX) for _ in range(args.batches)]
            apply(batches[0][:10])
            t0 = time.perf_counter()
            for b in batches:
                res = apply(b)
                assert (res["code"] == 0).all()
            rate = args.batches * R.BATCH_SIZE_MAX / (time.perf_counter() - t0)
            print(f"single-shard batched   {name:8s} {rate:10,.0f} transfers/s", flush=True)
        for name, sync in (("direct", shard), ("router", router), ("gateway", svc)):
            lat = []
            for k in range(args.sequential):
                t0 = time.perf_counter()
                assert sync.transfer(next(ids), src, dst[k % len(dst)], 1, CUR).code == 0
                lat.append(time.perf_counter() - t0)
            lat.sort()
            print(f"one call at a time     {name:8s} p50 {lat[len(lat) // 2] * 1000:6.2f} ms  "
                  f"p99 {lat[int(len(lat) * 0.99)] * 1000:6.2f} ms", flush=True)
        clients = {"direct": lambda: ShardAsync(list(system.shards[1].clients)),
                   "router": lambda: gateway.AsyncClient.direct(ls.system_path),
                   "gateway": lambda: gateway.AsyncClient(ls.gateway_addresses)}
        for name, make in clients.items():
            async def run(make=make) -> float:
                c = make()
                try:
                    return await unbatched(c, ids, src, dst, args.calls, args.concurrency)
                finally:
                    c.close()
            print(f"single-shard unbatched {name:8s} {asyncio.run(run()):10,.0f} transfers/s", flush=True)
        for rate in [float(x) for x in args.rates.split(",") if x]:
            for name, make in clients.items():
                async def run_open(make=make, rate=rate) -> tuple[float, float, float, int]:
                    c = make()
                    try:
                        return await open_loop(c, ids, src, dst, rate, args.open_seconds)
                    finally:
                        c.close()
                p50, p99, got, failed = asyncio.run(run_open())
                print(f"open loop {rate:7,.0f}/s    {name:8s} p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  answered "
                      f"{got:8,.0f}/s  failures {failed}", flush=True)
        for name in ("router", "gateway"):
            async def run2(make=clients[name]) -> tuple[float, float]:
                c = make()
                try:
                    x = await unbatched(c, ids, s1[0], s2[1:], args.calls, args.concurrency)
                    y = await payments(c, ids, s1[1:51], s2[1:], s1[51:], args.calls, args.concurrency)
                    return x, y
                finally:
                    c.close()
            x, y = asyncio.run(run2())
            print(f"cross-shard transfers  {name:8s} {x:10,.0f} /s", flush=True)
            print(f"payments with fee (2 shards) {name:8s} {y:10,.0f} /s", flush=True)
        shard.close()
        router.close()
        svc.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
