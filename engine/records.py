"""Fixed-size records of the hot path: operations in, results and events out.

This module is the one place the record layouts (numpy dtypes), the operation kinds, the result codes,
the account states, the flag bits and the named limits are defined. The Cython core (`_ledger.pyx`/`.pxd`)
mirrors these layouts as packed C structs and checks at import time that sizes and offsets agree.

Records travel on the wire unchanged: little-endian, no padding that is not named, every reserved byte zero.

128-bit integers are stored as two little-endian 64-bit words ``[lo, hi]`` in a ``('<u8', (2,))`` field;
signed values are two's complement over the 128 bits. Use `put_u128`/`put_i128` and `get_u128`/`get_i128`
to move Python ints (or int64 arrays) in and out.

Multi-record commands (batch balance operation, TCC try) are a *group*: a header record (kind
BATCH_BALANCE or TCC_TRY, ``group_size`` = number of records in the group including the header) followed
by ``group_size - 1`` member records of kind SPEC (account_id, amount, currency) or PRECONDITION
(account_id, amount = expected available balance). Members carry the header's dedup_id.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag
from collections.abc import Iterable, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------- limits
BATCH_SIZE_MAX = 8190            # records in one apply_batch call / one wire frame
GROUP_SPECS_MAX = 1024           # specs + preconditions in one batch balance operation or TCC try
CURRENCY_SIZE_MAX = 8            # bytes of an ASCII asset code ("USD", "BTC", "USDC")
ISSUED_AHEAD_MAX_MS = 60_000     # a command's issued_ms may be at most this far past its entry's time
OPEN_ITEMS_MAX = 4096            # reservations + open TCC tries on one account
U128_MAX = (1 << 128) - 1
I128_MAX = (1 << 127) - 1
I128_MIN = -(1 << 127)


class Kind(IntEnum):
    """Operation kind (op record ``kind``); also the command kind of an event."""
    CREATE_ACCOUNT = 1
    DELETE_ACCOUNT = 2
    LOCK_ACCOUNT = 3
    UNLOCK_ACCOUNT = 4
    UPDATE_ACCOUNT_CONFIG = 5
    TRANSFER = 6
    BATCH_BALANCE = 7      # group header
    RESERVE = 8
    RELEASE = 9
    TCC_TRY = 10           # group header
    TCC_CONFIRM = 11
    TCC_CANCEL = 12
    COMPENSATE = 13
    SPEC = 14              # group member: (account_id, amount, currency)
    PRECONDITION = 15      # group member: (account_id, expected available in amount)


class Code(IntEnum):
    """Result of one command. OK, NULL_COMPENSATED and NULL_CANCELLED are successes; every other code is a
    rejection that changed nothing (except that the rejection itself is remembered for exactly-once)."""
    OK = 0
    ACCOUNT_NOT_FOUND = 1
    ACCOUNT_ALREADY_EXISTS = 2
    INVALID_ACCOUNT_STATE = 3
    BALANCE_LIMIT_EXCEEDED = 4
    CURRENCY_MISMATCH = 5
    INVALID_AMOUNT = 6
    PRECONDITION_FAILED = 7
    RESERVATION_NOT_FOUND = 8
    RESERVATION_INSUFFICIENT = 9
    TXN_NOT_FOUND = 10
    TXN_ALREADY_EXISTS = 11
    TXN_ALREADY_CONFIRMED = 12
    TXN_ALREADY_CANCELLED = 13
    BALANCE_NOT_ZERO = 14
    INVALID_STATE_TRANSITION = 15
    OVERFLOW = 16
    SAME_ACCOUNT = 17
    ORIGINAL_COMPENSATED = 18
    BATCH_TOO_LARGE = 19
    NULL_COMPENSATED = 20          # compensate of a command never seen: recorded, original will be refused
    NOT_COMPENSATABLE = 21         # the original's kind cannot be undone by compensate
    INVALID_LIMITS = 22            # lower_limit > upper_limit, or current balance outside new limits
    INVALID_CURRENCY = 23          # empty, non-ASCII or too long asset code
    INVALID_ID = 24                # an id that must be non-zero is zero
    DEDUP_EXPIRED = 25             # not in the dedup window and issued before its horizon: may have been
                                   # applied before; never (re)applied (ask RESULT_OF for the outcome)
    ISSUED_IN_FUTURE = 26          # issued_ms more than ISSUED_AHEAD_MAX_MS past the entry's time
    OPEN_ITEMS_LIMIT_EXCEEDED = 27  # the account already has OPEN_ITEMS_MAX reservations + open TCC tries
    ACCOUNT_CAPACITY_EXCEEDED = 28  # the ledger holds accounts_max accounts
    NULL_CANCELLED = 29            # tcc_cancel of a txn never tried: recorded, its try will be refused
    TXN_EXPIRED = 30               # tcc_try whose expires_ms is not after its entry's time, or tcc_confirm of
                                   # a try past its expires_ms; in an event's code: the ledger cancelled an
                                   # expired try


SUCCESS_CODES = frozenset({Code.OK, Code.NULL_COMPENSATED, Code.NULL_CANCELLED})


class State(IntEnum):
    NORMAL = 0
    LOCKED = 1
    DELETED = 2


class OpFlag(IntFlag):
    """Bits of the op record ``flags`` byte."""
    NONE = 0
    HAS_EXPECTED_A = 1   # transfer: expected_from_balance is set; create/update: lower_limit given
    HAS_EXPECTED_B = 2   # transfer: expected_to_balance is set;   create/update: upper_limit given
    LOWER_UNBOUNDED = 4  # create/update: lower_limit is None (no lower bound)
    UPPER_UNBOUNDED = 8  # create/update: upper_limit is None (no upper bound)
    FULL_RELEASE = 16    # release: amount is ignored, the whole reservation is released


class ResultFlag(IntFlag):
    NONE = 0
    DUPLICATE = 1        # the dedup_id was applied before; this is the original result, nothing re-applied


_U128 = ("<u8", (2,))

# Operation record: 128 bytes. Field meaning by kind:
#   account_id  CREATE/DELETE/LOCK/UNLOCK/UPDATE/RESERVE/RELEASE: the account; TRANSFER: from;
#               SPEC/PRECONDITION: the account
#   other_id    TRANSFER: to; RESERVE/RELEASE: reservation_id; TCC_*: txn_id; COMPENSATE: original_dedup_id
#   amount      TRANSFER/RESERVE/RELEASE/SPEC: amount (signed for SPEC); PRECONDITION: expected balance;
#               CREATE/UPDATE: lower_limit
#   expected_a  TRANSFER: expected_from_balance; CREATE/UPDATE: upper_limit
#   expected_b  TRANSFER: expected_to_balance
#   currency    CREATE/TRANSFER/SPEC: ASCII asset code, NUL padded
#   group_size  records in the command (1 for single-record kinds; header of a group: 1 + members)
#   issued_ms   when the command was first issued, ms since the Unix epoch; a retry re-sends the same value.
#               Only a group's header's is read (members: 0 or the header's). See docs/ledger.md, exactly-once.
#   expires_ms  TCC_TRY header: the ledger cancels the try at the first entry time >= it (0: never expires);
#               must be 0 on every other record (members too). See docs/ledger.md, TCC.
#   reserved    must be zero
OP_DTYPE = np.dtype(
    [
        ("dedup_id", _U128),
        ("account_id", _U128),
        ("other_id", _U128),
        ("amount", _U128),
        ("expected_a", _U128),
        ("expected_b", _U128),
        ("currency", "S8"),
        ("kind", "u1"),
        ("flags", "u1"),
        ("group_size", "<u2"),
        ("reserved", "<u4"),
        ("issued_ms", "<u8"),
        ("expires_ms", "<u8"),
    ],
    align=False,
)
assert OP_DTYPE.itemsize == 128

# Result record: 32 bytes, one per op record, in the same order (members of a group repeat the header's).
RESULT_DTYPE = np.dtype(
    [
        ("dedup_id", _U128),
        ("seq_num", "<u8"),      # the event seq_num this command produced (0: no event)
        ("code", "<u2"),
        ("flags", "u1"),         # ResultFlag
        ("kind", "u1"),
        ("reserved", "<u4"),
    ]
)
assert RESULT_DTYPE.itemsize == 32

# Event record: 128 bytes. One command that applies produces one event (one seq_num) made of `parts`
# records, one per account it touched (part = 0..parts-1). Account management commands have one part.
#   amount     the change this command made to the account: TRANSFER/SPEC/BATCH: delta of available;
#              RESERVE/RELEASE: amount reserved/released; TCC_*: the spec amount; COMPENSATE: delta of available
#   available  the account's available balance after the command
#   version    the account's version after the command
EVENT_DTYPE = np.dtype(
    [
        ("seq_num", "<u8"),
        ("timestamp", "<u8"),    # caller-supplied (the leader's clock in a replicated shard)
        ("dedup_id", _U128),
        ("account_id", _U128),
        ("other_id", _U128),     # counterparty / reservation_id / txn_id / original_dedup_id
        ("amount", _U128),
        ("available", _U128),
        ("version", "<u8"),
        ("currency", "S8"),
        ("kind", "u1"),
        ("state", "u1"),         # account state after
        ("part", "<u2"),
        ("parts", "<u2"),
        ("code", "<u2"),         # the command's result: OK, NULL_COMPENSATED or NULL_CANCELLED; TXN_EXPIRED:
                                 # the ledger's own cancel of an expired try (dedup_id 0)
        ("reserved2", "<u8"),
    ]
)
assert EVENT_DTYPE.itemsize == 128


def field_offset(dtype: np.dtype, name: str) -> int:
    """The byte offset of a field of one of the record dtypes."""
    fields = dtype.fields
    assert fields is not None, "not a structured dtype"
    return int(fields[name][1])


# ------------------------------------------------------------------------------------- 128-bit helpers
def _split(values: Iterable[int], signed: bool) -> np.ndarray:
    lo_hi = []
    lo_bound, hi_bound = (I128_MIN, I128_MAX) if signed else (0, U128_MAX)
    for v in values:
        v = int(v)
        if not lo_bound <= v <= hi_bound:
            raise ValueError(f"{v} does not fit in a {'signed' if signed else 'unsigned'} 128-bit integer")
        v &= U128_MAX
        lo_hi.append((v & 0xFFFFFFFFFFFFFFFF, v >> 64))
    return np.array(lo_hi, dtype="<u8").reshape(-1, 2)


def put_u128(field: np.ndarray, values: Sequence[int] | np.ndarray | int) -> None:
    """Store unsigned ints (Python ints, or a non-negative integer array) into a ``(n, 2)`` u128 field."""
    _put(field, values, signed=False)


def put_i128(field: np.ndarray, values: Sequence[int] | np.ndarray | int) -> None:
    """Store signed ints (Python ints, or an int64 array) into a ``(n, 2)`` i128 field (two's complement)."""
    _put(field, values, signed=True)


def _put(field: np.ndarray, values, signed: bool) -> None:
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu" and values.dtype.itemsize <= 8:
        if values.dtype.kind == "i" and not signed and values.size and values.min() < 0:
            raise ValueError("negative value for an unsigned 128-bit field")
        field[..., 0] = values.astype("<i8", copy=False).view("<u8") if values.dtype.kind == "i" else values
        if values.dtype.kind == "i":
            field[..., 1] = np.where(values < 0, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(0))
        else:
            field[..., 1] = 0
        return
    if isinstance(values, (int, np.integer)):
        field[...] = _split([int(values)], signed)[0]
        return
    field[...] = _split(values, signed)


# numpy copies, concatenates and indexes a structured dtype with subarray fields (the u128 ``('<u8', (2,))``
# fields of every record here) field by field: ~80 ns a 128-byte record against ~4 for the same bytes as
# one opaque unit (numpy 2.4: a copy of 8190 event records 640 us, as void 33 us). These do the same on a
# view of the records as ``V<itemsize>`` and give back arrays of the original dtype.
def _as_void(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype((np.void, a.dtype.itemsize)))


def records_copy(a: np.ndarray) -> np.ndarray:
    """``a.copy()`` for record arrays, at memcpy speed."""
    return _as_void(a).copy().view(a.dtype)


def records_take(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``a[index]`` (an integer or boolean index) for record arrays, at memcpy speed."""
    return _as_void(a)[index].view(a.dtype)


def records_concat(arrays: Sequence[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """``np.concatenate(arrays)`` for record arrays of ``dtype``, at memcpy speed (empty: no records)."""
    if not arrays:
        return np.zeros(0, dtype=dtype)
    for a in arrays:
        if a.dtype != dtype:
            raise TypeError(f"records of dtype {a.dtype} are not {dtype}")
    if len(arrays) == 1:
        return records_copy(arrays[0])
    return np.concatenate([_as_void(a) for a in arrays]).view(dtype)


def get_u128(field: np.ndarray) -> list[int]:
    flat = np.asarray(field, dtype="<u8").reshape(-1, 2)
    return [int(lo) | (int(hi) << 64) for lo, hi in flat]


def get_i128(field: np.ndarray) -> list[int]:
    out = []
    for v in get_u128(field):
        out.append(v - (1 << 128) if v >> 127 else v)
    return out


def accounts_from_events(evs: np.ndarray) -> dict[int, dict]:
    """The accounts one command changed, as they were right after it, from its event records:
    ``{account_id: {"account_id", "currency", "state", "available", "version"}}`` (the shape of
    ``Result.accounts``, embedded or remote)."""
    out: dict[int, dict] = {}
    ids = get_u128(evs["account_id"])
    avail = get_i128(evs["available"])
    for k in range(len(evs)):
        if ids[k] == 0:
            continue
        out[ids[k]] = {"account_id": ids[k], "currency": bytes(evs["currency"][k]).decode("ascii"),
                       "state": State(int(evs["state"][k])), "available": avail[k],
                       "version": int(evs["version"][k])}
    return out


def encode_currency(currency: str | bytes) -> bytes:
    """Validate and encode an asset code: 1..8 printable ASCII characters."""
    raw = currency.encode("ascii") if isinstance(currency, str) else bytes(currency)
    if not 1 <= len(raw) <= CURRENCY_SIZE_MAX or not all(0x21 <= b <= 0x7E for b in raw):
        raise ValueError(f"invalid currency {currency!r}: 1 to {CURRENCY_SIZE_MAX} printable ASCII characters")
    return raw


def empty_ops(n: int) -> np.ndarray:
    """A zeroed batch of ``n`` op records (every reserved byte already zero)."""
    if not 0 <= n <= BATCH_SIZE_MAX:
        raise ValueError(f"batch of {n} records: the limit is BATCH_SIZE_MAX={BATCH_SIZE_MAX}")
    return np.zeros(n, dtype=OP_DTYPE)


def transfers(dedup_ids, from_ids, to_ids, amounts, currency: str | bytes, issued_ms: int = 0) -> np.ndarray:
    """Build a batch of TRANSFER records from integer arrays (ids < 2**63 when given as int64 arrays),
    issued at ``issued_ms`` (0 leaves it for the client to stamp when it first sends the batch)."""
    n = len(dedup_ids)
    ops = empty_ops(n)
    put_u128(ops["dedup_id"], np.asarray(dedup_ids) if not isinstance(dedup_ids, np.ndarray) else dedup_ids)
    put_u128(ops["account_id"], np.asarray(from_ids) if not isinstance(from_ids, np.ndarray) else from_ids)
    put_u128(ops["other_id"], np.asarray(to_ids) if not isinstance(to_ids, np.ndarray) else to_ids)
    put_i128(ops["amount"], np.asarray(amounts) if not isinstance(amounts, np.ndarray) else amounts)
    ops["currency"] = encode_currency(currency)
    ops["kind"] = Kind.TRANSFER
    ops["group_size"] = 1
    ops["issued_ms"] = issued_ms
    return ops
