"""zwallet demo: a local 3-replica cluster doing real work, with a leader killed part-way.

    python -m engine.demo [--accounts 2000] [--batches 120] [--keep]

Starts three replicas (Raft over ZeroMQ on 127.0.0.1, LMDB logs with fsync, the ledger as the state
machine) in a temporary directory, creates and funds accounts, runs a mixed workload (transfers, batch
balance operations, reserve/release, TCC try/confirm) as batches of op records, kills the leader with
SIGKILL part-way and measures the failover, restarts it, then checks that money is conserved and that
every replica reached the same ledger digest. Retries reuse the same records (the same dedup ids), so a
batch that was applied before the failure is never applied twice. Ctrl-C stops everything it started.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

import numpy as np

from engine import records as R
from engine.ledger_machine import ledger_entry
from engine.raft.local_cluster import ClusterClient, LocalCluster
from engine.workload import FUNDING, Workload


class Submitter:
    """Sends an entry to the leader until it is acknowledged, following leader changes. The entry's bytes
    never change between attempts, so a retry of an applied batch returns its original results."""

    def __init__(self, cluster: LocalCluster, client: ClusterClient) -> None:
        self.cluster = cluster
        self.client = client
        self.retries = 0

    def submit(self, entry: bytes, timeout_s: float = 30.0) -> np.ndarray:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.client.leader is None or not self.cluster.alive(self.client.leader):
                try:
                    self.client.find_leader([i for i in self.cluster.ids if self.cluster.alive(i)], timeout_s=5)
                except TimeoutError:
                    continue
            got = self.client.propose([entry], timeout_s=2.0)
            if got is not None:
                index, result = got[0]
                if result is None:
                    raise RuntimeError(f"entry {index} was refused by the ledger as malformed")
                return np.frombuffer(result, dtype=R.RESULT_DTYPE)
            self.retries += 1
            time.sleep(0.02)
        raise TimeoutError("the cluster did not acknowledge a batch in time")


def progress(done: int, total: int, text: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stdout.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text:<48}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=2000)
    p.add_argument("--batches", type=int, default=120, help="mixed workload batches")
    p.add_argument("--batch-size", type=int, default=1000, help="records per batch (<= 8190)")
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    args = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="zwallet-demo-")
    cluster = LocalCluster(3, base, machine="ledger", snapshot_threshold=2_000)
    client = None
    print(f"zwallet demo: 3 replicas on 127.0.0.1, data in {base}")
    try:
        cluster.start()
        client = ClusterClient(cluster.client_addr)
        leader = client.find_leader(timeout_s=20)
        print(f"  leader elected: replica {leader}")
        sub = Submitter(cluster, client)
        work = Workload(args.accounts)
        t0 = time.monotonic()
        for ops in work.create():
            res = sub.submit(ledger_entry(ops, int(time.time() * 1000)))
            assert (res["code"] == R.Code.OK).all(), np.unique(res["code"])
        print(f"  created {args.accounts + 1} accounts and funded {args.accounts} of them "
              f"({args.accounts * FUNDING:,} units) in {time.monotonic() - t0:.2f}s")
        kill_at = args.batches // 2
        codes: dict[int, int] = {}
        applied_ops = 0
        failover_s = None
        killed = None
        t0 = time.monotonic()
        for b in range(args.batches):
            if b == kill_at:
                killed = client.leader if client.leader is not None else client.find_leader()
                progress(b, args.batches, f"kill -9 leader (replica {killed})")
                t_kill = time.monotonic()
                cluster.kill(killed)
            entry = ledger_entry(work.mixed(args.batch_size), int(time.time() * 1000))
            res = sub.submit(entry)
            if b == kill_at:
                failover_s = time.monotonic() - t_kill
                progress(b + 1, args.batches, f"new leader: replica {client.leader} after {failover_s * 1000:.0f} ms")
                print()
                cluster.start_replica(killed)
            elif b % 5 == 0 or b == args.batches - 1:
                progress(b + 1, args.batches, "mixed batches")
            # a duplicate retry of an earlier batch counts as its original outcome
            for code, count in zip(*np.unique(res["code"], return_counts=True)):
                codes[int(code)] = codes.get(int(code), 0) + int(count)
            applied_ops += len(res)
        elapsed = time.monotonic() - t0
        print()
        # every replica converges: same applied index, same digest, money conserved
        deadline = time.monotonic() + 30
        while True:
            st = {i: client.status(i) for i in cluster.ids}
            digests = {s["digest"] for s in st.values() if s}
            applied = {s["sm_applied"] for s in st.values() if s}
            if len(digests) == 1 and len(applied) == 1 and all(st.values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas did not converge: {st}")
            time.sleep(0.1)
        held = {s["counter"] for s in st.values()}
        conserved = held == {0}
        print(f"  workload: {applied_ops:,} operations in {args.batches} batches, {elapsed:.1f}s "
              f"({applied_ops / elapsed:,.0f} ops/s through Raft with fsync), {sub.retries} retries")
        print("  results: " + ", ".join(f"{R.Code(c).name} {n:,}" for c, n in sorted(codes.items())))
        print(f"  failover: leader {killed} killed, next commit after {failover_s * 1000:.0f} ms; "
              f"it restarted and caught up")
        print(f"  replicas: applied index {applied.pop()} on all 3, digest {digests.pop()[:16]}... identical")
        print(f"  money conserved: sum of available + reserved + pending_out = {held.pop()} "
              f"({'OK' if conserved else 'VIOLATED'})")
        return 0 if conserved else 1
    except KeyboardInterrupt:
        print("\n  interrupted: stopping the replicas")
        return 130
    finally:
        if client is not None:
            client.close()
        cluster.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
