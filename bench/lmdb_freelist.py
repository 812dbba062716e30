"""How much an LMDB commit of the Raft log writes once a large log has been compacted away, without and
with LogStore's rewrite of a mostly free data file.

    python -m bench.lmdb_freelist            # ~15 s, writes ~800 MB under /tmp

Why this exists: during zwallet bench's latency runs after its batched workloads each replica wrote
~400 MB/s (from /proc/<pid>/io) while committing ~700 small entries a second, and its fsyncs stalled for
~10 ms several times a second. The cause, reproduced here on one ``LogStore``: LMDB 0.9 keeps freed pages
in a freelist that every write transaction rewrites; after ~360 MB of entries were compacted away a
one-entry commit wrote ~360 KB instead of ~37 KB (freeing the pages in small transactions did not help).
``LogStore.shrink_if_fragmented`` (run when a compaction ends) rewrites such a file compactly.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from engine.raft import log_store
from engine.raft.log_store import LogStore
from engine.raft.messages import Entry, HardState, SnapshotMeta


def _written_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["write_bytes"])


def small_commits(store: LogStore, first: int, n: int) -> tuple[float, float]:
    """(KB written per commit, ms per commit) for n one-entry commits of 2 KB from index ``first``."""
    w0, t0 = _written_bytes(), time.perf_counter()
    for i in range(first, first + n):
        store.save(entries=[Entry(1, i, 0, b"x" * 2000)], hard_state=HardState(1, 1, i - 1))
    return (_written_bytes() - w0) / n / 1024, (time.perf_counter() - t0) / n * 1000


def run(shrink: bool, big_entries: int, commits: int) -> None:
    base = tempfile.mkdtemp(prefix="zwallet-lmdb-freelist-")
    saved = log_store.SHRINK_FREE_PAGES_MIN
    if not shrink:
        log_store.SHRINK_FREE_PAGES_MIN = 1 << 62
    try:
        store = LogStore(os.path.join(base, "log"), sync=True)
        what = "with the rewrite" if shrink else "without it"
        print(f"fresh store:                                 %6.1f KB/commit  %5.2f ms/commit"
              % small_commits(store, 1, commits))
        idx = 1 + commits
        big = b"y" * (900 << 10)
        for _ in range(big_entries):
            store.save(entries=[Entry(1, idx, 0, big)], hard_state=HardState(1, 1, idx - 1))
            idx += 1
        store.save_snapshot(SnapshotMeta(idx - 1, 1, [1, 2, 3]), b"snapshot")
        t0 = time.perf_counter()
        store.compact(idx - 1)
        compact_ms = (time.perf_counter() - t0) * 1000
        print(f"after {big_entries} x 900 KB compacted, {what:<16}: %6.1f KB/commit  %5.2f ms/commit"
              % small_commits(store, idx, commits) + f"  (compaction {compact_ms:.0f} ms, rewrites {store.shrinks})")
        store.close()
    finally:
        log_store.SHRINK_FREE_PAGES_MIN = saved
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big-entries", type=int, default=400, help="900 KB entries appended, then compacted away")
    p.add_argument("--commits", type=int, default=300, help="small commits measured at each step")
    args = p.parse_args(argv)
    run(False, args.big_entries, args.commits)
    run(True, args.big_entries, args.commits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
