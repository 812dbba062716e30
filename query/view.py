"""The account view: every version of every account, as fixed-size records, and the lookups over them.

Layout in LMDB (one environment, ``query/projector.py`` writes it):

- ``versions``: key ``shard (u16 BE) + first_seq (u64 BE)`` -> a chunk of ``VERSION_DTYPE`` records in
  (seq, idx) order, at most ``CHUNK_RECORDS_MAX`` records and never splitting a seq. One record per
  (account, seq): the account as it was after that seq. Chunks are appended in seq order (cheap B-tree
  appends, no random writes per event).
- ``sparse``: key ``account_id (u128 BE) + seq (u64 BE)`` -> ``idx (u32 BE)``: every ``SPARSE_EVERY``-th
  version of an account (version % SPARSE_EVERY == 1), so that a point-in-time lookup walks at most
  ``SPARSE_EVERY`` ``prev`` links back from the next sparse entry.
- ``seqtime``: key ``shard (u16 BE) + timestamp (u64 BE)`` -> the greatest seq with that timestamp (u64):
  the time -> seq map of point-in-time and time-range queries.
- ``meta``: the last applied seq per shard (``last_seq/<shard>``), the account table snapshot.

Each version record carries a ``prev_seq``/``prev_idx`` link to the account's previous version, so history
and point-in-time answers walk an account's own versions only. The *current* version of every account is in
memory (``AccountTable``, sorted by account id; snapshotted into ``meta`` now and then and rebuilt from the
chunks after it on open).

Money fields are int64 in the view (events carry 128-bit values): an event whose values do not fit is refused
with ``ViewRangeError`` (the projector stops with that error), never wrapped.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import lmdb
import numpy as np

from engine.records import Kind, State

CHUNK_RECORDS_MAX = 8192          # version records in one LMDB value (bounds a lookup's decode)
SPARSE_EVERY = 32                 # one sparse index entry per this many versions of an account
HISTORY_LIMIT_MAX = 10_000        # records in one history page

_U128 = ("<u8", (2,))
VERSION_DTYPE = np.dtype([        # words 0-7 and 13-15 in the event record's order (copied as blocks)
    ("seq_num", "<u8"),
    ("timestamp", "<u8"),          # the event's (the shard leader's clock, ms)
    ("dedup_id", _U128),           # the command's (0: the ledger's own TCC expiry)
    ("account_id", _U128),
    ("other_id", _U128),           # counterparty / reservation_id / txn_id / original dedup id (last record's)
    ("amount", "<i8"),             # sum of this seq's event amounts on the account (kind-specific meaning)
    ("available", "<i8"),
    ("reserved", "<i8"),
    ("pending_in", "<i8"),
    ("pending_out", "<i8"),
    ("version", "<u8"),
    ("currency", "S8"),
    ("kind", "u1"),                # engine.records.Kind of the command (the last record's)
    ("state", "u1"),
    ("shard", "<u2"),
    ("pad", "<u4"),
    ("prev_seq", "<u8"),           # the account's previous version: (seq, idx); 0: none
    ("prev_idx", "<u4"),
    ("idx", "<u4"),                # rank of this record among its seq's records
])
assert VERSION_DTYPE.itemsize == 144
_PREV_SEQ_AT = VERSION_DTYPE.fields["prev_seq"][1]      # type: ignore[index]
_PREV_IDX_AT = VERSION_DTYPE.fields["prev_idx"][1]      # type: ignore[index]
_IDX_AT = VERSION_DTYPE.fields["idx"][1]                # type: ignore[index]

I64_SAFE = float(1 << 61)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")         # magnitudes the view's int64 sums stay below (checked, never wrapped)


class ViewError(RuntimeError):
    """The projector met events it cannot apply (a reconciliation mismatch, a malformed stream): it stops."""


class ViewRangeError(ViewError):
    """A value beyond the view's int64 range."""


# ------------------------------------------------------------------------------------------ keys
def be_keys(words: np.ndarray) -> np.ndarray:
    """u128 ids as ``[lo, hi]`` u64 pairs (records' layout) -> V16 big-endian keys (numeric order = byte order)."""
    w = np.asarray(words).reshape(-1, 2)
    out = np.empty((len(w), 2), dtype=">u8")
    out[:, 0] = w[:, 1]
    out[:, 1] = w[:, 0]
    return out.view("V16").reshape(-1)


def id_key(account_id: int) -> bytes:
    if not 0 <= account_id < 1 << 128:
        raise ValueError(f"account id {account_id} is not an unsigned 128-bit integer")
    return account_id.to_bytes(16, "big")


def words_to_int(w: Any) -> int:
    return int(w[0]) | (int(w[1]) << 64)


def chunk_key(shard: int, first_seq: int) -> bytes:
    return struct.pack(">HQ", shard, first_seq)


def seqtime_key(shard: int, ts: int) -> bytes:
    return struct.pack(">HQ", shard, ts)


# ------------------------------------------------------------------------------------------ the table
class AccountTable:
    """The current version of every account, sorted by account id (``keys``: V16 big-endian; ``rows``:
    VERSION_DTYPE). Vectorized lookups: ``find(keys)`` -> (positions, found)."""

    def __init__(self, keys: np.ndarray | None = None, rows: np.ndarray | None = None) -> None:
        self.keys = keys if keys is not None else np.zeros(0, dtype="V16")
        self.rows = rows if rows is not None else np.zeros(0, dtype=VERSION_DTYPE)
        assert len(self.keys) == len(self.rows)
        self._narrow()

    def _narrow(self) -> None:
        """``k64``: the ids as u64 when every one fits (the common case): binary searches on u64 are faster."""
        w = self.keys.view(">u8").reshape(-1, 2)
        self.k64 = w[:, 1].astype(np.uint64) if not w[:, 0].any() else None

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.k64 is not None:
            q = keys.view(">u8").reshape(-1, 2)
            if not q[:, 0].any():
                return self.find_u64(q[:, 1].astype(np.uint64))
        pos = np.searchsorted(self.keys, keys)
        found = np.zeros(len(keys), dtype=bool)
        inside = pos < len(self.keys)
        found[inside] = self.keys[pos[inside]] == keys[inside]
        return pos, found

    def find_u64(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``find`` of ids below 2**64 while ``k64`` is there."""
        assert self.k64 is not None
        k = self.k64
        pos = np.searchsorted(k, ids)
        found = np.zeros(len(ids), dtype=bool)
        inside = pos < len(k)
        found[inside] = k[pos[inside]] == ids[inside]
        return pos, found

    def get(self, account_id: int) -> np.void | None:
        if self.k64 is not None and 0 <= account_id < 1 << 64:
            k64 = self.k64
            at = int(np.searchsorted(k64, np.uint64(account_id)))
            return self.rows[at].copy() if at < len(k64) and int(k64[at]) == account_id else None
        k = np.frombuffer(id_key(account_id), dtype="V16")
        pos, found = self.find(k)
        return self.rows[pos[0]].copy() if found[0] else None

    def upsert(self, keys: np.ndarray, rows: np.ndarray, pos: np.ndarray | None = None,
               found: np.ndarray | None = None) -> None:
        """``rows`` (unique, sorted ``keys``; ``pos``/``found``: ``find(keys)`` if known) replace or add their
        accounts, in place (readers take copies of rows: ``get``)."""
        if pos is None or found is None:
            pos, found = self.find(keys)
        v = np.dtype((np.void, VERSION_DTYPE.itemsize))      # whole-record moves (field-wise ones cost more)
        if found.all():
            self.rows.view(v)[pos] = rows.view(v)
        else:
            self.rows.view(v)[pos[found]] = rows.view(v)[found]
        if not found.all():
            add_k, add_r = keys[~found], rows[~found]
            at = pos[~found]
            self.keys = np.insert(self.keys, at, add_k)
            self.rows = np.insert(self.rows, at, add_r)
            self._narrow()

    def to_bytes(self) -> bytes:
        return struct.pack("<Q", len(self.keys)) + self.keys.tobytes() + self.rows.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> AccountTable:
        (n,) = struct.unpack_from("<Q", data)
        if len(data) != 8 + n * (16 + VERSION_DTYPE.itemsize):
            raise ViewError("account table snapshot of the wrong size")
        keys = np.frombuffer(data, dtype="V16", count=n, offset=8).copy()
        rows = np.frombuffer(data, dtype=VERSION_DTYPE, count=n, offset=8 + 16 * n).copy()
        return cls(keys, rows)


# ------------------------------------------------------------------------------------------ records out
def version_dict(r: np.void) -> dict[str, Any]:
    """A version record as the query API gives it (the field names of ``Ledger.get_account``, plus the
    version's seq, time, command and counterparty)."""
    kind = int(r["kind"])
    return {
        "account_id": words_to_int(r["account_id"]),
        "currency": bytes(r["currency"]).rstrip(b"\0").decode("ascii"),
        "state": State(int(r["state"])).name,
        "available": int(r["available"]),
        "reserved": int(r["reserved"]),
        "pending_in": int(r["pending_in"]),
        "pending_out": int(r["pending_out"]),
        "version": int(r["version"]),
        "seq": int(r["seq_num"]),
        "timestamp_ms": int(r["timestamp"]),
        "shard": int(r["shard"]),
        "kind": Kind(kind).name if kind in Kind._value2member_map_ else str(kind),
        "amount": int(r["amount"]),
        "counterparty": words_to_int(r["other_id"]),
        "dedup_id": words_to_int(r["dedup_id"]),
    }


# ------------------------------------------------------------------------------------------ lookups
class ViewReader:
    """Read-side lookups over one read transaction of the view's LMDB environment."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.txn = txn
        self.dbs = dbs

    def _locate(self, shard: int, seq: int, idx: int) -> tuple[Any, int]:
        """The chunk holding version (shard, seq, idx) and the record's byte offset in it."""
        cur = self.txn.cursor(self.dbs["versions"])
        if not cur.set_range(chunk_key(shard, seq + 1)):
            if not cur.last():
                raise ViewError(f"no version chunk for shard {shard} seq {seq}")
        elif not cur.prev():
            raise ViewError(f"no version chunk for shard {shard} seq {seq}")
        if struct.unpack(">HQ", bytes(cur.key()))[0] != shard:
            raise ViewError(f"no version chunk for shard {shard} seq {seq}")
        buf = cur.value()
        size = VERSION_DTYPE.itemsize
        n = len(buf) // size
        lo, hi = 0, n                               # the seq's first record: a binary search on the bytes
        while lo < hi:                              # (numpy's would copy the strided seq column first)
            mid = (lo + hi) // 2
            if _U64.unpack_from(buf, mid * size)[0] < seq:
                lo = mid + 1
            else:
                hi = mid
        at = lo + idx
        if (at >= n or _U64.unpack_from(buf, at * size)[0] != seq
                or _U32.unpack_from(buf, at * size + _IDX_AT)[0] != idx):
            raise ViewError(f"version (shard {shard}, seq {seq}, idx {idx}) missing from its chunk")
        return buf, at * size

    def version_at(self, shard: int, seq: int, idx: int) -> np.void:
        buf, off = self._locate(shard, seq, idx)
        return np.frombuffer(buf, dtype=VERSION_DTYPE, count=1, offset=off).copy()[0]

    def _start_after(self, key: bytes, seq: int) -> tuple[int, int] | None:
        """The first sparse entry of the account with a seq > ``seq``: (seq, idx), or None."""
        cur = self.txn.cursor(self.dbs["sparse"])
        if not cur.set_range(key + struct.pack(">Q", seq + 1)):
            return None
        k = bytes(cur.key())
        if k[:16] != key:
            return None
        return struct.unpack(">Q", k[16:])[0], struct.unpack(">I", bytes(cur.value()))[0]

    def walk_back(self, current: np.void, key: bytes, last_seq: int) -> Iterator[np.void]:
        """The account's versions with seq <= ``last_seq``, newest first (``current``: its table row). Steps
        over newer versions read only their links (no record is built for them)."""
        shard = int(current["shard"])
        if int(current["seq_num"]) <= last_seq:
            yield current
            ps, pi = int(current["prev_seq"]), int(current["prev_idx"])
        else:
            start = self._start_after(key, last_seq)
            if start is None:
                ps, pi = int(current["prev_seq"]), int(current["prev_idx"])
            else:
                ps, pi = start
        while ps:
            buf, off = self._locate(shard, ps, pi)
            if ps <= last_seq:
                yield np.frombuffer(buf, dtype=VERSION_DTYPE, count=1, offset=off).copy()[0]
            ps = _U64.unpack_from(buf, off + _PREV_SEQ_AT)[0]
            pi = _U32.unpack_from(buf, off + _PREV_IDX_AT)[0]

    def seq_at_time(self, shard: int, at_ms: int) -> int:
        """The greatest seq of ``shard`` whose timestamp <= ``at_ms`` (0: none)."""
        cur = self.txn.cursor(self.dbs["seqtime"])
        if cur.set_range(seqtime_key(shard, at_ms + 1)):
            if not cur.prev():
                return 0
        elif not cur.last():
            return 0
        k = bytes(cur.key())
        if struct.unpack(">HQ", k)[0] != shard:
            return 0
        return struct.unpack("<Q", bytes(cur.value()))[0]
