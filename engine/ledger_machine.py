"""The ledger as a replicated state machine: what a Raft entry carries and how a replica applies it.

An entry is a group commit of client batches: ``ENTRY_HEADER`` = magic b"ZWL2", u64 leader timestamp (ms),
u32 batch count; then one u32 record count per batch; then the batches' op records (``records.OP_DTYPE``)
back to back. Apply is a pure function of (state, entry): the timestamp comes from the entry, never from
the replica's clock, so every replica reaches the same digest. Each batch is applied by one
``Ledger.apply_batch`` call; a batch the ledger refuses as malformed applies nothing and yields an error
outcome on every replica alike (the leader checks batches before proposing, so this is a second line of
defence). An entry that does not parse applies nothing at all.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from engine import Ledger
from engine.records import BATCH_SIZE_MAX, OP_DTYPE

LEDGER_MAGIC = b"ZWL2"
ENTRY_HEADER = struct.Struct("<4sQI")
ENTRY_BATCHES_MAX = 4096                 # client batches grouped into one log entry
ENTRY_RECORDS_MAX = 32_768               # op records in one log entry (the node groups up to this)
# The ledger's in-memory event ring must hold every event one entry can produce (a transfer makes two
# event records, a group at most one per member), so events can be copied out after each entry.
NODE_EVENT_RETENTION = 4 * ENTRY_RECORDS_MAX
_COUNT = struct.Struct("<I")


def ledger_entry(batches: Sequence[np.ndarray | bytes], timestamp_ms: int) -> bytes:
    """One log entry holding ``batches`` (arrays of OP_DTYPE or their raw bytes), stamped ``timestamp_ms``."""
    if not 1 <= len(batches) <= ENTRY_BATCHES_MAX:
        raise ValueError(f"an entry holds 1..{ENTRY_BATCHES_MAX} batches, not {len(batches)}")
    parts = [ENTRY_HEADER.pack(LEDGER_MAGIC, timestamp_ms, len(batches))]
    bodies = []
    for b in batches:
        if isinstance(b, np.ndarray):
            if b.dtype != OP_DTYPE:
                raise TypeError("batches must be arrays of records.OP_DTYPE")
            b = b.tobytes()
        n, rem = divmod(len(b), OP_DTYPE.itemsize)
        if rem or n > BATCH_SIZE_MAX:
            raise ValueError(f"a batch of {len(b)} bytes is not 0..{BATCH_SIZE_MAX} whole op records")
        parts.append(_COUNT.pack(n))
        bodies.append(b)
    return b"".join(parts + bodies)


def parse_entry(data: bytes | memoryview) -> tuple[int, list[np.ndarray]]:
    """(timestamp_ms, batches as read-only OP_DTYPE views). ValueError if the entry is not well formed."""
    if len(data) < ENTRY_HEADER.size:
        raise ValueError("entry shorter than its header")
    magic, ts, count = ENTRY_HEADER.unpack_from(data, 0)
    if magic != LEDGER_MAGIC or not 1 <= count <= ENTRY_BATCHES_MAX:
        raise ValueError("not a ledger entry")
    offset = ENTRY_HEADER.size + 4 * count
    if len(data) < offset:
        raise ValueError("entry truncated in its batch counts")
    counts = np.frombuffer(data, dtype="<u4", count=count, offset=ENTRY_HEADER.size)
    if int(counts.max()) > BATCH_SIZE_MAX or offset + int(counts.sum()) * OP_DTYPE.itemsize != len(data):
        raise ValueError("entry length does not match its batch counts")
    batches = []
    for n in counts.tolist():
        batches.append(np.frombuffer(data, dtype=OP_DTYPE, count=n, offset=offset))
        offset += n * OP_DTYPE.itemsize
    return ts, batches


@dataclass(slots=True)
class BatchOutcome:
    """What one client batch did: its result records, or why the ledger refused it (nothing applied);
    ``first_seq..last_seq`` are the events it produced (``first_seq > last_seq`` if none)."""
    results: np.ndarray | None
    error: str
    first_seq: int
    last_seq: int


EventSink = Callable[[list[np.ndarray]], None]


class LedgerMachine:
    """Applies committed entries to an embedded ``Ledger``; snapshots are the ledger's own.

    ``event_sink``, if given, receives after every entry the event records it produced (a list of
    arrays, contiguous in seq_num), before the results are handed back."""

    def __init__(self, event_sink: EventSink | None = None,
                 event_retention: int = NODE_EVENT_RETENTION) -> None:
        self.ledger = Ledger(event_retention=event_retention)
        self.applied = 0
        self.ops = 0
        self.rejected_batches = 0
        self.rejected_entries = 0
        self.event_sink = event_sink

    def apply(self, entries: Sequence[Any]) -> list[list[BatchOutcome] | None]:
        out: list[list[BatchOutcome] | None] = []
        ledger = self.ledger
        for e in entries:
            assert e.index > self.applied, f"entry {e.index} applied after {self.applied}"
            self.applied = e.index
            try:
                ts, batches = parse_entry(e.data)
            except ValueError:
                self.rejected_entries += 1
                out.append(None)
                continue
            seq_before = ledger.last_seq
            outcomes = []
            for ops in batches:
                first = ledger.last_seq + 1
                try:
                    res = ledger.apply_batch(ops, ts)
                except (TypeError, ValueError) as exc:
                    self.rejected_batches += 1
                    outcomes.append(BatchOutcome(None, str(exc), first, first - 1))
                    continue
                self.ops += len(ops)
                outcomes.append(BatchOutcome(res, "", first, ledger.last_seq))
            if ledger.last_seq > seq_before and self.event_sink is not None:
                # handed over entry by entry: a replay of many entries never holds all their events
                self.event_sink([ledger.events(seq_before + 1, ledger.last_seq)])
            out.append(outcomes)
        return out

    def snapshot(self) -> bytes:
        return struct.pack("<QQQQ", self.applied, self.ops, self.rejected_batches, self.rejected_entries) \
            + self.ledger.snapshot()

    def restore(self, data: bytes) -> None:
        self.applied, self.ops, self.rejected_batches, self.rejected_entries = struct.unpack_from("<QQQQ", data, 0)
        self.ledger = Ledger.restore(data[32:])
