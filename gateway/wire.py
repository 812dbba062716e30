"""The gateway service's protocol, on the service header (``engine/service/protocol.py``).

Every request is ``[Request header] [payload]``; replies ``[Reply header] [payload]``.

| op | name | payload | reply payload |
|---|---|---|---|
| 1 | CALL | msgpack ``[method, [args...], {kwargs}]``, <= CALL_BYTES_MAX | ``["ok", value]``, ``["err", kind, msg]`` |
| 5 | STATUS | empty | msgpack dict |

``method`` is one of ``gateway.ops.OPERATIONS`` (the embedded Ledger's method names, the business API's);
``args`` / ``kwargs`` are the Python call's, with these msgpack extension types for what msgpack has not:

| ext | what | data |
|---|---|---|
| 1 | an int above the u64 range (u128 ids, i128 amounts) | 16 bytes, little-endian unsigned |
| 7 | a map whose keys are not all strings or 64-bit ints (u128 txn / reservation ids) | msgpack list of [key, value] |
| 6 | an int below the i64 range (i128 amounts) | 16 bytes, little-endian two's complement |
| 2 | the Ledger's ``UNCHANGED`` (update_account_config) | empty |
| 3 | event records (``engine.records.EVENT_DTYPE``) | the records' bytes |
| 4 | op records (``engine.records.OP_DTYPE``: apply_batch) | the records' bytes |
| 8 | result records (``engine.records.RESULT_DTYPE``: apply_batch's answer) | the records' bytes |
| 5 | a ``gateway.Result`` | msgpack map of its fields (``Result.to_dict``: ``events`` or ``accounts``) |

A business outcome is an ``ok`` value (a Result with a code); ``err`` is an exception the call raised (``["err",
kind, message, {fields}]``: fields such as workflow_id, state, reason, code, when it has them): ``kind``
ValueError / TypeError / TemplateError (the caller's: nothing applied), WorkflowPending (the workflow goes on),
WorkflowRefused, Unavailable (outcome unknown: retry with the same ids), ClientError. A request refused before
it ran is a service ERROR reply (BAD_REQUEST, FRAME_TOO_LARGE, OVERLOADED, UNKNOWN_OP).
"""
from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from engine import records as R
from engine._ledger import UNCHANGED
from gateway.result import Result

OP_CALL = 1
OP_STATUS = 5
CALL_BYTES_MAX = 4 << 20              # a CALL payload, checked before decoding
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1     # what a msgpack int holds

EXT_BIGINT, EXT_UNCHANGED, EXT_EVENTS, EXT_OPS, EXT_RESULT, EXT_NEGINT, EXT_MAP, EXT_RESULTS = 1, 2, 3, 4, 5, 6, 7, 8


def _walk(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, (str, bytes, float)):
        return v
    if isinstance(v, int):
        if _INT_MIN <= v <= _INT_MAX:
            return int(v)
        if v > 0:
            return msgspec.msgpack.Ext(EXT_BIGINT, int(v).to_bytes(16, "little"))
        return msgspec.msgpack.Ext(EXT_NEGINT, int(v).to_bytes(16, "little", signed=True))
    if isinstance(v, np.integer):
        return _walk(int(v))
    if isinstance(v, dict):
        if all(isinstance(k, str) or (isinstance(k, int) and _INT_MIN <= k <= _INT_MAX) for k in v):
            return {k: _walk(x) for k, x in v.items()}
        return msgspec.msgpack.Ext(EXT_MAP, _encoder.encode([[_walk(k), _walk(x)] for k, x in v.items()]))
    if isinstance(v, (list, tuple)):
        return [_walk(x) for x in v]
    if isinstance(v, Result):
        return msgspec.msgpack.Ext(EXT_RESULT, _encoder.encode(_walk(v.to_dict())))
    if isinstance(v, np.ndarray):
        if v.dtype == R.EVENT_DTYPE:
            return msgspec.msgpack.Ext(EXT_EVENTS, np.ascontiguousarray(v).tobytes())
        if v.dtype == R.OP_DTYPE:
            return msgspec.msgpack.Ext(EXT_OPS, np.ascontiguousarray(v).tobytes())
        if v.dtype == R.RESULT_DTYPE:
            return msgspec.msgpack.Ext(EXT_RESULTS, np.ascontiguousarray(v).tobytes())
        raise TypeError(f"cannot send a numpy array of dtype {v.dtype}")
    if v is UNCHANGED:
        return msgspec.msgpack.Ext(EXT_UNCHANGED, b"")
    import uuid
    if isinstance(v, uuid.UUID):
        return _walk(v.int)
    raise TypeError(f"cannot send {type(v).__name__} to the gateway")


def _ext(code: int, data: memoryview) -> Any:
    if code in (EXT_BIGINT, EXT_NEGINT):
        if len(data) != 16:
            raise ValueError("a big int is 16 bytes")
        return int.from_bytes(data, "little", signed=code == EXT_NEGINT)
    if code == EXT_MAP:
        pairs = _decoder.decode(data)
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError("a map is a list of [key, value] pairs")
        return dict(pairs)
    if code == EXT_UNCHANGED:
        return UNCHANGED
    if code == EXT_EVENTS:
        return np.frombuffer(bytes(data), dtype=R.EVENT_DTYPE)
    if code == EXT_OPS:
        if len(data) % R.OP_DTYPE.itemsize:
            raise ValueError("op records are whole 128-byte records")
        return np.frombuffer(bytes(data), dtype=R.OP_DTYPE)
    if code == EXT_RESULTS:
        if len(data) % R.RESULT_DTYPE.itemsize:
            raise ValueError("result records are whole records")
        return np.frombuffer(bytes(data), dtype=R.RESULT_DTYPE)
    if code == EXT_RESULT:
        return Result.from_dict(_decoder.decode(data))
    raise ValueError(f"unknown msgpack extension {code}")


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ext_hook=_ext)


def encode(value: Any) -> bytes:
    return _encoder.encode(_walk(value))


def decode(data: bytes | memoryview) -> Any:
    return _decoder.decode(data)


def account_states(v: Any) -> Any:
    """Account dicts (get_account(s), Result.accounts) come back with ``state`` as ``engine.State``, as the
    embedded Ledger gives it."""
    if isinstance(v, dict) and "state" in v and "account_id" in v and isinstance(v["state"], int):
        v["state"] = R.State(v["state"])
    elif isinstance(v, list):
        for x in v:
            account_states(x)
    elif isinstance(v, Result) and v._accounts:      # decoded from dicts (events decode with their State)
        for acc in v._accounts.values():
            account_states(acc)
    return v


def encode_call(method: str, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> bytes:
    return encode([method, list(args), kwargs])


def decode_call(data: bytes | memoryview) -> tuple[str, list[Any], dict[str, Any]]:
    """A CALL payload (its size already checked): ValueError for anything that is not one."""
    try:
        v = decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise ValueError(f"bad CALL payload: {exc}") from None
    if (not isinstance(v, list) or len(v) != 3 or not isinstance(v[0], str) or not isinstance(v[1], list)
            or not isinstance(v[2], dict) or not all(isinstance(k, str) for k in v[2])):
        raise ValueError("a CALL payload is [method, [args...], {kwargs}]")
    return v[0], v[1], v[2]
