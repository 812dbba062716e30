"""What a small durable Raft log append costs, fresh and after a large log was compacted away: the segment
log (``LogStore``) beside an LMDB table of entries (how the log was kept until the ninth session).

    python -m bench.log_store_writes            # ~15 s, writes ~800 MB under /tmp

Bytes are counted at the block device (/proc/diskstats; keep the machine otherwise idle). An earlier
version of this script read /proc/self/io and reported ~360 KB per LMDB commit after compaction (~37 KB
fresh): that counter charges page-cache dirtying, not device writes, and overstated LMDB's free-list cost
about tenfold; the device sees ~30-38 KB per LMDB commit. What is real, and why the log left LMDB: an LMDB
commit writes ~5x the bytes of a segment append and costs two flushes (data, then its meta page) where an
append costs one fdatasync.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import lmdb

from engine.raft.log_store import LogStore
from engine.raft.messages import Entry, HardState, SnapshotMeta

SMALL = b"x" * 2000          # one small entry (~15 single transfers)
BIG = b"y" * (900 << 10)     # one batched entry (~7000 transfers)


def _device_written(path: str) -> int:
    """Bytes written to the block device holding ``path`` (/proc/diskstats). Not /proc/self/io: its
    write_bytes charges an fdatasync into a renamed spare segment with ~1 MB that never reaches the disk."""
    dev = os.stat(path).st_dev
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if (int(fields[0]), int(fields[1])) == (os.major(dev), os.minor(dev)):
                return int(fields[9]) * 512
    raise RuntimeError(f"no /proc/diskstats line for the device of {path}")


def _measure(commit, first: int, n: int, path: str) -> tuple[float, float, float]:
    """(KB written to the device per commit, median ms, p99 ms) for n one-entry commits from ``first``."""
    os.sync()
    time.sleep(0.5)                         # let background writeback of earlier phases finish
    times = []
    w0 = _device_written(path)
    for i in range(first, first + n):
        t0 = time.perf_counter()
        commit(i)
        times.append(time.perf_counter() - t0)
    written = _device_written(path) - w0
    times.sort()
    return written / n / 1024, statistics.median(times) * 1000, times[int(len(times) * 0.99)] * 1000


class LmdbLog:
    """The old layout, reduced to what matters here: one synced LMDB transaction per append, entries keyed
    by big-endian index, a compaction that deletes the prefix."""

    def __init__(self, path: str) -> None:
        self.env = lmdb.open(path, map_size=64 << 30, max_dbs=2, sync=True, metasync=True, readahead=False)
        self.db = self.env.open_db(b"entries")

    def append(self, index: int, data: bytes) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            txn.put(index.to_bytes(8, "big"), data)

    def compact(self, upto: int) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            cursor = txn.cursor()
            while cursor.first() and int.from_bytes(cursor.key(), "big") <= upto:
                cursor.delete()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big-entries", type=int, default=400, help="900 KB entries appended, then compacted away")
    p.add_argument("--commits", type=int, default=500, help="small commits measured at each step")
    args = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="zwallet-log-writes-")
    rows = []
    try:
        store = LogStore(os.path.join(base, "segments"), sync=True)
        time.sleep(1)                         # the first spare segment (written zeros) is being made
        old = LmdbLog(os.path.join(base, "lmdb"))

        def seg_commit(i: int) -> None:
            store.save(entries=[Entry(1, i, 0, SMALL)], hard_state=HardState(1, 1, i - 1))

        def lmdb_commit(i: int) -> None:
            old.append(i, SMALL)

        seg_commit(1)                         # the first segment is rolled and the next spare made, before
        lmdb_commit(1)                        # the measurement; the LMDB table gets the same first commit
        time.sleep(1)
        idx = 2
        rows.append(("fresh", _measure(seg_commit, idx, args.commits, base),
                     _measure(lmdb_commit, idx, args.commits, base)))
        idx += args.commits
        for _ in range(args.big_entries):
            store.save(entries=[Entry(1, idx, 0, BIG)], hard_state=HardState(1, 1, idx - 1))
            old.append(idx, BIG)
            idx += 1
        store.save_snapshot(SnapshotMeta(idx - 1, 1, [1, 2, 3]), b"snapshot")
        old.compact(idx - 1)
        label = f"after {args.big_entries} x 900 KB compacted"
        rows.append((label, _measure(seg_commit, idx, args.commits, base),
                     _measure(lmdb_commit, idx, args.commits, base)))
        store.close()
        old.env.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{'':34} {'segment log (LogStore)':>30}   {'LMDB table (old layout)':>30}")
    print(f"{'':34} {'KB/commit  p50 ms  p99 ms':>30}   {'KB/commit  p50 ms  p99 ms':>30}")
    for label, seg, lm in rows:
        print(f"{label:34} {seg[0]:9.1f} {seg[1]:7.3f} {seg[2]:7.3f}     {lm[0]:9.1f} {lm[1]:7.3f} {lm[2]:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
