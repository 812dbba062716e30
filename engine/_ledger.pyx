# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# distutils: language = c++
"""The embedded ledger: one shard's accounts and operations, single-threaded, exactly-once.

The state machine itself is the C++ core in ``ledger_core.h`` (no I/O, no clock). This module owns the
numpy memory the accounts live in, validates input, converts Python values to fixed-size records and
back, and exposes the per-call API. Every per-call method builds op records and goes through the same
``apply_records`` entry point as ``apply_batch``: there is one implementation of every operation.
"""
import hashlib
import struct
import uuid

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcpy, memset
from cpython.ref cimport Py_INCREF, PyObject, PyTypeObject
from libcpp.vector cimport vector
from libcpp.string cimport string

from engine import records as _records
from engine.records import (Code, Kind, State, OpFlag, ResultFlag, OP_DTYPE, RESULT_DTYPE, EVENT_DTYPE,
                            BATCH_SIZE_MAX, GROUP_SPECS_MAX, SUCCESS_CODES, U128_MAX, I128_MAX, I128_MIN)

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # declared here: numpy's pxd leaves it out because it steals the reference to the dtype (the caller
    # increments it first)
    object _new_from_descr "PyArray_NewFromDescr" (PyTypeObject* subtype, cnp.dtype descr, int nd,
                                                   cnp.npy_intp* dims, cnp.npy_intp* strides, void* data,
                                                   int flags, PyObject* obj)

__all__ = ["Ledger", "OpEncoder", "check_batch", "Result", "Code", "Kind", "State", "UNCHANGED",
           "DEDUP_RETENTION_DEFAULT", "EVENT_RETENTION_DEFAULT", "ACCOUNTS_MAX_DEFAULT"]

DEDUP_RETENTION_DEFAULT = 1 << 20      # dedup ids remembered (FIFO); also finished TCC txns remembered
EVENT_RETENTION_DEFAULT = 1 << 20      # event records kept in memory (ring)
DEDUP_RETENTION_MIN = 16
EVENT_RETENTION_MIN = 4096             # must hold the largest single event (1 + GROUP_SPECS_MAX parts)
ACCOUNT_RECORD_BYTES = 96
ACCOUNT_CAPACITY_MAX = (1 << 31) - 1
ACCOUNTS_MAX_DEFAULT = 1 << 26         # account records reserved (address space only until created: 6 GiB)
_SNAPSHOT_MAGIC = b"ZWLSNAP1"

_CODES = tuple(sorted(Code, key=int))
_CODE_BY_VALUE = {int(c): c for c in Code}
_STATES = {int(s): s for s in State}
_KINDS = {int(k): k for k in Kind}
_U64_MASK = 0xFFFFFFFFFFFFFFFF
_SUCCESS_VALUES = frozenset(int(c) for c in SUCCESS_CODES)


class _Unchanged:
    __slots__ = ()

    def __repr__(self):
        return "UNCHANGED"


UNCHANGED = _Unchanged()

# --- layout cross-check: the C structs must match the numpy dtypes byte for byte --------------------
cdef OpRec _op_probe
cdef EvRec _ev_probe
cdef ResRec _res_probe


def _check_layouts():
    cdef char* base = <char*>&_op_probe
    assert sizeof(OpRec) == OP_DTYPE.itemsize, "OpRec size"
    assert sizeof(ResRec) == RESULT_DTYPE.itemsize, "ResRec size"
    assert sizeof(EvRec) == EVENT_DTYPE.itemsize, "EvRec size"
    offs = {
        "dedup_id": <char*>&_op_probe.dedup_id[0] - base, "account_id": <char*>&_op_probe.account_id[0] - base,
        "other_id": <char*>&_op_probe.other_id[0] - base, "amount": <char*>&_op_probe.amount[0] - base,
        "expected_a": <char*>&_op_probe.expected_a[0] - base, "expected_b": <char*>&_op_probe.expected_b[0] - base,
        "currency": <char*>&_op_probe.currency[0] - base, "kind": <char*>&_op_probe.kind - base,
        "flags": <char*>&_op_probe.flags - base, "group_size": <char*>&_op_probe.group_size - base,
        "reserved": <char*>&_op_probe.reserved - base, "issued_ms": <char*>&_op_probe.issued_ms - base,
        "expires_ms": <char*>&_op_probe.expires_ms - base,
    }
    for name, off in offs.items():
        assert OP_DTYPE.fields[name][1] == off, f"OpRec.{name} offset"
    base = <char*>&_res_probe
    assert RESULT_DTYPE.fields["seq_num"][1] == <char*>&_res_probe.seq_num - base
    assert RESULT_DTYPE.fields["code"][1] == <char*>&_res_probe.code - base
    assert RESULT_DTYPE.fields["flags"][1] == <char*>&_res_probe.flags - base
    base = <char*>&_ev_probe
    assert EVENT_DTYPE.fields["available"][1] == <char*>&_ev_probe.available[0] - base
    assert EVENT_DTYPE.fields["version"][1] == <char*>&_ev_probe.version - base
    assert EVENT_DTYPE.fields["parts"][1] == <char*>&_ev_probe.parts - base
    assert EVENT_DTYPE.fields["reserved2"][1] == <char*>&_ev_probe.reserved2 - base


_check_layouts()


# --- value conversion (the only place Python ints become 128-bit record fields and back) ------------
cdef inline object _as_int(object v, str what):
    if type(v) is int:
        return v
    if isinstance(v, uuid.UUID):
        return v.int
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{what} must be an int or uuid.UUID, not {type(v).__name__}")
    return v.__index__()


cdef int _put_u128(unsigned char* dst, object v, str what) except -1:
    cdef uint64_t lo
    v = _as_int(v, what)
    if v < 0 or v > U128_MAX:
        raise ValueError(f"{what}={v} is outside the unsigned 128-bit range [0, 2**128)")
    if v <= _U64_MASK:
        lo = <uint64_t>v
        memcpy(dst, &lo, 8)
        memset(dst + 8, 0, 8)
    else:
        raw = v.to_bytes(16, "little")
        memcpy(dst, <char*>raw, 16)
    return 0


cdef int _put_i128(unsigned char* dst, object v, str what) except -1:
    cdef int64_t small
    if type(v) is not int:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"{what} must be an int, not {type(v).__name__}")
        v = v.__index__()
    if -0x8000000000000000 <= v <= 0x7FFFFFFFFFFFFFFF:
        small = <int64_t>v
        memcpy(dst, &small, 8)
        memset(dst + 8, 0xFF if small < 0 else 0, 8)
        return 0
    if v < I128_MIN or v > I128_MAX:
        raise ValueError(f"{what}={v} is outside the signed 128-bit range")
    raw = v.to_bytes(16, "little", signed=True)
    memcpy(dst, <char*>raw, 16)
    return 0


cdef inline object _get_u128(const unsigned char* p):
    cdef uint64_t lo, hi
    memcpy(&lo, p, 8)
    memcpy(&hi, p + 8, 8)
    if hi == 0:
        return lo
    return (<object>hi << 64) | lo


cdef inline object _get_i128(const unsigned char* p):
    cdef int64_t lo_s
    cdef uint64_t hi
    memcpy(&hi, p + 8, 8)
    memcpy(&lo_s, p, 8)
    if (hi == 0 and lo_s >= 0) or (hi == _U64_MASK and lo_s < 0):
        return lo_s
    return int.from_bytes((<char*>p)[:16], "little", signed=True)


_currency_cache = {}


cdef int _put_currency(char* dst, object currency) except -1:
    cdef bytes raw = _currency(currency)
    memcpy(dst, <char*>raw, 8)
    return 0


cdef bytes _currency(object currency):
    cdef bytes raw = _currency_cache.get(currency)
    if raw is None:
        if not isinstance(currency, (str, bytes)):
            raise TypeError(f"currency must be a str, not {type(currency).__name__}")
        raw = _records.encode_currency(currency).ljust(8, b"\0")
        if len(_currency_cache) < 4096:
            _currency_cache[currency] = raw
    return raw


cdef class Result:
    """The outcome of one command: ``code`` (a Code), ``duplicate`` (True when this dedup_id was applied
    before and this is the original outcome, nothing re-applied), ``seq_num`` (its event, 0 if none)."""
    cdef readonly object code
    cdef readonly bint duplicate
    cdef readonly uint64_t seq_num
    cdef readonly object dedup_id
    cdef readonly object kind
    cdef Ledger _ledger

    def __repr__(self):
        return (f"Result(code={self.code.name}, duplicate={self.duplicate}, seq_num={self.seq_num}, "
                f"dedup_id={self.dedup_id})")

    @property
    def ok(self):
        return self.code in SUCCESS_CODES

    @property
    def accounts(self):
        """The accounts this command changed, as they were right after it (from its event):
        ``{account_id: {"account_id", "currency", "state", "available", "version"}}``. Empty for a
        rejection; raises ValueError if the event has left the event retention window."""
        if self.seq_num == 0:
            return {}
        return _records.accounts_from_events(self._ledger.events(self.seq_num, self.seq_num))


cdef class _CommandApi:
    """The per-call commands (one shared implementation of how each command becomes op records). What a
    built command does is ``_call``'s: ``Ledger`` applies it, ``OpEncoder`` hands the records back."""

    def __cinit__(self, *args, **kwargs):
        self._opbuf = np.zeros(BATCH_SIZE_MAX, dtype=OP_DTYPE)
        self._ops = <OpRec*><uintptr_t>self._opbuf.ctypes.data

    cdef object _call(self, uint64_t n, uint64_t timestamp):
        raise NotImplementedError

    cdef OpRec* _op(self, uint64_t i, object dedup_id, uint8_t kind) except NULL:
        cdef OpRec* o = &self._ops[i]
        memset(o, 0, sizeof(OpRec))
        _put_u128(o.dedup_id, dedup_id, "dedup_id")
        o.kind = kind
        o.group_size = 1
        return o

    cdef uint64_t _ts(self, object timestamp) except? 0:
        t = _as_int(timestamp, "timestamp")
        if not 0 <= t <= _U64_MASK:
            raise ValueError("timestamp must fit in an unsigned 64-bit integer")
        return <uint64_t>t

    def create_account(self, dedup_id, account_id, currency, lower_limit=0, upper_limit=None, *, timestamp=0):
        cdef uint64_t ts = self._ts(timestamp)
        cdef OpRec* o = self._op(0, dedup_id, 1)
        _put_u128(o.account_id, account_id, "account_id")
        _put_currency(o.currency, currency)
        o.flags = 1 | 2
        if lower_limit is None:
            o.flags |= 4
        else:
            _put_i128(o.amount, lower_limit, "lower_limit")
        if upper_limit is None:
            o.flags |= 8
        else:
            _put_i128(o.expected_a, upper_limit, "upper_limit")
        return self._call(1, ts)

    def delete_account(self, dedup_id, account_id, *, timestamp=0):
        return self._account_op(2, dedup_id, account_id, timestamp)

    def lock_account(self, dedup_id, account_id, *, timestamp=0):
        return self._account_op(3, dedup_id, account_id, timestamp)

    def unlock_account(self, dedup_id, account_id, *, timestamp=0):
        return self._account_op(4, dedup_id, account_id, timestamp)

    cdef object _account_op(self, uint8_t kind, object dedup_id, object account_id, object timestamp):
        cdef uint64_t ts = self._ts(timestamp)
        cdef OpRec* o = self._op(0, dedup_id, kind)
        _put_u128(o.account_id, account_id, "account_id")
        return self._call(1, ts)

    def update_account_config(self, dedup_id, account_id, *, lower_limit=UNCHANGED, upper_limit=UNCHANGED,
                              timestamp=0):
        """Change an account's limits; None = unbounded, UNCHANGED (default) = keep the current one."""
        cdef uint64_t ts = self._ts(timestamp)
        cdef OpRec* o = self._op(0, dedup_id, 5)
        _put_u128(o.account_id, account_id, "account_id")
        if lower_limit is not UNCHANGED:
            o.flags |= 1
            if lower_limit is None:
                o.flags |= 4
            else:
                _put_i128(o.amount, lower_limit, "lower_limit")
        if upper_limit is not UNCHANGED:
            o.flags |= 2
            if upper_limit is None:
                o.flags |= 8
            else:
                _put_i128(o.expected_a, upper_limit, "upper_limit")
        return self._call(1, ts)

    def transfer(self, dedup_id, from_account_id, to_account_id, amount, currency,
                 expected_from_balance=None, expected_to_balance=None, *, timestamp=0):
        cdef uint64_t ts = self._ts(timestamp)
        cdef OpRec* o = self._op(0, dedup_id, 6)
        _put_u128(o.account_id, from_account_id, "from_account_id")
        _put_u128(o.other_id, to_account_id, "to_account_id")
        _put_i128(o.amount, amount, "amount")
        _put_currency(o.currency, currency)
        if expected_from_balance is not None:
            o.flags |= 1
            _put_i128(o.expected_a, expected_from_balance, "expected_from_balance")
        if expected_to_balance is not None:
            o.flags |= 2
            _put_i128(o.expected_b, expected_to_balance, "expected_to_balance")
        return self._call(1, ts)

    cdef uint64_t _group(self, uint8_t kind, object dedup_id, object specs, object preconditions) except 0:
        specs = list(specs)
        preconditions = list(preconditions)
        cdef uint64_t n = 1 + len(specs) + len(preconditions)
        if n > BATCH_SIZE_MAX:
            raise ValueError(f"{n - 1} specs and preconditions do not fit in one batch (BATCH_SIZE_MAX={BATCH_SIZE_MAX})")
        cdef OpRec* h = self._op(0, dedup_id, kind)
        h.group_size = <uint16_t>n
        cdef uint64_t i = 1
        cdef OpRec* m
        for spec in specs:
            if len(spec) != 3:
                raise ValueError(f"a spec is (account_id, amount, currency), got {spec!r}")
            m = &self._ops[i]
            memset(m, 0, sizeof(OpRec))
            memcpy(m.dedup_id, h.dedup_id, 16)
            m.kind = 14
            _put_u128(m.account_id, spec[0], "spec account_id")
            _put_i128(m.amount, spec[1], "spec amount")
            _put_currency(m.currency, spec[2])
            i += 1
        for pre in preconditions:
            if len(pre) != 2:
                raise ValueError(f"a precondition is (account_id, expected_balance), got {pre!r}")
            m = &self._ops[i]
            memset(m, 0, sizeof(OpRec))
            memcpy(m.dedup_id, h.dedup_id, 16)
            m.kind = 15
            _put_u128(m.account_id, pre[0], "precondition account_id")
            _put_i128(m.amount, pre[1], "precondition expected_balance")
            i += 1
        return n

    def batch_balance_operation(self, dedup_id, specs, preconditions=(), *, timestamp=0):
        """Apply signed ``(account_id, amount, currency)`` specs all or nothing, if every
        ``(account_id, expected_balance)`` precondition holds."""
        cdef uint64_t ts = self._ts(timestamp)
        cdef uint64_t n = self._group(7, dedup_id, specs, preconditions)
        return self._call(n, ts)

    def reserve(self, dedup_id, account_id, reservation_id, amount, *, timestamp=0):
        cdef uint64_t ts = self._ts(timestamp)
        cdef OpRec* o = self._op(0, dedup_id, 8)
        _put_u128(o.account_id, account_id, "account_id")
        _put_u128(o.other_id, reservation_id, "reservation_id")
        _put_i128(o.amount, amount, "amount")
        return self._call(1, ts)

    def release(self, dedup_id, account_id, reservation_id, amount=None, *, timestamp=0):
        """Release a reservation back to available: all of it (amount=None) or part of it."""
        cdef uint64_t ts = self._ts(timestamp)
        cdef OpRec* o = self._op(0, dedup_id, 9)
        _put_u128(o.account_id, account_id, "account_id")
        _put_u128(o.other_id, reservation_id, "reservation_id")
        if amount is None:
            o.flags |= 16
        else:
            _put_i128(o.amount, amount, "amount")
        return self._call(1, ts)

    def tcc_try(self, dedup_id, txn_id, specs, *, timestamp=0, expires_ms=0):
        """Set money aside for txn_id: negative specs move available to pending_out, positive ones are
        recorded in pending_in. ``expires_ms`` (ms since the Unix epoch, 0 = never): at the first entry time
        >= it the ledger cancels the try itself, and a confirm from then on is refused."""
        cdef uint64_t ts = self._ts(timestamp)
        cdef uint64_t expires = self._ts(expires_ms)
        cdef uint64_t n = self._group(10, dedup_id, specs, ())
        _put_u128(self._ops[0].other_id, txn_id, "txn_id")
        self._ops[0].expires_ms = expires
        return self._call(n, ts)

    def tcc_confirm(self, dedup_id, txn_id, *, timestamp=0):
        return self._txn_op(11, dedup_id, txn_id, timestamp)

    def tcc_cancel(self, dedup_id, txn_id, *, timestamp=0):
        return self._txn_op(12, dedup_id, txn_id, timestamp)

    cdef object _txn_op(self, uint8_t kind, object dedup_id, object txn_id, object timestamp):
        cdef uint64_t ts = self._ts(timestamp)
        cdef OpRec* o = self._op(0, dedup_id, kind)
        _put_u128(o.other_id, txn_id, "txn_id")
        return self._call(1, ts)

    def compensate(self, dedup_id, original_dedup_id, *, timestamp=0):
        cdef uint64_t ts = self._ts(timestamp)
        cdef OpRec* o = self._op(0, dedup_id, 13)
        _put_u128(o.other_id, original_dedup_id, "original_dedup_id")
        return self._call(1, ts)



cdef class OpEncoder(_CommandApi):
    """Builds the op records of a per-call command without applying it: ``OpEncoder().transfer(d, a, b,
    100, "USD")`` returns a numpy array of ``OP_DTYPE`` records (1 record, or 1 + members for a group),
    exactly what ``Ledger.transfer`` would apply. Clients use it to put per-call commands into batches.
    Input is checked as the ledger checks it (ValueError/TypeError); ``timestamp`` becomes the command's
    ``issued_ms`` (a client passes the time it first issues the command and retries the same records; a
    replicated shard stamps each entry with its leader's clock)."""

    cdef object _call(self, uint64_t n, uint64_t timestamp):
        # a new array of the n records by memcpy: numpy's copy of a structured dtype with subarray fields
        # (``self._opbuf[:n].copy()``) goes field by field, ~14 us for one record (a client's per-call cost)
        self._ops[0].issued_ms = timestamp
        cdef cnp.npy_intp dims[1]
        dims[0] = <cnp.npy_intp>n
        Py_INCREF(OP_DTYPE)                    # PyArray_NewFromDescr steals a reference to the dtype
        cdef cnp.ndarray out = _new_from_descr(<PyTypeObject*>cnp.ndarray, <cnp.dtype>OP_DTYPE, 1, dims,
                                               NULL, NULL, 0, NULL)
        memcpy(cnp.PyArray_DATA(out), self._ops, n * sizeof(OpRec))
        return out


def dedup_hashes(ids):
    """The C core's 64-bit hashes of dedup ids given as an (n, 2) u64 ``[lo, hi]`` array: the same function as
    ``engine.service.event_store.dedup_hashes`` (the durable index's), for the tests that pin it."""
    a = np.ascontiguousarray(ids, dtype=np.uint64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError("ids must be an (n, 2) array of u64 [lo, hi]")
    cdef uint64_t[:, ::1] v = a
    out = np.empty(a.shape[0], dtype=np.uint64)
    cdef uint64_t[::1] o = out
    cdef Py_ssize_t k
    for k in range(a.shape[0]):
        o[k] = dedup_hash(v[k, 0], v[k, 1])
    return out


def check_batch(ops):
    """Check a batch of op records the way ``apply_batch`` does, without applying it: a numpy array of
    ``OP_DTYPE``, one-dimensional, C-contiguous, at most ``BATCH_SIZE_MAX`` records, well-formed groups,
    known kinds, reserved bytes zero. Raises TypeError/ValueError naming the fault; returns None."""
    _check_ops_array(ops)
    cdef const char* why = NULL
    cdef int64_t bad = validate_ops(<const OpRec*>cnp.PyArray_DATA(<cnp.ndarray>ops), ops.shape[0], &why)
    if bad >= 0:
        raise ValueError(f"malformed batch at record {bad}: {why.decode()}; nothing was applied")


cdef int _check_ops_array(object ops) except -1:
    if not isinstance(ops, np.ndarray):
        raise TypeError(f"ops must be a numpy array of OP_DTYPE, not {type(ops).__name__}")
    if ops.dtype != OP_DTYPE:
        raise TypeError(f"ops has dtype {ops.dtype}, expected engine.records.OP_DTYPE")
    if ops.ndim != 1 or not ops.flags.c_contiguous:
        raise ValueError("ops must be a one-dimensional C-contiguous array")
    if ops.shape[0] > BATCH_SIZE_MAX:
        raise ValueError(f"batch of {ops.shape[0]} records exceeds BATCH_SIZE_MAX={BATCH_SIZE_MAX}; "
                         "nothing was applied")
    return 0


cdef class Ledger(_CommandApi):
    """One shard's ledger, in memory. Single-threaded: do not call it from two threads at once."""

    def __cinit__(self, *, dedup_retention=DEDUP_RETENTION_DEFAULT, event_retention=EVENT_RETENTION_DEFAULT,
                  initial_capacity=1024, accounts_max=ACCOUNTS_MAX_DEFAULT):
        if int(dedup_retention) < DEDUP_RETENTION_MIN:
            raise ValueError(f"dedup_retention must be >= {DEDUP_RETENTION_MIN}")
        if int(event_retention) < EVENT_RETENTION_MIN:
            raise ValueError(f"event_retention must be >= {EVENT_RETENTION_MIN}")
        if not 1 <= int(accounts_max) <= ACCOUNT_CAPACITY_MAX:
            raise ValueError(f"accounts_max must be in 1..{ACCOUNT_CAPACITY_MAX}")
        if not 1 <= int(initial_capacity) <= ACCOUNT_CAPACITY_MAX:
            raise ValueError("initial_capacity out of range")
        self.dedup_retention = 1 << (int(dedup_retention) - 1).bit_length()   # rounded up to a power of two
        self.event_retention = 1 << (int(event_retention) - 1).bit_length()
        try:
            self.core = new Core(self.dedup_retention, self.event_retention, <uint32_t>int(accounts_max),
                                 min(int(initial_capacity), int(accounts_max)))
        except MemoryError:
            raise MemoryError(f"cannot reserve address space for {int(accounts_max)} accounts "
                              f"({int(accounts_max) * ACCOUNT_RECORD_BYTES} bytes) and the dedup window; "
                              "lower accounts_max or dedup_retention") from None
        self._resbuf = np.zeros(BATCH_SIZE_MAX, dtype=RESULT_DTYPE)
        self._res = <ResRec*><uintptr_t>self._resbuf.ctypes.data

    def __dealloc__(self):
        del self.core

    cdef int _check_batch(self, const OpRec* ops, uint64_t n) except -1:
        cdef const char* why = NULL
        cdef int64_t bad = self.core.validate(ops, n, &why)
        if bad >= 0:
            raise ValueError(f"malformed batch at record {bad}: {why.decode()}; nothing was applied")
        return 0

    cdef int apply_records(self, const OpRec* ops, uint64_t n, ResRec* out, uint64_t timestamp) except -1:
        self._check_batch(ops, n)
        self.core.apply(ops, n, out, timestamp)
        return 0

    # ------------------------------------------------------------------------------ the hot path
    def apply_batch(self, ops, timestamp=0, out=None):
        """Apply a batch of op records (numpy array of ``OP_DTYPE``, at most ``BATCH_SIZE_MAX``).
        Returns one ``RESULT_DTYPE`` record per op record (written into ``out[:len(ops)]`` when a
        C-contiguous ``RESULT_DTYPE`` array is given, to reuse its memory). A malformed batch raises
        ValueError/TypeError and applies nothing."""
        _check_ops_array(ops)
        cdef uint64_t n = ops.shape[0]
        ts = _as_int(timestamp, "timestamp")
        if not 0 <= ts <= _U64_MASK:
            raise ValueError("timestamp must fit in an unsigned 64-bit integer")
        if out is None:
            results = np.empty(n, dtype=RESULT_DTYPE)   # the core writes every byte
        else:
            if not isinstance(out, np.ndarray) or out.dtype != RESULT_DTYPE or out.ndim != 1 \
                    or not out.flags.c_contiguous or not out.flags.writeable or out.shape[0] < n:
                raise ValueError("out must be a writeable C-contiguous RESULT_DTYPE array of at least len(ops)")
            results = out[:n]
        if n:
            self.apply_records(<const OpRec*>cnp.PyArray_DATA(<cnp.ndarray>ops), n,
                               <ResRec*>cnp.PyArray_DATA(<cnp.ndarray>results), <uint64_t>ts)
        return results

    # ---------------------------------------------------------------------------- per-call API
    cdef object _call(self, uint64_t n, uint64_t timestamp):
        self._ops[0].issued_ms = timestamp          # an embedded command is issued at its timestamp
        self.apply_records(self._ops, n, self._res, timestamp)
        cdef ResRec* r = &self._res[0]
        cdef Result res = Result.__new__(Result)
        res.code = _CODES[r.code] if r.code < len(_CODES) else _CODE_BY_VALUE[r.code]
        res.duplicate = (r.flags & 1) != 0
        res.seq_num = r.seq_num
        res.dedup_id = _get_u128(r.dedup_id)
        res.kind = _KINDS[r.kind]
        res._ledger = self
        return res

    # ------------------------------------------------------------------------------------ reads
    def result_of(self, dedup_id):
        """The recorded outcome of ``dedup_id`` (``duplicate`` is True: it is the original outcome),
        or None if this ledger does not remember it. Applies nothing."""
        cdef unsigned char key[16]
        _put_u128(key, dedup_id, "dedup_id")
        return self._lookup(key)

    cdef object _lookup(self, const unsigned char* key):
        cdef uint16_t code
        cdef uint64_t seq
        cdef uint8_t kind, flags
        if not _dedup_get(self.core, key, &code, &seq, &kind, &flags):
            return None
        cdef Result res = Result.__new__(Result)
        res.code = _CODE_BY_VALUE[code]
        res.duplicate = True
        res.seq_num = seq if code in _SUCCESS_VALUES else 0
        res.dedup_id = _get_u128(key)
        res.kind = _KINDS.get(kind, kind)
        res._ledger = self
        return res

    def get_account(self, account_id):
        cdef unsigned char key[16]
        cdef AccountView v
        cdef vector[KV] items
        _put_u128(key, account_id, "account_id")
        if not self.core.view(key, &v):
            return None
        self.core.reservations_of(key, items)
        reservations = {_get_u128(items[i].key): _get_i128(items[i].a) for i in range(items.size())}
        self.core.pending_of(key, items)
        pending_in = {}
        pending_out = {}
        for i in range(items.size()):
            txn = _get_u128(items[i].key)
            pin = _get_i128(items[i].a)
            pout = _get_i128(items[i].b)
            if pin:
                pending_in[txn] = pin
            if pout:
                pending_out[txn] = pout
        return {
            "account_id": _get_u128(v.id),
            "currency": (<bytes>v.currency).decode("ascii"),
            "state": _STATES[v.state],
            "available": _get_i128(v.available),
            "reserved": _get_i128(v.reserved) + ((<object>v.reserved_carry) << 128),
            "reservations": reservations,
            "pending_in": pending_in,
            "pending_out": pending_out,
            "lower_limit": None if v.flags & 1 else _get_i128(v.lower),
            "upper_limit": None if v.flags & 2 else _get_i128(v.upper),
            "version": v.version,
        }

    def totals(self, currency):
        """Sums over the accounts of one currency: available, reserved, pending_in, pending_out."""
        cdef unsigned char lo[64]
        cdef int64_t carry[4]
        cdef bytes cur = _currency(currency)
        self.core.totals(<char*>cur, lo, carry)
        names = ("available", "reserved", "pending_in", "pending_out")
        return {names[i]: _get_i128(lo + 16 * i) + ((<object>carry[i]) << 128) for i in range(4)}

    def events(self, first_seq, last_seq):
        """The event records of seqs ``first_seq..last_seq`` (inclusive), all parts of each, in order. A range
        that reaches past the newest seq gives what exists (none if ``first_seq`` is past it). Raises
        ValueError if ``first_seq`` < 1, ``last_seq`` < ``first_seq``, or part of the range is no longer
        retained."""
        first = _as_int(first_seq, "first_seq")
        last = _as_int(last_seq, "last_seq")
        if not 1 <= first <= last:
            raise ValueError(f"bad event range {first}..{last} (seqs start at 1)")
        if first > self.core.last_seq:
            return np.empty(0, dtype=EVENT_DTYPE)
        last = min(last, self.core.last_seq)
        cdef uint64_t n = self.core.event_count(first, last)
        if n == <uint64_t>-1:
            raise ValueError(f"events {first}..{last} are no longer retained (event_retention="
                             f"{self.event_retention} records); fetch them from the event store")
        out = np.empty(n, dtype=EVENT_DTYPE)             # the copy writes every byte
        if n:
            self.core.copy_events(first, last, <EvRec*>cnp.PyArray_DATA(<cnp.ndarray>out))
        return out

    def event_index(self, first_seq, last_seq):
        """What the event store's durable dedup index needs of seqs ``first_seq..last_seq`` (the range
        ``events`` would give): ``(hashes, ts_first, ts_last)``, ``hashes`` one u64 per seq, the 64-bit hash
        (``engine.service.event_store.dedup_hashes``) of the dedup id of the seq's first (part 0) event
        record (the command's; 0's, which hashes to 0, for a TCC expiry), kept by the ledger as it applies;
        ``ts_first``/``ts_last`` the timestamps of the range's first and last records (events' timestamps
        never decrease: the least and the greatest). Derived output, like the events; raises ValueError as
        ``events`` does."""
        first = _as_int(first_seq, "first_seq")
        last = _as_int(last_seq, "last_seq")
        if not (1 <= first <= last <= self.core.last_seq):
            raise ValueError(f"event range {first}..{last} is outside 1..{self.core.last_seq}")
        if self.core.event_count(first, last) == <uint64_t>-1:
            raise ValueError(f"events {first}..{last} are no longer retained (event_retention="
                             f"{self.event_retention} records); fetch them from the event store")
        cdef uint64_t ts_first = 0, ts_last = 0
        hashes = np.empty(last - first + 1, dtype=np.uint64)
        self.core.copy_seq_hashes(first, last, <uint64_t*>cnp.PyArray_DATA(<cnp.ndarray>hashes), &ts_first, &ts_last)
        return hashes, ts_first, ts_last

    @property
    def last_seq(self):
        return self.core.last_seq

    @property
    def account_count(self):
        return self.core.acc_count

    @property
    def dedup_count(self):
        return self.core.dedup_size()

    @property
    def seq_before_commands(self):
        """``last_seq`` as it was when the latest apply call had expired the TCC tries due at its time and
        was about to apply its commands: that call's expiry events are the seqs just before and up to it,
        its commands' events the seqs after it."""
        return self.core.seq_before_commands

    def _check_invariants(self):
        """O(state) check of the open-item, pending_in-sum, txn and expiry-index bookkeeping (for tests).
        Raises AssertionError naming the first broken invariant."""
        cdef const char* why = self.core.check_invariants()
        if why != NULL:
            raise AssertionError(why.decode())

    def memory_bytes(self):
        """Bytes of the per-account structures (the account records and the id -> index table) and of
        the dedup window (its ring and index); ``dedup_overflow`` counts the dedup ids whose index bucket
        was full when they arrived (kept in a side map; a handful at most in normal operation)."""
        return {"accounts": int(self.core.acc_count) * ACCOUNT_RECORD_BYTES, "index": int(self.core.index_bytes()),
                "account_capacity": int(self.core.acc_capacity), "dedup": int(self.core.dedup_bytes()),
                "dedup_overflow": int(self.core.dedup_overflow())}

    def dedup_window(self):
        """The exactly-once window: ``size`` ids remembered of ``retention``; ``oldest_issued_ms``, the issue
        time of the oldest remembered command (0 if none); ``horizon_ms``: a command the window does not
        hold that was issued before it is refused with DEDUP_EXPIRED (it may have been applied before)."""
        size = int(self.core.dedup_size())
        return {"size": size, "retention": int(self.dedup_retention), "horizon_ms": int(self.core.horizon),
                "oldest_issued_ms": int(self.core.oldest_issued()) if size else 0,
                "last_timestamp_ms": int(self.core.last_ts)}

    def chain_digest(self):
        """A 16-byte running hash of every result and event in order, kept in O(1) per command: equal on
        two ledgers that applied the same commands (cheap, unlike ``digest``, which hashes the whole state)."""
        return struct.pack("<QQ", self.core.chain_a, self.core.chain_b)

    # --------------------------------------------------------------------------- snapshot / digest
    def digest(self):
        """A 32-byte hash of the whole state: equal on two ledgers that applied the same commands."""
        cdef string s = self.core.serialize()
        return hashlib.blake2b(s, digest_size=32).digest()

    def snapshot(self):
        """The whole state as bytes (versioned, checksummed); ``Ledger.restore`` reads it back."""
        cdef string s = self.core.serialize()
        body = <bytes>s
        return _SNAPSHOT_MAGIC + hashlib.blake2b(body, digest_size=32).digest() + body

    @classmethod
    def restore(cls, snapshot, *, accounts_max=ACCOUNTS_MAX_DEFAULT):
        if not isinstance(snapshot, (bytes, bytearray, memoryview)):
            raise TypeError("snapshot must be bytes")
        data = bytes(snapshot)
        if len(data) < 40 + 40 or data[:8] != _SNAPSHOT_MAGIC:
            raise ValueError("not a zwallet ledger snapshot")
        body = data[40:]
        if hashlib.blake2b(body, digest_size=32).digest() != data[8:40]:
            raise ValueError("snapshot checksum mismatch: corrupted or truncated")
        _, dedup_ret, event_ret, _, count = struct.unpack_from("<5Q", body, 0)
        if int(count) > int(accounts_max):
            raise ValueError(f"snapshot holds {int(count)} accounts, more than accounts_max={int(accounts_max)}")
        cdef Ledger led = cls(dedup_retention=dedup_ret, event_retention=event_ret,
                              initial_capacity=max(int(count), 1024), accounts_max=accounts_max)
        cdef const char* p = body
        cdef const char* err = led.core.deserialize(p, p + len(body))
        if err != NULL:
            raise ValueError(f"bad snapshot: {err.decode()}")
        if led.core.dedup_retention != led.dedup_retention or led.core.event_retention != led.event_retention:
            raise ValueError("bad snapshot: retention is not a power of two")
        return led


cdef extern from *:
    """
    static bool _dedup_get(zw::Core* c, const unsigned char* key, uint16_t* code, uint64_t* seq,
                           uint8_t* kind, uint8_t* flags) {
        const zw::Dedup* d = c->dfind(zw::ld_u(key));
        if (!d) return false;
        *code = d->code; *seq = d->seq; *kind = d->kind; *flags = d->flags;
        return true;
    }
    """
    bint _dedup_get(Core* c, const unsigned char* key, uint16_t* code, uint64_t* seq, uint8_t* kind,
                    uint8_t* flags)
