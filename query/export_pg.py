"""The exactly-once PostgreSQL export of every shard's events: ``zwallet export-pg``.

    zwallet export-pg --system D/system.toml --dsn "host=127.0.0.1 port=5432 dbname=zwallet user=zw"

Two parts (docs/export-pg.md has the schema, the guarantees and the operator's view):

- ``PgExporter``, the core: takes batches of event records (numpy arrays of ``engine.records.EVENT_DTYPE``,
  whole seqs, in seq order per shard, each continuing that shard's checkpoint) and writes them to the
  ``events`` and ``account_versions`` tables with binary COPY, moving the shard's row in
  ``export_checkpoint`` IN THE SAME TRANSACTION. A batch is all or nothing, so after any crash (of this
  process or of PostgreSQL) the checkpoint says exactly what is in the tables: a restart resumes after
  it, without a duplicate or a hole. The primary key ``(shard_id, seq_num, part)`` makes a duplicate a
  hard error, never silently ignored; a batch that does not continue the checkpoint (a hole, a repeat, a
  partial seq) is refused with ``ExportError`` before anything is written. A projector can drive it.
- The runner (``run``/``main``): one ``ShardReader`` per shard reads its events in seq order with no gap
  (bounded range fetches from the replicas' event stores while it is behind, then
  ``engine.client.Subscriber`` on the shard's PUB sockets once it has caught up), collects up to
  ``BATCH_RECORDS_MAX`` records or ``FLUSH_INTERVAL_S`` worth, prepares them (check + encode) and hands
  them to a ``CommitPipeline`` (``CONNECTIONS_DEFAULT`` connections: batch i+1's COPY runs while batch i
  commits; the checkpoints still move in order). When the database goes away it reconnects with backoff,
  reloads the checkpoints and re-reads from them.

Rows are encoded to PostgreSQL's binary COPY format with numpy, a batch at a time (no Python work per
event): fixed-size big-endian records, 128-bit values as fixed-width NUMERIC (5 or 10 base-10000 digits
per column and batch, which the server normalizes), the one variable-length column (``currency``) last,
rows grouped by its length.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine import records as R

BATCH_RECORDS_MAX = 65_536          # event records written in one transaction (8 MiB of records)
FETCH_SEQS_MAX = 16_384             # seqs in one catch-up range fetch from a shard's event store
LIVE_LAG_SEQS_MAX = 65_536          # a live reader this far behind the shard's head goes back to range fetches
HEAD_CHECK_S = 1.0                  # how often a live reader asks the shard how far it is
CONNECTIONS_DEFAULT = 2             # transactions in flight at once (PostgreSQL works on both cores here)
CONNECTIONS_MAX = 8
FLUSH_INTERVAL_S = 0.1              # records waiting this long are written even if the batch is not full
PROGRESS_INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 5
RECONNECT_BACKOFF_S_MIN = 0.1
RECONNECT_BACKOFF_S_MAX = 5.0
SHARD_TIMEOUT_S = 5.0               # a shard call (status, range fetch) that gets no answer this long is retried
INT64_MAX = (1 << 63) - 1
TIMESTAMP_MS_MAX = 1 << 53          # ms since the Unix epoch that a timestamptz holds (year ~287,000)
_PG_EPOCH_MS = 946_684_800_000      # 2000-01-01 (PostgreSQL's timestamp epoch) in ms since the Unix epoch

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS events (
    shard_id    integer        NOT NULL,
    seq_num     bigint         NOT NULL,
    part        integer        NOT NULL,
    parts       integer        NOT NULL,
    "timestamp" bigint         NOT NULL,
    dedup_id    numeric(39, 0) NOT NULL,
    account_id  numeric(39, 0) NOT NULL,
    other_id    numeric(39, 0) NOT NULL,
    amount      numeric(39, 0) NOT NULL,
    available   numeric(39, 0) NOT NULL,
    version     bigint         NOT NULL,
    kind        smallint       NOT NULL,
    state       smallint       NOT NULL,
    code        integer        NOT NULL,
    currency    varchar(8)     NOT NULL,
    PRIMARY KEY (shard_id, seq_num, part)
);
CREATE TABLE IF NOT EXISTS account_versions (
    shard_id    integer        NOT NULL,
    seq_num     bigint         NOT NULL,
    part        integer        NOT NULL,
    account_id  numeric(39, 0) NOT NULL,
    version     bigint         NOT NULL,
    available   numeric(39, 0) NOT NULL,
    state       smallint       NOT NULL,
    "time"      timestamptz    NOT NULL,
    currency    varchar(8)     NOT NULL,
    PRIMARY KEY (account_id, shard_id, seq_num, part)
);
CREATE TABLE IF NOT EXISTS export_checkpoint (
    shard_id    integer     PRIMARY KEY,
    last_seq    bigint      NOT NULL CHECK (last_seq >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
"""

EVENTS_COLUMNS = ("shard_id", "seq_num", "part", "parts", '"timestamp"', "dedup_id", "account_id", "other_id",
                  "amount", "available", "version", "kind", "state", "code", "currency")
ACCOUNT_VERSIONS_COLUMNS = ("shard_id", "seq_num", "part", "account_id", "version", "available", "state", '"time"',
                            "currency")


class ExportError(Exception):
    """Events that cannot be exported exactly once (a hole, a repeat, a partial seq, a checkpoint ahead
    of the shard or moved by someone else, malformed records). Never retried, never skipped: the export
    stops and says why."""


# -------------------------------------------------------------------------------- binary COPY encoding
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)
_NUMERIC_NEG = 0x4000
_SCALARS: dict[str, np.dtype] = {"i2": np.dtype(">i2"), "i4": np.dtype(">i4"), "i8": np.dtype(">i8")}
_M32 = np.uint64(0xFFFFFFFF)
_U10K = np.uint64(10_000)


def _numeric_dtype(ndigits: int) -> np.dtype:
    """NUMERIC's binary form with a fixed number of base-10000 digits (leading zero digits are allowed:
    the server normalizes them away)."""
    return np.dtype([("ndigits", ">i2"), ("weight", ">i2"), ("sign", ">u2"), ("dscale", ">u2"),
                     ("digits", ">u2", (ndigits,))])


def _numeric(field: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sign words and base-10000 digits (most significant first, ``(n, 5)`` when every magnitude fits in
    64 bits, else ``(n, 10)``) of 128-bit values (a ``(n, 2)`` [lo, hi] field, two's complement if
    ``signed``)."""
    lo = np.ascontiguousarray(field[:, 0])
    hi = np.ascontiguousarray(field[:, 1])
    sign = np.zeros(len(lo), dtype=np.uint16)
    if signed and len(hi):
        neg = (hi >> np.uint64(63)).astype(bool)
        if neg.any():
            nlo = ~lo + np.uint64(1)
            nhi = ~hi + (lo == 0).astype(np.uint64)
            lo = np.where(neg, nlo, lo)
            hi = np.where(neg, nhi, hi)
            sign[neg] = _NUMERIC_NEG
    if not hi.any():                                   # the common case: every magnitude fits in 64 bits
        out = np.empty((len(lo), 5), dtype=np.uint64)  # 2**64 < 10000**5
        x = lo
        for k in range(4, -1, -1):
            q = x // _U10K
            out[:, k] = x - q * _U10K
            x = q
        return sign, out
    out = np.empty((len(lo), 10), dtype=np.uint64)     # 2**128 < 10000**10
    limbs = [hi >> np.uint64(32), hi & _M32, lo >> np.uint64(32), lo & _M32]
    for k in range(9, -1, -1):                         # long division of four 32-bit limbs by 10000
        rem = np.zeros(len(lo), dtype=np.uint64)
        for j in range(4):
            cur = (rem << np.uint64(32)) | limbs[j]    # rem < 10000, so cur < 2**46
            q = cur // _U10K
            rem = cur - q * _U10K
            limbs[j] = q
        out[:, k] = rem
    return sign, out


def _copy_tuples(columns: list[tuple[str, str, Any]], currency: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Binary COPY tuples (as arrays of fixed-size records, to be written as their bytes) of ``columns``
    (name, kind ``i2``/``i4``/``i8``/``u128``/``i128``, values) followed by ``currency`` (varchar, its
    ``lengths``). Rows are grouped by the currency's length, so each group is fixed-size: the constant parts
    (field lengths, NUMERIC headers) are one broadcast copy of a template row, each value column one
    vectorized assignment; no Python work per row."""
    spec: list[tuple[str, Any]] = [("nfields", ">i2")]
    const: dict[str, int] = {"nfields": len(columns) + 1}
    values: dict[str, Any] = {}
    for name, kind, vals in columns:
        if kind in _SCALARS:
            spec += [(f"{name}_len", ">i4"), (name, _SCALARS[kind])]
            const[f"{name}_len"] = _SCALARS[kind].itemsize
            values[name] = vals
        else:
            sign, digits = _numeric(vals, kind == "i128")
            ndt = _numeric_dtype(digits.shape[1])
            spec += [(f"{name}_len", ">i4"), (name, ndt)]
            const[f"{name}_len"] = ndt.itemsize
            values[name] = (sign, digits)
    out: list[np.ndarray] = []
    distinct = np.unique(lengths)
    for length in distinct:
        n = int(length)
        sel: Any = np.nonzero(lengths == length)[0] if len(distinct) > 1 else slice(None)
        dt = np.dtype(spec + [("currency_len", ">i4")] + ([("currency", f"S{n}")] if n else []))
        template = np.zeros(1, dtype=dt)
        for k, v in const.items():
            template[k] = v
        template["currency_len"] = n
        for name, kind, _ in columns:
            if kind not in _SCALARS:
                ndigits = template[name]["digits"].shape[-1]
                template[name]["ndigits"] = ndigits
                template[name]["weight"] = ndigits - 1
        count = len(lengths) if isinstance(sel, slice) else len(sel)
        rows = np.empty(count, dtype=dt)
        rows.view(np.uint8).reshape(count, dt.itemsize)[:] = template.view(np.uint8)
        for name, kind, _ in columns:
            if kind in _SCALARS:
                rows[name] = values[name][sel]
            else:
                sign, digits = values[name]
                sub = rows[name]
                sub["sign"] = sign[sel]
                sub["digits"] = digits[sel]
        if n:
            rows["currency"] = currency[sel]
        out.append(rows)
    return out


def _currency_lengths(currency: np.ndarray) -> np.ndarray:
    raw = np.frombuffer(np.ascontiguousarray(currency).tobytes(), dtype=np.uint8).reshape(-1, R.CURRENCY_SIZE_MAX)
    zero = raw == 0
    if not np.array_equal(np.logical_or.accumulate(zero, axis=1), zero):
        raise ExportError("an event's currency has a byte after its NUL padding")
    if ((~zero) & ((raw < 0x21) | (raw > 0x7E))).any():
        raise ExportError("an event's currency is not printable ASCII")
    return (~zero).sum(axis=1)


def encode_events(shard_id: int, evs: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The binary COPY tuples of a checked batch for ``events`` and for ``account_versions`` (the parts
    with an account: every change of an account's version, ordered by account for the index), as arrays
    whose bytes are the tuples. A COPY stream is ``COPY_HEADER``, the tuples of any number of batches,
    ``COPY_TRAILER``."""
    n = len(evs)
    lengths = _currency_lengths(evs["currency"])
    shard = np.full(n, shard_id, dtype=np.int32)
    ev_cols: list[tuple[str, str, Any]] = [
        ("shard_id", "i4", shard), ("seq_num", "i8", evs["seq_num"]), ("part", "i4", evs["part"]),
        ("parts", "i4", evs["parts"]), ("timestamp", "i8", evs["timestamp"]), ("dedup_id", "u128", evs["dedup_id"]),
        ("account_id", "u128", evs["account_id"]), ("other_id", "u128", evs["other_id"]),
        ("amount", "i128", evs["amount"]), ("available", "i128", evs["available"]), ("version", "i8", evs["version"]),
        ("kind", "i2", evs["kind"]), ("state", "i2", evs["state"]), ("code", "i4", evs["code"])]
    events_rows = _copy_tuples(ev_cols, evs["currency"], lengths)

    acct = evs["account_id"]
    has_account = (acct[:, 0] | acct[:, 1]) != 0
    # by account (then seq: the batch is in seq order and the sort is stable): the index's insertion order
    order = np.lexsort((acct[:, 0], acct[:, 1]))
    order = order[has_account[order]]
    v = evs[order]
    v_cols: list[tuple[str, str, Any]] = [
        ("shard_id", "i4", shard[:len(v)]), ("seq_num", "i8", v["seq_num"]), ("part", "i4", v["part"]),
        ("account_id", "u128", v["account_id"]), ("version", "i8", v["version"]),
        ("available", "i128", v["available"]), ("state", "i2", v["state"]),
        ("time", "i8", (v["timestamp"].astype(np.int64) - _PG_EPOCH_MS) * 1000)]
    version_rows = _copy_tuples(v_cols, v["currency"], lengths[order])
    return events_rows, version_rows


# --------------------------------------------------------------------------------------- batch checks
def check_batch(shard_id: int, evs: np.ndarray, after_seq: int) -> int:
    """Check that ``evs`` continues a shard's export after ``after_seq``: event records, seqs from
    after_seq + 1 with no gap and no repeat, every seq whole (parts 0..parts-1, in order), values that fit
    the tables. Returns the batch's last seq; ExportError (nothing written) otherwise."""
    if not isinstance(evs, np.ndarray) or evs.dtype != R.EVENT_DTYPE or evs.ndim != 1:
        raise ExportError(f"shard {shard_id}: a batch must be a 1-d numpy array of EVENT_DTYPE records")
    if not len(evs):
        return after_seq
    seqs = evs["seq_num"]
    first = int(seqs[0])
    if first != after_seq + 1:
        what = "a hole" if first > after_seq + 1 else "a repeat"
        raise ExportError(f"shard {shard_id}: the batch starts at seq {first} but the export is at seq {after_seq}: "
                          f"{what} (seqs {min(first, after_seq + 1)}..{max(first - 1, after_seq)}); never skipped")
    step = np.diff(seqs.astype(np.int64))
    if len(step) and (step.min() < 0 or step.max() > 1):
        k = int(np.nonzero((step < 0) | (step > 1))[0][0])
        raise ExportError(f"shard {shard_id}: seq {int(seqs[k])} is followed by seq {int(seqs[k + 1])} in the batch "
                          "(a hole or out of order); never skipped")
    part = evs["part"].astype(np.int64)
    parts = evs["parts"].astype(np.int64)
    starts = np.concatenate(([True], step == 1))
    ends = np.concatenate((step == 1, [True]))
    inner = ~starts
    bad = ((parts < 1) | (starts & (part != 0)) | (ends & (part != parts - 1))
           | (inner & (np.concatenate(([0], np.diff(part))) != 1))
           | (inner & (np.concatenate(([0], np.diff(parts))) != 0)))
    if bad.any():
        k = int(np.nonzero(bad)[0][0])
        raise ExportError(f"shard {shard_id}: seq {int(seqs[k])} is not whole in the batch (part {int(part[k])} of "
                          f"{int(parts[k])}): a batch holds every part of each of its seqs")
    if int(seqs[-1]) > INT64_MAX or int(evs["version"].max()) > INT64_MAX:
        raise ExportError(f"shard {shard_id}: a seq_num or version does not fit a bigint")
    if int(evs["timestamp"].max()) > TIMESTAMP_MS_MAX:
        raise ExportError(f"shard {shard_id}: an event's timestamp is past {TIMESTAMP_MS_MAX} ms")
    if evs["reserved2"].any():
        raise ExportError(f"shard {shard_id}: an event's reserved2 is not zero (an unknown record layout)")
    return int(seqs[-1])


def _copy_write(cp: Any, tuples: list[np.ndarray]) -> None:
    """One binary COPY stream: the header, the tuples' bytes (no copy), the trailer."""
    cp.write(COPY_HEADER)
    for rows in tuples:
        if len(rows):
            cp.write(rows.view(np.uint8).data)
    cp.write(COPY_TRAILER)


def join_records(chunks: list[np.ndarray]) -> np.ndarray:
    """One array of the chunks' records (np.concatenate of structured arrays goes field by field)."""
    if len(chunks) == 1:
        return chunks[0]
    if not chunks:
        return np.zeros(0, dtype=R.EVENT_DTYPE)
    return np.frombuffer(bytearray(b"".join(np.ascontiguousarray(c).data for c in chunks)), dtype=R.EVENT_DTYPE)


# ------------------------------------------------------------------------------------------ the core
@dataclass
class PreparedBatch:
    """One transaction's worth, checked and encoded: each shard's batch continues ``after[shard]`` and ends
    at ``last[shard]``; the COPY tuples of both tables."""
    after: dict[int, int]
    last: dict[int, int]
    records: int
    events_rows: list[np.ndarray]
    version_rows: list[np.ndarray]


class PgExporter:
    """Writes event record batches to PostgreSQL exactly once (see the module doc). Single-threaded: one
    connection, one transaction per ``write``.

    After any exception from ``write`` other than ExportError the transaction's outcome may be unknown
    (the connection broke during COMMIT): reconnect and call ``checkpoints()`` again, which says what is
    in the tables, and continue from there."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._checkpoints: dict[int, int] = {}

    @classmethod
    def connect(cls, dsn: str, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> PgExporter:
        import psycopg
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout_s,
                               application_name="zwallet export-pg")
        return cls(conn)

    def close(self) -> None:
        self.conn.close()

    def create_schema(self) -> None:
        """Create the tables if they do not exist (docs/export-pg.md)."""
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(7340214)")      # concurrent CREATE IF NOT EXISTS races
            cur.execute(SCHEMA_SQL)

    def checkpoints(self, shard_ids: Iterable[int]) -> dict[int, int]:
        """The last exported seq of each shard (0: nothing yet; the row is created), checked against the
        tables: ``events`` must end exactly at the checkpoint (otherwise ExportError: rows that no
        checkpoint covers, or a checkpoint past the rows)."""
        ids = sorted({int(s) for s in shard_ids})
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute("INSERT INTO export_checkpoint (shard_id, last_seq) SELECT s, 0 FROM unnest(%s::integer[]) "
                        "AS s ON CONFLICT (shard_id) DO NOTHING", (ids,))
            cur.execute("SELECT shard_id, last_seq FROM export_checkpoint WHERE shard_id = ANY(%s)", (ids,))
            got = {int(s): int(q) for s, q in cur.fetchall()}
            for s in ids:
                cur.execute("SELECT max(seq_num) FROM events WHERE shard_id = %s", (s,))
                row = cur.fetchone()
                top = int(row[0]) if row and row[0] is not None else 0
                if top != got[s]:
                    raise ExportError(f"shard {s}: export_checkpoint says seq {got[s]} but the events table ends at "
                                      f"seq {top}: the tables were changed outside the exporter; refusing to go on")
        self._checkpoints.update(got)
        return {s: got[s] for s in ids}

    def prepare(self, batches: Mapping[int, np.ndarray], after: Mapping[int, int] | None = None) -> PreparedBatch:
        """Check and encode one transaction's batches (no database access: this can run in another thread
        while the previous transaction is in flight). ``after``: the seq each shard's batch continues (default:
        the checkpoints; a pipeline passes the previous prepared batch's ``last``)."""
        todo = {int(s): evs for s, evs in batches.items() if len(evs)}
        base = dict(self._checkpoints if after is None else after)
        missing = [s for s in todo if s not in base]
        if missing:
            raise ExportError(f"shard(s) {missing}: no checkpoint loaded (call checkpoints() first)")
        last = {s: check_batch(s, evs, base[s]) for s, evs in todo.items()}
        encoded = [encode_events(s, evs) for s, evs in sorted(todo.items())]
        return PreparedBatch({s: base[s] for s in todo}, last, sum(len(e) for e in todo.values()),
                             [rows for ev_rows, _ in encoded for rows in ev_rows],
                             [rows for _, av_rows in encoded for rows in av_rows])

    def commit(self, batch: PreparedBatch, wait_turn: Callable[[], bool] | None = None) -> int:
        """Write a prepared batch and move its shards' checkpoints, in ONE transaction; the number of event
        records written. ExportError (nothing written) if a checkpoint is not where the batch continues.

        ``wait_turn`` (a ``CommitPipeline`` of several connections): called after the COPYs, before the
        checkpoint is checked and moved; it returns once the previous batch's transaction has ended, True
        if that one committed (then this one continues it) and False if it failed (then this one is rolled
        back: ``Discarded``). So the batches commit in order and only ever continue a committed checkpoint."""
        if not batch.records:
            return 0
        ids = sorted(batch.last)
        if wait_turn is None:
            for s in ids:
                if self._checkpoints.get(s) != batch.after[s]:
                    raise ExportError(f"shard {s}: the batch continues seq {batch.after[s]} but the export is at "
                                      f"{self._checkpoints.get(s)}: a hole or a repeat; never skipped")
        with self.conn.transaction(), self.conn.cursor() as cur:
            with cur.copy(f"COPY events ({', '.join(EVENTS_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as cp:
                _copy_write(cp, batch.events_rows)
            with cur.copy(f"COPY account_versions ({', '.join(ACCOUNT_VERSIONS_COLUMNS)}) "
                          "FROM STDIN (FORMAT BINARY)") as cp:
                _copy_write(cp, batch.version_rows)
            if wait_turn is not None and not wait_turn():
                raise Discarded()
            cur.execute("SELECT shard_id, last_seq FROM export_checkpoint WHERE shard_id = ANY(%s) "
                        "ORDER BY shard_id FOR UPDATE", (ids,))
            now = {int(s): int(q) for s, q in cur.fetchall()}
            for s in ids:
                if now.get(s) != batch.after[s]:
                    raise ExportError(f"shard {s}: export_checkpoint is at {now.get(s)} but this batch continues seq "
                                      f"{batch.after[s]}: is another exporter writing to the same database?")
            cur.execute("UPDATE export_checkpoint AS c SET last_seq = v.last_seq, updated_at = now() FROM "
                        "unnest(%s::integer[], %s::bigint[]) AS v(shard_id, last_seq) WHERE c.shard_id = v.shard_id",
                        (ids, [batch.last[s] for s in ids]))
            if cur.rowcount != len(ids):
                raise ExportError(f"export_checkpoint: {cur.rowcount} of {len(ids)} shard rows updated")
        self._checkpoints.update(batch.last)
        return batch.records

    def write(self, batches: Mapping[int, np.ndarray]) -> int:
        """Write each shard's batch (continuing its checkpoint) and move the checkpoints, in ONE transaction.
        Returns the number of event records written."""
        missing = [s for s, evs in batches.items() if len(evs) and s not in self._checkpoints]
        if missing:
            self.checkpoints(missing)
        return self.commit(self.prepare(batches))


class Discarded(Exception):
    """A pipelined batch rolled back because the one before it failed (it is read and written again)."""


class CommitPipeline:
    """Commits prepared batches, in order, on one or more connections (each with a thread), while the
    caller reads and prepares the next ones. With several connections, batch i+1's COPYs run while batch i
    commits (PostgreSQL works on both cores); each transaction checks and moves the checkpoint only after
    the previous one committed (``PgExporter.commit``'s ``wait_turn``), so the checkpoints still move in
    seq order and a transaction never commits rows past a hole. Bounded: per connection one transaction
    in flight and one batch waiting. After a failure nothing later is committed: ``error`` holds the first
    exception until the caller ``take_error()``s it (after ``drain()``)."""

    def __init__(self, exporters: list[PgExporter]) -> None:
        import queue
        if not exporters:
            raise ValueError("a pipeline needs at least one connection")
        self.exporters = list(exporters)
        self.records_written = 0
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._submitted = 0                   # batches handed in
        self._done = 0                        # batches finished (committed, failed or discarded), in order
        self._queues: list[queue.Queue[tuple[int, PreparedBatch] | None]] = [queue.Queue(maxsize=1)
                                                                             for _ in self.exporters]
        self._threads = [threading.Thread(target=self._run, args=(k,), name=f"export-pg-commit-{k}", daemon=True)
                         for k in range(len(self.exporters))]
        for t in self._threads:
            t.start()

    def _run(self, k: int) -> None:
        while True:
            item = self._queues[k].get()
            if item is None:
                return
            index, batch = item

            def turn(index: int = index) -> bool:
                with self._cond:
                    while self._done != index:
                        self._cond.wait()
                    return self.error is None
            try:
                if self.error is None:
                    n = self.exporters[k].commit(batch, turn if len(self.exporters) > 1 else None)
                    with self._cond:
                        self.records_written += n
            except Discarded:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which decides
                with self._cond:
                    if self.error is None:
                        self.error = exc
            finally:
                turn()                        # finish in order (also after a failure before our turn)
                with self._cond:
                    self._done += 1
                    self._cond.notify_all()

    def submit(self, batch: PreparedBatch) -> None:
        """Queue a batch (blocks while its connection's queue is full: the backpressure on the readers)."""
        index = self._submitted
        self._submitted += 1
        self._queues[index % len(self._queues)].put((index, batch))

    def drain(self) -> None:
        """Wait until every submitted batch is finished (committed, or refused after an error)."""
        with self._cond:
            while self._done != self._submitted:
                self._cond.wait()

    def take_error(self) -> BaseException | None:
        with self._cond:
            exc, self.error = self.error, None
        return exc

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()


# ------------------------------------------------------------------------------------- the readers
class ShardReader:
    """One shard's events in seq order with no gap, from ``next_seq`` on, in bounded chunks of whole seqs.

    While the shard is more than ``FETCH_SEQS_MAX`` seqs ahead it reads ranges of at most that many seqs
    from the replicas' event stores (EVENTS); once it has caught up it follows the shard live with
    ``engine.client.Subscriber`` (PUB, plus range fetches of any gap), and goes back to range reads if it
    falls more than ``LIVE_LAG_SEQS_MAX`` behind (so no socket queue grows with the lag). A range the
    replicas no longer hold is an ExportError: a hole is never skipped."""

    def __init__(self, shard_id: int, clients: Iterable[str], pubs: Iterable[str], next_seq: int, *,
                 timeout_s: float = SHARD_TIMEOUT_S, keys: Any = None) -> None:
        from engine.client import Client
        self.shard_id = shard_id
        self.clients = list(clients)
        self.pubs = list(pubs)
        if not self.pubs:
            raise ValueError(f"shard {shard_id}: system.toml lists no pubs (event PUB addresses)")
        self.next_seq = next_seq
        self.timeout_s = timeout_s
        self.keys = keys                        # CURVE (engine.service.security.ClientKeys), None: insecure
        self.client = Client(self.clients, timeout_s=timeout_s, keys=keys)
        self.sub: Any = None
        self.head_seq = 0                       # the newest seq the shard reported
        self._head_at = 0.0

    def close(self) -> None:
        self._close_sub()
        self.client.close()

    def _close_sub(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None

    def reset(self, next_seq: int) -> None:
        """Read from ``next_seq`` again (after the database lost an unknown part of what was read)."""
        self._close_sub()
        self.next_seq = next_seq

    def max_head(self) -> int | None:
        """The newest seq any replica has applied (each replica asked; None if none answers)."""
        from engine.client import ClientError
        best = None
        for k in range(len(self.clients)):
            try:
                seq = int(self.client.status(k).get("last_seq", 0))
            except ClientError:
                continue
            best = seq if best is None else max(best, seq)
        if best is not None:
            self.head_seq = max(self.head_seq, best)
            self._head_at = time.monotonic()
        return best

    def _refresh_head(self) -> None:
        self.head_seq = max(self.head_seq, int(self.client.status().get("last_seq", 0)))
        self._head_at = time.monotonic()

    def read(self) -> np.ndarray | None:
        """The next chunk (whole seqs from ``next_seq``), or None if there is nothing new right now.
        Raises ExportError for a hole, ``engine.client.Unavailable`` when the shard does not answer."""
        from engine.client import RequestRefused, Subscriber
        from engine.service.protocol import ErrorCode
        if self.sub is None:
            if self.head_seq - self.next_seq < FETCH_SEQS_MAX:
                self._refresh_head()
            if self.head_seq - self.next_seq >= FETCH_SEQS_MAX:
                last = min(self.head_seq, self.next_seq + FETCH_SEQS_MAX - 1)
                try:
                    evs = self.client.events(self.next_seq, last)
                except RequestRefused as exc:
                    if exc.code is ErrorCode.EVENTS_UNAVAILABLE:
                        raise ExportError(f"shard {self.shard_id}: events from seq {self.next_seq} are in no "
                                          f"replica's event store ({exc}): a hole the export cannot fill; "
                                          "never skipped") from None
                    raise
                return self._took(evs)
            self.sub = Subscriber(self.pubs, self.clients, from_seq=self.next_seq, timeout_s=self.timeout_s,
                                  keys=self.keys)
        try:
            evs = self.sub.poll(0)
        except RequestRefused as exc:
            if exc.code is ErrorCode.EVENTS_UNAVAILABLE:
                raise ExportError(f"shard {self.shard_id}: events from seq {self.next_seq} are in no replica's "
                                  f"event store ({exc}): a hole the export cannot fill; never skipped") from None
            raise
        out = self._took(evs) if evs is not None else None
        if time.monotonic() - self._head_at >= HEAD_CHECK_S:
            self._refresh_head()
            if self.head_seq - self.next_seq > LIVE_LAG_SEQS_MAX:
                self._close_sub()               # far behind: bounded range reads until caught up again
        return out

    def _took(self, evs: np.ndarray) -> np.ndarray | None:
        if not len(evs):
            return None
        first = int(evs["seq_num"][0])
        if first != self.next_seq:
            raise ExportError(f"shard {self.shard_id}: expected seq {self.next_seq}, the shard sent {first}: "
                              "a hole or a repeat; never skipped")
        self.next_seq = int(evs["seq_num"][-1]) + 1
        if self.sub is not None:
            assert self.sub.next_seq == self.next_seq, (self.sub.next_seq, self.next_seq)
        return evs


# --------------------------------------------------------------------------------------- the runner
def safe_dsn(dsn: str) -> str:
    """The DSN without its password (for messages). ValueError if it does not parse."""
    import psycopg
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"bad --dsn: {exc}") from None
    return " ".join(f"{k}={v}" for k, v in parts.items() if k != "password" and v is not None)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ExportRunner:
    """Every shard of a system into one PostgreSQL database, until ``stop`` is set (see the module doc)."""

    def __init__(self, system_path: str, dsn: str, *, shard_ids: Iterable[int] | None = None,
                 batch_records_max: int = BATCH_RECORDS_MAX, flush_interval_s: float = FLUSH_INTERVAL_S,
                 progress_interval_s: float = PROGRESS_INTERVAL_S, connections: int = CONNECTIONS_DEFAULT,
                 say: Callable[[str], None] | None = None,
                 stop: threading.Event | None = None) -> None:
        from engine.system import System
        self.system = System.load(system_path)
        from engine.service.security import reader_keys_of_system
        self.keys = reader_keys_of_system(self.system)
        self.shard_ids = sorted(shard_ids) if shard_ids is not None else sorted(self.system.shards)
        for s in self.shard_ids:
            self.system.shard_clients(s)                    # ValueError for a shard the system does not have
        if not 1 <= batch_records_max <= 1 << 20:
            raise ValueError("batch_records_max must be 1..1048576")
        if not 1 <= connections <= CONNECTIONS_MAX:
            raise ValueError(f"connections must be 1..{CONNECTIONS_MAX}")
        self.connections = connections
        self.dsn = dsn
        self.dsn_shown = safe_dsn(dsn)
        self.batch_records_max = batch_records_max
        self.flush_interval_s = flush_interval_s
        self.progress_interval_s = progress_interval_s
        self.say = say or (lambda msg: print(f"export-pg: {msg}", flush=True))
        self.stop = stop or threading.Event()
        self.exporter: PgExporter | None = None          # the first connection (checkpoints, schema)
        self.exporters: list[PgExporter] = []           # every connection of the commit pipeline
        self.readers: dict[int, ShardReader] = {}
        self.pipeline: CommitPipeline | None = None
        self.records_written = 0

    # ---------------------------------------------------------------------------------- database
    def _connect_all(self) -> dict[int, int]:
        self.exporter = PgExporter.connect(self.dsn)
        self.exporter.create_schema()
        cps = self.exporter.checkpoints(self.shard_ids)
        self.exporters = [self.exporter] + [PgExporter.connect(self.dsn) for _ in range(self.connections - 1)]
        return cps

    def _close_all(self) -> None:
        import psycopg
        for ex in self.exporters or ([self.exporter] if self.exporter is not None else []):
            try:
                ex.close()
            except psycopg.Error:
                pass
        self.exporters = []
        self.exporter = None

    def connect_first(self) -> dict[int, int]:
        """The first connections: errors here (bad DSN, unreachable, auth, a bad schema) are the operator's
        to fix and end the command. Returns the checkpoints."""
        return self._connect_all()

    def reconnect(self) -> dict[int, int] | None:
        """Connect again with backoff until it works or ``stop``; the checkpoints, or None if stopped."""
        import psycopg
        self._close_all()
        delay = RECONNECT_BACKOFF_S_MIN
        while not self.stop.is_set():
            try:
                cps = self._connect_all()
                self.say(f"database back; resuming from {cps}")
                return cps
            except psycopg.OperationalError as exc:
                self.say(f"database unavailable ({_first_line(exc)}); retrying in {delay:.1f} s")
                self._close_all()
            self.stop.wait(delay)
            delay = min(delay * 2, RECONNECT_BACKOFF_S_MAX)
        return None

    # ---------------------------------------------------------------------------------- shards
    def open_readers(self, cps: Mapping[int, int]) -> bool:
        """A reader per shard from its checkpoint; checks that no checkpoint is ahead of its shard (then
        ExportError: the database holds another system's export, or the shard lost data). False if
        stopped while waiting for a shard to answer."""
        for s in self.shard_ids:
            g = self.system.shards[s]
            r = ShardReader(s, g.clients, g.pubs, cps[s] + 1, keys=self.keys)
            self.readers[s] = r
            waited = False
            while True:
                head = r.max_head()
                if head is not None:
                    break
                if not waited:
                    self.say(f"shard {s}: no replica answers; waiting")
                    waited = True
                if self.stop.wait(1.0):
                    return False
            if cps[s] > head:
                raise ExportError(f"shard {s}: export_checkpoint is at seq {cps[s]} but the shard's events end at "
                                  f"seq {head}: the database holds another system's export, or the shard lost "
                                  "events; refusing to export")
        return True

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()
        self._close_all()

    # ---------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        """Export until ``stop``. Raises ExportError (and psycopg errors other than a lost connection)."""
        cps = self.connect_first()
        self.say(f"into {self.dsn_shown}: shards {self.shard_ids} from checkpoints {cps}")
        if not self.open_readers(cps):
            return
        self.pipeline = CommitPipeline(self.exporters)
        try:
            self._loop(cps)
            self.pipeline.drain()                     # what was read and prepared is committed before exit
            self._raise_if_failed(final=True)
        finally:
            self.records_written = self.pipeline.records_written
            self.pipeline.close()

    def _raise_if_failed(self, final: bool = False) -> dict[int, int] | None:
        """After a failed commit: new checkpoints (the database came back) or None (stopped); raises for
        anything but a lost connection."""
        import psycopg
        assert self.pipeline is not None
        if self.pipeline.error is None:
            return None
        self.pipeline.drain()
        exc = self.pipeline.take_error()
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and not final:
            self.say(f"database write failed ({_first_line(exc)}); the transaction's outcome is settled by the "
                     "checkpoint on reconnect")
            cps = self.reconnect()
            if cps is not None:
                self.pipeline.exporters = list(self.exporters)
            return cps
        if isinstance(exc, psycopg.IntegrityError):
            raise ExportError(f"the database refused rows as duplicates ({_first_line(exc)}): the tables hold "
                              "events no checkpoint covers; never ignored") from None
        assert exc is not None
        raise exc

    def _loop(self, cps: dict[int, int]) -> None:
        import zmq
        from engine.client import Unavailable
        assert self.pipeline is not None
        self.say("ready")
        prepared_upto = dict(cps)                     # the seq each shard's next batch continues
        pending: dict[int, list[np.ndarray]] = {s: [] for s in self.shard_ids}
        pending_records = 0
        pending_since = 0.0
        shard_wait: dict[int, float] = {}
        last_report = time.monotonic()
        reported_records = 0
        while not self.stop.is_set():
            if self.pipeline.error is not None:
                new = self._raise_if_failed()
                if new is None:
                    return
                prepared_upto = dict(new)
                for s, r in self.readers.items():
                    r.reset(new[s] + 1)
                for chunks in pending.values():
                    chunks.clear()
                pending_records = 0
            got = False
            now = time.monotonic()
            for s, r in self.readers.items():
                if pending_records >= self.batch_records_max:
                    break
                if shard_wait.get(s, 0.0) > now:
                    continue
                try:
                    evs = r.read()
                except Unavailable as exc:
                    self.say(f"shard {s}: {_first_line(exc)}; retrying in 1 s")
                    shard_wait[s] = now + 1.0
                    continue
                if evs is not None:
                    if not pending_records:
                        pending_since = now
                    pending[s].append(evs)
                    pending_records += len(evs)
                    got = True
            if pending_records and (pending_records >= self.batch_records_max
                                    or time.monotonic() - pending_since >= self.flush_interval_s):
                assert self.exporter is not None
                batch = self.exporter.prepare({s: join_records(c) for s, c in pending.items() if c}, prepared_upto)
                prepared_upto.update(batch.last)
                self.pipeline.submit(batch)
                for chunks in pending.values():
                    chunks.clear()
                pending_records = 0
            elif not got:
                subs = [r.sub.sub for r in self.readers.values() if r.sub is not None]
                if subs and len(subs) == len(self.readers):
                    zmq.select(subs, [], [], timeout=0.02)
                else:
                    self.stop.wait(0.01)
            if time.monotonic() - last_report >= self.progress_interval_s:
                dt = time.monotonic() - last_report
                written = self.pipeline.records_written
                at = ", ".join(f"shard {s} at seq {r.next_seq - 1} (head {r.head_seq})"
                               for s, r in self.readers.items())
                self.say(f"{at}; {written} records written, {(written - reported_records) / dt:,.0f} records/s")
                last_report = time.monotonic()
                reported_records = written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zwallet export-pg",
                                description="export every shard's events into PostgreSQL, exactly once, until "
                                            "SIGINT/SIGTERM (docs/export-pg.md)")
    p.add_argument("--system", required=True, help="the system file (D/system.toml of `zwallet up`)")
    p.add_argument("--dsn", required=True, help="libpq connection string, e.g. 'host=127.0.0.1 dbname=zwallet'")
    p.add_argument("--shards", help="comma-separated shard ids (default: every shard of the system)")
    p.add_argument("--batch-records", type=int, default=BATCH_RECORDS_MAX,
                   help=f"event records per transaction, at most (default {BATCH_RECORDS_MAX})")
    p.add_argument("--flush-interval-ms", type=int, default=int(FLUSH_INTERVAL_S * 1000),
                   help="write what has arrived after this long even if the batch is not full")
    p.add_argument("--connections", type=int, default=CONNECTIONS_DEFAULT,
                   help=f"database connections, one transaction in flight on each (default {CONNECTIONS_DEFAULT})")
    p.add_argument("--progress-interval-s", type=float, default=PROGRESS_INTERVAL_S)
    args = p.parse_args(argv)
    import psycopg
    stop = threading.Event()

    def on_signal(_sig: int, _frm: Any) -> None:
        stop.set()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        shard_ids = [int(x) for x in args.shards.split(",")] if args.shards else None
        runner = ExportRunner(args.system, args.dsn, shard_ids=shard_ids, batch_records_max=args.batch_records,
                              flush_interval_s=args.flush_interval_ms / 1000,
                              progress_interval_s=args.progress_interval_s, connections=args.connections,
                              stop=stop)
    except ValueError as exc:
        print(f"zwallet export-pg: {exc}", file=sys.stderr)
        return 2
    code = 0
    try:
        runner.run()
    except ExportError as exc:
        print(f"zwallet export-pg: {exc}", file=sys.stderr)
        code = 1
    except psycopg.OperationalError as exc:
        if runner.exporter is None:
            print(f"zwallet export-pg: cannot connect to PostgreSQL ({runner.dsn_shown}): {_first_line(exc)}",
                  file=sys.stderr)
            code = 2
        else:
            print(f"zwallet export-pg: database error: {_first_line(exc)}", file=sys.stderr)
            code = 1
    except psycopg.Error as exc:
        print(f"zwallet export-pg: database error: {_first_line(exc)}", file=sys.stderr)
        code = 1
    finally:
        runner.close()
    print(f"export-pg: stopped; {runner.records_written} records written", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
