"""The one-shard demo: a local 3-replica shard doing real work, with the leader killed part-way.

    python -m engine.devtools.shard_demo [--accounts 2000] [--batches 120] [--batch-size 1000] [--keep]

Starts three node processes (the ledger behind a ZeroMQ ROUTER, Raft over ZeroMQ on 127.0.0.1, LMDB logs
with fsync, events in LMDB and on PUB) in a temporary directory. Through the replicated client it creates
and funds accounts, runs a mixed workload (transfers, batch balance operations, reserve/release, TCC
try/confirm) as batches of op records plus a few per-call commands, kills the leader with SIGKILL half-way
and measures the failover, restarts it, and checks that: money is conserved, every replica reached the
same ledger digest at the same applied index, and an event subscriber saw every seq exactly once. The
client retries with the same bytes (the same dedup ids), so a batch that was applied before the failure is
never applied twice. Ctrl-C stops everything it started.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from engine import records as R
from engine.client import Client, ClientError
from engine.devtools.checks import GapFreeFollower
from engine.devtools.cluster import NodeCluster
from engine.devtools.workload import BANK, CURRENCY, FUNDING, Workload


def progress(done: int, total: int, text: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stdout.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text:<52}")
    sys.stdout.flush()


def find_leader(client: Client, cluster: NodeCluster, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for k, node in enumerate(cluster.ids):
            if not cluster.alive(node):
                continue
            try:
                if client.status(k).get("role") == "leader":
                    return node
            except ClientError:          # a replica that is down or restarting does not answer
                pass
        time.sleep(0.05)
    raise TimeoutError("no leader elected")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.devtools.shard_demo", description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=2000)
    p.add_argument("--batches", type=int, default=120, help="mixed workload batches")
    p.add_argument("--batch-size", type=int, default=1000, help="records per batch (<= 8190)")
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    p.add_argument("--verbose", action="store_true", help="the replicas log Raft events")
    args = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="zwallet-demo-")
    cluster = NodeCluster(3, base, snapshot_threshold_entries=200, snapshot_keep_entries=50,
                          verbose=args.verbose)
    client = None
    counter = None
    print(f"zwallet demo: a 3-replica shard on 127.0.0.1, data in {base}")
    try:
        cluster.start()
        client = Client(cluster.client_addresses, timeout_s=30, attempt_timeout_s=0.5, keys=cluster.client_keys)
        print(f"  leader elected: replica {find_leader(client, cluster)}")
        counter = GapFreeFollower(cluster.pub_addresses, cluster.client_addresses, "demo-subscriber",
                                  keys=cluster.client_keys)
        counter.start()
        work = Workload(args.accounts)
        t0 = time.monotonic()
        for ops in work.create():
            res = client.apply_batch(ops)
            assert (res["code"] == R.Code.OK).all(), np.unique(res["code"])
        print(f"  created {args.accounts + 1} accounts and funded {args.accounts} of them "
              f"({args.accounts * FUNDING:,} units) in {time.monotonic() - t0:.2f}s")
        # the per-call API: the same methods as the embedded Ledger
        a, b = work.first_account, work.first_account + 1
        d = int(work.ids(3)[0])
        r = client.transfer(d, a, b, 1_00, CURRENCY)
        again = client.transfer(d, a, b, 1_00, CURRENCY)
        balances = {k: v["available"] for k, v in r.accounts.items()}
        print(f"  per-call transfer: {r.code.name} seq {r.seq_num}, balances after {balances}; "
              f"the same dedup_id again: duplicate={again.duplicate}")
        kill_at = args.batches // 2
        codes: dict[int, int] = {}
        applied_ops = 0
        failover_s: float | None = None
        killed: int | None = None
        t0 = time.monotonic()
        for batch in range(args.batches):
            if batch == kill_at:
                killed = find_leader(client, cluster)
                progress(batch, args.batches, f"kill -9 leader (replica {killed})")
                t_kill = time.monotonic()
                cluster.kill(killed)
                res = client.apply_batch(work.mixed(args.batch_size))
                failover_s = time.monotonic() - t_kill
                progress(batch + 1, args.batches,
                         f"new leader: replica {find_leader(client, cluster)} after {failover_s * 1000:.0f} ms")
                print()
                cluster.start_replica(killed)
            else:
                res = client.apply_batch(work.mixed(args.batch_size))
                if batch % 5 == 0 or batch == args.batches - 1:
                    progress(batch + 1, args.batches, "mixed batches")
            for code, count in zip(*np.unique(res["code"], return_counts=True)):
                codes[int(code)] = codes.get(int(code), 0) + int(count)
            applied_ops += len(res)
        elapsed = time.monotonic() - t0
        print()
        # every replica converges: same applied index, same digest; money conserved; events gap-free
        deadline = time.monotonic() + 60
        while True:
            st: dict[int, dict[str, Any]] = {}           # the replicas that answered
            for k, node in enumerate(cluster.ids):
                try:
                    st[node] = client.status(k, with_digest=True)
                except ClientError:
                    pass                                  # down or restarting: not converged yet
            done = len(st) == len(cluster.ids) and len({s["digest"] for s in st.values()}) == 1 \
                and len({s["sm_applied"] for s in st.values()}) == 1
            if done:
                break
            if time.monotonic() > deadline:
                silent = [node for node in cluster.ids if node not in st]
                raise RuntimeError(f"replicas did not converge: {st}; not answering: {silent}")
            time.sleep(0.2)
        totals = client.totals(CURRENCY)
        held = totals["available"] + totals["reserved"] + totals["pending_out"]
        bank_account = client.get_account(BANK)
        if bank_account is None:
            raise RuntimeError(f"the bank account {BANK} is missing")
        bank = bank_account["available"]
        last_seq = st[cluster.ids[0]]["last_seq"]
        while counter.seen < last_seq and time.monotonic() < deadline and counter.error is None:
            time.sleep(0.05)
        counter.stop.set()
        counter.join(5)
        conserved = held == 0 and bank == -args.accounts * FUNDING
        events_ok = counter.error is None and counter.seen == last_seq
        print(f"  workload: {applied_ops:,} operations in {args.batches} batches, {elapsed:.1f}s "
              f"({applied_ops / elapsed:,.0f} ops/s through Raft with fsync, one batch at a time and each waited "
              f"for; throughput with batches in flight: zwallet bench, python -m bench.bench_node)")
        print("  results: " + ", ".join(f"{R.Code(c).name} {n:,}" for c, n in sorted(codes.items())))
        if killed is not None and failover_s is not None:
            print(f"  failover: leader {killed} killed, next commit after {failover_s * 1000:.0f} ms; "
                  f"it restarted and caught up")
        else:
            print("  failover: none (the leader is killed half-way through the batches, and there were none)")
        s0 = st[cluster.ids[0]]
        print(f"  replicas: applied index {s0['sm_applied']} on all 3, digest {s0['digest'][:16]}... identical")
        print(f"  events: the subscriber saw seqs 1..{counter.seen} with no gap "
              f"({'OK' if events_ok else 'VIOLATED: ' + repr(counter.error)})")
        print(f"  money conserved: sum of available + reserved + pending_out = {held}, the bank still "
              f"owes {-bank:,} ({'OK' if conserved else 'VIOLATED'})")
        return 0 if conserved and events_ok else 1
    except KeyboardInterrupt:
        print("\n  interrupted: stopping the replicas")
        return 130
    finally:
        if counter is not None:
            counter.stop.set()
        if client is not None:
            client.close()
        cluster.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
