"""How long the Raft thread stalls while the event store prunes, under load, with a small retention.

    python -m bench.bench_prune                  # 3 replicas, 20 s of batched transfers
    python -m bench.bench_prune --seconds 10

A 3-replica ``NodeCluster`` with ``event_retention_seqs`` small (200K seqs by default) and frequent
snapshots (``snapshot_threshold_entries``), so that every snapshot prunes: the event store's pruning used
to run inside the snapshot callback, on the Raft thread, in one LMDB transaction over every chunk below the
cutoff. The load is 4 clients keeping 2 batches of 8190 transfers in flight each. Reported per replica,
from STATUS ``stalls`` (engine/stalls.py, phases of the Raft thread over 5 ms): the ``raft-snapshot``
phase's count and longest, the longest stall of any Raft phase, and the event store's floor (proof that it
pruned). The script uses only what every version has, so it runs against an older checkout too (with
``PYTHONPATH`` pointing at it) for a side-by-side comparison.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from typing import Any

import numpy as np

from engine import records as R
from engine.client import Client
from engine.devtools.cluster import NodeCluster

BATCH = 8190


def load(addresses: list[str], accounts: int, stop: threading.Event, counts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = (seed + 1) << 40
    with Client(addresses, timeout_s=60) as c:
        pending: list[Any] = []
        k = 0
        while not stop.is_set() or pending:
            while not stop.is_set() and len(pending) < 2:
                src = rng.integers(1, accounts + 1, BATCH)
                dst = (src % accounts) + 1
                ops = R.transfers(np.arange(base + k, base + k + BATCH, dtype=np.int64), src, dst,
                                  np.ones(BATCH, np.int64), "USD")
                k += BATCH
                pending.append(c.apply_batch_async(ops))
            if pending:
                res = pending.pop(0).result(60)
                counts.append(int(np.count_nonzero(res["code"] == R.Code.OK)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--retention", type=int, default=200_000, help="event_retention_seqs")
    p.add_argument("--snapshot-entries", type=int, default=20, help="snapshot_threshold_entries")
    args = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="zwallet-prune-")
    cluster = NodeCluster(3, base, insecure=True, event_retention_seqs=args.retention,
                          snapshot_threshold_entries=args.snapshot_entries, leader_snapshot_defer=1,
                          snapshot_keep_entries=5)
    out: dict[str, Any] = {}
    try:
        cluster.start()
        addrs = cluster.client_addresses
        with Client(addrs, timeout_s=60) as c:
            for start in range(0, args.accounts, BATCH):
                n = min(BATCH, args.accounts - start)
                ops = R.empty_ops(n)
                R.put_u128(ops["dedup_id"], np.arange(start + 1, start + n + 1, dtype=np.int64))
                R.put_u128(ops["account_id"], np.arange(start + 1, start + n + 1, dtype=np.int64))
                ops["kind"] = R.Kind.CREATE_ACCOUNT
                ops["group_size"] = 1
                ops["currency"] = b"USD"
                ops["flags"] = R.OpFlag.HAS_EXPECTED_A | R.OpFlag.LOWER_UNBOUNDED
                assert (c.apply_batch(ops)["code"] == R.Code.OK).all()
            before = [c.status(k)["stalls"] for k in range(3)]
            stop = threading.Event()
            counts: list[int] = []
            threads = [threading.Thread(target=load, args=(addrs, args.accounts, stop, counts, s)) for s in range(4)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            time.sleep(args.seconds)
            stop.set()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            print(f"load: {sum(counts):,} transfers in {wall:.1f} s ({sum(counts) / wall:,.0f}/s); "
                  f"event_retention_seqs={args.retention:,}, snapshot every {args.snapshot_entries} entries")
            for k in range(3):
                st = c.status(k)
                by = st["stalls"]["by_cause"]
                b = before[k]["by_cause"]
                snap = by.get("raft-snapshot", {"count": 0, "max_ms": 0.0})
                snap_n = snap["count"] - b.get("raft-snapshot", {"count": 0})["count"]
                worst = max((v["max_ms"] for name, v in by.items() if name.startswith("raft-")), default=0.0)
                row = {"raft_snapshot_stalls": snap_n, "raft_snapshot_max_ms": snap["max_ms"],
                       "raft_any_max_ms": worst, "events_first_seq": st["events_first_seq"],
                       "last_seq": st["last_seq"], "role": st["role"]}
                out[f"replica {k + 1}"] = row
                print(f"replica {k + 1} ({st['role']}): raft-snapshot stalls >= 5 ms: {snap_n}, longest "
                      f"{snap['max_ms']:.1f} ms; longest Raft-thread stall {worst:.1f} ms; event store holds "
                      f"{st['events_first_seq']:,}..{st['last_seq']:,}")
    finally:
        cluster.close()
    return out


if __name__ == "__main__":
    main()
