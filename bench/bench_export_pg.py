"""Throughput of the exactly-once PostgreSQL export (query/export_pg.py) from stored events.

    python -m bench.bench_export_pg                      # 500K event records, 3 runs, median
    python -m bench.bench_export_pg --records 1000000 --runs 5

The events are a real shard's: the embedded ledger applies batched transfers between ``--accounts``
accounts (two event records, one seq, per transfer) and the records are stored in an event store
(``engine.event_store.EventStore``, LMDB, the node's golden copy), then read back in ranges as the
exporter's catch-up reads them. Each run exports them into a fresh database of a private PostgreSQL
(engine/devtools/pg_server.py: fsync=on, synchronous_commit=on, full_page_writes=on) through
``PgExporter.prepare`` and a
``CommitPipeline`` (as ``zwallet export-pg`` does: encoding overlaps the previous commit), in
batches of ``--batch-records`` (whole seqs), each batch one transaction with its checkpoint. Reported per
run and as the median: event records/s and seqs/s end to end (read from the store, check, encode, COPY,
commit), the exporter's CPU and the PostgreSQL server's CPU per record. The bar: >= 100K event records/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from engine import records as R

BAR_RECORDS_S = 100_000


def make_store(path: str, records: int, accounts: int) -> tuple[Any, int]:
    """An event store holding ``records`` event records (transfers: 2 a seq) of a real ledger."""
    from engine import Ledger
    from engine.event_store import EventStore
    led = Ledger(event_retention=1 << 21)
    t0 = 1_760_000_000_000
    for a in range(1, accounts + 1):
        r = led.create_account(a, a, "USD", lower_limit=None, timestamp=t0)
        assert r.ok
    store = EventStore(path)
    store.append([led.events(1, led.last_seq)])
    rng = np.random.default_rng(1)
    dedup = accounts + 1
    while led.last_seq * 2 - accounts < records:
        n = R.BATCH_SIZE_MAX
        frm = rng.integers(1, accounts + 1, n)
        to = frm % accounts + 1
        first = led.last_seq + 1
        led.apply_batch(R.transfers(np.arange(dedup, dedup + n), frm, to, rng.integers(1, 100_000, n), "USD"),
                        timestamp=t0 + dedup)
        dedup += n
        store.append([led.events(first, led.last_seq)])
    store.flush()
    return store, led.last_seq


def one_run(pg: Any, store: Any, last_seq: int, batch_records: int, connections: int, run: int) -> dict[str, float]:
    import psycopg
    from query.export_pg import FETCH_SEQS_MAX, CommitPipeline, PgExporter, join_records
    db = f"bench_export_{run}_{os.getpid()}"
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db}")
        conn.execute(f"CREATE DATABASE {db}")
    dsn = f"host=127.0.0.1 port={pg.port} user=postgres dbname={db}"
    ex = PgExporter.connect(dsn)
    ex.create_schema()
    cps = ex.checkpoints([1])
    extra = [PgExporter.connect(dsn) for _ in range(connections - 1)]
    pipeline = CommitPipeline([ex, *extra])
    pg_cpu0 = pg.cpu_seconds()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    seq = 1
    pending: list[np.ndarray] = []
    pending_records = 0
    while seq <= last_seq:
        evs = store.read(seq, min(last_seq, seq + FETCH_SEQS_MAX - 1), 1 << 20)
        seq = int(evs["seq_num"][-1]) + 1
        pending.append(evs)
        pending_records += len(evs)
        if pending_records >= batch_records or seq > last_seq:
            batch = ex.prepare({1: join_records(pending)}, cps)     # encoded while the previous one commits
            cps = batch.last
            pipeline.submit(batch)
            pending, pending_records = [], 0
    pipeline.drain()
    error = pipeline.take_error()
    pipeline.close()
    if error is not None:
        raise error
    records = pipeline.records_written
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    pg_cpu = pg.cpu_seconds() - pg_cpu0
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*), max(seq_num) FROM events").fetchone()
        assert row is not None and (int(row[0]), int(row[1])) == (records, last_seq), row
    for e in [ex, *extra]:
        e.close()
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {db}")
    return {"records_s": records / wall, "seqs_s": last_seq / wall, "wall_s": wall,
            "client_cpu_us": cpu / records * 1e6, "server_cpu_us": pg_cpu / records * 1e6}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=500_000, help="event records to export (2 per transfer)")
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch-records", type=int, default=None, help="records per transaction (default: the "
                   "exporter's BATCH_RECORDS_MAX)")
    p.add_argument("--connections", type=int, default=None, help="commit pipeline connections (default: the "
                   "exporter's CONNECTIONS_DEFAULT)")
    args = p.parse_args(argv)
    from engine.devtools.pg_server import PostgresServer
    from query.export_pg import BATCH_RECORDS_MAX, CONNECTIONS_DEFAULT
    batch = args.batch_records or BATCH_RECORDS_MAX
    connections = args.connections or CONNECTIONS_DEFAULT
    with tempfile.TemporaryDirectory(prefix="zwallet-bench-export-") as tmp:
        t = time.perf_counter()
        store, last_seq = make_store(os.path.join(tmp, "events"), args.records, args.accounts)
        print(f"stored {last_seq:,} seqs ({args.records:,}+ event records) in {time.perf_counter() - t:.1f} s",
              flush=True)
        results = []
        with PostgresServer(tmp) as pg:
            for k in range(args.runs):
                r = one_run(pg, store, last_seq, batch, connections, k)
                results.append(r)
                print(f"run {k + 1}: {r['records_s']:,.0f} event records/s ({r['seqs_s']:,.0f} seqs/s), "
                      f"{r['wall_s']:.2f} s; exporter CPU {r['client_cpu_us']:.2f} us/record, "
                      f"PostgreSQL CPU {r['server_cpu_us']:.2f} us/record", flush=True)
        store.close()
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    verdict = "meets" if med["records_s"] >= BAR_RECORDS_S else "MISSES"
    print(f"median of {args.runs}: {med['records_s']:,.0f} event records/s ({med['seqs_s']:,.0f} seqs/s), exporter "
          f"CPU {med['client_cpu_us']:.2f} us/record, PostgreSQL CPU {med['server_cpu_us']:.2f} us/record; "
          f"batches of {batch} records on {connections} connection(s); {verdict} the bar of {BAR_RECORDS_S:,} "
          "event records/s", flush=True)
    return {"median": med, "runs": results, "bar_records_s": BAR_RECORDS_S, "connections": connections}


if __name__ == "__main__":
    main()
