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

BANK = 1                 # the funding account (may go negative)
CURRENCY = "USD"
FUNDING = 1_000_000      # minor units per account


class Workload:
    def __init__(self, accounts: int, seed: int = 1) -> None:
        self.accounts = accounts
        self.rng = np.random.default_rng(seed)
        self.next_dedup = 1
        self.next_txn = 1

    def ids(self, n: int) -> np.ndarray:
        out = np.arange(self.next_dedup, self.next_dedup + n, dtype=np.int64)
        self.next_dedup += n
        return out

    def create(self) -> list[np.ndarray]:
        out = []
        ids = np.arange(1, self.accounts + 2, dtype=np.int64)       # the bank + the customers
        for start in range(0, len(ids), R.BATCH_SIZE_MAX):
            chunk = ids[start:start + R.BATCH_SIZE_MAX]
            ops = R.empty_ops(len(chunk))
            R.put_u128(ops["dedup_id"], self.ids(len(chunk)))
            R.put_u128(ops["account_id"], chunk)
            ops["kind"] = R.Kind.CREATE_ACCOUNT
            ops["group_size"] = 1
            ops["currency"] = CURRENCY.encode()
            ops["flags"] = np.where(chunk == BANK, R.OpFlag.HAS_EXPECTED_A | R.OpFlag.LOWER_UNBOUNDED, 0)
            out.append(ops)
        # fund every customer from the bank: transfers, so the total stays 0 (the bank holds the debt)
        customers = ids[1:]
        for start in range(0, len(customers), R.BATCH_SIZE_MAX):
            chunk = customers[start:start + R.BATCH_SIZE_MAX]
            out.append(R.transfers(self.ids(len(chunk)), np.full(len(chunk), BANK), chunk,
                                   np.full(len(chunk), FUNDING), CURRENCY))
        return out

    def mixed(self, size: int) -> np.ndarray:
        """About 70% transfers, 10% batch balance operations (balanced), 10% reserve+release, 10% TCC."""
        parts = []
        n = 0
        acct = lambda: int(self.rng.integers(2, self.accounts + 2))  # noqa: E731
        while n < size - 8:
            roll = self.rng.random()
            a, b = acct(), acct()
            if a == b:
                continue
            if roll < 0.7:
                g = R.transfers(self.ids(1), np.array([a]), np.array([b]), self.rng.integers(1, 5000, 1), CURRENCY)
            elif roll < 0.8:
                c = acct()
                g = R.empty_ops(4)
                R.put_u128(g["dedup_id"], np.repeat(self.ids(1), 4))
                g["kind"] = [R.Kind.BATCH_BALANCE, R.Kind.SPEC, R.Kind.SPEC, R.Kind.SPEC]
                g["group_size"][0] = 4
                R.put_u128(g["account_id"], np.array([0, a, b, c]))
                R.put_i128(g["amount"], np.array([0, -300, 100, 200]))
                g["currency"][1:] = CURRENCY.encode()
            elif roll < 0.9:
                g = R.empty_ops(2)
                R.put_u128(g["dedup_id"], self.ids(2))
                g["kind"] = [R.Kind.RESERVE, R.Kind.RELEASE]
                g["group_size"] = 1
                R.put_u128(g["account_id"], np.array([a, a]))
                R.put_u128(g["other_id"], np.array([self.next_txn, self.next_txn]))
                R.put_i128(g["amount"], np.array([250, 0]))
                g["flags"][1] = R.OpFlag.FULL_RELEASE
                self.next_txn += 1
            else:
                g = R.empty_ops(4)
                d = self.ids(2)
                R.put_u128(g["dedup_id"], np.array([d[0], d[0], d[0], d[1]]))
                g["kind"] = [R.Kind.TCC_TRY, R.Kind.SPEC, R.Kind.SPEC, R.Kind.TCC_CONFIRM]
                g["group_size"] = [3, 0, 0, 1]
                R.put_u128(g["account_id"], np.array([0, a, b, 0]))
                R.put_u128(g["other_id"], np.array([self.next_txn, 0, 0, self.next_txn]))
                R.put_i128(g["amount"], np.array([0, -700, 700, 0]))
                g["currency"][1:3] = CURRENCY.encode()
                self.next_txn += 1
            parts.append(g)
            n += len(g)
        return np.concatenate(parts)


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
