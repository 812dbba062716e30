"""Durable Raft storage on LMDB: log entries, hard state and the latest snapshot.

One LMDB environment per replica (``<data_dir>/``) with three named databases:

``entries``   key = big-endian u64 index (so LMDB's byte order is log order),
              value = ``ENTRY_HEADER`` (crc32, term, kind, data length) followed by the raw payload.
              The crc32 covers the index, the header fields and the payload; it is verified on every
              read, so a flipped bit or a record moved under the wrong key is a ``LogCorruption`` error,
              never a silently wrong entry handed to the core.
``state``     ``hard_state`` and ``snapshot_meta`` (msgpack of the core's structs, with a crc32 prefix).
``snapshot``  the state machine's snapshot bytes for ``snapshot_meta`` (one value; LMDB stores it on
              overflow pages), with a crc32 prefix.

Durability: every mutating call is ONE write transaction. With ``sync=True`` (the default) LMDB
fsyncs the data and the meta page before ``commit`` returns, so when a method returns the change is
on disk; LMDB's copy-on-write B+tree with two alternating meta pages makes a transaction all or
nothing across a kill -9 or a power cut. ``save(hard_state=..., entries=...)`` writes what one
``Ready`` asks for in one transaction, so the driver pays one fsync per Ready (group commit).

Invariants kept (and asserted): entries are contiguous from ``first_index`` to ``last_index``; the
entry just before ``first_index`` is covered by the snapshot (``first_index == 1`` or
``first_index <= snapshot.index + 1``); ``hard_state.commit <= last_index``.
"""
from __future__ import annotations

import glob
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import lmdb
import msgspec

from engine.raft import messages as _msg

# --- named limits -----------------------------------------------------------------------------------
MAP_SIZE_BYTES_DEFAULT = 64 << 30        # sparse file: only pages written occupy disk
ENTRY_SIZE_BYTES_MAX = 64 << 20          # one entry's payload; the ledger's largest batch is ~1 MiB
SNAPSHOT_SIZE_BYTES_MAX = 8 << 30        # one snapshot value in LMDB
APPEND_BATCH_ENTRIES_MAX = 1 << 16       # entries in one save() call (bounds one write transaction)
COMPACT_STEP_ENTRIES = 256               # compact_later(): entries deleted per write transaction
READ_BATCH_BYTES_DEFAULT = 64 << 20      # entries(lo, hi, size_bytes_max=...) default

# crc32 (u32), term (u64), kind (u8), data length (u32); little-endian, no padding.
ENTRY_HEADER = struct.Struct("<IQBI")
_INDEX_KEY = struct.Struct(">Q")
_CRC = struct.Struct("<I")

_KEY_HARD_STATE = b"hard_state"
_KEY_SNAPSHOT_META = b"snapshot_meta"
_KEY_SNAPSHOT_DATA = b"snapshot_data"


class LogStoreError(Exception):
    """Misuse of the store (non-contiguous append, compaction past the snapshot, ...)."""


class LogCorruption(LogStoreError):
    """Bytes on disk fail their checksum or break a log invariant; the replica must not start on them."""


def _index_key(index: int) -> bytes:
    return _INDEX_KEY.pack(index)


def _entry_crc(index: int, term: int, kind: int, data: bytes | memoryview) -> int:
    head = struct.pack("<QQB", index, term, kind)
    return zlib.crc32(data, zlib.crc32(head))


def encode_entry_value(entry: Any) -> list[bytes | memoryview]:
    """The stored value of ``entry`` as parts (header, payload) to avoid concatenating big payloads."""
    data = entry.data
    size = len(data)
    if size > ENTRY_SIZE_BYTES_MAX:
        raise LogStoreError(f"entry {entry.index}: {size} bytes exceeds ENTRY_SIZE_BYTES_MAX={ENTRY_SIZE_BYTES_MAX}")
    kind = int(entry.kind)
    if not 0 <= kind <= 255:
        raise LogStoreError(f"entry {entry.index}: kind {kind} does not fit in one byte")
    crc = _entry_crc(entry.index, entry.term, kind, data)
    return [ENTRY_HEADER.pack(crc, entry.term, kind, size), data]


def decode_entry_value(index: int, value: bytes | memoryview) -> Any:
    """Verify and decode one stored entry; raises LogCorruption on any mismatch."""
    if len(value) < ENTRY_HEADER.size:
        raise LogCorruption(f"entry {index}: stored value of {len(value)} bytes is shorter than its header")
    crc, term, kind, size = ENTRY_HEADER.unpack_from(value, 0)
    data = bytes(value[ENTRY_HEADER.size:])
    if len(data) != size:
        raise LogCorruption(f"entry {index}: header says {size} payload bytes, found {len(data)}")
    if _entry_crc(index, term, kind, data) != crc:
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


class LogStore:
    """The replica's durable Raft state. Not thread-safe: one thread (the driver's) owns it."""

    def __init__(self, path: str | os.PathLike[str], *, sync: bool = True,
                 map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT) -> None:
        if map_size_bytes < (1 << 20):
            raise ValueError(f"map_size_bytes={map_size_bytes} is below 1 MiB")
        self.path = os.fspath(path)
        self.sync = sync
        os.makedirs(self.path, exist_ok=True)
        # metasync/sync follow `sync`; readahead off: the log is read mostly at its tail.
        self._env = lmdb.open(self.path, map_size=map_size_bytes, max_dbs=4, sync=sync, metasync=sync,
                              readahead=False, lock=True, subdir=True)
        self._entries = self._env.open_db(b"entries")
        self._state = self._env.open_db(b"state")
        self._snapshot = self._env.open_db(b"snapshot")
        self._hs_encoder = msgspec.msgpack.Encoder()
        self._hs_decoder = msgspec.msgpack.Decoder(_msg.HardState)
        self._meta_decoder = msgspec.msgpack.Decoder(_msg.SnapshotMeta)
        # Cached from disk and kept in step with every committed write transaction.
        self._hard_state: Any = None
        self._deferred_hard_state: Any = None      # a commit-only change not yet written (defer_commit)
        self._snapshot_meta: Any = None
        self._first_index = 1
        self._last_index = 0
        self._last_term = 0
        self._snapshot_file: str | None = None
        self._compact_target = 0                   # compact_later(): drop entries <= this, a step per save
        self._load_and_verify_bounds()
        self._snapshot_file = self._referenced_snapshot_file()
        self._remove_unreferenced_snapshot_files()

    # --- recovery ------------------------------------------------------------------------------------
    def _load_and_verify_bounds(self) -> None:
        with self._env.begin(buffers=True) as txn:
            raw = txn.get(_KEY_HARD_STATE, db=self._state)
            self._hard_state = (self._hs_decoder.decode(_unwrap("hard state", raw)) if raw is not None
                                else _msg.HardState(term=0, vote=_no_vote(), commit=0))
            raw = txn.get(_KEY_SNAPSHOT_META, db=self._state)
            self._snapshot_meta = (self._meta_decoder.decode(_unwrap("snapshot meta", raw))
                                   if raw is not None else None)
            cursor = txn.cursor(db=self._entries)
            snap_index = self._snapshot_meta.index if self._snapshot_meta is not None else 0
            snap_term = self._snapshot_meta.term if self._snapshot_meta is not None else 0
            if cursor.first():
                first = _INDEX_KEY.unpack(cursor.key())[0]
                cursor.last()
                last = _INDEX_KEY.unpack(cursor.key())[0]
                tail = decode_entry_value(last, cursor.value())
                count = txn.stat(self._entries)["entries"]
                if count != last - first + 1:
                    raise LogCorruption(f"log has {count} entries between {first} and {last}: not contiguous")
                if first > snap_index + 1:
                    raise LogCorruption(f"log starts at {first} but the snapshot covers only up to {snap_index}")
                self._first_index, self._last_index = first, last
                self._last_term = tail.term
                if last < snap_index:  # the snapshot covers the whole log
                    self._first_index, self._last_index, self._last_term = snap_index + 1, snap_index, snap_term
            else:
                self._first_index, self._last_index, self._last_term = snap_index + 1, snap_index, snap_term
        commit = self._hard_state.commit
        if commit > self._last_index:
            raise LogCorruption(f"hard state commit {commit} is past the last stored index {self._last_index}")
        if self._snapshot_meta is not None:       # a prefix compact_later() had not finished deleting
            self._compact_target = self._snapshot_meta.index

    def initial_state(self) -> tuple[Any, Any, list[Any]]:
        """(hard_state, snapshot_meta or None, entries after the snapshot) -- what RaftCore starts from."""
        snap_index = self._snapshot_meta.index if self._snapshot_meta is not None else 0
        lo = max(self._first_index, snap_index + 1)
        entries = self.entries(lo, self._last_index + 1, size_bytes_max=None)
        return self._hard_state, self._snapshot_meta, entries

    # --- reads ---------------------------------------------------------------------------------------
    @property
    def first_index(self) -> int:
        return self._first_index

    @property
    def last_index(self) -> int:
        return self._last_index

    @property
    def last_term(self) -> int:
        return self._last_term

    @property
    def hard_state(self) -> Any:
        return self._hard_state

    @property
    def snapshot_meta(self) -> Any:
        return self._snapshot_meta

    def entries(self, lo: int, hi: int, *, size_bytes_max: int | None = READ_BATCH_BYTES_DEFAULT) -> list[Any]:
        """Entries with lo <= index < hi (checksums verified). With size_bytes_max, stops once the payloads
        reach that many bytes (always returns at least one entry when the range is non-empty)."""
        if lo < self._first_index or hi > self._last_index + 1 or lo > hi:
            raise LogStoreError(f"entries [{lo}, {hi}) outside the stored log [{self._first_index}, "
                                f"{self._last_index + 1})")
        out: list[Any] = []
        if lo == hi:
            return out
        total = 0
        with self._env.begin(db=self._entries, buffers=True) as txn:
            cursor = txn.cursor()
            if not cursor.set_key(_index_key(lo)):
                raise LogCorruption(f"entry {lo} missing inside the stored log")
            expected = lo
            for key, value in cursor:
                index = _INDEX_KEY.unpack(key)[0]
                if index >= hi:
                    break
                if index != expected:
                    raise LogCorruption(f"entry {expected} missing (next stored is {index})")
                entry = decode_entry_value(index, value)
                out.append(entry)
                expected += 1
                total += len(entry.data)
                if size_bytes_max is not None and total >= size_bytes_max:
                    break
        if size_bytes_max is None and len(out) != hi - lo:
            raise LogCorruption(f"entries [{lo}, {hi}): found only {len(out)}")
        return out

    def term(self, index: int) -> int:
        """The term of the entry at index (the snapshot's term at its index; 0 at index 0)."""
        if self._snapshot_meta is not None and index == self._snapshot_meta.index:
            return self._snapshot_meta.term
        if index == 0:
            return 0
        return self.entries(index, index + 1)[0].term

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
                try:
                    os.unlink(f)
                except FileNotFoundError:
                    pass

    # --- writes --------------------------------------------------------------------------------------
    def append(self, entries: Sequence[Any]) -> None:
        self.save(entries=entries)

    def set_hard_state(self, hard_state: Any) -> None:
        self.save(hard_state=hard_state)

    def save(self, *, hard_state: Any = None, entries: Sequence[Any] = (), snapshot: tuple[Any, bytes] | None = None,
             defer_prefix: bool = False) -> None:
        """Persist what one Ready asks for, in ONE write transaction (one fsync when sync=True).

        Order inside the transaction: snapshot (replaces the log prefix it covers), then entries (an
        append starting at or below last_index first drops the conflicting suffix), then hard state.
        ``defer_prefix``: a snapshot that keeps the log's suffix leaves the prefix it covers to
        ``compact_later`` instead of deleting it in this transaction (the replica's own snapshots).
        Raises LogStoreError and changes nothing when the request breaks a log invariant."""
        entries = list(entries)
        if hard_state is None and self._deferred_hard_state is not None and (entries or snapshot is not None):
            hard_state = self._deferred_hard_state       # rides along with the next durable write
        if len(entries) > APPEND_BATCH_ENTRIES_MAX:
            raise LogStoreError(f"{len(entries)} entries in one save: APPEND_BATCH_ENTRIES_MAX={APPEND_BATCH_ENTRIES_MAX}")
        first, last, last_term = self._first_index, self._last_index, self._last_term
        snap_meta = self._snapshot_meta
        snap_value = None
        moved_to = None
        if snapshot is not None:
            snap_meta, snap_data = snapshot
            size = snap_data.size if isinstance(snap_data, SnapshotFile) else len(snap_data)
            if size > SNAPSHOT_SIZE_BYTES_MAX:
                raise LogStoreError(f"snapshot of {size} bytes: SNAPSHOT_SIZE_BYTES_MAX={SNAPSHOT_SIZE_BYTES_MAX}")
            if self._snapshot_meta is not None and snap_meta.index < self._snapshot_meta.index:
                raise LogStoreError(f"snapshot at {snap_meta.index} is older than the stored one at "
                                    f"{self._snapshot_meta.index}")
            if isinstance(snap_data, SnapshotFile):
                name = f"snapshot-{snap_meta.index}-{snap_meta.term}.bin"
                moved_to = os.path.join(self.path, name)
                os.replace(snap_data.path, moved_to)          # the bytes are durable already: move them in
                _fsync_dir(self.path)
                snap_value = _wrap(SNAPSHOT_FILE_MAGIC + msgspec.msgpack.encode([name, snap_data.size,
                                                                                 snap_data.crc32]))
            else:
                snap_value = _wrap(bytes(snap_data))
        values: list[tuple[bytes, bytes]] = []
        if entries:
            lo = entries[0].index
            floor = snap_meta.index if snap_meta is not None else 0
            if lo <= floor:
                raise LogStoreError(f"append at {lo} is not above the snapshot index {floor}")
            for prev, cur in zip(entries, entries[1:]):
                if cur.index != prev.index + 1:
                    raise LogStoreError(f"entries not contiguous: {prev.index} then {cur.index}")
                if cur.term < prev.term:
                    raise LogStoreError(f"entry terms go back: {prev.term} at {prev.index}, {cur.term} at {cur.index}")
            for entry in entries:
                header, data = encode_entry_value(entry)
                values.append((_index_key(entry.index), b"".join((header, data))))
        if hard_state is not None:
            if hard_state.term < self._hard_state.term:
                raise LogStoreError(f"hard state term goes back: {self._hard_state.term} -> {hard_state.term}")
        self._pending_hard_state = None
        try:
            first, last, last_term, snap_meta = self._save_txn(hard_state, entries, values, snapshot, snap_meta,
                                                               snap_value, first, last, last_term, defer_prefix)
        except lmdb.MapFullError as exc:
            raise LogStoreError(f"log store full: raise map_size_bytes (now {self._env.info()['map_size']})"
                                ) from exc
        # committed (and fsynced when sync=True): update the cache
        self._first_index, self._last_index, self._last_term = first, last, last_term
        self._snapshot_meta = snap_meta
        if snapshot is not None:
            self._snapshot_file = moved_to if isinstance(snapshot[1], SnapshotFile) else None
            self._remove_unreferenced_snapshot_files()
        if hard_state is not None:
            self._hard_state = hard_state
        elif self._pending_hard_state is not None:
            self._hard_state = self._pending_hard_state
        self._pending_hard_state = None
        if self._deferred_hard_state is not None and self._hard_state.commit >= self._deferred_hard_state.commit:
            self._deferred_hard_state = None
        assert self._hard_state.commit <= self._last_index
        assert self._first_index <= self._last_index + 1

    def _save_txn(self, hard_state: Any, entries: list[Any], values: list[tuple[bytes, bytes]],
                  snapshot: Any, snap_meta: Any, snap_value: Any, first: int, last: int, last_term: int,
                  defer_prefix: bool = False) -> tuple[int, int, int, Any]:
        with self._env.begin(write=True) as txn:
            if snapshot is not None:
                first, last, last_term = self._install_snapshot_txn(txn, snap_meta, snap_value, first, last,
                                                                    defer_prefix)
            if entries:
                lo = entries[0].index
                if lo > last + 1:
                    raise LogStoreError(f"append at {lo} leaves a gap after last index {last}")
                if lo > first and lo - 1 <= last:
                    prev_term = self._term_in_txn(txn, lo - 1, snap_meta)
                    if entries[0].term < prev_term:
                        raise LogStoreError(f"entry {lo} term {entries[0].term} below its predecessor's {prev_term}")
                committed = max(self._hard_state.commit, snap_meta.index if snap_meta is not None else 0)
                if lo <= last and lo <= committed:
                    raise LogStoreError(f"append at {lo} would overwrite committed entries (commit {committed})")
                if lo <= last:  # conflicting suffix: drop [lo, last]
                    self._delete_range_txn(txn, lo, last)
                put = txn.put
                for key, value in values:
                    put(key, value, db=self._entries)
                last, last_term = entries[-1].index, entries[-1].term
                if first > lo:
                    first = lo
            if hard_state is not None:
                if hard_state.commit > last:
                    raise LogStoreError(f"hard state commit {hard_state.commit} past last index {last}")
                txn.put(_KEY_HARD_STATE, _wrap(self._hs_encoder.encode(hard_state)), db=self._state)
            elif self._hard_state.commit > last:
                raise LogStoreError(f"truncating to {last} would drop committed entries up to {self._hard_state.commit}")
            floor = snap_meta.index if snap_meta is not None else 0
            step_to = min(self._compact_target, floor, last, first + COMPACT_STEP_ENTRIES - 1)
            if step_to >= first:                  # a step of compact_later(), in the same transaction
                self._delete_range_txn(txn, first, step_to)
                first = step_to + 1
        return first, last, last_term, snap_meta

    def save_snapshot(self, meta: Any, data: "bytes | SnapshotFile") -> None:
        """The replica's own snapshot (its log holds meta.index with meta.term): the prefix it covers is
        deleted a step at a time by later saves (``compact_later``), not all in this transaction."""
        self.save(snapshot=(meta, data), defer_prefix=True)
        self.compact_later(meta.index)

    def truncate_suffix(self, from_index: int) -> None:
        """Drop entries with index >= from_index (a conflicting suffix). Committed entries are never dropped."""
        if from_index > self._last_index:
            return
        if from_index <= self._hard_state.commit:
            raise LogStoreError(f"truncate from {from_index} would drop committed entries (commit "
                                f"{self._hard_state.commit})")
        if from_index < self._first_index:
            raise LogStoreError(f"truncate from {from_index} is below first index {self._first_index}")
        with self._env.begin(write=True) as txn:
            self._delete_range_txn(txn, from_index, self._last_index)
            new_last = from_index - 1
            new_term = self._term_in_txn(txn, new_last, self._snapshot_meta)
        self._last_index, self._last_term = new_last, new_term

    def compact(self, upto_index: int) -> None:
        """Drop entries with index <= upto_index; they must be covered by the saved snapshot."""
        snap_index = self._snapshot_meta.index if self._snapshot_meta is not None else 0
        if upto_index > snap_index:
            raise LogStoreError(f"compact up to {upto_index} past the snapshot index {snap_index}")
        if upto_index < self._first_index:
            return
        with self._env.begin(write=True) as txn:
            self._delete_range_txn(txn, self._first_index, min(upto_index, self._last_index))
        self._first_index = upto_index + 1
        if self._last_index < upto_index:
            self._last_index = upto_index
        assert self._first_index <= self._last_index + 1

    def compact_later(self, upto_index: int) -> None:
        """Like ``compact`` but spread out: each later write transaction that has other work (``save`` with
        entries, a hard state or a snapshot) also deletes up to COMPACT_STEP_ENTRIES of the entries <=
        upto_index, so no fsync is added and no transaction grows large. Deleting a whole compacted prefix
        at once (20,000 entries of up to 1 MiB) held the Raft thread for 30-190 ms after each snapshot.
        The entries waiting to go are below the snapshot: keeping them a while longer is harmless."""
        snap_index = self._snapshot_meta.index if self._snapshot_meta is not None else 0
        if upto_index > snap_index:
            raise LogStoreError(f"compact up to {upto_index} past the snapshot index {snap_index}")
        self._compact_target = max(self._compact_target, upto_index)

    @property
    def compact_pending(self) -> int:
        """Entries still waiting for ``compact_later`` to delete them."""
        return max(0, min(self._compact_target, self._last_index) - self._first_index + 1)

    def sync_now(self) -> None:
        """Force an fsync (useful when opened with sync=False)."""
        self._env.sync(True)

    def defer_commit(self, hard_state: Any) -> None:
        """A hard state that differs from the durable one only in ``commit``: keep it in memory and write it
        with the next durable write (or at close) instead of paying an fsync for it now. Raft does not need
        the commit index durable: after a crash it is learned again from the leader (etcd's MustSync rule);
        a lower stored commit only makes the store's own checks looser, never wrong."""
        hs = self._hard_state
        if hard_state.term != hs.term or hard_state.vote != hs.vote:
            raise LogStoreError("only a commit-index change may be deferred; term and vote are written durably")
        if hard_state.commit > self._last_index:
            raise LogStoreError(f"hard state commit {hard_state.commit} past last index {self._last_index}")
        if hard_state.commit > hs.commit:
            self._deferred_hard_state = hard_state

    @property
    def commit_deferred(self) -> bool:
        return self._deferred_hard_state is not None

    def close(self) -> None:
        if self._deferred_hard_state is not None:
            try:
                with self._env.begin(write=True) as txn:
                    txn.put(_KEY_HARD_STATE, _wrap(self._hs_encoder.encode(self._deferred_hard_state)),
                            db=self._state)
                self._hard_state, self._deferred_hard_state = self._deferred_hard_state, None
            except lmdb.Error:
                pass        # best effort: the commit index is relearned from the leader
        self._env.close()

    def __enter__(self) -> "LogStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers inside a write transaction ----------------------------------------------------------
    def _install_snapshot_txn(self, txn: lmdb.Transaction, meta: Any, value: bytes, first: int, last: int,
                              defer_prefix: bool = False) -> tuple[int, int, int]:
        """Raft §7: keep the log suffix after meta.index only if the entry at meta.index has meta.term;
        otherwise discard the whole log. Entries <= meta.index are dropped: here, or with ``defer_prefix``
        and a kept suffix, later by ``compact_later`` (returning the unchanged first index)."""
        keep_suffix = False
        if first <= meta.index <= last:
            raw = txn.get(_index_key(meta.index), db=self._entries)
            keep_suffix = raw is not None and decode_entry_value(meta.index, raw).term == meta.term
        if keep_suffix:
            new_first = first if defer_prefix else meta.index + 1
            if not defer_prefix:
                self._delete_range_txn(txn, first, meta.index)
            new_last = last
            new_last_term = self._last_term
        else:
            if last >= first:
                self._delete_range_txn(txn, first, last)
            new_last, new_last_term = meta.index, meta.term
            new_first = meta.index + 1
        txn.put(_KEY_SNAPSHOT_META, _wrap(self._hs_encoder.encode(meta)), db=self._state)
        txn.put(_KEY_SNAPSHOT_DATA, value, db=self._snapshot)
        if self._hard_state.commit < meta.index:
            # a snapshot is committed state by definition; keep commit <= last index consistent
            hs = self._hard_state
            new_hs = _msg.HardState(term=hs.term, vote=hs.vote, commit=meta.index)
            txn.put(_KEY_HARD_STATE, _wrap(self._hs_encoder.encode(new_hs)), db=self._state)
            self._pending_hard_state = new_hs
        return new_first, new_last, new_last_term

    def _term_in_txn(self, txn: lmdb.Transaction, index: int, snap_meta: Any) -> int:
        if snap_meta is not None and index == snap_meta.index:
            return snap_meta.term
        if index == 0:
            return 0
        raw = txn.get(_index_key(index), db=self._entries)
        if raw is None:
            raise LogCorruption(f"entry {index} missing")
        return decode_entry_value(index, raw).term

    def _delete_range_txn(self, txn: lmdb.Transaction, lo: int, hi: int) -> None:
        """Delete entries lo..hi inclusive."""
        if hi < lo:
            return
        cursor = txn.cursor(db=self._entries)
        if not cursor.set_range(_index_key(lo)):
            return
        hi_key = _index_key(hi)
        while True:
            key = cursor.key()
            if not key or key > hi_key:
                break
            if not cursor.delete():
                break


def _no_vote() -> Any:
    """The 'no vote' value of HardState.vote: the struct's own default if it has one, else 0."""
    for field in msgspec.structs.fields(_msg.HardState):
        if field.name == "vote" and field.default is not msgspec.NODEFAULT:
            return field.default
    return 0

