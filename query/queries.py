"""What the query service answers, over the projector's view and the hierarchy (no I/O of its own): the
ZeroMQ service (``query/server.py``) and the HTTP API (``query/http_api.py``) both call ``Queries``.

Values use the field names of ``Ledger.get_account`` (``account_id``, ``currency``, ``state``,
``available``, ``reserved``, ``pending_in``, ``pending_out``, ``version``) plus ``seq``, ``timestamp_ms``,
``shard`` and, in history, ``kind``, ``amount``, ``counterparty`` and ``dedup_id``. ``pending_in`` and
``pending_out`` are totals over the account's open TCC tries (the events do not say more per txn than the view
keeps).
"""
from __future__ import annotations

from typing import Any

from query.hierarchy import Hierarchy
from query.projector import Projector
from query.view import HISTORY_LIMIT_MAX, id_key, version_dict

BALANCES_IDS_MAX = 10_000
HISTORY_LIMIT_DEFAULT = 1000


class QueryError(ValueError):
    """A query refused as malformed (the caller's fault)."""


def _opt_int(v: Any, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            v = int(v)
        except (TypeError, ValueError):
            raise QueryError(f"{what} must be an integer") from None
    if not lo <= v <= hi:
        raise QueryError(f"{what} {v} outside {lo}..{hi}")
    return int(v)


def account_id_of(v: Any, what: str = "account_id") -> int:
    out = _opt_int(v, what, 0, (1 << 128) - 1)
    if out is None:
        raise QueryError(f"{what} is required")
    return out


class Queries:
    def __init__(self, projector: Projector, hierarchy: Hierarchy) -> None:
        self.p = projector
        self.h = hierarchy

    # ------------------------------------------------------------------------------ balances
    def balance(self, account_id: Any, at_seq: Any = None, at_ms: Any = None) -> dict[str, Any] | None:
        """The account now, at a seq of its shard (its last version with seq <= at_seq), or at a time (its
        last version with timestamp <= at_ms); None if it did not exist then. ``as_of_seq``: the shard's seq
        the answer reflects."""
        aid = account_id_of(account_id)
        seq = _opt_int(at_seq, "at_seq")
        ms = _opt_int(at_ms, "at_ms")
        if seq is not None and ms is not None:
            raise QueryError("give at_seq or at_ms, not both")
        with self.p.lock:
            cur = self.p.table.get(aid)
            applied = dict(self.p.applied)
        if cur is None:
            return None
        shard = int(cur["shard"])
        with self.p.env.begin(buffers=True) as txn:
            rd = self.p.reader(txn)
            if ms is not None:
                seq = rd.seq_at_time(shard, ms)
            view_seq = applied.get(shard, 0)
            upto = view_seq if seq is None else min(seq, view_seq)
            for r in rd.walk_back(cur, id_key(aid), upto):
                out = version_dict(r)
                out["as_of_seq"] = upto
                return out
        return None

    def balances(self, account_ids: Any) -> dict[str, Any]:
        """Many accounts' current versions at one consistent seq per shard."""
        if not isinstance(account_ids, (list, tuple)) or len(account_ids) > BALANCES_IDS_MAX:
            raise QueryError(f"account_ids must be a list of at most {BALANCES_IDS_MAX} ids")
        ids = [account_id_of(a) for a in account_ids]
        with self.p.lock:
            rows = [self.p.table.get(a) for a in ids]
            seqs = dict(self.p.applied)
        return {"accounts": [None if r is None else version_dict(r) for r in rows], "seqs": seqs}

    # ------------------------------------------------------------------------------ history
    def history(self, account_id: Any, first_seq: Any = None, last_seq: Any = None, since_ms: Any = None,
                until_ms: Any = None, limit: Any = None) -> dict[str, Any]:
        """The account's versions with first_seq <= seq <= last_seq and since_ms <= timestamp <= until_ms, newest
        first, at most ``limit`` (a page); when there are more, ``next_last_seq`` is the ``last_seq`` of the
        next (older) page, else None."""
        aid = account_id_of(account_id)
        first = _opt_int(first_seq, "first_seq") or 1
        last = _opt_int(last_seq, "last_seq")
        since = _opt_int(since_ms, "since_ms")
        until = _opt_int(until_ms, "until_ms")
        lim = _opt_int(limit, "limit", 1, HISTORY_LIMIT_MAX) or HISTORY_LIMIT_DEFAULT
        with self.p.lock:
            cur = self.p.table.get(aid)
            applied = dict(self.p.applied)
        if cur is None:
            return {"account_id": aid, "versions": [], "next_last_seq": None, "as_of_seq": 0}
        shard = int(cur["shard"])
        view_seq = applied.get(shard, 0)
        with self.p.env.begin(buffers=True) as txn:
            rd = self.p.reader(txn)
            if since is not None:
                first = max(first, rd.seq_at_time(shard, since - 1) + 1 if since > 0 else 1)
            if until is not None:
                last = min(last if last is not None else view_seq, rd.seq_at_time(shard, until))
            upto = view_seq if last is None else min(last, view_seq)
            page: list[Any] = []
            nxt = None
            for r in rd.walk_back(cur, id_key(aid), upto):     # newest first: a page costs its size
                if int(r["seq_num"]) < first:
                    break
                if len(page) == lim:
                    nxt = int(r["seq_num"])
                    break
                page.append(r)
        return {"account_id": aid, "versions": [version_dict(r) for r in page], "next_last_seq": nxt,
                "as_of_seq": upto}

    def seq_range(self, shard: int, first_seq: Any, last_seq: Any, since_ms: Any, until_ms: Any
                  ) -> tuple[int, int, int | None]:
        """A shard's seq range from seqs and/or times (timestamps <= until_ms, >= since_ms), within what the
        view has applied: (first, last, until_ms)."""
        first = _opt_int(first_seq, "first_seq") or 1
        applied = self.p.applied_seq(shard)
        last = min(_opt_int(last_seq, "last_seq") or applied, applied)
        since = _opt_int(since_ms, "since_ms")
        until = _opt_int(until_ms, "until_ms")
        with self.p.env.begin(buffers=True) as txn:
            rd = self.p.reader(txn)
            if since is not None and since > 0:
                first = max(first, rd.seq_at_time(shard, since - 1) + 1)
            if until is not None:
                last = min(last, rd.seq_at_time(shard, until))
        return first, last, until

    # ------------------------------------------------------------------------------ hierarchy
    def set_parent(self, node_id: Any, parent_id: Any) -> dict[str, Any]:
        node = account_id_of(node_id, "node_id")
        parent = None if parent_id is None else account_id_of(parent_id, "parent_id")
        return self.h.set_parent(node, parent)

    def hierarchy_balance(self, node_id: Any, currency: Any, at_ms: Any = None,
                          at_seqs: Any = None) -> dict[str, Any]:
        """The node's sums in ``currency``: now (the maintained sums), as of a time (the tree as it was then and
        each leaf's balance then), or at given seqs per shard (``at_seqs``: {shard: seq}; the tree as it is now,
        each leaf's balance at its shard's seq). ``seqs``: the seq per shard the answer reflects."""
        node = account_id_of(node_id, "node_id")
        if not isinstance(currency, str) or not 1 <= len(currency) <= 8 or not currency.isascii():
            raise QueryError("currency must be an ASCII asset code of 1..8 characters")
        ms = _opt_int(at_ms, "at_ms")
        if at_seqs is not None:
            if ms is not None:
                raise QueryError("give at_ms or at_seqs, not both")
            if not isinstance(at_seqs, dict):
                raise QueryError("at_seqs is a map {shard: seq}")
            at = {_opt_int(k, "shard", 1, 65_535): _opt_int(v, "seq") for k, v in at_seqs.items()}
        if ms is None and at_seqs is None:
            return self.h.balance(node, currency)
        # the slow paths: O(leaves under the node) point-in-time lookups
        with self.p.lock:
            applied = dict(self.p.applied)
        if ms is not None:
            tree = self.h.tree_as_of(ms)
            with self.p.env.begin(buffers=True) as txn:
                rd = self.p.reader(txn)
                seqs = {s: rd.seq_at_time(s, ms) for s in sorted(applied)}
        else:
            tree = self.h.tree_as_of(1 << 62)
            seqs = {s: min(int(at.get(s) or applied[s]), applied[s]) for s in sorted(applied)}
        vec = [0, 0, 0, 0]
        for leaf in tree.leaves_under(node):
            with self.p.lock:
                row = self.p.table.get(leaf)
            if row is None:
                continue
            b = self.balance(leaf, at_seq=seqs.get(int(row["shard"]), 0))
            if b is not None and b["currency"] == currency:
                for i, f in enumerate(("available", "reserved", "pending_in", "pending_out")):
                    vec[i] += b[f]
        found = node in tree.parent or node in tree.children or node in tree.leaf
        return {"node_id": node, "currency": currency, "found": found,
                **dict(zip(("available", "reserved", "pending_in", "pending_out"), vec)), "seqs": seqs}

    def status(self) -> dict[str, Any]:
        st = self.p.status()
        st["hierarchy_nodes"] = len(self.h.tree.parent) + sum(
            1 for n in self.h.tree.children if n not in self.h.tree.parent)
        return st
