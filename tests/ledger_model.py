"""A small, obviously-correct pure-Python model of the ledger's semantics (docs/ledger.md).

Used by the stateful property test (every result and every account compared with the real ledger) and by
the benchmark (the speed of the straightforward implementation, on the same commands). It keeps no
retention windows: tests that use it stay below the ledger's dedup and event retention. Time: every
command takes the ledger's ``timestamp`` (the entry's time, never going back); TCC tries with an
``expires_ms`` are cancelled by the ledger before the first command at a time >= it.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.records import GROUP_SPECS_MAX, I128_MAX, I128_MIN, SUCCESS_CODES, Code, Kind, State

EXPIRY_RECORDS_PER_TS_MAX = 8192      # engine/ledger_core.h: expiry event records per entry time
EXPIRY_RETRY_MS = 1000                # a due try whose cancel was refused is tried again this much later


def _id(v) -> int:
    return v.int if isinstance(v, uuid.UUID) else int(v)


@dataclass
class Account:
    account_id: int
    currency: str
    lower_limit: int | None
    upper_limit: int | None
    state: State = State.NORMAL
    available: int = 0
    reservations: dict = field(default_factory=dict)
    pending_in: dict = field(default_factory=dict)
    pending_out: dict = field(default_factory=dict)
    version: int = 1

    def allows(self, value: int) -> bool:
        return ((self.lower_limit is None or value >= self.lower_limit)
                and (self.upper_limit is None or value <= self.upper_limit))

    def as_dict(self) -> dict:
        return {"account_id": self.account_id, "currency": self.currency, "state": self.state,
                "available": self.available, "reserved": sum(self.reservations.values()),
                "reservations": dict(self.reservations), "pending_in": dict(self.pending_in),
                "pending_out": dict(self.pending_out), "lower_limit": self.lower_limit,
                "upper_limit": self.upper_limit, "version": self.version}


def _fits(v: int) -> bool:
    return I128_MIN <= v <= I128_MAX


@dataclass
class ModelResult:
    code: Code
    duplicate: bool
    seq_num: int


class _Reject(Exception):
    def __init__(self, code: Code):
        self.code = code


class ModelLedger:
    def __init__(self) -> None:
        self.accounts: dict[int, Account] = {}
        self.dedup: dict[int, dict] = {}          # dedup_id -> {code, seq, kind, compensated, null, undo}
        # txn_id -> {state: tried/confirmed/cancelled/null_cancelled, specs, expires, due}
        self.txns: dict[int, dict] = {}
        self.last_seq = 0
        self.event_parts: list[int] = []          # parts per seq
        self.last_ts = 0
        self.now = 0                              # the time of the command being applied
        self.expiry_ts = self.expiry_records = 0

    # --------------------------------------------------------------------------------------- engine
    def _expire(self) -> None:
        """Cancel the tries due now, in (due, txn_id) order, within the per-time record budget."""
        ts = self.now
        if ts != self.expiry_ts:
            self.expiry_ts, self.expiry_records = ts, 0
        while True:
            due = sorted((t["due"], txn) for txn, t in self.txns.items()
                         if t["state"] == "tried" and t["expires"] and t["due"] <= ts)
            if not due:
                return
            txn = due[0][1]
            t = self.txns[txn]
            if self.expiry_records + len(t["specs"]) > EXPIRY_RECORDS_PER_TS_MAX:
                return
            self.expiry_records += len(t["specs"])
            try:
                parts = self._finish_txn(txn, t, False)
            except _Reject:
                t["due"] = ts + EXPIRY_RETRY_MS
                continue
            self.last_seq += 1
            self.event_parts.append(parts)

    def _run(self, dedup_id, kind: Kind, fn, timestamp: int = 0) -> ModelResult:
        self.now = self.last_ts = max(self.last_ts, timestamp)
        self._expire()
        did = _id(dedup_id)
        if did == 0:
            return ModelResult(Code.INVALID_ID, False, 0)
        seen = self.dedup.get(did)
        if seen is not None:
            if seen["null"]:
                return ModelResult(Code.ORIGINAL_COMPENSATED, False, 0)
            return ModelResult(seen["code"], True, seen["seq"])
        entry: dict[str, Any] = {"code": Code.OK, "seq": 0, "kind": kind, "compensated": False, "null": False,
                                 "undo": None}
        try:
            parts, undo = fn(self.last_seq + 1)
            code = {"null": Code.NULL_COMPENSATED, "null_cancel": Code.NULL_CANCELLED}.get(parts, Code.OK)
            self.last_seq += 1
            self.event_parts.append(1 if isinstance(parts, str) else parts)
            entry.update(code=code, seq=self.last_seq, undo=undo)
        except _Reject as r:
            entry["code"] = r.code
        self.dedup[did] = entry
        return ModelResult(entry["code"], False, entry["seq"])

    def _acc(self, account_id) -> Account:
        a = self.accounts.get(_id(account_id))
        if a is None:
            raise _Reject(Code.ACCOUNT_NOT_FOUND)
        return a

    @staticmethod
    def _need(cond: bool, code: Code) -> None:
        if not cond:
            raise _Reject(code)

    # ------------------------------------------------------------------------------ account management
    def create_account(self, dedup_id, account_id, currency, lower_limit=0, upper_limit=None, *, timestamp=0):
        def op(seq):
            aid = _id(account_id)
            self._need(aid != 0, Code.INVALID_ID)
            self._need(aid not in self.accounts, Code.ACCOUNT_ALREADY_EXISTS)
            self._need(lower_limit is None or lower_limit <= 0, Code.INVALID_LIMITS)
            self._need(upper_limit is None or upper_limit >= 0, Code.INVALID_LIMITS)
            self.accounts[aid] = Account(aid, currency, lower_limit, upper_limit)
            return 1, None
        return self._run(dedup_id, Kind.CREATE_ACCOUNT, op, timestamp)

    def _set_state(self, kind, dedup_id, account_id, timestamp=0):
        def op(seq):
            a = self._acc(account_id)
            if kind == Kind.LOCK_ACCOUNT:
                self._need(a.state == State.NORMAL, Code.INVALID_STATE_TRANSITION)
                a.state = State.LOCKED
            elif kind == Kind.UNLOCK_ACCOUNT:
                self._need(a.state == State.LOCKED, Code.INVALID_STATE_TRANSITION)
                a.state = State.NORMAL
            else:
                self._need(a.state != State.DELETED, Code.INVALID_STATE_TRANSITION)
                self._need(a.available == 0 and not a.reservations and not a.pending_in and not a.pending_out,
                           Code.BALANCE_NOT_ZERO)
                a.state = State.DELETED
            a.version += 1
            return 1, None
        return self._run(dedup_id, kind, op, timestamp)

    def delete_account(self, dedup_id, account_id, *, timestamp=0):
        return self._set_state(Kind.DELETE_ACCOUNT, dedup_id, account_id, timestamp)

    def lock_account(self, dedup_id, account_id, *, timestamp=0):
        return self._set_state(Kind.LOCK_ACCOUNT, dedup_id, account_id, timestamp)

    def unlock_account(self, dedup_id, account_id, *, timestamp=0):
        return self._set_state(Kind.UNLOCK_ACCOUNT, dedup_id, account_id, timestamp)

    def update_account_config(self, dedup_id, account_id, *, lower_limit=..., upper_limit=..., timestamp=0):
        def op(seq):
            a = self._acc(account_id)
            self._need(a.state != State.DELETED, Code.INVALID_ACCOUNT_STATE)
            lo = a.lower_limit if lower_limit is ... else lower_limit
            hi = a.upper_limit if upper_limit is ... else upper_limit
            self._need(lo is None or hi is None or lo <= hi, Code.INVALID_LIMITS)
            self._need((lo is None or a.available >= lo) and (hi is None or a.available <= hi), Code.INVALID_LIMITS)
            a.lower_limit, a.upper_limit = lo, hi
            a.version += 1
            return 1, None
        return self._run(dedup_id, Kind.UPDATE_ACCOUNT_CONFIG, op, timestamp)

    # ------------------------------------------------------------------------------------ balances
    def _apply_deltas(self, deltas: list[tuple[Account, int]]) -> None:
        """All-or-nothing signed changes to available: overflow, then limits, on final balances."""
        final: dict[int, int] = {}
        for a, d in deltas:
            v = final.get(a.account_id, a.available) + d
            self._need(_fits(v), Code.OVERFLOW)
            final[a.account_id] = v
        for aid, v in final.items():
            self._need(self.accounts[aid].allows(v), Code.BALANCE_LIMIT_EXCEEDED)
        for aid, v in final.items():
            self.accounts[aid].available = v
            self.accounts[aid].version += 1

    def transfer(self, dedup_id, from_account_id, to_account_id, amount, currency,
                 expected_from_balance=None, expected_to_balance=None, *, timestamp=0):
        def op(seq):
            self._need(amount > 0, Code.INVALID_AMOUNT)
            self._need(_id(from_account_id) != _id(to_account_id), Code.SAME_ACCOUNT)
            f, t = self.accounts.get(_id(from_account_id)), self.accounts.get(_id(to_account_id))
            if f is None or t is None:
                raise _Reject(Code.ACCOUNT_NOT_FOUND)
            self._need(f.state == State.NORMAL and t.state == State.NORMAL, Code.INVALID_ACCOUNT_STATE)
            self._need(f.currency == currency and t.currency == currency, Code.CURRENCY_MISMATCH)
            self._need(expected_from_balance is None or f.available == expected_from_balance, Code.PRECONDITION_FAILED)
            self._need(expected_to_balance is None or t.available == expected_to_balance, Code.PRECONDITION_FAILED)
            self._apply_deltas([(f, -amount), (t, amount)])
            return 2, [(f.account_id, amount), (t.account_id, -amount)]
        return self._run(dedup_id, Kind.TRANSFER, op, timestamp)

    def batch_balance_operation(self, dedup_id, specs, preconditions=(), *, timestamp=0):
        specs, preconditions = list(specs), list(preconditions)

        def op(seq):
            self._need(len(specs) + len(preconditions) <= GROUP_SPECS_MAX, Code.BATCH_TOO_LARGE)
            resolved = []
            for aid, amount, cur in specs:
                self._need(amount != 0, Code.INVALID_AMOUNT)
                a = self._acc(aid)
                self._need(a.state == State.NORMAL, Code.INVALID_ACCOUNT_STATE)
                self._need(a.currency == cur, Code.CURRENCY_MISMATCH)
                resolved.append((a, amount))
            self._need(bool(resolved), Code.INVALID_AMOUNT)
            for aid, expected in preconditions:
                self._need(self._acc(aid).available == expected, Code.PRECONDITION_FAILED)
            self._apply_deltas(resolved)
            return len(resolved), [(a.account_id, -amount) for a, amount in resolved]
        return self._run(dedup_id, Kind.BATCH_BALANCE, op, timestamp)

    def reserve(self, dedup_id, account_id, reservation_id, amount, *, timestamp=0):
        def op(seq):
            rid = _id(reservation_id)
            self._need(rid != 0, Code.INVALID_ID)
            self._need(amount > 0, Code.INVALID_AMOUNT)
            a = self._acc(account_id)
            self._need(a.state == State.NORMAL, Code.INVALID_ACCOUNT_STATE)
            new_avail, new_res = a.available - amount, a.reservations.get(rid, 0) + amount
            self._need(_fits(new_avail) and _fits(new_res), Code.OVERFLOW)
            self._need(a.allows(new_avail), Code.BALANCE_LIMIT_EXCEEDED)
            a.available, a.reservations[rid] = new_avail, new_res
            a.version += 1
            return 1, None
        return self._run(dedup_id, Kind.RESERVE, op, timestamp)

    def release(self, dedup_id, account_id, reservation_id, amount=None, *, timestamp=0):
        def op(seq):
            rid = _id(reservation_id)
            self._need(rid != 0, Code.INVALID_ID)
            self._need(amount is None or amount > 0, Code.INVALID_AMOUNT)
            a = self._acc(account_id)
            self._need(a.state == State.NORMAL, Code.INVALID_ACCOUNT_STATE)
            self._need(rid in a.reservations, Code.RESERVATION_NOT_FOUND)
            amt = a.reservations[rid] if amount is None else amount
            self._need(amt <= a.reservations[rid], Code.RESERVATION_INSUFFICIENT)
            new_avail = a.available + amt
            self._need(_fits(new_avail), Code.OVERFLOW)
            self._need(a.allows(new_avail), Code.BALANCE_LIMIT_EXCEEDED)
            a.available = new_avail
            a.reservations[rid] -= amt
            if a.reservations[rid] == 0:
                del a.reservations[rid]
            a.version += 1
            return 1, None
        return self._run(dedup_id, Kind.RELEASE, op, timestamp)

    # ------------------------------------------------------------------------------------------ TCC
    def tcc_try(self, dedup_id, txn_id, specs, *, timestamp=0, expires_ms=0):
        specs = list(specs)

        def op(seq):
            txn = _id(txn_id)
            self._need(txn != 0, Code.INVALID_ID)
            self._need(len(specs) <= GROUP_SPECS_MAX, Code.BATCH_TOO_LARGE)
            self._need(bool(specs), Code.INVALID_AMOUNT)
            known = self.txns.get(txn)
            if known is not None:
                raise _Reject(Code.TXN_ALREADY_CANCELLED if known["state"] == "null_cancelled"
                              else Code.TXN_ALREADY_EXISTS)
            self._need(expires_ms == 0 or expires_ms > self.now, Code.TXN_EXPIRED)
            resolved = []
            for aid, amount, cur in specs:
                self._need(amount != 0, Code.INVALID_AMOUNT)
                a = self._acc(aid)
                self._need(a.state == State.NORMAL, Code.INVALID_ACCOUNT_STATE)
                self._need(a.currency == cur, Code.CURRENCY_MISMATCH)
                self._need(amount != I128_MIN, Code.OVERFLOW)
                resolved.append((a, amount))
            out: dict[int, int] = {}
            inc: dict[int, int] = {}
            outgoing: dict[int, int] = {}
            for a, amount in resolved:
                out.setdefault(a.account_id, a.available)
                inc.setdefault(a.account_id, 0)
                outgoing.setdefault(a.account_id, 0)
                if amount < 0:
                    out[a.account_id] += amount
                    outgoing[a.account_id] -= amount
                    self._need(_fits(out[a.account_id]) and _fits(outgoing[a.account_id]), Code.OVERFLOW)
                else:
                    inc[a.account_id] += amount
                    self._need(_fits(inc[a.account_id]), Code.OVERFLOW)
            for aid in out:
                a = self.accounts[aid]
                self._need(a.lower_limit is None or out[aid] >= a.lower_limit, Code.BALANCE_LIMIT_EXCEEDED)
                top = a.available + sum(a.pending_in.values()) + inc[aid]
                self._need(_fits(top), Code.OVERFLOW)
                self._need(a.upper_limit is None or top <= a.upper_limit, Code.BALANCE_LIMIT_EXCEEDED)
            for aid in out:
                self.accounts[aid].version += 1
            for a, amount in resolved:
                if amount < 0:
                    a.available += amount
                    a.pending_out[txn] = a.pending_out.get(txn, 0) - amount
                    a.pending_in.setdefault(txn, 0)
                else:
                    a.pending_in[txn] = a.pending_in.get(txn, 0) + amount
                    a.pending_out.setdefault(txn, 0)
            self.txns[txn] = {"state": "tried", "specs": [(a.account_id, amount) for a, amount in resolved],
                              "expires": expires_ms, "due": expires_ms}
            return len(resolved), None
        return self._run(dedup_id, Kind.TCC_TRY, op, timestamp)

    def _finish_txn(self, txn: int, t: dict, confirm: bool) -> int:
        """Confirm or cancel a tried txn (all or nothing); its event parts."""
        touched = []
        for aid, _ in t["specs"]:
            if aid not in touched:
                touched.append(aid)
        back = {}
        for aid in touched:
            a = self.accounts[aid]
            amt = a.pending_in[txn] if confirm else a.pending_out[txn]
            v = a.available + amt
            self._need(_fits(v), Code.OVERFLOW)
            self._need(amt <= 0 or a.upper_limit is None or v <= a.upper_limit, Code.BALANCE_LIMIT_EXCEEDED)
            back[aid] = v
        for aid in touched:
            a = self.accounts[aid]
            a.available = back[aid]
            a.version += 1
            del a.pending_in[txn], a.pending_out[txn]
        t["state"] = "confirmed" if confirm else "cancelled"
        return len(t["specs"])

    def _finish(self, kind, dedup_id, txn_id, timestamp=0):
        confirm = kind == Kind.TCC_CONFIRM

        def op(seq):
            txn = _id(txn_id)
            self._need(txn != 0, Code.INVALID_ID)
            t = self.txns.get(txn)
            if t is None:
                self._need(not confirm, Code.TXN_NOT_FOUND)
                self.txns[txn] = {"state": "null_cancelled", "specs": [], "expires": 0, "due": 0}
                return "null_cancel", None
            self._need(t["state"] != "confirmed", Code.TXN_ALREADY_CONFIRMED)
            self._need(t["state"] not in ("cancelled", "null_cancelled"), Code.TXN_ALREADY_CANCELLED)
            self._need(not (confirm and t["expires"] and t["expires"] <= self.now), Code.TXN_EXPIRED)
            return self._finish_txn(txn, t, confirm), None
        return self._run(dedup_id, kind, op, timestamp)

    def tcc_confirm(self, dedup_id, txn_id, *, timestamp=0):
        return self._finish(Kind.TCC_CONFIRM, dedup_id, txn_id, timestamp)

    def tcc_cancel(self, dedup_id, txn_id, *, timestamp=0):
        return self._finish(Kind.TCC_CANCEL, dedup_id, txn_id, timestamp)

    # ----------------------------------------------------------------------------------- compensate
    def compensate(self, dedup_id, original_dedup_id, *, timestamp=0):
        def op(seq):
            orig = _id(original_dedup_id)
            self._need(orig != 0 and orig != _id(dedup_id), Code.INVALID_ID)
            d = self.dedup.get(orig)
            if d is None:
                self.dedup[orig] = {"code": Code.ORIGINAL_COMPENSATED, "seq": seq, "kind": Kind.COMPENSATE,
                                    "compensated": False, "null": True, "undo": None}
                return "null", None
            self._need(not d["compensated"] and not d["null"], Code.ORIGINAL_COMPENSATED)
            if d["code"] != Code.OK:
                d["compensated"] = True
                return 1, None
            self._need(d["kind"] in (Kind.TRANSFER, Kind.BATCH_BALANCE), Code.NOT_COMPENSATABLE)
            deltas = [(self.accounts[aid], amount) for aid, amount in d["undo"]]
            self._need(all(a.state != State.DELETED for a, _ in deltas), Code.INVALID_ACCOUNT_STATE)
            self._apply_deltas(deltas)
            d["compensated"] = True
            return len(deltas), None
        return self._run(dedup_id, Kind.COMPENSATE, op, timestamp)

    # ---------------------------------------------------------------------------------------- reads
    def get_account(self, account_id):
        a = self.accounts.get(_id(account_id))
        if a is None:
            return None
        d = a.as_dict()
        d["pending_in"] = {k: v for k, v in d["pending_in"].items() if v}
        d["pending_out"] = {k: v for k, v in d["pending_out"].items() if v}
        return d

    def result_of(self, dedup_id):
        d = self.dedup.get(_id(dedup_id))
        if d is None:
            return None
        return ModelResult(d["code"], True, d["seq"] if d["code"] in SUCCESS_CODES else 0)

    def totals(self, currency):
        accs = [a for a in self.accounts.values() if a.currency == currency]
        return {"available": sum(a.available for a in accs),
                "reserved": sum(sum(a.reservations.values()) for a in accs),
                "pending_in": sum(sum(a.pending_in.values()) for a in accs),
                "pending_out": sum(sum(a.pending_out.values()) for a in accs)}

    # ---------------------------------------------------------------------------------- op records
    def apply_batch(self, ops, timestamp: int = 0) -> list[ModelResult]:
        """The same op-record batches the real ledger takes (records.OP_DTYPE), decoded in Python and
        dispatched to the methods above; one result per record (group members repeat their header's).
        Every command runs at the batch's time (the ledger's time never goes back: the methods' default
        timestamp 0 means "the newest time seen")."""
        from engine.records import OpFlag, get_i128, get_u128
        if not len(ops):
            return []                              # the ledger does not even look at the time
        self.last_ts = max(self.last_ts, timestamp)
        dedup, acct, other = get_u128(ops["dedup_id"]), get_u128(ops["account_id"]), get_u128(ops["other_id"])
        amount, exp_a, exp_b = get_i128(ops["amount"]), get_i128(ops["expected_a"]), get_i128(ops["expected_b"])
        kinds, flags, sizes = ops["kind"].tolist(), ops["flags"].tolist(), ops["group_size"].tolist()
        expires = ops["expires_ms"].tolist()
        cur = [bytes(c).rstrip(b"\0").decode("ascii", "replace") for c in ops["currency"]]
        out: list[ModelResult] = []
        i = 0
        while i < len(ops):
            k, f, g = Kind(kinds[i]), flags[i], max(sizes[i], 1)
            if k == Kind.TRANSFER:
                r = self.transfer(dedup[i], acct[i], other[i], amount[i], cur[i],
                                  exp_a[i] if f & OpFlag.HAS_EXPECTED_A else None,
                                  exp_b[i] if f & OpFlag.HAS_EXPECTED_B else None)
            elif k == Kind.CREATE_ACCOUNT:
                lo = None if f & OpFlag.LOWER_UNBOUNDED else (amount[i] if f & OpFlag.HAS_EXPECTED_A else 0)
                hi = None if (f & OpFlag.UPPER_UNBOUNDED or not f & OpFlag.HAS_EXPECTED_B) else exp_a[i]
                r = self.create_account(dedup[i], acct[i], cur[i], lo, hi)
            elif k in (Kind.DELETE_ACCOUNT, Kind.LOCK_ACCOUNT, Kind.UNLOCK_ACCOUNT):
                r = self._set_state(k, dedup[i], acct[i])
            elif k == Kind.UPDATE_ACCOUNT_CONFIG:
                kw = {}
                if f & OpFlag.HAS_EXPECTED_A:
                    kw["lower_limit"] = None if f & OpFlag.LOWER_UNBOUNDED else amount[i]
                if f & OpFlag.HAS_EXPECTED_B:
                    kw["upper_limit"] = None if f & OpFlag.UPPER_UNBOUNDED else exp_a[i]
                r = self.update_account_config(dedup[i], acct[i], **kw)
            elif k == Kind.BATCH_BALANCE:
                specs = [(acct[j], amount[j], cur[j]) for j in range(i + 1, i + g) if kinds[j] == Kind.SPEC]
                pre = [(acct[j], amount[j]) for j in range(i + 1, i + g) if kinds[j] == Kind.PRECONDITION]
                r = self.batch_balance_operation(dedup[i], specs, pre)
            elif k == Kind.RESERVE:
                r = self.reserve(dedup[i], acct[i], other[i], amount[i])
            elif k == Kind.RELEASE:
                r = self.release(dedup[i], acct[i], other[i], None if f & OpFlag.FULL_RELEASE else amount[i])
            elif k == Kind.TCC_TRY:
                r = self.tcc_try(dedup[i], other[i], [(acct[j], amount[j], cur[j]) for j in range(i + 1, i + g)],
                                 expires_ms=expires[i])
            elif k in (Kind.TCC_CONFIRM, Kind.TCC_CANCEL):
                r = self._finish(k, dedup[i], other[i])
            elif k == Kind.COMPENSATE:
                r = self.compensate(dedup[i], other[i])
            else:
                raise ValueError(f"record {i}: kind {k!r} outside a group")
            out.extend([r] * g)
            i += g
        return out
