"""The ledger as a replicated state machine: what a Raft entry carries and how a replica applies it.

An entry is a group commit of client batches: ``ENTRY_HEADER`` = magic b"ZWL3", u64 leader timestamp (ms),
u32 batch count; then one u32 record count per batch; then the batches' op records (``records.OP_DTYPE``,
128 bytes) back to back. An entry written by the previous version (b"ZWL2": 112-byte records, without
``issued_ms``) is read by padding its records (issued_ms 0: such a command is refused once the dedup
horizon has moved, as a command issued before the horizon is). Apply is a pure function of (state, entry):
the timestamp comes from the entry, never from the replica's clock (and the ledger never lets it go back),
so every replica reaches the same digest. An entry whose batches are all well formed
and hold at most BATCH_SIZE_MAX records in all is applied by one ``Ledger.apply_batch`` call (the same
result as one call per batch, which is how any other entry goes); a batch the ledger refuses as malformed
applies nothing and yields an error outcome on every replica alike (the leader checks batches before
proposing, so this is a second line of defence). An entry that does not parse applies nothing at all.
"""
from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Sequence

import lz4.block
import numpy as np

from engine import Ledger
from engine._ledger import ACCOUNTS_MAX_DEFAULT, DEDUP_RETENTION_DEFAULT, check_batch
from engine.records import BATCH_SIZE_MAX, OP_DTYPE, Kind, field_offset
from engine.service.event_store import IndexedEvents

LEDGER_MAGIC = b"ZWL3"
LEDGER_MAGIC_V2 = b"ZWL2"                # 112-byte op records (no issued_ms, no reserved2)
_V2_OP_BYTES = 112
# A snapshot is stored and sent LZ4-compressed: SNAPSHOT_LZ4_MAGIC, u64 raw size, then chunks of at most
# SNAPSHOT_CHUNK_BYTES raw bytes, each u32 compressed size + u32 raw size + an LZ4 block. At 1M accounts
# the raw snapshot is ~280 MB and mostly zeros and small numbers (~9x smaller compressed, ~0.1 s of the
# forked child's CPU); written raw, its writeback and fsync held the other replicas' log fsyncs back.
SNAPSHOT_LZ4_MAGIC = b"ZWSNLZ4\x01"
SNAPSHOT_CHUNK_BYTES = 64 << 20             # (an LZ4 block holds less than 2 GiB; a 10M-account one is ~3 GB)
_SNAP_HEADER = struct.Struct("<8sQ")
_SNAP_CHUNK = struct.Struct("<II")
ENTRY_HEADER = struct.Struct("<4sQI")
ENTRY_BATCHES_MAX = 4096                 # client batches grouped into one log entry
ENTRY_RECORDS_MAX = 32_768               # op records in one log entry (the node groups up to this)
# The ledger's in-memory event ring must hold every event one entry can produce (a transfer makes two
# event records, a group at most one per member), so events can be copied out after each entry.
NODE_EVENT_RETENTION = 4 * ENTRY_RECORDS_MAX
_COUNT = struct.Struct("<I")
_GROUP_MEMBER_KINDS = (int(Kind.SPEC), int(Kind.PRECONDITION))
_KIND_OFFSET = field_offset(OP_DTYPE, "kind")
_OP_BYTES = OP_DTYPE.itemsize


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


def compress_snapshot(raw: bytes | memoryview) -> bytes:
    raw = memoryview(raw).cast("B")
    parts = [_SNAP_HEADER.pack(SNAPSHOT_LZ4_MAGIC, len(raw))]
    for at in range(0, len(raw), SNAPSHOT_CHUNK_BYTES):
        chunk = raw[at:at + SNAPSHOT_CHUNK_BYTES]
        block = lz4.block.compress(chunk, store_size=False)
        parts += [_SNAP_CHUNK.pack(len(block), len(chunk)), block]
    return b"".join(parts)


def decompress_snapshot(data: bytes | memoryview) -> bytes | bytearray | memoryview:
    """The raw snapshot of ``compress_snapshot``'s output; data without its magic is returned as it is (a
    snapshot written raw by an earlier version). ValueError if it does not decompress to its stated size."""
    data = memoryview(data).cast("B")
    if len(data) < _SNAP_HEADER.size or bytes(data[:8]) != SNAPSHOT_LZ4_MAGIC:
        return data
    _, size = _SNAP_HEADER.unpack_from(data, 0)
    out = bytearray(size)
    at, filled = _SNAP_HEADER.size, 0
    while filled < size:
        if at + _SNAP_CHUNK.size > len(data):
            raise ValueError("compressed snapshot truncated")
        clen, rlen = _SNAP_CHUNK.unpack_from(data, at)
        at += _SNAP_CHUNK.size
        if rlen == 0 or rlen > size - filled or at + clen > len(data):
            raise ValueError("compressed snapshot: a chunk's sizes do not fit")
        try:
            chunk = lz4.block.decompress(data[at:at + clen], uncompressed_size=rlen)
        except lz4.block.LZ4BlockError as exc:
            raise ValueError(f"compressed snapshot: a chunk does not decompress: {exc}") from None
        if len(chunk) != rlen:
            raise ValueError("compressed snapshot: a chunk decompressed to the wrong size")
        out[filled:filled + rlen] = chunk
        filled += rlen
        at += clen
    if at != len(data):
        raise ValueError("compressed snapshot: bytes after its last chunk")
    return out


def _entry_layout(data: bytes | memoryview) -> tuple[int, np.ndarray, int]:
    """(timestamp_ms, record count of each batch, offset of the first record). ValueError if the entry is
    not well formed."""
    if len(data) < ENTRY_HEADER.size:
        raise ValueError("entry shorter than its header")
    magic, ts, count = ENTRY_HEADER.unpack_from(data, 0)
    if magic != LEDGER_MAGIC or not 1 <= count <= ENTRY_BATCHES_MAX:
        raise ValueError("not a ledger entry")
    offset = ENTRY_HEADER.size + 4 * count
    if len(data) < offset:
        raise ValueError("entry truncated in its batch counts")
    counts = np.frombuffer(data, dtype="<u4", count=count, offset=ENTRY_HEADER.size).astype(np.int64)
    if int(counts.max()) > BATCH_SIZE_MAX or offset + int(counts.sum()) * OP_DTYPE.itemsize != len(data):
        raise ValueError("entry length does not match its batch counts")
    return ts, counts, offset


def _upgrade_v2(data: bytes | memoryview) -> bytes:
    """A b"ZWL2" entry rewritten as b"ZWL3" (each 112-byte record padded with a zero issued_ms and
    reserved2). ValueError if it is not well formed."""
    _, ts, count = ENTRY_HEADER.unpack_from(data, 0)
    offset = ENTRY_HEADER.size + 4 * count
    if not 1 <= count <= ENTRY_BATCHES_MAX or len(data) < offset:
        raise ValueError("not a ledger entry")
    n, rem = divmod(len(data) - offset, _V2_OP_BYTES)
    counts = np.frombuffer(data, dtype="<u4", count=count, offset=ENTRY_HEADER.size)
    if rem or int(counts.sum()) != n:
        raise ValueError("entry length does not match its batch counts")
    old = np.frombuffer(data, dtype=np.uint8, count=n * _V2_OP_BYTES, offset=offset).reshape(n, _V2_OP_BYTES)
    new = np.zeros((n, OP_DTYPE.itemsize), dtype=np.uint8)
    new[:, :_V2_OP_BYTES] = old
    return ENTRY_HEADER.pack(LEDGER_MAGIC, ts, count) + bytes(data[ENTRY_HEADER.size:offset]) + new.tobytes()


def _batch_views(data: bytes | memoryview, counts: np.ndarray, offset: int) -> list[np.ndarray]:
    batches = []
    for n in counts.tolist():
        batches.append(np.frombuffer(data, dtype=OP_DTYPE, count=n, offset=offset))
        offset += n * OP_DTYPE.itemsize
    return batches


def parse_entry(data: bytes | memoryview) -> tuple[int, list[np.ndarray]]:
    """(timestamp_ms, batches as read-only OP_DTYPE views). ValueError if the entry is not well formed."""
    if bytes(data[:4]) == LEDGER_MAGIC_V2:
        data = _upgrade_v2(data)
    ts, counts, offset = _entry_layout(data)
    return ts, _batch_views(data, counts, offset)


@dataclass(slots=True)
class BatchOutcome:
    """What one client batch did: its result records, or why the ledger refused it (nothing applied);
    ``first_seq..last_seq`` are the events it produced (``first_seq > last_seq`` if none)."""
    results: np.ndarray | None
    error: str
    first_seq: int
    last_seq: int


class EntryOutcomes(Sequence[BatchOutcome]):
    """The outcomes of an entry applied in one call, one per batch, built when asked for (a follower never
    asks): a batch's results are its slice of the entry's, and its events are the new seqs among them (a
    duplicate carries its original, older seq; a rejection 0), so batch i's range starts after batch i-1's."""

    __slots__ = ("results", "starts", "counts", "first_seq", "last_seq", "_built", "events")

    def __init__(self, results: np.ndarray, starts: list[int], counts: list[int], first_seq: int,
                 last_seq: int) -> None:
        self.results, self.starts, self.counts = results, starts, counts
        self.first_seq, self.last_seq = first_seq, last_seq
        self._built: list[BatchOutcome] | None = None
        self.events: np.ndarray | None = None     # the entry's event records (see OutcomeList)

    def _build(self) -> list[BatchOutcome]:
        if self._built is None:
            first, res = self.first_seq, self.results
            seqs = res["seq_num"].astype(np.int64)
            newest = np.maximum.reduceat(np.where(seqs >= first, seqs, first - 1), self.starts)
            built, prev = [], first - 1
            for a, n, last in zip(self.starts, self.counts, np.maximum.accumulate(newest).tolist()):
                built.append(BatchOutcome(res[a:a + n], "", prev + 1, last))
                prev = last
            assert prev == self.last_seq, (prev, self.last_seq)
            self._built = built
        return self._built

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i):
        return self._build()[i]

    def __iter__(self):
        return iter(self._build())


class OutcomeList(list):
    """The outcomes of an entry applied batch by batch; like EntryOutcomes, it carries the entry's event
    records in ``events`` (EVENT_DTYPE, in seq order; None if it made none), so whoever answers the entry's
    requests slices them by seq (``events_between``) instead of reading them back from the event store."""
    events: np.ndarray | None = None


def events_between(evs: np.ndarray | None, first_seq: int, last_seq: int) -> np.ndarray | None:
    """The records of seqs first_seq..last_seq in an entry's events (sorted by seq: two binary searches)."""
    if evs is None or last_seq < first_seq or not len(evs):
        return None
    seqs = evs["seq_num"]
    a = int(np.searchsorted(seqs, first_seq, "left"))
    b = int(np.searchsorted(seqs, last_seq, "right"))
    return evs[a:b] if b > a else None


EventSink = Callable[[list[np.ndarray]], None]


class LedgerMachine:
    """Applies committed entries to an embedded ``Ledger``; snapshots are the ledger's own.

    ``event_sink``, if given, receives after every entry the event records it produced (a list of
    arrays, contiguous in seq_num), before the results are handed back. Each is an ``IndexedEvents``
    carrying what the event store's dedup index needs of it (the ledger kept it as it applied)."""

    def __init__(self, event_sink: EventSink | None = None,
                 event_retention: int = NODE_EVENT_RETENTION, *,
                 dedup_retention: int = DEDUP_RETENTION_DEFAULT, accounts_max: int = ACCOUNTS_MAX_DEFAULT) -> None:
        self.accounts_max = accounts_max
        self.ledger = Ledger(event_retention=event_retention, dedup_retention=dedup_retention,
                             accounts_max=accounts_max)
        self.applied = 0
        self.ops = 0
        self.rejected_batches = 0
        self.rejected_entries = 0
        self.event_sink = event_sink

    def apply(self, entries: Sequence[Any]) -> list[Sequence[BatchOutcome] | None]:
        out: list[Sequence[BatchOutcome] | None] = []
        ledger = self.ledger
        for e in entries:
            assert e.index > self.applied, f"entry {e.index} applied after {self.applied}"
            self.applied = e.index
            data = e.data
            try:
                if bytes(data[:4]) == LEDGER_MAGIC_V2:
                    data = _upgrade_v2(data)
                ts, counts, body = _entry_layout(data)
            except ValueError:
                self.rejected_entries += 1
                out.append(None)
                continue
            seq_before = ledger.last_seq
            outcomes: EntryOutcomes | OutcomeList | None = \
                self._apply_whole(data, ts, counts, body) if len(counts) > 1 else None
            if outcomes is None:
                outcomes = OutcomeList()
                for ops in _batch_views(data, counts, body):
                    self._apply_one(ops, ts, outcomes)
            if ledger.last_seq > seq_before:
                first, last = seq_before + 1, ledger.last_seq
                evs = ledger.events(first, last).view(IndexedEvents)
                hashes, ts_first, ts_last = ledger.event_index(first, last)
                evs.dedup_index = (hashes, first, ts_first, ts_last)    # the event store's index takes these
                outcomes.events = evs
                if self.event_sink is not None:
                    # handed over entry by entry: a replay of many entries never holds all their events
                    self.event_sink([evs])
            out.append(outcomes)
        return out

    def _apply_one(self, ops: np.ndarray, ts: int, outcomes: list[BatchOutcome]) -> None:
        ledger = self.ledger
        first = ledger.last_seq + 1
        try:
            res = ledger.apply_batch(ops, ts)
        except (TypeError, ValueError) as exc:
            self.rejected_batches += 1
            outcomes.append(BatchOutcome(None, str(exc), first, first - 1))
            return
        self.ops += len(ops)
        # the TCC tries the ledger expired before the batch's commands are no batch's events (they are in
        # the entry's events all the same)
        first = ledger.seq_before_commands + 1
        outcomes.append(BatchOutcome(res, "", first, ledger.last_seq))

    def _apply_whole(self, data: Any, ts: int, counts: np.ndarray, body: int) -> EntryOutcomes | None:
        """An entry of several batches, none empty, at most BATCH_SIZE_MAX records in all, every batch
        well formed on its own, applied by ONE apply_batch call: the same records in the same order as a
        call per batch, so the same state, events and result records, at a fraction of the cost (a call
        costs ~2.6 us; a latency-bound entry holds tens of one-transfer batches, on every replica). Each
        batch is well formed on its own iff the whole is and no batch starts inside a group (with a group
        member). None (nothing applied) if the entry does not qualify: then it goes batch by batch."""
        sizes = counts.tolist()
        total = sum(sizes)
        if total > BATCH_SIZE_MAX or 0 in sizes:
            return None
        starts = [0, *itertools.accumulate(sizes[:-1])]
        kind_at = body + _KIND_OFFSET
        if any(data[kind_at + k * _OP_BYTES] in _GROUP_MEMBER_KINDS for k in starts):   # plain ints: numpy
            return None                                                  # calls cost ~1 us each here
        ops = np.frombuffer(data, dtype=OP_DTYPE, count=total, offset=body)
        try:
            check_batch(ops)
        except (TypeError, ValueError):
            return None
        ledger = self.ledger
        res = ledger.apply_batch(ops, ts)
        self.ops += total
        # after the seqs of the TCC tries it expired first (no batch's events)
        return EntryOutcomes(res, starts, sizes, ledger.seq_before_commands + 1, ledger.last_seq)

    def snapshot(self) -> bytes:
        """The machine's counters and the ledger's snapshot, LZ4-compressed (``compress_snapshot``)."""
        return compress_snapshot(struct.pack("<QQQQ", self.applied, self.ops, self.rejected_batches,
                                             self.rejected_entries) + self.ledger.snapshot())

    def restore(self, data: bytes | memoryview) -> None:
        """Replace the state with a snapshot: compressed, or raw as earlier versions wrote them."""
        raw = decompress_snapshot(data)
        self.applied, self.ops, self.rejected_batches, self.rejected_entries = struct.unpack_from("<QQQQ", raw, 0)
        self.ledger = Ledger.restore(memoryview(raw)[32:], accounts_max=self.accounts_max)
