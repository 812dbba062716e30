"""The projector: a shard's event stream, applied in seq order, into the account view (``query/view.py``).

``Projector.offer(shard, records)`` takes event records (``engine.records.EVENT_DTYPE``) as they come: whole
seqs, possibly repeated (another replica's copy, a re-fetch), out of order or with a gap. What continues the
view (seq ``applied + 1`` on) is applied at once; what is ahead waits in a buffer bounded in bytes
(``AHEAD_BYTES_MAX``) until the gap before it is filled, and ``missing(shard)`` says which range to fetch (the
shard's event stores: the query service's feed, ``query/server.py``). A gap is never skipped.

Applying is vectorized over the record batch (numpy; no Python work per event): the records are grouped by
account, each account's deltas (available, reserved, pending in/out, by command kind) are summed with
segmented cumulative sums from the view's current version, and every (account, seq)'s result is checked
against the event: its ``available`` and its ``version`` must be what the view computes (a continuous
reconciliation; a mismatch raises ``ViewError`` and the projector stops). The new version records, the sparse
index entries, the time -> seq entries and the shard's last applied seq are written in ONE LMDB transaction:
exactly-once, resumable after kill -9 from that checkpoint. ``rebuild`` replays from seq 1 into a new
environment beside the current one, then swaps the directories.
"""
from __future__ import annotations

import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import lmdb
import numpy as np

from engine.records import EVENT_DTYPE, Kind
from query.view import (CHUNK_RECORDS_MAX, I64_SAFE, SPARSE_EVERY, VERSION_DTYPE, AccountTable, ViewError,
                        ViewRangeError, ViewReader, be_keys, chunk_key, seqtime_key)

MAP_SIZE_DEFAULT = 1 << 36                  # LMDB map size (virtual; the file grows as used)
AHEAD_BYTES_MAX = 64 << 20                  # records buffered ahead of a gap, per shard
SNAPSHOT_VERSIONS_MIN = 1_000_000           # versions written between two account-table snapshots (at least)
TXN_RECORDS_MAX = 65_536                    # event records applied in one LMDB transaction
_POS_BITS = 17                              # record positions in the packed sort key (> TXN_RECORDS_MAX)
assert TXN_RECORDS_MAX < 1 << _POS_BITS
SHARD_ID_MAX = 65_535

_K = Kind

Listener = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


def _seg_cumsum(d: np.ndarray, starts: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """Cumulative sums of ``d`` restarting at each group start (groups contiguous; ``gid`` per row)."""
    cs = np.cumsum(d)
    return cs - (cs[starts] - d[starts])[gid]


def _i64_words(lo: np.ndarray, hi: np.ndarray, what: str) -> np.ndarray:
    """i128 as (lo, hi) u64 word columns -> int64, refusing values that do not fit (ViewRangeError)."""
    v = lo.view(np.int64)
    if (hi != (v >> 63).view(np.uint64)).any() or (len(v) and (int(v.max()) >= 1 << 61 or int(v.min()) <= -(1 << 61))):
        raise ViewRangeError(f"an event's {what} is beyond the view's int64 range (|x| < 2**61)")
    return v


def _words(dtype: np.dtype) -> dict[str, int]:
    fields = dtype.fields
    assert fields is not None
    return {name: fields[name][1] // 8 for name in fields}


EV_W = _words(EVENT_DTYPE)          # u64 word index of each event field (kind: the word of kind..code)
VER_W = _words(VERSION_DTYPE)       # (idx: the word of prev_idx (low half) and idx (high half))
VER_W["idx"] = VER_W["prev_idx"]
assert EV_W["kind"] == 14 and VER_W["kind"] == 15 and VER_W["idx"] == 17 and EVENT_DTYPE.itemsize == 128
assert VERSION_DTYPE.itemsize == 144 and VER_W["available"] + 3 == VER_W["pending_out"]
assert EV_W["dedup_id"] == VER_W["dedup_id"] == 2 and EV_W["other_id"] == VER_W["other_id"] == 6
assert (EV_W["version"], EV_W["currency"]) == (12, 13) and (VER_W["version"], VER_W["currency"]) == (13, 14)


def _guard(d: np.ndarray, what: str) -> None:
    if len(d) and float(np.abs(np.cumsum(d.astype(np.float64))).max()) >= I64_SAFE:
        raise ViewRangeError(f"the view's {what} sums would leave its int64 range")


def check_records(evs: np.ndarray) -> None:
    """Refuse records that are not whole, consecutive seqs (ViewError): what a peer sends is checked."""
    if evs.dtype != EVENT_DTYPE:
        raise ViewError(f"event records must be engine.records.EVENT_DTYPE, not {evs.dtype}")
    if not len(evs):
        return
    seqs = evs["seq_num"]
    step = np.diff(seqs)
    if len(step) and ((step != 0) & (step != 1)).any():
        raise ViewError("event records are not consecutive seqs")
    starts = np.flatnonzero(np.r_[True, step != 0])
    counts = np.diff(np.r_[starts, len(evs)])
    parts = evs["parts"].astype(np.int64)
    if (parts[starts] != counts).any():
        raise ViewError("a seq's records are not all there (parts)")
    gid = np.cumsum(np.r_[True, step != 0]) - 1
    if (evs["part"].astype(np.int64) != np.arange(len(evs)) - starts[gid]).any():
        raise ViewError("a seq's records are out of part order")


class Projector:
    """The account view in LMDB at ``path`` and the in-memory current versions (``table``), fed by
    ``offer``. ``lock`` guards ``table``, ``applied`` and what listeners maintain (the hierarchy);
    ``write_lock`` serializes LMDB write transactions (the projector's and the hierarchy's edits)."""

    def __init__(self, path: str, *, sync: bool = True, map_size: int = MAP_SIZE_DEFAULT) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.env = lmdb.open(path, map_size=map_size, max_dbs=8, sync=sync, metasync=sync, readahead=False)
        self.dbs = {name: self.env.open_db(name.encode()) for name in ("versions", "sparse", "seqtime", "meta",
                                                                          "tree")}
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.listeners: list[Listener] = []
        self.applied: dict[int, int] = {}
        self.last_ts: dict[int, int] = {}
        self._ahead: dict[int, dict[int, np.ndarray]] = {}
        self._ahead_bytes: dict[int, int] = {}
        self.records_applied = 0
        self.seqs_applied = 0
        self.apply_s = 0.0
        self.versions_since_snapshot = 0
        self.table = AccountTable()
        self.error: str | None = None
        self._open()

    # ------------------------------------------------------------------------------ open / close
    def _open(self) -> None:
        with self.env.begin(db=self.dbs["meta"]) as txn:
            for k, v in txn.cursor():
                k = bytes(k)
                if k.startswith(b"last_seq/"):
                    self.applied[int(k[9:])] = struct.unpack("<Q", v)[0]
                elif k.startswith(b"last_ts/"):
                    self.last_ts[int(k[8:])] = struct.unpack("<Q", v)[0]
            snap = txn.get(b"table")
            snap_seqs: dict[int, int] = {}
            if snap is not None:
                self.table = AccountTable.from_bytes(bytes(snap))
                raw = bytes(txn.get(b"table_seqs") or b"")
                for off in range(0, len(raw), 10):
                    s, q = struct.unpack_from("<HQ", raw, off)
                    snap_seqs[s] = q
        # the versions after the snapshot (their chunks are committed with the checkpoint) bring the table up
        with self.env.begin(db=self.dbs["versions"]) as txn:
            for shard in sorted(self.applied):
                cur = txn.cursor()
                if not cur.set_range(chunk_key(shard, snap_seqs.get(shard, 0) + 1)):
                    continue
                for k, v in cur:
                    if struct.unpack(">HQ", bytes(k))[0] != shard:
                        break
                    rows = np.frombuffer(v, dtype=VERSION_DTYPE).copy()
                    self._upsert_last(self.table, rows)
                    self.versions_since_snapshot += len(rows)

    @staticmethod
    def _upsert_last(table: AccountTable, rows: np.ndarray) -> None:
        acc = rows["account_id"]
        o = np.lexsort((acc[:, 0], acc[:, 1]))
        ks = be_keys(acc[o])
        last = np.r_[ks[1:] != ks[:-1], True]
        table.upsert(ks[last], rows[o][last])

    def close(self) -> None:
        self.env.close()

    def reader(self, txn: lmdb.Transaction) -> ViewReader:
        return ViewReader(txn, self.dbs)

    # ------------------------------------------------------------------------------ feeding
    def applied_seq(self, shard: int) -> int:
        return self.applied.get(shard, 0)

    def offer(self, shard: int, evs: np.ndarray) -> int:
        """Take records of ``shard`` (whole seqs, any order, repeats allowed); apply what continues the view.
        Returns the number of seqs applied. Raises ViewError on a malformed chunk or a reconciliation
        mismatch (the latter also sets ``error``: the projector stops)."""
        if self.error is not None:
            raise ViewError(self.error)
        if not 1 <= shard <= SHARD_ID_MAX:
            raise ViewError(f"shard id {shard} outside 1..{SHARD_ID_MAX}")
        check_records(evs)
        if not len(evs):
            return 0
        nxt = self.applied_seq(shard) + 1
        evs = evs[int(np.searchsorted(evs["seq_num"], nxt)):]      # (consecutive seqs: a slice, no copy)
        if not len(evs):
            return 0
        first = int(evs["seq_num"][0])
        if first > nxt:
            ahead = self._ahead.setdefault(shard, {})
            if first not in ahead:
                used = self._ahead_bytes.get(shard, 0)
                if used + evs.nbytes > AHEAD_BYTES_MAX:
                    return 0                   # dropped: it will be fetched again once the gap is filled
                ahead[first] = evs
                self._ahead_bytes[shard] = used + evs.nbytes
            return 0
        parts = [evs]
        end = int(evs["seq_num"][-1]) + 1
        ahead = self._ahead.get(shard, {})
        while ahead:                           # chunks that waited for this one
            usable = [f for f in ahead if f <= end]
            if not usable:
                break
            for f in sorted(usable):
                chunk = ahead.pop(f)
                self._ahead_bytes[shard] -= chunk.nbytes
                rest = chunk[chunk["seq_num"] >= end]
                if len(rest):
                    parts.append(rest)
                    end = int(rest["seq_num"][-1]) + 1
        evs = np.concatenate(parts) if len(parts) > 1 else evs
        return self._apply(shard, evs)

    def missing(self, shard: int) -> tuple[int, int] | None:
        """The range to fetch before the buffered chunks ahead can be applied (None: no gap known)."""
        ahead = self._ahead.get(shard)
        if not ahead:
            return None
        return self.applied_seq(shard) + 1, min(ahead) - 1

    def add_listener(self, fn: Listener) -> None:
        """``fn(keys, currency, old, new)`` under ``lock`` after each commit: the accounts whose current
        version changed (V16 keys, S8 currencies, and (n, 4) int64 [available, reserved, pending_in,
        pending_out] before and after)."""
        self.listeners.append(fn)

    # ------------------------------------------------------------------------------ applying
    def _apply(self, shard: int, evs: np.ndarray) -> int:
        """Apply records that continue the view (whole seqs from applied + 1): one LMDB transaction per
        ``TXN_RECORDS_MAX`` records, cut at seq boundaries."""
        seqs = evs["seq_num"]
        assert int(seqs[0]) == self.applied_seq(shard) + 1, "apply continues the view"
        done = 0
        a = 0
        while a < len(evs):
            b = min(len(evs), a + TXN_RECORDS_MAX)
            if b < len(evs):
                b = int(np.searchsorted(seqs, seqs[b], side="left"))
                if b <= a:
                    b = int(np.searchsorted(seqs, seqs[a], side="right"))
            done += self._apply_txn(shard, evs[a:b])
            a = b
        return done

    def _apply_txn(self, shard: int, evs: np.ndarray) -> int:
        t0 = time.perf_counter()
        seqs = evs["seq_num"]
        first_seq = int(seqs[0])
        table = self.table
        try:
            out, keys, new_rows, old_vals, new_vals, pos, found = self._compute(shard, evs, table)
        except ViewError as exc:
            self.error = f"shard {shard}: {exc}"
            raise ViewError(self.error) from None
        last_seq = int(seqs[-1])
        last_ts = int(evs["timestamp"][-1])
        nver = len(out)
        snapshot = self.versions_since_snapshot + nver >= max(SNAPSHOT_VERSIONS_MIN, 2 * len(table))
        try:
            with self.write_lock, self.env.begin(write=True) as txn:
                self._write(txn, shard, evs, out, last_seq, last_ts, snapshot, keys, new_rows, pos, found)
        except lmdb.Error as exc:
            self.error = f"shard {shard}: the view's LMDB refused a write ({exc}); restart to resume"
            raise ViewError(self.error) from None
        with self.lock:
            if len(keys):
                table.upsert(keys, new_rows, pos, found)
            self.applied[shard] = last_seq
            self.last_ts[shard] = last_ts
            if len(keys):
                for fn in self.listeners:
                    fn(keys, new_rows["currency"], old_vals, new_vals)
        self.versions_since_snapshot = 0 if snapshot else self.versions_since_snapshot + nver
        nseq = last_seq - first_seq + 1
        self.records_applied += len(evs)
        self.seqs_applied += nseq
        self.apply_s += time.perf_counter() - t0
        return nseq

    def _write(self, txn: lmdb.Transaction, shard: int, evs: np.ndarray, out: np.ndarray, last_seq: int,
               last_ts: int, snapshot: bool, keys: np.ndarray, new_rows: np.ndarray, pos: np.ndarray,
               found: np.ndarray) -> None:
        vdb = self.dbs["versions"]
        cuts = [0]
        oseq = out["seq_num"]
        while cuts[-1] < len(out):
            b = min(len(out), cuts[-1] + CHUNK_RECORDS_MAX)
            if b < len(out):
                b = int(np.searchsorted(oseq, oseq[b], side="left"))
                if b <= cuts[-1]:
                    b = int(np.searchsorted(oseq, oseq[cuts[-1]], side="right"))
            cuts.append(b)
        for a, b in zip(cuts[:-1], cuts[1:]):
            txn.put(chunk_key(shard, int(oseq[a])), out[a:b].data, db=vdb)
        sp = out[out["version"] % SPARSE_EVERY == 1]
        if len(sp):
            kv = np.empty(len(sp), dtype=[("k", "V16"), ("s", ">u8"), ("i", ">u4")])
            kv["k"] = be_keys(sp["account_id"])
            kv["s"] = sp["seq_num"]
            kv["i"] = sp["idx"]
            items = [(r[:24], r[24:]) for r in kv.view("V28").tolist()]
            txn.cursor(self.dbs["sparse"]).putmulti(items)
        ts = evs["timestamp"]
        seqs = evs["seq_num"]
        run_end = np.flatnonzero(np.r_[ts[1:] != ts[:-1], True])
        sdb = self.dbs["seqtime"]
        for i in run_end.tolist():
            txn.put(seqtime_key(shard, int(ts[i])), struct.pack("<Q", int(seqs[i])), db=sdb)
        mdb = self.dbs["meta"]
        txn.put(b"last_seq/%d" % shard, struct.pack("<Q", last_seq), db=mdb)
        txn.put(b"last_ts/%d" % shard, struct.pack("<Q", last_ts), db=mdb)
        if snapshot:
            t = AccountTable(self.table.keys.copy(), self.table.rows.copy())
            t.upsert(keys, new_rows)
            applied = dict(self.applied)
            applied[shard] = last_seq
            txn.put(b"table", t.to_bytes(), db=mdb)
            txn.put(b"table_seqs", b"".join(struct.pack("<HQ", s, q) for s, q in sorted(applied.items())), db=mdb)

    def _compute(self, shard: int, evs: np.ndarray, table: AccountTable) -> tuple[np.ndarray, ...]:
        """One transaction's records: (version records in seq order, the changed accounts' keys (sorted), their
        new table rows, their [available, reserved, pending_in, pending_out] before and after, and their
        ``table.find`` positions and found flags). Works on the records as rows of u64 words (EV_W, VER_W):
        structured-field gathers cost several times more here."""
        w_all = np.ascontiguousarray(evs).view(np.uint64).reshape(-1, 16)
        real = (w_all[:, EV_W["account_id"]] | w_all[:, EV_W["account_id"] + 1]) != 0   # null cancels: no account
        w = w_all if real.all() else np.take(w_all, np.flatnonzero(real), axis=0)
        n = len(w)
        if not n:
            z4 = np.zeros((0, 4), np.int64)
            return (np.zeros(0, VERSION_DTYPE), np.zeros(0, "V16"), np.zeros(0, VERSION_DTYPE), z4, z4,
                    np.zeros(0, np.int64), np.zeros(0, bool))
        a_lo, a_hi = w[:, EV_W["account_id"]], w[:, EV_W["account_id"] + 1]
        if not a_hi.any() and n <= 1 << _POS_BITS and int(a_lo.max()) < 1 << (64 - _POS_BITS):
            # a stable sort by account as a plain sort of (id, position) packed in one u64: numpy's sort of
            # plain values is several times faster than its (stable) argsort
            key = (a_lo << np.uint64(_POS_BITS)) | np.arange(n, dtype=np.uint64)
            o = (np.sort(key) & np.uint64((1 << _POS_BITS) - 1)).astype(np.int64)
        else:
            o = np.lexsort((a_lo, a_hi))
        # the columns the computation needs, by account (u128 order) then stream order (a column at a time:
        # gathering whole 128-byte records costs a pass over all of them)

        def col(name: str, k: int = 0) -> np.ndarray:
            return np.take(w[:, EV_W[name] + k], o)
        lo = col("account_id")
        hi = col("account_id", 1) if a_hi.any() else np.zeros(n, np.uint64)
        seq = col("seq_num")
        kind = (col("kind") & np.uint64(0xFF)).astype(np.uint8)
        amount = _i64_words(col("amount"), col("amount", 1), "amount")
        avail = _i64_words(col("available"), col("available", 1), "available")
        newacc = np.empty(n, bool)
        newacc[0] = True
        np.not_equal(lo[1:], lo[:-1], out=newacc[1:])
        if hi.any():
            newacc[1:] |= hi[1:] != hi[:-1]
        starts = np.flatnonzero(newacc)
        gid = np.cumsum(newacc) - 1
        uk = be_keys(np.stack([lo[starts], hi[starts]], axis=1))
        pos, found = table.find_u64(lo[starts]) if table.k64 is not None and not a_hi.any() else table.find(uk)
        if len(table):
            bw = np.take(table.rows.view(np.uint64).reshape(-1, 18), np.minimum(pos, len(table) - 1), axis=0)
            bw[~found] = 0
        else:
            bw = np.zeros((len(uk), 18), np.uint64)
        b_av = bw[:, VER_W["available"]].view(np.int64)
        b_res = bw[:, VER_W["reserved"]].view(np.int64)
        b_pin = bw[:, VER_W["pending_in"]].view(np.int64)
        b_pout = bw[:, VER_W["pending_out"]].view(np.int64)
        b_ver = bw[:, VER_W["version"]].view(np.int64)
        # an account the view does not know must start with its creation, and only there
        is_create = kind == _K.CREATE_ACCOUNT
        first_kind_ok = np.where(found, ~is_create[starts], is_create[starts])
        if not first_kind_ok.all():
            i = int(np.flatnonzero(~first_kind_ok)[0])
            raise ViewError(f"seq {int(seq[starts[i]])}: account {_key_int(uk[i])} "
                            + ("is created again" if found[i] else "is not known to the view (a view starts at "
                               "seq 1: rebuild it)"))
        if int(np.count_nonzero(is_create)) != int(np.count_nonzero(~found)):
            raise ViewError("an account is created twice in one batch")
        is_res = kind == _K.RESERVE
        is_rel = kind == _K.RELEASE
        is_try = kind == _K.TCC_TRY
        is_conf = kind == _K.TCC_CONFIRM
        is_canc = kind == _K.TCC_CANCEL
        movers = (kind == _K.TRANSFER) | (kind == _K.BATCH_BALANCE) | (kind == _K.COMPENSATE)
        if movers.all():
            d_av = amount                                   # the common case: transfers only
            rare = False
        else:
            rare = bool((is_res | is_rel | is_try | is_conf | is_canc).any())
            zero = np.zeros(n, np.int64)
            d_av = np.where(movers | is_rel, amount, zero)
            if rare:
                pos_a = np.maximum(amount, 0)
                neg_a = np.minimum(amount, 0)
                d_av = np.where(is_res, -amount, d_av)
                d_av = np.where(is_try, neg_a, d_av)
                d_av = np.where(is_conf | is_canc, pos_a, d_av)
        _guard(d_av, "available")
        v_av = b_av[gid] + _seg_cumsum(d_av, starts, gid)
        is_last = np.empty(n, bool)                         # the last record of each (account, seq)
        is_last[-1] = True
        np.not_equal(seq[1:], seq[:-1], out=is_last[:-1])
        is_last[:-1] |= newacc[1:]
        r = np.flatnonzero(is_last)
        bad = v_av[r] != avail[r]
        if bad.any():
            i = int(r[np.flatnonzero(bad)[0]])
            raise ViewError(f"reconciliation: seq {int(seq[i])} account {(int(hi[i]) << 64) | int(lo[i])}: the event "
                            f"says available {int(avail[i])}, the view computes {int(v_av[i])}")
        rank = _seg_cumsum(is_last.astype(np.int64), starts, gid)
        ver = col("version").view(np.int64)
        rg = gid[r]
        exp_ver = b_ver[rg] + rank[r]
        badv = ver[r] != exp_ver
        if badv.any():
            j = int(np.flatnonzero(badv)[0])
            i = int(r[j])
            raise ViewError(f"reconciliation: seq {int(seq[i])} account {(int(hi[i]) << 64) | int(lo[i])}: the event "
                            f"says version {int(ver[i])}, the view expects {int(exp_ver[j])}")
        m = len(r)
        # the output rows in seq order: the (account, seq)s' last records in stream order (a scatter, no sort);
        # columns computed in account order are permuted by ``inv``
        orr = o[r]
        last_orig = np.zeros(n, bool)
        last_orig[orr] = True
        src = np.flatnonzero(last_orig)                     # their places in w, in seq order
        seqpos = (np.cumsum(last_orig) - 1)[orr]            # account order -> seq order
        inv = np.empty(m, np.int64)
        inv[seqpos] = np.arange(m)
        ow = np.empty((m, 18), np.uint64)
        wsrc = np.take(w, src, axis=0)                      # one pass over the records, then two blocks:
        ow[:, 0:8] = wsrc[:, 0:8]                           # seq, timestamp, dedup_id, account_id, other_id
        ow[:, 13:16] = wsrc[:, 12:15]                       # version, currency, kind..code (code: replaced)
        ow[:, 15] &= np.uint64(0xFFFF)
        ow[:, 15] |= np.uint64(shard << 16)
        ow[:, VER_W["available"]] = avail[r][inv].view(np.uint64)
        if rare:
            zero = np.zeros(n, np.int64)
            d_res = np.where(is_res, amount, np.where(is_rel, -amount, zero))
            d_pin = np.where(is_try, pos_a, np.where(is_conf, -pos_a, np.where(is_canc, neg_a, zero)))
            d_pout = np.where(is_try, -neg_a, np.where(is_conf, neg_a, np.where(is_canc, -pos_a, zero)))
            for d, what in ((d_res, "reserved"), (d_pin, "pending_in"), (d_pout, "pending_out")):
                _guard(d, what)
            v_res = (b_res[gid] + _seg_cumsum(d_res, starts, gid))[r]
            v_pin = (b_pin[gid] + _seg_cumsum(d_pin, starts, gid))[r]
            v_pout = (b_pout[gid] + _seg_cumsum(d_pout, starts, gid))[r]
            neg = (v_res < 0) | (v_pin < 0) | (v_pout < 0)
            if neg.any():
                i = int(r[np.flatnonzero(neg)[0]])
                raise ViewError(f"reconciliation: seq {int(seq[i])} account {(int(hi[i]) << 64) | int(lo[i])}: "
                                "reserved or pending would go below zero")
        else:
            v_res, v_pin, v_pout = b_res[rg], b_pin[rg], b_pout[rg]
        ow[:, VER_W["reserved"]] = v_res[inv].view(np.uint64)
        ow[:, VER_W["pending_in"]] = v_pin[inv].view(np.uint64)
        ow[:, VER_W["pending_out"]] = v_pout[inv].view(np.uint64)
        csa = np.cumsum(amount)
        grp = csa[r]
        grp[1:] -= csa[r[:-1]]
        ow[:, VER_W["amount"]] = grp[inv].view(np.uint64)
        # idx = rank within the seq (seq order); prev links (account order): the account's previous output
        # row, or its table row
        seq_sorted = ow[:, VER_W["seq_num"]]
        sstart = np.empty(m, bool)
        sstart[0] = True
        np.not_equal(seq_sorted[1:], seq_sorted[:-1], out=sstart[1:])
        sgid = np.cumsum(sstart) - 1
        idx_seq = np.arange(m) - np.flatnonzero(sstart)[sgid]
        idx = idx_seq[seqpos]
        first_of_acct = np.empty(m, bool)
        first_of_acct[0] = True
        np.not_equal(rg[1:], rg[:-1], out=first_of_acct[1:])
        t_seq = bw[:, VER_W["seq_num"]]
        t_idx = bw[:, VER_W["idx"]] >> np.uint64(32)
        prev_seq = np.empty(m, np.uint64)
        prev_seq[0] = 0
        prev_seq[1:] = seq[r[:-1]]
        prev_idx = np.empty(m, np.uint64)
        prev_idx[0] = 0
        prev_idx[1:] = idx[:-1].astype(np.uint64)
        prev_seq = np.where(first_of_acct, t_seq[rg], prev_seq)
        prev_idx = np.where(first_of_acct, t_idx[rg], prev_idx)
        ow[:, VER_W["prev_seq"]] = prev_seq[inv]
        ow[:, VER_W["idx"]] = prev_idx[inv] | (idx_seq.astype(np.uint64) << np.uint64(32))
        last_of_acct = np.empty(m, bool)
        last_of_acct[-1] = True
        np.not_equal(rg[1:], rg[:-1], out=last_of_acct[:-1])
        nr = np.take(ow, seqpos[np.flatnonzero(last_of_acct)], axis=0)      # the accounts' new table rows
        new_rows = nr.view(VERSION_DTYPE).reshape(-1)
        old_vals = np.stack([b_av, b_res, b_pin, b_pout], axis=1)
        new_vals = nr[:, VER_W["available"]:VER_W["pending_out"] + 1].view(np.int64)
        out = ow
        return out.view(VERSION_DTYPE).reshape(-1), uk, new_rows, old_vals, new_vals, pos, found

    # ------------------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        now_ms = int(time.time() * 1000)
        return {
            "applied": dict(self.applied),
            "view_time_lag_ms": {s: max(0, now_ms - t) for s, t in self.last_ts.items()},
            "accounts": len(self.table),
            "records_applied": self.records_applied,
            "seqs_applied": self.seqs_applied,
            "apply_records_per_s": int(self.records_applied / self.apply_s) if self.apply_s else 0,
            "error": self.error,
        }


def _key_int(k: Any) -> int:
    return int.from_bytes(bytes(k), "big")


def rebuild(path: str, shards: dict[int, Callable[[int, int], np.ndarray]], head: dict[int, Callable[[], int]],
            *, sync: bool = True, fetch_seqs: int = 65_536) -> None:
    """Rebuild the view at ``path`` from seq 1, side by side: replay every shard's stored events (``shards``:
    shard -> ``fetch(first, last)`` of records, ``head``: shard -> its last seq) into ``path + '.rebuild'``,
    then swap the directories (the old view is removed once the new one is in place)."""
    new = path + ".rebuild"
    shutil.rmtree(new, ignore_errors=True)
    # no fsync per transaction: a rebuild that dies is started again; one sync before the swap makes it durable
    p = Projector(new, sync=False)
    try:
        for shard, fetch in shards.items():
            last = head[shard]()
            while p.applied_seq(shard) < last:
                first = p.applied_seq(shard) + 1
                evs = fetch(first, min(last, first + fetch_seqs - 1))
                if not len(evs):
                    raise ViewError(f"shard {shard}: no events {first}..{last} to rebuild from")
                p.offer(shard, evs)
        if sync:
            p.env.sync(True)
    finally:
        p.close()
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)
