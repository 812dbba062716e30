"""CPU per transfer of one replica's in-process hot path, by stage, in process CPU time (not wall time), so
that a machine shared with other work still gives comparable numbers (bench_node's throughput on 2 busy cores
moves by 2x between runs of the same code). Runs against an older checkout too (``PYTHONPATH``).

Stages, for entries of ``--batches`` batches of 8190 random transfers among ``--accounts`` accounts:
- ``entry``: the leader's ``ledger_entry`` of the batches' bytes (the group commit of its requests' frames
  into one Raft entry);
- ``log``: ``LogStore.save`` of the entry (record header, crc32, pwritev; the fdatasync is on by default but
  its wait is not CPU time) plus the copy the Raft core makes of a follower's entry (``bytes(data)``);
- ``apply``: ``LedgerMachine.apply`` without its event sink (the ledger, the entry's parsing, the events'
  copy out of the ledger);
- ``events``: the node's event sink, ``EventStore.append`` (LZ4 chunks and the dedup index, flushed as the
  store's grouping does) and the final flush.

It also counts the process's minor page faults over the timed stages: fresh pages cost ~0.25 us each here,
and a heap that glibc trims after every entry faults its multi-MB buffers (the entry, its events) in again.

What it leaves out (the same in any checkout, or not CPU): ZeroMQ transport, the Raft core's bookkeeping,
the node's request intake and replies, the spare segments' zero fill, page-cache writeback.

It fixes glibc's malloc thresholds first, as a replica does at its start (``engine.service.process.tune_malloc``;
the same numbers when run against a checkout that predates it), unless ``--malloc-default``.

    python -m bench.bench_replica_path [--entries 60] [--batches 2] [--reps 5] [--malloc-default]
"""
from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time

import numpy as np

from engine import records as R
from engine._ledger import OpEncoder
from engine.event_store import EventStore
from engine.ledger_machine import LedgerMachine, ledger_entry
from engine.raft.log_store import LogStore
from engine.raft.messages import Entry

BATCH_RECORDS = R.BATCH_SIZE_MAX
DEDUP_BATCH_BASE = 1 << 40


def _tune_malloc() -> bool:
    """The replica's malloc policy (engine/service/process.py), also for a checkout that has none."""
    try:
        from engine.service.process import tune_malloc
    except ImportError:                  # an older checkout: the same mallopt calls
        import ctypes
        import ctypes.util
        import platform
        if platform.libc_ver()[0] != "glibc":
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt(-3, 8 << 20) == 1 and libc.mallopt(-1, 32 << 20) == 1
    return tune_malloc()


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _stamp(ops: np.ndarray, now_ms: int) -> None:
    if "issued_ms" in (ops.dtype.names or ()):          # a checkout before the 128-byte record has none
        ops["issued_ms"] = now_ms


def _setup_entries(machine: LedgerMachine, accounts: int, now_ms: int, term: int) -> int:
    """Accounts 1..accounts created through entries applied to ``machine``; returns the last index."""
    template = OpEncoder().create_account(1, 1, "USD", lower_limit=None)
    index = 0
    for start in range(0, accounts, BATCH_RECORDS):
        ids = np.arange(start + 1, min(start + BATCH_RECORDS, accounts) + 1, dtype=np.int64)
        ops = np.repeat(template, len(ids))
        R.put_u128(ops["dedup_id"], ids)
        R.put_u128(ops["account_id"], ids)
        _stamp(ops, now_ms)
        index += 1
        machine.apply([Entry(term, index, 0, ledger_entry([ops], now_ms))])
    return index


def run_once(args: argparse.Namespace, rep: int) -> dict[str, float]:
    base = tempfile.mkdtemp(prefix="bench-replica-path-")
    try:
        events = EventStore(f"{base}/events")
        sink_cpu = [0.0]

        def sink(chunks: list[np.ndarray]) -> None:
            t = time.process_time()
            events.append(chunks)
            sink_cpu[0] += time.process_time() - t

        machine = LedgerMachine(event_sink=sink)
        store = LogStore(f"{base}/raft", sync=not args.no_sync)
        now_ms = int(time.time() * 1000)
        term = 1
        index = _setup_entries(machine, args.accounts, now_ms, term)
        setup_sink = sink_cpu[0]
        rng = np.random.default_rng(rep)
        templates = []
        for _ in range(8):
            src = rng.integers(1, args.accounts + 1, BATCH_RECORDS)
            dst = (src + rng.integers(1, args.accounts, BATCH_RECORDS) - 1) % args.accounts + 1
            templates.append(R.transfers(np.zeros(BATCH_RECORDS, dtype=np.int64), src, dst,
                                         np.ones(BATCH_RECORDS, dtype=np.int64), "USD"))
        cpu = {"entry": 0.0, "log": 0.0, "apply": 0.0, "events": 0.0}
        sent = 0
        entry_bytes = 0
        faults = 0
        log_index = 0                     # the log holds only the timed entries
        for _ in range(args.entries):
            batches = []
            for _ in range(args.batches):
                ops = templates[sent % len(templates)].copy()
                ops["dedup_id"][:, 0] = np.arange(BATCH_RECORDS, dtype=np.uint64) + np.uint64(
                    DEDUP_BATCH_BASE + sent * BATCH_RECORDS)
                _stamp(ops, now_ms)
                batches.append(ops.tobytes())     # the node groups the request frames' bytes
                sent += 1
            now_ms += 1
            index += 1
            f0 = _faults()
            t0 = time.process_time()
            data = ledger_entry(batches, now_ms)
            t1 = time.process_time()
            log_index += 1
            entry = Entry(term, log_index, 0, data)
            store.save(entries=[entry])
            follower_copy = bytes(memoryview(data))
            t2 = time.process_time()
            machine.apply([Entry(term, index, 0, follower_copy)])
            t3 = time.process_time()
            faults += _faults() - f0
            cpu["entry"] += t1 - t0
            cpu["log"] += t2 - t1
            cpu["apply"] += t3 - t2
            entry_bytes += len(data)
        in_apply = sink_cpu[0] - setup_sink
        cpu["apply"] -= in_apply               # apply: the ledger and the machine around it, without the sink
        t = time.process_time()
        events.close()                         # the last flush belongs to the events too
        cpu["events"] = in_apply + time.process_time() - t
        transfers = sent * BATCH_RECORDS
        out = {k: v / transfers * 1e9 for k, v in cpu.items()}        # ns per transfer
        out["total"] = sum(out.values())
        out["page_faults_per_1k_transfers"] = faults / transfers * 1000
        out["entry_bytes_per_transfer"] = entry_bytes / transfers
        out["log_bytes_per_transfer"] = store.bytes_written / transfers
        store.close()
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--entries", type=int, default=60, help="timed entries per repetition")
    p.add_argument("--batches", type=int, default=2, help="8190-transfer batches per entry (bench_node's load "
                   "makes 1-4)")
    p.add_argument("--reps", type=int, default=5, help="repetitions (fresh ledger and stores); medians shown")
    p.add_argument("--no-sync", action="store_true", help="no fdatasync of the log")
    p.add_argument("--malloc-default", action="store_true", help="keep glibc's dynamic malloc thresholds (a "
                   "replica fixes them at start)")
    args = p.parse_args(argv)
    tuned = False if args.malloc_default else _tune_malloc()
    runs = [run_once(args, rep) for rep in range(args.reps)]
    keys = list(runs[0])
    print(f"replica path, {args.entries} entries x {args.batches} x {BATCH_RECORDS} transfers, "
          f"{args.accounts:,} accounts, {args.reps} reps, malloc thresholds {'fixed' if tuned else 'glibc default'} "
          "(CPU ns per transfer; medians, then every rep)")
    for k in keys:
        vals = [r[k] for r in runs]
        print(f"  {k:26s} {statistics.median(vals):8.1f}   " + " ".join(f"{v:.1f}" for v in vals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
