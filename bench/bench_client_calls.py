"""The per-call client path: ``engine.client.AsyncClient.transfer`` from many coroutines (and
``Client.transfer`` from threads) against one local shard replica without fsync, so what is measured is the
client and the node's intake, not the disk. Prints calls/s and the client process's CPU per call.

    python -m bench.bench_client_calls [--calls 4000] [--concurrency 200] [--rounds 5]
    python -m bench.bench_client_calls --trees /path/to/old/checkout,/path/to/new/checkout

With ``--trees`` every round runs each tree in turn (its own node process and client, PYTHONPATH set to
the tree), so the trees are compared under the same load; medians per tree are printed last.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any


def one_round(calls: int, concurrency: int, threads: int) -> dict[str, float]:
    from engine.client import AsyncClient, Client
    from engine.devtools.cluster import NodeCluster
    with tempfile.TemporaryDirectory() as d:
        cluster = NodeCluster(1, d, sync=False, insecure=True)
        cluster.start()
        try:
            with Client(cluster.client_addresses) as sc:
                assert sc.create_account(1, 10, "USD", lower_limit=None).code == 0
                for a in range(11, 111):
                    assert sc.create_account(a, a, "USD").code == 0
            ids = itertools.count(1000)

            async def run(n: int) -> tuple[float, float]:
                cl: Any = AsyncClient(cluster.client_addresses)   # methods made by _make_methods
                sem = asyncio.Semaphore(concurrency)

                async def one(k: int) -> None:
                    async with sem:
                        r = await cl.transfer(next(ids), 10, 11 + k % 100, 1, "USD")
                        assert r.code == 0, r
                t0, c0 = time.perf_counter(), time.process_time()
                await asyncio.gather(*(one(k) for k in range(n)))
                out = n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6
                cl.close()
                return out
            asyncio.run(run(min(1000, calls)))                # warm-up
            rate, cpu = asyncio.run(run(calls))
            with Client(cluster.client_addresses) as c:
                per = calls // threads

                def work() -> None:
                    for k in range(per):
                        assert c.transfer(next(ids), 10, 11 + k % 100, 1, "USD").code == 0
                ts = [threading.Thread(target=work) for _ in range(threads)]
                t0, c0 = time.perf_counter(), time.process_time()
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                n = per * threads
                trate, tcpu = n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6
            return {"async_calls_per_s": rate, "async_cpu_us": cpu, "threads_calls_per_s": trate,
                    "threads_cpu_us": tcpu}
        finally:
            cluster.close()


def gateway_round(calls: int, concurrency: int) -> dict[str, float]:
    """The same per-call transfers through the gateway service (one shard replica without fsync, no Marker,
    one gateway): calls/s, and the gateway process's CPU a call (from /proc)."""
    import gateway
    from engine.devtools.up import LocalSystem
    with tempfile.TemporaryDirectory() as d, \
            LocalSystem(d, shards=1, replicas=1, sync=False, marker=False, insecure=True) as ls:
        ls.start()
        with gateway.Client.from_system(ls.system_path) as g:
            assert g.create_account(1, 10, "USD", lower_limit=None).code == 0
            for a in range(11, 111):
                assert g.create_account(a, a, "USD").code == 0
        ids = itertools.count(1000)
        pid = ls.gateways[1].pid

        def cpu_s() -> float:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        async def run(n: int) -> tuple[float, float]:
            c = gateway.AsyncClient(ls.gateway_addresses)
            sem = asyncio.Semaphore(concurrency)

            async def one(k: int) -> None:
                async with sem:
                    r = await c.transfer(next(ids), 10, 11 + k % 100, 1, "USD")
                    assert r.code == 0, r
            t0, c0 = time.perf_counter(), cpu_s()
            await asyncio.gather(*(one(k) for k in range(n)))
            out = n / (time.perf_counter() - t0), (cpu_s() - c0) / n * 1e6
            c.close()
            return out
        asyncio.run(run(min(1000, calls)))
        rate, cpu = asyncio.run(run(calls))
        return {"gateway_calls_per_s": rate, "gateway_cpu_us": cpu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_client_calls")
    p.add_argument("--calls", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=200, help="coroutines with a call in flight")
    p.add_argument("--threads", type=int, default=16, help="threads sharing one sync Client")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--trees", help="comma-separated checkouts to compare, alternating (default: this one)")
    p.add_argument("--gateway", action="store_true", help="through the gateway service instead")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)      # a child: one round, JSON out
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(gateway_round(args.calls, args.concurrency) if args.gateway else
                         one_round(args.calls, args.concurrency, args.threads)))
        return 0
    trees = [t for t in (args.trees or "").split(",") if t] or [os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))]
    res: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
    for r in range(args.rounds):
        for t in trees:
            env = dict(os.environ, PYTHONPATH=t)
            cmd = [sys.executable, "-m", "bench.bench_client_calls", "--one", "--calls", str(args.calls),
                   "--concurrency", str(args.concurrency), "--threads", str(args.threads)]
            out = subprocess.run(cmd + (["--gateway"] if args.gateway else []), cwd=t, env=env, capture_output=True,
                                 text=True, timeout=600)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            m = json.loads(out.stdout.strip().splitlines()[-1])
            res[t].append(m)
            print(f"round {r + 1} {t}: {_line(m, args.threads)}", flush=True)
    print("medians:")
    for t, ms in res.items():
        print(f"  {t}: {_line({k: statistics.median(m[k] for m in ms) for k in ms[0]}, args.threads)}")
    return 0


def _line(m: dict[str, float], threads: int) -> str:
    if "gateway_calls_per_s" in m:
        return (f"through the gateway {m['gateway_calls_per_s']:,.0f} calls/s, the gateway's CPU "
                f"{m['gateway_cpu_us']:.0f} us a call")
    return (f"async {m['async_calls_per_s']:,.0f} calls/s ({m['async_cpu_us']:.0f} us CPU a call), {threads} threads "
            f"{m['threads_calls_per_s']:,.0f} calls/s ({m['threads_cpu_us']:.0f} us)")


if __name__ == "__main__":
    raise SystemExit(main())
