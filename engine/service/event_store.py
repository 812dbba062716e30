"""A replicated service's event store: the golden copy of its seq-numbered event stream, in LMDB, range-readable.

What it assumes of the records (``dtype``, a numpy structured dtype, fixed size): a ``seq_num`` u64 field
first (offset 0), records appended in seq order, whole seqs at a time (several records, "parts", may share
one seq: the ledger's multi-account events). If the dtype also has ``part``, ``timestamp`` (u64 ms) and
``dedup_id`` ((2,) u64) fields, the store keeps the durable dedup index below on the part-0 records (the
shard's RESULT_OF past the window); otherwise there is no index and ``lookup_event`` finds nothing. The
shard's records are ``engine.records.EVENT_DTYPE`` (128 bytes; ``engine/event_store.py``); another app
brings its own.

Layout (one LMDB environment ``<data_dir>/events``):
- ``chunks``: key = big-endian u64 first seq_num of a chunk; value = u64 last seq_num, u32 byte size of
  the records, then the chunk's event records (``records.EVENT_DTYPE``, every part of every seq in
  first..last, in order) compressed as one LZ4 block. One chunk is what one log entry produced, so a write
  is one put however many events it holds. LZ4 because writing the records raw was 45% of the batch
  throughput (bench_node: ~425K transfers/s with the events stored raw, ~755K with none stored): two
  128-byte records per transfer copied into new page-cache pages, which costs far more than compressing
  them (LZ4, 1.6 GB/s here, shrinks a batch's events about 5.8x). A store written by an earlier version
  (no ``format`` in meta, raw records as values) is still read and appended to in its own format.
- ``dindex``: the durable dedup index that lets RESULT_OF answer after the ledger's window forgot an id.
  One block per flush (key = big-endian u64 first seq it covers): ``_BLOCK_HEADER`` (u64 first seq, u64
  last seq, u64 first timestamp, u64 last timestamp, u32 count) then ``count`` sorted u64 hashes of the
  commands' dedup ids and their ``count`` u64 seqs. One put per flush instead of one random B-tree insert
  per command (measured: 1-2 us an insert at 400K commands/s, a quarter of the node's CPU); a lookup walks
  the blocks newest first, a binary search each, back to a time bound (a late retry's issue time) or a
  block budget, and reads the event to confirm the id (the hash may collide). ``meta`` ``index_from``: the
  first seq the index covers (a store written before it existed is not indexed below it). What a chunk adds
  to the block (each seq's part-0 id hash, the seq, the timestamps' bounds) comes ready with an
  ``IndexedEvents`` chunk (the shard's ledger keeps it as it applies: ``Ledger.event_index``), or is
  extracted from the records; the block is the same bytes either way.
- ``meta``: ``format`` (u64 2: compressed chunks), ``holes`` (msgpack list of [first, last] seq ranges this
  replica never received: it was brought
  back by a snapshot of the ledger that was newer than its events) and ``floor`` (seqs below it were pruned
  by retention).

Pruning (``prune``) only records the wanted floor and wakes the store's pruner thread, which deletes chunks
and index blocks in passes of at most ``PRUNE_PASS_CHUNKS`` chunks, each its own write transaction that also
moves ``floor`` (kill -9 between passes leaves a consistent store), releasing the lock between passes: the
Raft thread never waits behind it (it deleted up to ~800K chunks in one transaction there before).

Writes are not fsynced one by one: the events are derived from the Raft log, and a replica that restarts
replays the log from its newest ledger snapshot, rewriting the same events. ``sync()`` is called before a
ledger snapshot is saved (after which the log below it may be compacted), so every event older than the
snapshot is durable by then (the node ``flush()``es before it forks a snapshot child, whose fsync then
covers them).

Writes are also grouped: ``append`` encodes each chunk at once but keeps it in memory until
``PENDING_CHUNKS_MAX`` chunks or ``PENDING_BYTES_MAX`` bytes are waiting, or ``flush()`` is called (the node
does every ``WRITEBACK_INTERVAL_S``), then puts them all in one LMDB transaction. One transaction per log
entry rewrote ~6 pages of the B-tree (~24 KB of page cache and 7 syscalls on every replica for an entry of
tens of transfers). A read of seqs still waiting flushes them first, so reads see every appended event.
Retention: chunks whose seqs are all below ``last_seq - retention_events``
are deleted when a snapshot is taken (``prune``).
"""
from __future__ import annotations

import os
import struct
import threading

import lmdb
import lz4.block
import msgspec
import numpy as np

from engine import fileio
from engine.records import records_concat

EVENT_STORE_MAP_SIZE_BYTES_DEFAULT = 64 << 30
EVENT_RETENTION_SEQS_DEFAULT = 50_000_000
_KEY = struct.Struct(">Q")
_LAST = struct.Struct("<Q")


WRITEBACK_INTERVAL_S = 0.05              # the node flushes the event store and starts its writeback this often
PENDING_CHUNKS_MAX = 64                  # appended chunks kept in memory before one transaction puts them ...
PENDING_BYTES_MAX = 1 << 20              # ... or this many encoded bytes
_CHUNK_HEADER = struct.Struct("<QI")     # last seq_num, byte size of the records (format 2)
FORMAT_RAW, FORMAT_LZ4 = 1, 2
_BLOCK_HEADER = struct.Struct("<QQQQI")  # dedup index block: first seq, last seq, first ts, last ts, count
PRUNE_PASS_CHUNKS = 2048                 # chunks (and index blocks) deleted per pruner write transaction
LOOKUP_BLOCKS_MAX = 200_000              # index blocks a lookup walks at most (newest first)
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)


def dedup_hashes(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of dedup ids given as an (n, 2) u64 [lo, hi] array (the records' layout)."""
    return _mix(ids[:, 0], ids[:, 1])


def _mix(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = lo ^ (hi * _M1)
        x ^= x >> np.uint64(31)
        x *= _M2
        x ^= x >> np.uint64(29)
    return x


class IndexedEvents(np.ndarray):
    """A chunk of event records whose producer already has what the dedup index needs of it, so ``append``
    does not re-read the records for it: ``dedup_index = (hashes, first_seq, ts_min, ts_max)``, where the
    chunk holds every seq ``first_seq..first_seq + len(hashes) - 1``, ``hashes[k]`` is ``dedup_hashes`` of the
    dedup id of seq ``first_seq + k``'s part-0 record, and ``ts_min``/``ts_max`` are the least and greatest
    part-0 timestamps (the shard's ledger keeps these as it applies: ``Ledger.event_index``). A view or a
    slice of one has no ``dedup_index`` (None), and a chunk without it is extracted as before."""
    dedup_index: tuple[np.ndarray, int, int, int] | None = None


# What the index keeps of a pending chunk: (hashes, seqs or None when they are first_seq.., first_seq, ts_min,
# ts_max)
_IndexPart = tuple[np.ndarray, "np.ndarray | None", int, int, int]


def _index_part(evs: np.ndarray) -> _IndexPart:
    """What the index needs of a chunk of events: its commands' (first events', part 0) dedup id hashes, seqs,
    and the least and greatest of their timestamps. Taken as it is from an ``IndexedEvents`` chunk that has
    it; else gathered column by column through the part-0 positions (~35 ns a transfer: a boolean index of
    the 128-byte records and a multi-field view of them cost ~225 ns, 14% of a replica's apply thread at
    ~330K transfers/s; a 2-D take of the ids ~10 ns more)."""
    given = getattr(evs, "dedup_index", None)
    if given is not None:
        hashes, first, ts0, ts1 = given
        assert len(hashes) == int(evs["seq_num"][-1]) - first + 1 and int(evs["seq_num"][0]) == first, \
            "an IndexedEvents chunk's dedup_index does not cover its seqs"
        return hashes, None, first, ts0, ts1
    at = np.flatnonzero(evs["part"] == 0)
    ids = evs["dedup_id"]
    hashes = _mix(ids[:, 0].take(at), ids[:, 1].take(at))
    seqs = evs["seq_num"].take(at)
    if not len(at):
        return hashes, seqs, 0, 0, 0
    ts = evs["timestamp"].take(at)
    return hashes, seqs, int(seqs[0]), int(ts.min()), int(ts.max())


def _stable_order(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes[order], order)`` with ``order`` exactly ``np.argsort(hashes, kind="stable")``, at a fraction
    of its cost (~15 against ~80 ns an id here): the position is packed into the hashes' low bits and the
    keys sorted by value (numpy's SIMD sort). That orders by the hashes' high bits, then by position, which
    is the stable order unless two hashes share their high bits but not their low ones (about once in 10^5
    blocks of 32K commands): then the result is not sorted, and the stable argsort is used instead."""
    n = len(hashes)
    bits = max(1, (n - 1).bit_length())
    low = np.uint64((1 << bits) - 1)
    keys = (hashes & ~low) | np.arange(n, dtype=np.uint64)
    keys.sort()
    order = (keys & low).astype(np.intp)
    ordered = hashes[order]
    if n > 1 and not (ordered[1:] >= ordered[:-1]).all():
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
    return ordered, order


def _hash_of(dedup_id: int) -> int:
    ids = np.array([[dedup_id & 0xFFFFFFFFFFFFFFFF, dedup_id >> 64]], dtype=np.uint64)
    return int(dedup_hashes(ids)[0])


class EventsUnavailable(LookupError):
    """This replica does not hold (all of) the asked range: pruned, never received, or not yet applied."""


class EventStore:
    def __init__(self, path: str, *, dtype: np.dtype, map_size_bytes: int = EVENT_STORE_MAP_SIZE_BYTES_DEFAULT,
                 retention_seqs: int = EVENT_RETENTION_SEQS_DEFAULT) -> None:
        dtype = np.dtype(dtype)
        names = dtype.names or ()
        seq_field = dtype.fields["seq_num"] if dtype.fields is not None and "seq_num" in dtype.fields else None
        if seq_field is None or seq_field[1] != 0 or seq_field[0] != np.dtype("<u8"):
            raise ValueError("event records need a little-endian u64 seq_num as their first field")
        self.dtype = dtype
        self._rec = dtype.itemsize
        self.indexed = {"part", "timestamp", "dedup_id"} <= set(names)   # the durable dedup index
        os.makedirs(path, exist_ok=True)
        self._path = path
        self.retention_seqs = retention_seqs
        self._env = lmdb.open(path, map_size=map_size_bytes, max_dbs=4, sync=False, metasync=False,
                              writemap=False, lock=True)
        self._chunks = self._env.open_db(b"chunks")
        self._meta = self._env.open_db(b"meta")
        self._dindex = self._env.open_db(b"dindex")
        self._lock = threading.Lock()     # writers: the apply thread; readers use their own read txns
        with self._env.begin(write=True, db=self._meta) as txn:
            fmt = txn.get(b"format")
            if fmt is None:             # new store: compressed; an old one holds raw chunks and stays so
                empty = txn.stat(self._chunks)["entries"] == 0
                fmt = _LAST.pack(FORMAT_LZ4 if empty else FORMAT_RAW)
                txn.put(b"format", fmt)
            self.format = _LAST.unpack(fmt)[0]
            if self.format not in (FORMAT_RAW, FORMAT_LZ4):
                raise ValueError(f"event store {path}: unknown format {self.format}")
            raw = txn.get(b"holes")
            self._holes: list[list[int]] = msgspec.msgpack.decode(raw) if raw else []
            raw = txn.get(b"floor")
            self._floor = _LAST.unpack(raw)[0] if raw else 1
        self.last_seq = max([self._scan_last()] + [h[1] for h in self._holes])
        with self._env.begin(write=True, db=self._meta) as txn:
            raw = txn.get(b"index_from")
            if raw is None:              # a new store, or one written before the index: indexed from here
                raw = _LAST.pack(self.last_seq + 1)
                txn.put(b"index_from", raw)
            self._index_from = _LAST.unpack(raw)[0]
        # the pending chunks' commands for the index, one _IndexPart a chunk
        self._pending_index: list[_IndexPart] = []
        self._prune_to = 0
        self._prune_wake = threading.Condition()
        self._pruner: threading.Thread | None = None
        self._closing = False
        self.lookup_stopped_at_ms = 0
        self._pending: list[tuple[bytes, bytes | memoryview]] = []     # (key, value) not yet in LMDB
        self._pending_bytes = 0
        self._pending_first = 0          # the lowest seq waiting (0: none)
        self._writeback_fd = os.open(self.data_file, os.O_RDONLY | os.O_CLOEXEC)

    def _scan_last(self) -> int:
        with self._env.begin(db=self._chunks) as txn:
            cur = txn.cursor()
            if not cur.last():
                return 0
            return self._last_seq_of(cur.value())

    def _last_seq_of(self, value: bytes) -> int:
        if self.format == FORMAT_LZ4:
            return _CHUNK_HEADER.unpack_from(value, 0)[0]
        return _LAST.unpack_from(value, len(value) - self._rec)[0]      # seq_num is a record's first field

    def _encode(self, evs: np.ndarray) -> bytes | memoryview:
        raw = np.ascontiguousarray(evs).data.cast("B")
        if self.format == FORMAT_RAW:
            return raw
        return _CHUNK_HEADER.pack(int(evs["seq_num"][-1]), raw.nbytes) + lz4.block.compress(raw, store_size=False)

    def _decode(self, value: bytes | memoryview) -> np.ndarray:
        if self.format == FORMAT_RAW:
            return np.frombuffer(value, dtype=self.dtype)
        _, size = _CHUNK_HEADER.unpack_from(value, 0)
        raw = lz4.block.decompress(memoryview(value)[_CHUNK_HEADER.size:], uncompressed_size=size)
        if len(raw) != size or size % self._rec:
            raise ValueError(f"event store {self._path}: a chunk does not decompress to whole records")
        return np.frombuffer(raw, dtype=self.dtype)

    def close(self) -> None:
        if self._pruner is not None:
            with self._prune_wake:
                self._closing = True
                self._prune_wake.notify()
            self._pruner.join()
        self.flush()
        self._env.close()
        if self._writeback_fd >= 0:
            os.close(self._writeback_fd)
            self._writeback_fd = -1

    def append(self, chunks: list[np.ndarray]) -> None:
        """Store event chunks (each contiguous in seq_num; consecutive chunks continue each other).
        Rewriting seqs that are already there (log replay after a restart) is allowed and idempotent."""
        with self._lock:
            for evs in chunks:
                if not len(evs):
                    continue
                first = int(evs["seq_num"][0])
                last = int(evs["seq_num"][-1])
                assert first <= last and (self.last_seq == 0 or first <= self.last_seq + 1 or self._holes), \
                    f"event gap: store ends at {self.last_seq}, chunk starts at {first}"
                value = self._encode(evs)
                self._pending.append((_KEY.pack(first), value))
                if self.indexed:
                    self._pending_index.append(_index_part(evs))
                self._pending_bytes += len(value)
                if not self._pending_first or first < self._pending_first:
                    self._pending_first = first
                self.last_seq = max(self.last_seq, last)
            if len(self._pending) >= PENDING_CHUNKS_MAX or self._pending_bytes >= PENDING_BYTES_MAX:
                self._flush_locked()

    def flush(self) -> None:
        """Put every appended chunk still in memory into LMDB (one transaction; not fsynced)."""
        if self._pending:
            with self._lock:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        block = self._index_block()
        with self._env.begin(write=True, db=self._chunks) as txn:
            for key, value in self._pending:
                txn.put(key, value)
            if block is not None:
                txn.put(block[0], block[1], db=self._dindex)
        self._pending.clear()
        self._pending_index.clear()
        self._pending_bytes = 0
        self._pending_first = 0

    def _index_block(self) -> tuple[bytes, bytes] | None:
        """The dedup index block of the pending chunks (their commands' sorted id hashes and seqs)."""
        parts = [p for p in self._pending_index if len(p[0])]
        if not parts:
            return None
        hashes = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        ordered, order = _stable_order(hashes)
        first = parts[0][2]
        # the seqs of chunks that continue each other with every seq once are first.. in order: no gather
        run = first
        for p in parts:
            if p[1] is not None or p[2] != run:
                run = -1
                break
            run += len(p[0])
        if run >= 0:
            seqs_ordered = order.astype(np.uint64)
            seqs_ordered += np.uint64(first)
            last = run - 1
        else:
            seqs = np.concatenate([np.arange(p[2], p[2] + len(p[0]), dtype=np.uint64) if p[1] is None else p[1]
                                   for p in parts])
            seqs_ordered = seqs[order]
            first, last = int(seqs.min()), int(seqs.max())
        ts0, ts1 = min(p[3] for p in parts), max(p[4] for p in parts)
        head = _BLOCK_HEADER.pack(first, last, ts0, ts1, len(hashes))
        return _KEY.pack(first), b"".join((head, ordered.astype("<u8", copy=False).data,
                                           seqs_ordered.astype("<u8", copy=False).data))

    def lookup(self, dedup_id: int, since_ms: int = 0) -> int | None:
        """The seq of the applied command with this dedup id, if the index holds it; None if not. Walks the
        index newest first down to blocks whose events are all older than ``since_ms`` (a command issued
        at T is applied at T - ISSUED_AHEAD_MAX_MS or later), at most LOOKUP_BLOCKS_MAX blocks (then
        ``lookup_stopped_at_ms`` says how far back it looked; ``index_complete_from`` bounds the rest). A
        candidate is confirmed against its event (hashes may collide)."""
        ev = self.lookup_event(dedup_id, since_ms)
        return None if ev is None else int(ev["seq_num"])

    def lookup_event(self, dedup_id: int, since_ms: int = 0) -> np.void | None:
        """``lookup``, answering the command's first event record (its seq, kind, code), read once."""
        if self._pending:
            self.flush()
        h = _hash_of(dedup_id)
        lo, hi = dedup_id & 0xFFFFFFFFFFFFFFFF, dedup_id >> 64
        walked = 0
        self.lookup_stopped_at_ms = 0      # > 0: the block budget ran out at blocks this old
        with self._env.begin(db=self._dindex, buffers=True) as txn:
            cur = txn.cursor()
            ok = cur.last()
            while ok and walked < LOOKUP_BLOCKS_MAX:
                value = cur.value()
                first, last, ts0, ts1, n = _BLOCK_HEADER.unpack_from(value, 0)
                if ts1 < since_ms or last < self._floor:
                    break
                walked += 1
                off = _BLOCK_HEADER.size
                hashes = np.frombuffer(value, dtype="<u8", count=n, offset=off)
                a = int(np.searchsorted(hashes, np.uint64(h), "left"))
                if a < n and int(hashes[a]) == h:
                    seqs = np.frombuffer(value, dtype="<u8", count=n, offset=off + 8 * n)
                    b = int(np.searchsorted(hashes, np.uint64(h), "right"))
                    for seq in seqs[a:b].tolist():
                        try:
                            ev = self.read(seq, seq, 1 << 16)[0]
                        except EventsUnavailable:
                            continue
                        if int(ev["dedup_id"][0]) == lo and int(ev["dedup_id"][1]) == hi:
                            return ev
                ok = cur.prev()
            if ok and walked >= LOOKUP_BLOCKS_MAX:
                self.lookup_stopped_at_ms = _BLOCK_HEADER.unpack_from(cur.value(), 0)[3] + 1
        return None

    def index_complete_from(self) -> int:
        """The first seq from which the index holds every command this store holds (after pruning, the
        gap of a restore from a snapshot, and the seqs written before the index existed)."""
        first = max(self._floor, self._index_from)
        for _a, b in self._holes:
            if b >= first:
                first = max(first, b + 1)
        return first

    def note_restored(self, ledger_last_seq: int) -> None:
        """The ledger was replaced by a snapshot whose last event is ``ledger_last_seq``: if that is past what
        this store holds, the seqs in between will never arrive here; remember them as a hole."""
        if ledger_last_seq <= self.last_seq:
            return
        self.flush()
        with self._lock, self._env.begin(write=True, db=self._meta) as txn:
            self._holes.append([self.last_seq + 1, ledger_last_seq])
            txn.put(b"holes", msgspec.msgpack.encode(self._holes))
            self.last_seq = ledger_last_seq

    def sync(self) -> None:
        self.flush()
        self._env.sync(True)

    def start_writeback(self) -> None:
        """Start writing the store's dirty pages back to the disk without waiting (Linux
        ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op elsewhere). Writes are not fsynced one by one, so
        left alone the kernel writes them back in bursts (every 5 s, what is older than 30 s: ~10 MB at 10K
        transfers/s per replica), and every Raft fsync on the disk then waits behind the burst (measured:
        25-120 ms fsyncs on all three replicas at once). Called every ``WRITEBACK_INTERVAL_S`` by the node,
        it keeps that writeback small and continuous."""
        if self._writeback_fd < 0 or not fileio.AVAILABLE:
            return
        fileio.start_writeback(self._writeback_fd)

    @property
    def data_file(self) -> str:
        """The LMDB data file: fsyncing it (from any process) makes every committed write durable."""
        return os.path.join(self._path, "data.mdb")

    def prune(self) -> None:
        """Ask for the chunks entirely below ``last_seq - retention_seqs`` to go; the store's pruner thread
        deletes them in bounded passes (returns at once)."""
        cutoff = self.last_seq - self.retention_seqs
        if cutoff <= self._floor:
            return
        with self._prune_wake:
            self._prune_to = max(self._prune_to, cutoff)
            if self._pruner is None:
                self._pruner = threading.Thread(target=self._prune_loop, name="event-pruner", daemon=True)
                self._pruner.start()
            self._prune_wake.notify()

    def _prune_loop(self) -> None:
        while True:
            with self._prune_wake:
                while not self._closing and self._prune_to <= self._floor:
                    self._prune_wake.wait()
                if self._closing:
                    return
                cutoff = self._prune_to
            try:
                while self.prune_pass(cutoff) and not self._closing:
                    pass
            except lmdb.Error:
                import logging
                logging.getLogger(__name__).exception("event store %s: pruning failed", self._path)
                return

    def prune_now(self, pass_chunks: int = PRUNE_PASS_CHUNKS) -> int:
        """Prune to the retention synchronously (tests, tools); returns the chunks deleted."""
        cutoff = self.last_seq - self.retention_seqs
        deleted = 0
        while True:
            n = self.prune_pass(cutoff, pass_chunks)
            deleted += n
            if not n:
                return deleted

    def prune_pass(self, cutoff: int, pass_chunks: int = PRUNE_PASS_CHUNKS) -> int:
        """One bounded pass: delete at most ``pass_chunks`` chunks whose seqs are all below ``cutoff``, and
        the index blocks below the new floor, moving ``floor`` in the same transaction. Returns how many
        chunks it deleted (0: nothing left below the cutoff)."""
        if cutoff <= self._floor:
            return 0
        self.flush()
        deleted = 0
        with self._lock, self._env.begin(write=True) as txn:
            cur = txn.cursor(db=self._chunks)
            new_floor = self._floor
            if cur.first():
                while deleted < pass_chunks:
                    last = self._last_seq_of(cur.value())
                    if last >= cutoff:
                        new_floor = _KEY.unpack(cur.key())[0]
                        break
                    deleted += 1
                    new_floor = last + 1
                    if not cur.delete() or not cur.key():
                        break
            icur = txn.cursor(db=self._dindex)
            removed = 0
            if icur.first():
                while removed < pass_chunks:
                    if _BLOCK_HEADER.unpack_from(icur.value(), 0)[1] >= new_floor:
                        break
                    removed += 1
                    if not icur.delete() or not icur.key():
                        break
            self._floor = max(self._floor, new_floor)
            self._holes = [h for h in self._holes if h[1] >= self._floor]
            txn.put(b"floor", _LAST.pack(self._floor), db=self._meta)
            txn.put(b"holes", msgspec.msgpack.encode(self._holes), db=self._meta)
        return deleted

    def first_available(self) -> int:
        return self._floor

    def read(self, first_seq: int, last_seq: int, records_max: int) -> np.ndarray:
        """Event records of whole seqs from ``first_seq`` towards ``last_seq`` (all parts), at most
        ``records_max`` records; the answer stops early at the end of this store or before a hole, and the
        caller continues from the next seq (elsewhere). Raises EventsUnavailable if ``first_seq`` itself
        is not here (pruned, in a hole, or not yet applied)."""
        if not 1 <= first_seq <= last_seq:
            raise ValueError(f"bad event range {first_seq}..{last_seq}")
        if first_seq < self._floor:
            raise EventsUnavailable(f"events below {self._floor} were pruned by retention "
                                    f"({self.retention_seqs} seqs) on this replica")
        if first_seq > self.last_seq:
            raise EventsUnavailable(f"this replica's events end at {self.last_seq}")
        last_seq = min(last_seq, self.last_seq)
        for a, b in self._holes:
            if a <= first_seq <= b:
                raise EventsUnavailable(f"this replica was restored from a snapshot and never held "
                                        f"events {a}..{b}; ask another replica")
            if first_seq < a <= last_seq:
                last_seq = a - 1          # serve the prefix before the hole; the caller continues elsewhere
        pending_first = self._pending_first
        if pending_first and last_seq >= pending_first:
            self.flush()                  # (rare: a reply that asked for its events, a subscriber at the head)
        out: list[np.ndarray] = []
        count = 0
        with self._env.begin(db=self._chunks) as txn:
            cur = txn.cursor()
            if not cur.set_range(_KEY.pack(first_seq)) or _KEY.unpack(cur.key())[0] != first_seq:
                # the chunk holding first_seq starts before it
                if not (cur.prev() if cur.key() else cur.last()):
                    raise EventsUnavailable(f"event {first_seq} not found")
            while True:
                evs = self._decode(cur.value())
                seqs = evs["seq_num"]
                lo = int(np.searchsorted(seqs, first_seq, "left"))
                hi = int(np.searchsorted(seqs, last_seq, "right"))
                if hi > lo:
                    part = evs[lo:hi]
                    if count + len(part) > records_max:
                        pseqs = part["seq_num"]
                        cut = records_max - count
                        if pseqs[cut] == pseqs[cut - 1] if cut > 0 else False:
                            cut = int(np.searchsorted(pseqs, pseqs[cut], "left"))   # whole seqs only
                        if cut <= 0 and not count:
                            cut = int(np.searchsorted(pseqs, pseqs[0], "right"))    # always progress
                        if cut > 0:
                            out.append(part[:cut])
                            count += cut
                        break
                    out.append(part)
                    count += len(part)
                if int(seqs[-1]) >= last_seq or not cur.next():
                    break
        # the parts are views of the decoded chunks: copied once, into the result (as opaque records:
        # numpy copies a structured dtype field by field, engine/records.py)
        result = records_concat(out, self.dtype)
        if not len(result) or int(result["seq_num"][0]) != first_seq:
            raise EventsUnavailable(f"event {first_seq} is not in this replica's store")
        return result
