"""Durable Raft storage: the log in append-only segment files, the hard state and the snapshot in LMDB.

A replica's data directory holds:

``log-<seq:016x>.seg``  the log: segment files of records, appended in order and never rewritten. A record
              is ``RECORD_HEADER`` (crc32, type, kind, index, term, length) followed by ``length`` payload
              bytes; the crc32 covers everything after itself. Types: ENTRY (a log entry), TRUNCATE (entries
              >= index are gone: a conflicting suffix or a log replaced by a leader's snapshot) and COMMIT (the
              commit index, written with the next append instead of costing a sync of its own). A segment
              starts with ``SEGMENT_HEADER`` (magic, its sequence number) and is preallocated; an all-zero
              header marks the end of what was written.
``data.mdb``  one LMDB environment with two named databases: ``state`` (``hard_state``,
              ``snapshot_meta``, msgpack of the core's structs with a crc32 prefix, and ``log_first``, the
              lowest index the latest snapshot left in the log) and ``snapshot`` (the state machine's snapshot
              bytes, or a reference to ``snapshot-<index>-<term>.bin`` beside it).

Why the log is not in LMDB (it was until the ninth session): an LMDB commit costs two flushes (data pages,
then the meta page) and writes ~30-38 KB for one small entry; a segment append costs one ``fdatasync`` and
~6 KB (``python -m bench.log_store_writes``: p50 0.13-0.18 vs 0.27-0.34 ms on this machine, alone). Under
three replicas on one disk the difference is larger. Compaction of a segment log is deleting whole files.
New segments are spare files of written zeros made ahead by a background thread (``_SpareSegments``).

Durability: with ``sync=True`` (the default) every mutating call is on disk when it returns. ``save`` of
what one ``Ready`` asks for costs one ``fdatasync`` of the active segment for entries (group commit) and an
LMDB commit only when the term or vote changes or a snapshot arrives (rare). Order, so that a crash between
two steps always leaves a valid state: a new term/vote (LMDB) before entries of that term (segment); a
TRUNCATE of a replaced log (segment) before the snapshot that replaces it (LMDB); the snapshot before the
entries that follow it. A torn write can only be the tail of the last segment (a save returns after its
``fdatasync``): a bad record there that looks unfinished (zeros where the rest of it should be; see
``_looks_torn``) is cut off at open. Any other bad record is ``LogCorruption``: never silently dropped.

Invariants kept (and asserted): entries are contiguous from ``first_index`` to ``last_index``; the entry just
before ``first_index`` is covered by the snapshot (``first_index == 1`` or ``first_index <= snapshot.index +
1``); ``hard_state.commit <= last_index``; a committed entry is never truncated.

Entries below the snapshot: ``save_snapshot(meta, data, keep_from=k)`` keeps the entries from ``k`` on (the
replica's ``snapshot_keep_entries``, for followers a little behind), across restarts too (``log_first``);
``initial_state`` returns them with the rest, and the core takes the first of them as its log's base.
"""
from __future__ import annotations

import glob
import itertools
import mmap
import os
import re
import struct
import threading
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import lmdb
import msgspec

from engine import fileio
from engine.raft import messages as _msg

# --- named limits -----------------------------------------------------------------------------------
MAP_SIZE_BYTES_DEFAULT = 64 << 30        # LMDB map (sparse): hard state, snapshot meta, small snapshots
ENTRY_SIZE_BYTES_MAX = 64 << 20          # one entry's payload; the ledger's largest batch is ~1 MiB
SNAPSHOT_SIZE_BYTES_MAX = 8 << 30        # one snapshot value in LMDB
APPEND_BATCH_ENTRIES_MAX = 1 << 16       # entries in one save() call
SEGMENT_BYTES_DEFAULT = 64 << 20         # a segment is preallocated to this and rolled when full
READ_BATCH_BYTES_DEFAULT = 64 << 20      # entries(lo, hi, size_bytes_max=...) default
_WRITE_BUFFERS_MAX = 1024                # buffers per pwritev (Linux IOV_MAX)
_COALESCE_BYTES = 64 << 10               # payloads below this are copied into one buffer with their headers
_READ_RUN_BYTES_MAX = 8 << 20            # entries(): records read back to back with one pread, up to this

# crc32 (u32), type (u8), kind (u8), reserved (u16), index (u64), term (u64), payload length (u32).
RECORD_HEADER = struct.Struct("<IBBHQQI")
_REC_BODY = struct.Struct("<BBHQQI")     # the header after its crc32
REC_ENTRY, REC_TRUNCATE, REC_COMMIT = 1, 2, 3
SEGMENT_MAGIC = b"ZWRAFTL1"
SEGMENT_HEADER = struct.Struct("<8sQ")   # magic, segment sequence number
_SEGMENT_NAME = re.compile(r"^log-([0-9a-f]{16})\.seg$")
_CRC = struct.Struct("<I")

_KEY_HARD_STATE = b"hard_state"
_KEY_SNAPSHOT_META = b"snapshot_meta"
_KEY_SNAPSHOT_DATA = b"snapshot_data"
_KEY_LOG_FIRST = b"log_first"            # u64 big-endian: the first index the latest snapshot kept
# ENTRY_HEADER is the value layout of the LMDB ``entries`` table of stores written before the segment log;
# such a store is moved into segments once, at its first open (``_migrate_lmdb_entries``).
ENTRY_HEADER = struct.Struct("<IQBI")
_INDEX_KEY = struct.Struct(">Q")


class LogStoreError(Exception):
    """Misuse of the store (non-contiguous append, compaction past the snapshot, ...)."""


class LogCorruption(LogStoreError):
    """Bytes on disk fail their checksum or break a log invariant; the replica must not start on them."""


def _record(rtype: int, kind: int, index: int, term: int, data: bytes | memoryview = b"") -> bytes:
    """Header of one record (the payload is written after it); the crc32 covers header body + payload."""
    body = _REC_BODY.pack(rtype, kind, 0, index, term, len(data))
    return _CRC.pack(zlib.crc32(data, zlib.crc32(body))) + body


def _legacy_entry(index: int, value: bytes | memoryview) -> Any:
    """Verify and decode one entry of the old LMDB ``entries`` table; raises LogCorruption on a mismatch."""
    if len(value) < ENTRY_HEADER.size:
        raise LogCorruption(f"entry {index}: stored value of {len(value)} bytes is shorter than its header")
    crc, term, kind, size = ENTRY_HEADER.unpack_from(value, 0)
    data = bytes(value[ENTRY_HEADER.size:])
    head = struct.pack("<QQB", index, term, kind)
    if len(data) != size or zlib.crc32(data, zlib.crc32(head)) != crc:
        raise LogCorruption(f"entry {index}: checksum mismatch (stored crc32 {crc:#010x})")
    return _msg.Entry(term=term, index=index, kind=_entry_kind(kind), data=data)


def _entry_kind(kind: int) -> Any:
    kind_type = getattr(_msg, "EntryKind", None)
    return kind_type(kind) if kind_type is not None else kind


SNAPSHOT_FILE_MAGIC = b"ZWSNAPFILE1:"      # a snapshot db value that refers to a file beside the LMDB env
SNAPSHOT_FILE_GLOB = "snapshot-*.bin"


@dataclass(frozen=True)
class SnapshotFile:
    """Snapshot bytes already written and fsynced to ``path`` by whoever made them (the node's snapshot
    child), with their size and crc32. ``LogStore.save`` moves the file into the store's directory and
    records a reference to it, so a large snapshot costs the driver a rename and a small transaction
    instead of writing and fsyncing all its bytes again."""
    path: str
    size: int
    crc32: int


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _wrap(payload: bytes) -> bytes:
    return _CRC.pack(zlib.crc32(payload)) + payload


def _unwrap(what: str, value: bytes | memoryview) -> memoryview:
    view = memoryview(value)
    if len(view) < _CRC.size:
        raise LogCorruption(f"{what}: stored value too short")
    (crc,) = _CRC.unpack_from(view, 0)
    payload = view[_CRC.size:]
    if zlib.crc32(payload) != crc:
        raise LogCorruption(f"{what}: checksum mismatch")
    return payload


SPARE_GLOB = "spare-*.tmp"
FIRST_ROLL_WAIT_S = 2.0                  # the first roll after open waits this long for the first spare
SPARE_WRITE_CHUNK_BYTES = 1 << 20        # a spare is written this much at a time, each chunk on the disk
SPARE_WRITE_PAUSE_S = 0.001              # before the next, with this pause: see _SpareSegments


class _SpareSegments:
    """Slow file work kept off the Raft thread, by one background thread: making the next segment (a file
    of written zeros) ahead of need, and deleting compacted segments.

    Why not fallocate: an fdatasync of an append into fallocated blocks (unwritten extents) must also commit
    the filesystem's journal, and waits behind whatever else the journal holds; at 10K transfers/s that
    stalled every replica's log sync for ~66 ms several times in 10 s. Into blocks already written, it is a
    plain data flush (p99 at 10K/s: 4.5 ms, no stall over 5 ms; bench/RESULTS.md). Why not unlink on the
    Raft thread: freeing a 64 MiB file's extents after a snapshot took tens of ms per file.

    Why paced: the replicas write the same log, so they roll their segments at about the same moment; three
    spares of 64 MiB written at once and then fsynced put ~190 MB ahead of every log sync on the disk, and all
    three replicas' syncs stalled for ~45 ms together (zwallet bench, 10K/s). Written a chunk at a time,
    each on the disk before the next, at most one chunk waits ahead of a log sync."""

    def __init__(self, directory: str, size: int) -> None:
        self._dir, self._size = directory, size
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ready: str | None = None
        self._want_spare = True
        self._filled = threading.Event()            # set when a fill attempt ends (made or failed)
        self._doomed: list[str] = []
        self._closed = False
        self._made = 0
        self._thread = threading.Thread(target=self._run, name="raft-log-files", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._doomed or self._want_spare):
                    self._wake.wait()
                if self._closed:
                    return
                doomed, self._doomed = self._doomed, []
                fill = self._want_spare and not doomed
                if fill:
                    self._want_spare = False
                    self._made += 1
                    path = os.path.join(self._dir, f"spare-{self._made}.tmp")
            for old in doomed:                      # deletions first: they free the space a spare takes
                fileio.unlink_quietly(old)
            if fill:
                self._fill(path)

    def _fill(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                zero = memoryview(bytes(SPARE_WRITE_CHUNK_BYTES))
                fileio.write_paced(fd, self._size, lambda _at, n: zero[:n], SPARE_WRITE_CHUNK_BYTES,
                                   SPARE_WRITE_PAUSE_S, cancelled=lambda: self._closed)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            with self._lock:
                if not self._closed:
                    self._ready, path = path, ""
        except OSError:
            pass                                  # a full disk: rolls fall back to fallocate
        finally:
            if path:
                fileio.unlink_quietly(path)
            self._filled.set()

    def take(self, wait_s: float) -> str | None:
        """The path of a ready spare (the caller renames it), or None; asks for the next one."""
        if wait_s > 0:
            self._filled.wait(wait_s)
        with self._lock:
            path, self._ready = self._ready, None
            if path is not None or self._filled.is_set():
                self._filled.clear()
                self._want_spare = True
                self._wake.notify()
        return path

    @property
    def has_ready(self) -> bool:
        return self._ready is not None

    def discard(self, path: str) -> None:
        """Delete a file (a compacted segment, already closed) in the background."""
        with self._lock:
            self._doomed.append(path)
            self._wake.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            path, self._ready = self._ready, None
            doomed, self._doomed = self._doomed, []
            self._wake.notify()
        self._thread.join(timeout=5)
        for old in doomed + ([path] if path else []):
            fileio.unlink_quietly(old)


_SECTOR = 512


def _looks_torn(view: memoryview, off: int, end: int, past_eof: bool) -> bool:
    """Is the bad record at [off, end) a write that did not finish (cut off at the tail of the last segment)
    rather than damage? A save is one pwritev then one fdatasync; a kill stops the copy at a page boundary
    and a power cut loses whole sectors, and what was never written reads as zeros (the segment is
    preallocated). So: the record runs past the end of the file, or a whole sector inside it is zeros,
    or it ends in zeros from a sector boundary on. Anything else is corruption, never silently cut."""
    if past_eof:
        return True
    first = -(-off // _SECTOR) * _SECTOR
    zeros = bytes(_SECTOR)
    for z in range(first, end - _SECTOR + 1, _SECTOR):
        if view[z:z + _SECTOR] == zeros:
            return True
    tail = bytes(view[off:end]).rstrip(b"\0")
    last_nonzero = off + len(tail) - 1
    boundary = (last_nonzero // _SECTOR + 1) * _SECTOR
    return boundary < end


class _Segment:
    """One segment file: its descriptor, where the next record goes, and the highest entry index in it."""
    __slots__ = ("end", "fallocated", "fd", "max_index", "path", "seq")

    def __init__(self, seq: int, path: str, fd: int, end: int) -> None:
        self.seq, self.path, self.fd, self.end, self.max_index = seq, path, fd, end, 0
        self.fallocated = False            # made without a spare: its syncs wait on the journal


class LogStore:
    """The replica's durable Raft state. Not thread-safe: one thread (the driver's) owns it."""

    def __init__(self, path: str | os.PathLike[str], *, sync: bool = True,
                 map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT,
                 segment_bytes: int = SEGMENT_BYTES_DEFAULT) -> None:
        if map_size_bytes < (1 << 20):
            raise ValueError(f"map_size_bytes={map_size_bytes} is below 1 MiB")
        if segment_bytes < (1 << 16):
            raise ValueError(f"segment_bytes={segment_bytes} is below 64 KiB")
        self.path = os.fspath(path)
        self.sync = sync
        self.segment_bytes = segment_bytes
        os.makedirs(self.path, exist_ok=True)
        self._env = lmdb.open(self.path, map_size=map_size_bytes, max_dbs=4, sync=sync, metasync=sync,
                              readahead=False, lock=True, subdir=True)
        self._state = self._env.open_db(b"state")
        self._snapshot = self._env.open_db(b"snapshot")
        self._hs_encoder = msgspec.msgpack.Encoder()
        self._hs_decoder = msgspec.msgpack.Decoder(_msg.HardState)
        self._meta_decoder = msgspec.msgpack.Decoder(_msg.SnapshotMeta)
        # Where each live entry is: position i holds index first_index + i.
        self._seg = array("q")          # segment sequence number
        self._off = array("q")          # record offset in that segment
        self._term = array("q")
        self._len = array("q")          # payload length
        self._first_index = 1
        self._snap_index = 0
        self._snap_term = 0
        self._segments: dict[int, _Segment] = {}   # oldest first
        self._active: _Segment | None = None        # created at the first append after open
        self._next_seq = 1
        self._hard_state: Any = None                # term and vote durable in LMDB; commit see below
        self._durable_commit = 0                    # the commit index on disk (LMDB or a COMMIT record)
        self._deferred_hard_state: Any = None       # a commit-only change not yet written (defer_commit)
        self._snapshot_meta: Any = None
        self._log_first: int | None = None          # _KEY_LOG_FIRST, if stored
        self._snapshot_file: str | None = None
        self.bytes_written = 0                      # to segments, since open
        self.segments_removed = 0
        self.segments_fallocated = 0                # rolls that found no spare ready (sync=True only)
        self._spares: _SpareSegments | None = None
        self._rolled = False
        try:
            self._load_state()
            self._scan_segments()
            self._migrate_lmdb_entries()
            self._settle_after_load()
        except BaseException:
            self._close_files()
            raise
        self._snapshot_file = self._referenced_snapshot_file()
        self._remove_unreferenced_snapshot_files()
        for leftover in glob.glob(os.path.join(self.path, SPARE_GLOB)):
            fileio.unlink_quietly(leftover)
        if sync:
            self._spares = _SpareSegments(self.path, segment_bytes)

    # --- recovery ------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        with self._env.begin(buffers=True) as txn:
            raw = txn.get(_KEY_HARD_STATE, db=self._state)
            self._hard_state = (self._hs_decoder.decode(_unwrap("hard state", raw)) if raw is not None
                                else _msg.HardState(term=0, vote=_no_vote(), commit=0))
            raw = txn.get(_KEY_SNAPSHOT_META, db=self._state)
            self._snapshot_meta = (self._meta_decoder.decode(_unwrap("snapshot meta", raw))
                                   if raw is not None else None)
            raw = txn.get(_KEY_LOG_FIRST, db=self._state)
            self._log_first = _INDEX_KEY.unpack(bytes(_unwrap("log first", raw)))[0] if raw is not None else None
        if self._snapshot_meta is not None:
            self._snap_index, self._snap_term = self._snapshot_meta.index, self._snapshot_meta.term
        self._durable_commit = self._hard_state.commit

    def _scan_segments(self) -> None:
        """Replay every segment's records, oldest first, into the in-memory index of entries."""
        found = []
        for name in os.listdir(self.path):
            m = _SEGMENT_NAME.match(name)
            if m:
                found.append((int(m.group(1), 16), name))
        found.sort()
        for pos, (seq, name) in enumerate(found):
            last = pos == len(found) - 1
            path = os.path.join(self.path, name)
            fd = os.open(path, os.O_RDWR)
            seg = _Segment(seq, path, fd, 0)
            self._segments[seq] = seg
            self._next_seq = seq + 1
            end = self._replay(seg, os.fstat(fd).st_size, tail_may_tear=last)
            if end is None:               # created, then killed before its header was durable: nothing in it
                del self._segments[seq]
                os.close(fd)
                os.unlink(path)
            else:
                seg.end = end

    def _replay(self, seg: _Segment, size: int, *, tail_may_tear: bool) -> int | None:
        """Apply one segment's records to the index; returns the offset after its last good record (None:
        the last segment has no header, a roll cut short by a crash). Every record's checksum is verified
        (a flipped bit in an index or a length would misplace everything after it); reads verify again."""
        name = os.path.basename(seg.path)
        if size < SEGMENT_HEADER.size:
            if tail_may_tear:
                return None
            raise LogCorruption(f"segment {name}: {size} bytes, shorter than its header")
        with mmap.mmap(seg.fd, size, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                magic, seq = SEGMENT_HEADER.unpack_from(view, 0)
                if magic != SEGMENT_MAGIC or seq != seg.seq:
                    if tail_may_tear and magic == b"\0" * 8:
                        return None
                    raise LogCorruption(f"segment {name}: bad header (magic {magic!r}, sequence {seq})")
                off = SEGMENT_HEADER.size
                hsize = RECORD_HEADER.size
                while off + hsize <= size:
                    crc, rtype, _kind, _, index, term, length = RECORD_HEADER.unpack_from(view, off)
                    if rtype == 0 and crc == 0 and index == 0 and length == 0:
                        break                                       # preallocated, never written
                    end = off + hsize + length
                    bad = (rtype not in (REC_ENTRY, REC_TRUNCATE, REC_COMMIT) or end > size
                           or zlib.crc32(view[off + 4:end]) != crc)
                    if bad:
                        if tail_may_tear and _looks_torn(view, off, min(max(end, off + hsize), size), end > size):
                            self._cut_tail(seg, off)
                            return off
                        raise LogCorruption(f"segment {name}: bad record at offset {off} (checksum, type "
                                            f"{rtype} or length {length})")
                    if rtype == REC_ENTRY:
                        self._index_entry(index, term, seg, off, length)
                    elif rtype == REC_TRUNCATE:
                        self._drop_from(index)
                    else:
                        self._durable_commit = max(self._durable_commit, index)
                    off = end
                return off
            finally:
                view.release()

    def _cut_tail(self, seg: _Segment, off: int) -> None:
        """Drop a torn write at the end of the last segment (it was never reported durable)."""
        os.ftruncate(seg.fd, off)
        os.fsync(seg.fd)

    def _index_entry(self, index: int, term: int, seg: _Segment, off: int, length: int) -> None:
        last = self._first_index + len(self._term) - 1
        if self._term and index <= last:
            # a rewrite of a conflicting suffix; below the first index known here when the entries it kept
            # were in a segment deleted since (all below a snapshot): whatever is missing is checked once
            # every segment is read (the log must start at or below snapshot index + 1)
            self._drop_from(index)
        elif self._term and index > last + 1:
            self._drop_from(self._first_index)     # a gap: a snapshot replaced the log before this entry
        if not self._term:
            self._first_index = index
        self._seg.append(seg.seq)
        self._off.append(off)
        self._term.append(term)
        self._len.append(length)
        seg.max_index = max(seg.max_index, index)

    def _drop_from(self, index: int) -> None:
        """Forget entries >= index (in memory)."""
        keep = max(0, index - self._first_index)
        if keep < len(self._term):
            del self._seg[keep:], self._off[keep:], self._term[keep:], self._len[keep:]

    def _migrate_lmdb_entries(self) -> None:
        """A store written before the segment log kept its entries in LMDB: append them to a segment once
        (synced), then drop that table. A crash in between repeats the copy, which rewrites the same entries."""
        with self._env.begin(buffers=True) as txn:
            if txn.get(b"entries") is None:        # named databases are keys of the main database
                return
        old = self._env.open_db(b"entries")
        with self._env.begin(db=old, buffers=True) as txn:
            entries = [_legacy_entry(_INDEX_KEY.unpack(k)[0], v) for k, v in txn.cursor()]
        for lo in range(0, len(entries), APPEND_BATCH_ENTRIES_MAX):
            self._write_records(entries[lo:lo + APPEND_BATCH_ENTRIES_MAX], None, None)
        with self._env.begin(write=True) as txn:
            txn.drop(old, delete=True)

    def _settle_after_load(self) -> None:
        snap_index = self._snap_index
        if self._term:
            first = self._first_index
            if first > snap_index + 1:
                raise LogCorruption(f"log starts at {first} but the snapshot covers only up to {snap_index}")
        if snap_index >= self._first_index:
            # entries the snapshot covers are gone, but for those it kept (from log_first on), which must
            # reach the snapshot's own entry (else they are dropped too: they are only an optimization)
            keep_first = snap_index + 1 if self._log_first is None else min(self._log_first, snap_index + 1)
            if keep_first <= snap_index and not self._holds(snap_index, self._snap_term):
                keep_first = snap_index + 1
            self._drop_prefix_to(keep_first - 1)
        # a snapshot is committed state: its index is a floor even when the COMMIT records that said so
        # were in segments deleted since
        commit = max(self._durable_commit, self._hard_state.commit, snap_index)
        if commit > self.last_index:
            raise LogCorruption(f"hard state commit {commit} is past the last stored index {self.last_index}")
        self._durable_commit = commit
        if commit != self._hard_state.commit:
            hs = self._hard_state
            self._hard_state = _msg.HardState(term=hs.term, vote=hs.vote, commit=commit)
        self._remove_compacted_segments()

    def initial_state(self) -> tuple[Any, Any, list[Any]]:
        """(hard_state, snapshot_meta or None, entries) -- what RaftCore starts from. The entries are those
        after the snapshot, preceded by those it kept below itself (save_snapshot's keep_from), if any."""
        entries = self.entries(self._first_index, self.last_index + 1, size_bytes_max=None)
        return self._hard_state, self._snapshot_meta, entries

    # --- reads ---------------------------------------------------------------------------------------
    @property
    def first_index(self) -> int:
        return self._first_index

    @property
    def last_index(self) -> int:
        return self._first_index + len(self._term) - 1 if self._term else self._snap_index

    @property
    def last_term(self) -> int:
        return self._term[-1] if self._term else self._snap_term

    @property
    def hard_state(self) -> Any:
        return self._hard_state

    @property
    def snapshot_meta(self) -> Any:
        return self._snapshot_meta

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def entries(self, lo: int, hi: int, *, size_bytes_max: int | None = READ_BATCH_BYTES_DEFAULT) -> list[Any]:
        """Entries with lo <= index < hi (checksums verified). With size_bytes_max, stops once the payloads
        reach that many bytes (always returns at least one entry when the range is non-empty)."""
        if lo < self._first_index or hi > self.last_index + 1 or lo > hi:
            raise LogStoreError(f"entries [{lo}, {hi}) outside the stored log [{self._first_index}, "
                                f"{self.last_index + 1})")
        out: list[Any] = []
        total = 0
        hsize = RECORD_HEADER.size
        base = self._first_index
        index = lo
        while index < hi:
            # one pread for a run of entries written back to back in one segment
            i = index - base
            seq, start = self._seg[i], self._off[i]
            end = start + hsize + self._len[i]
            run_bytes = total + self._len[i]
            stop = index + 1
            while (stop < hi and end - start < _READ_RUN_BYTES_MAX
                   and (size_bytes_max is None or run_bytes < size_bytes_max)):
                k = stop - base
                if self._seg[k] != seq or self._off[k] != end:
                    break
                end += hsize + self._len[k]
                run_bytes += self._len[k]
                stop += 1
            seg = self._segments[seq]
            name = os.path.basename(seg.path)
            buf = memoryview(os.pread(seg.fd, end - start, start))
            for at_index in range(index, stop):
                i = at_index - base
                at, length = self._off[i] - start, self._len[i]
                if at + hsize + length > len(buf):
                    raise LogCorruption(f"entry {at_index}: segment {name} ends inside it")
                crc, rtype, kind, _, r_index, r_term, r_len = RECORD_HEADER.unpack_from(buf, at)
                if zlib.crc32(buf[at + 4:at + hsize + length]) != crc:
                    raise LogCorruption(f"entry {at_index}: checksum mismatch in segment {name}")
                if rtype != REC_ENTRY or r_index != at_index or r_term != self._term[i] or r_len != length:
                    raise LogCorruption(f"entry {at_index}: segment {name} holds another record there")
                out.append(_msg.Entry(term=r_term, index=at_index, kind=_entry_kind(kind),
                                      data=bytes(buf[at + hsize:at + hsize + length])))
                total += length
            index = stop
            if size_bytes_max is not None and total >= size_bytes_max:
                break
        return out

    def term(self, index: int) -> int:
        """The term of the entry at index (the snapshot's term at its index; 0 at index 0)."""
        if self._snapshot_meta is not None and index == self._snap_index:
            return self._snap_term
        if index == 0:
            return 0
        if not self._first_index <= index <= self.last_index:
            raise LogStoreError(f"term of {index}: outside the stored log [{self._first_index}, "
                                f"{self.last_index + 1})")
        return self._term[index - self._first_index]

    def snapshot(self) -> tuple[Any, bytes] | None:
        """(meta, data) of the latest saved snapshot, or None."""
        if self._snapshot_meta is None:
            return None
        with self._env.begin(db=self._snapshot, buffers=True) as txn:
            raw = txn.get(_KEY_SNAPSHOT_DATA)
            if raw is None:
                raise LogCorruption("snapshot meta present but its data is missing")
            payload = bytes(_unwrap("snapshot data", raw))
        if not payload.startswith(SNAPSHOT_FILE_MAGIC):
            return self._snapshot_meta, payload
        name, size, crc = msgspec.msgpack.decode(payload[len(SNAPSHOT_FILE_MAGIC):])
        try:
            with open(os.path.join(self.path, name), "rb") as f:
                data = f.read()
        except OSError as exc:
            raise LogCorruption(f"snapshot file {name}: {exc}") from exc
        if len(data) != size or zlib.crc32(data) != crc:
            raise LogCorruption(f"snapshot file {name}: size or checksum mismatch")
        return self._snapshot_meta, data

    @property
    def snapshot_file_path(self) -> str | None:
        """The file holding the current snapshot's bytes, if they are in a file (else in LMDB, or none)."""
        return self._snapshot_file

    def _referenced_snapshot_file(self) -> str | None:
        with self._env.begin(db=self._snapshot, buffers=True) as txn:
            raw = txn.get(_KEY_SNAPSHOT_DATA)
            if raw is None:
                return None
            head = bytes(raw[_CRC.size:_CRC.size + len(SNAPSHOT_FILE_MAGIC)])
            if head != SNAPSHOT_FILE_MAGIC:
                return None
            payload = bytes(_unwrap("snapshot data", raw))
        name = msgspec.msgpack.decode(payload[len(SNAPSHOT_FILE_MAGIC):])[0]
        return os.path.join(self.path, name)

    def _remove_unreferenced_snapshot_files(self) -> None:
        """Files of older snapshots, or of one moved in by a save that did not commit (a crash between)."""
        for f in glob.glob(os.path.join(self.path, SNAPSHOT_FILE_GLOB)):
            if f != self._snapshot_file:
                fileio.unlink_quietly(f)

    # --- writes --------------------------------------------------------------------------------------
    def append(self, entries: Sequence[Any]) -> None:
        self.save(entries=entries)

    def set_hard_state(self, hard_state: Any) -> None:
        self.save(hard_state=hard_state)

    def save(self, *, hard_state: Any = None, entries: Sequence[Any] = (),
             snapshot: tuple[Any, bytes | SnapshotFile] | None = None, keep_from: int | None = None) -> None:
        """Persist what one Ready asks for: durable when it returns (with sync=True).

        Meaning: the snapshot first (it replaces the log prefix it covers -- but for the entries from
        ``keep_from`` on, when given -- or the whole log when the log does not hold its last entry), then the
        entries (an append starting at or below last_index first
        drops the conflicting suffix), then the hard state. Costs one fdatasync of the active segment when
        there are entries, plus an LMDB commit when the term or vote changes or there is a snapshot.
        Raises LogStoreError and changes nothing when the request breaks a log invariant."""
        entries = list(entries)
        if len(entries) > APPEND_BATCH_ENTRIES_MAX:
            raise LogStoreError(f"{len(entries)} entries in one save: "
                                f"APPEND_BATCH_ENTRIES_MAX={APPEND_BATCH_ENTRIES_MAX}")
        if hard_state is None and self._deferred_hard_state is not None and (entries or snapshot is not None):
            hard_state = self._deferred_hard_state       # rides along with the next durable write
        snap_meta = self._snapshot_meta
        if snapshot is not None:
            snap_meta = snapshot[0]
            size = snapshot[1].size if isinstance(snapshot[1], SnapshotFile) else len(snapshot[1])
            if size > SNAPSHOT_SIZE_BYTES_MAX:
                raise LogStoreError(f"snapshot of {size} bytes: SNAPSHOT_SIZE_BYTES_MAX={SNAPSHOT_SIZE_BYTES_MAX}")
            if self._snapshot_meta is not None and snap_meta.index < self._snapshot_meta.index:
                raise LogStoreError(f"snapshot at {snap_meta.index} is older than the stored one at "
                                    f"{self._snapshot_meta.index}")
        keeps_log = snapshot is not None and self._holds(snap_meta.index, snap_meta.term)
        last = self.last_index
        if snapshot is not None and not keeps_log:
            last = snap_meta.index
        floor = snap_meta.index if snap_meta is not None else 0
        committed = max(self._commit_known, floor)
        if entries:
            lo = entries[0].index
            if lo <= floor:
                raise LogStoreError(f"append at {lo} is not above the snapshot index {floor}")
            if lo > last + 1:
                raise LogStoreError(f"append at {lo} leaves a gap after last index {last}")
            for e in entries:
                if len(e.data) > ENTRY_SIZE_BYTES_MAX:
                    raise LogStoreError(f"entry {e.index}: {len(e.data)} bytes exceeds "
                                        f"ENTRY_SIZE_BYTES_MAX={ENTRY_SIZE_BYTES_MAX}")
                if not 0 <= int(e.kind) <= 255:
                    raise LogStoreError(f"entry {e.index}: kind {int(e.kind)} does not fit in one byte")
            for prev, cur in itertools.pairwise(entries):
                if cur.index != prev.index + 1:
                    raise LogStoreError(f"entries not contiguous: {prev.index} then {cur.index}")
                if cur.term < prev.term:
                    raise LogStoreError(f"entry terms go back: {prev.term} at {prev.index}, {cur.term} at {cur.index}")
            if lo - 1 > floor and lo - 1 <= last:
                prev_term = self._term[lo - 1 - self._first_index]
                if entries[0].term < prev_term:
                    raise LogStoreError(f"entry {lo} term {entries[0].term} below its predecessor's {prev_term}")
            if lo <= last and lo <= committed:
                raise LogStoreError(f"append at {lo} would overwrite committed entries (commit {committed})")
            last = entries[-1].index
        if hard_state is not None:
            if hard_state.term < self._hard_state.term:
                raise LogStoreError(f"hard state term goes back: {self._hard_state.term} -> {hard_state.term}")
            if hard_state.commit > last:
                raise LogStoreError(f"hard state commit {hard_state.commit} past last index {last}")
        # checked: now write, in an order that leaves a valid store after a crash between any two steps
        if hard_state is not None and (hard_state.term != self._hard_state.term
                                       or hard_state.vote != self._hard_state.vote):
            self._put_hard_state(hard_state)            # a term's entries never reach disk before the term
        if snapshot is not None:
            self._install_snapshot(snap_meta, snapshot[1], keeps_log, keep_from)
        if entries or (hard_state is not None and hard_state.commit > self._durable_commit):
            self._write_records(entries, hard_state.commit if hard_state is not None else None, None)
        if hard_state is not None:
            merged = _msg.HardState(term=hard_state.term, vote=hard_state.vote,
                                    commit=max(hard_state.commit, self._hard_state.commit))
            self._hard_state = merged
        if self._deferred_hard_state is not None and self._hard_state.commit >= self._deferred_hard_state.commit:
            self._deferred_hard_state = None
        assert self._hard_state.commit <= self.last_index
        assert self._first_index <= self.last_index + 1

    def _holds(self, index: int, term: int) -> bool:
        return self._first_index <= index <= self.last_index and self._term[index - self._first_index] == term

    def _put_hard_state(self, hard_state: Any) -> None:
        # never a commit past what the segments hold: the entries of this save are written after it
        commit = min(hard_state.commit, self._durable_commit)
        stored = _msg.HardState(term=hard_state.term, vote=hard_state.vote, commit=commit)
        with self._env.begin(write=True) as txn:
            txn.put(_KEY_HARD_STATE, _wrap(self._hs_encoder.encode(stored)), db=self._state)

    def _install_snapshot(self, meta: Any, data: bytes | SnapshotFile, keeps_log: bool,
                          keep_from: int | None = None) -> None:
        """Raft §7: keep the log after meta.index only if it holds meta.index with meta.term; otherwise the
        whole log goes (a TRUNCATE record, synced, before the snapshot that replaces it is committed). When it
        is kept, so are the entries from ``keep_from`` (at most meta.index) on."""
        first = meta.index + 1
        if keeps_log and keep_from is not None:
            first = max(min(keep_from, meta.index + 1), self._first_index)
        if not keeps_log:
            cut = max(self._hard_state.commit, self._first_index - 1) + 1   # committed entries never go
            if self._term and cut <= self.last_index:
                self._write_records([], None, cut)
        moved_to = None
        if isinstance(data, SnapshotFile):
            name = f"snapshot-{meta.index}-{meta.term}.bin"
            moved_to = os.path.join(self.path, name)
            os.replace(data.path, moved_to)          # the bytes are durable already: move them in
            _fsync_dir(self.path)
            value = _wrap(SNAPSHOT_FILE_MAGIC + msgspec.msgpack.encode([name, data.size, data.crc32]))
        else:
            value = _wrap(bytes(data))
        hs = self._hard_state
        new_hs = None
        if hs.commit < meta.index:                    # a snapshot is committed state by definition
            new_hs = _msg.HardState(term=hs.term, vote=hs.vote, commit=meta.index)
        try:
            with self._env.begin(write=True) as txn:
                txn.put(_KEY_SNAPSHOT_META, _wrap(self._hs_encoder.encode(meta)), db=self._state)
                txn.put(_KEY_SNAPSHOT_DATA, value, db=self._snapshot)
                txn.put(_KEY_LOG_FIRST, _wrap(_INDEX_KEY.pack(first)), db=self._state)
                if new_hs is not None:
                    txn.put(_KEY_HARD_STATE, _wrap(self._hs_encoder.encode(new_hs)), db=self._state)
        except lmdb.MapFullError as exc:
            raise LogStoreError(f"log store full: raise map_size_bytes (now {self._env.info()['map_size']})"
                                ) from exc
        self._snapshot_meta = meta
        self._log_first = first
        self._snap_index, self._snap_term = meta.index, meta.term
        if new_hs is not None:
            self._hard_state = new_hs
            self._durable_commit = max(self._durable_commit, meta.index)
        if not keeps_log:
            self._drop_from(self._first_index)
            self._first_index = meta.index + 1
        self._drop_prefix_to(first - 1)
        self._snapshot_file = moved_to
        self._remove_unreferenced_snapshot_files()
        self._remove_compacted_segments()

    def save_snapshot(self, meta: Any, data: bytes | SnapshotFile, *, keep_from: int | None = None) -> None:
        """The replica's own snapshot (its log holds meta.index with meta.term): saved, and the log prefix
        it covers dropped (whole segments below it are deleted; no record is written for it) -- but for the
        entries from ``keep_from`` on (at most meta.index), kept for followers a little behind."""
        self.save(snapshot=(meta, data), keep_from=keep_from)

    def truncate_suffix(self, from_index: int) -> None:
        """Drop entries with index >= from_index (a conflicting suffix). Committed entries are never dropped."""
        if from_index > self.last_index:
            return
        if from_index <= self._commit_known:
            raise LogStoreError(f"truncate from {from_index} would drop committed entries (commit "
                                f"{self._commit_known})")
        if from_index < self._first_index:
            raise LogStoreError(f"truncate from {from_index} is below first index {self._first_index}")
        deferred = self._deferred_hard_state
        self._write_records([], deferred.commit if deferred is not None else None, from_index)
        if deferred is not None:                   # it rode along with this durable write
            self._hard_state, self._deferred_hard_state = deferred, None

    def compact(self, upto_index: int) -> None:
        """Drop entries with index <= upto_index; they must be covered by the saved snapshot. Costs no write:
        the index forgets them and segments holding nothing newer are deleted."""
        if upto_index > self._snap_index:
            raise LogStoreError(f"compact up to {upto_index} past the snapshot index {self._snap_index}")
        self._drop_prefix_to(upto_index)
        self._remove_compacted_segments()

    def _drop_prefix_to(self, upto_index: int) -> None:
        if upto_index < self._first_index:
            return
        n = min(upto_index - self._first_index + 1, len(self._term))
        del self._seg[:n], self._off[:n], self._term[:n], self._len[:n]
        self._first_index = upto_index + 1

    def _remove_compacted_segments(self) -> None:
        """Delete the oldest segments while every entry in them is below first_index (never the active one).
        Only from the oldest on: a TRUNCATE record must not outlive the records it cancels."""
        while self._segments:
            seg = next(iter(self._segments.values()))
            if seg is self._active or seg.max_index >= self._first_index:
                return
            del self._segments[seg.seq]
            os.close(seg.fd)
            if self._spares is not None:
                self._spares.discard(seg.path)    # freeing 64 MiB of extents: not on this thread
            else:
                os.unlink(seg.path)
            self.segments_removed += 1

    def sync_now(self) -> None:
        """Force everything to disk (useful when opened with sync=False)."""
        if self._active is not None:
            os.fdatasync(self._active.fd)
        self._env.sync(True)

    def defer_commit(self, hard_state: Any) -> None:
        """A hard state that differs from the durable one only in ``commit``: keep it in memory and write it
        with the next durable write (or at close) instead of paying an fsync for it now. Raft does not need
        the commit index durable: after a crash it is learned again from the leader (etcd's MustSync rule);
        a lower stored commit only makes the store's own checks looser, never wrong."""
        hs = self._hard_state
        if hard_state.term != hs.term or hard_state.vote != hs.vote:
            raise LogStoreError("only a commit-index change may be deferred; term and vote are written durably")
        if hard_state.commit > self.last_index:
            raise LogStoreError(f"hard state commit {hard_state.commit} past last index {self.last_index}")
        if hard_state.commit > hs.commit:
            self._deferred_hard_state = hard_state

    @property
    def _commit_known(self) -> int:
        """The commit index this store has been told, durable or deferred: nothing at or below it is dropped."""
        deferred = self._deferred_hard_state
        return max(self._hard_state.commit, deferred.commit if deferred is not None else 0)

    @property
    def commit_deferred(self) -> bool:
        return self._deferred_hard_state is not None

    def close(self) -> None:
        if self._deferred_hard_state is not None:
            try:
                self._write_records([], self._deferred_hard_state.commit, None)
                self._hard_state, self._deferred_hard_state = self._deferred_hard_state, None
            except OSError:
                pass        # best effort: the commit index is relearned from the leader
        self._close_files()

    def _close_files(self) -> None:
        if self._spares is not None:
            self._spares.close()
            self._spares = None
        for seg in self._segments.values():
            os.close(seg.fd)
        self._segments.clear()
        self._active = None
        self._env.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- segment writes ------------------------------------------------------------------------------
    def _write_records(self, entries: list[Any], commit: int | None, truncate_from: int | None) -> None:
        """Append records (a TRUNCATE, then entries, then a COMMIT), in one pwritev series and one
        fdatasync, to the active segment (rolling to a new one when they do not fit); then update the index."""
        bufs: list[bytes | memoryview] = []
        small = bytearray()
        size = 0
        if truncate_from is not None:
            small += _record(REC_TRUNCATE, 0, truncate_from, 0)
        offsets = []
        for e in entries:
            data = e.data
            offsets.append(size + len(small))
            small += _record(REC_ENTRY, int(e.kind), e.index, e.term, data)
            if len(data) < _COALESCE_BYTES:
                small += data
            else:
                bufs.append(bytes(small))
                size += len(small)
                small = bytearray()
                bufs.append(data)
                size += len(data)
        new_commit = commit if commit is not None and commit > self._durable_commit else None
        if new_commit is not None:
            small += _record(REC_COMMIT, 0, new_commit, 0)
        if small:
            bufs.append(bytes(small))
            size += len(small)
        if not bufs:
            return
        seg = self._active
        if seg is None or (seg.end + size > self.segment_bytes and seg.end > SEGMENT_HEADER.size):
            seg = self._roll(size)
        elif seg.fallocated and self._spares is not None and self._spares.has_ready:
            seg = self._roll(size)             # leave a fallocated segment as soon as a spare is ready
        base = seg.end
        if len(bufs) > _WRITE_BUFFERS_MAX:       # one syscall per save: a kill cuts it at a page boundary
            bufs = [b"".join(bufs)]
        wrote = os.pwritev(seg.fd, bufs, base)
        if wrote != size:                        # a short write to a regular file: only on a full disk
            raise OSError(f"segment {os.path.basename(seg.path)}: wrote {wrote} of {size} bytes")
        if self.sync:
            os.fdatasync(seg.fd)
        seg.end = base + size
        self.bytes_written += size
        # durable: update the index
        if truncate_from is not None:
            self._drop_from(truncate_from)
        for e, off in zip(entries, offsets):
            self._index_entry(e.index, e.term, seg, base + off, len(e.data))
        if new_commit is not None:
            self._durable_commit = new_commit

    def _roll(self, need: int) -> _Segment:
        """Start a new segment (preallocated, header synced, directory entry synced); the COMMIT record
        of the durable commit opens it, so deleting older segments never loses the commit index."""
        seq = self._next_seq
        self._next_seq += 1
        path = os.path.join(self.path, f"log-{seq:016x}.seg")
        head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, seq) + _record(REC_COMMIT, 0, self._durable_commit, 0)
        spare = None
        if self._spares is not None and len(head) + need <= self.segment_bytes:
            spare = self._spares.take(0.0 if self._rolled else FIRST_ROLL_WAIT_S)
        self._rolled = True
        if spare is not None:
            os.rename(spare, path)               # durable with the directory sync below
            fd = os.open(path, os.O_RDWR)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if spare is None:
                try:
                    os.posix_fallocate(fd, 0, max(self.segment_bytes, len(head) + need))
                except OSError:
                    pass                         # a filesystem without fallocate: the file just grows
            os.pwrite(fd, head, 0)
            if self.sync:
                os.fdatasync(fd)
                _fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        seg = _Segment(seq, path, fd, len(head))
        seg.fallocated = spare is None and self._spares is not None
        if seg.fallocated:
            self.segments_fallocated += 1
        self._segments[seq] = seg
        self._active = seg
        self._remove_compacted_segments()
        return seg


def _no_vote() -> Any:
    """The 'no vote' value of HardState.vote: the struct's own default if it has one, else 0."""
    for field in msgspec.structs.fields(_msg.HardState):
        if field.name == "vote" and field.default is not msgspec.NODEFAULT:
            return field.default
    return 0

