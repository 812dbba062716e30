"""The query service's wire: ops on the common request/reply header (``engine/service/protocol.py``) and
msgpack payloads. Integers beyond 64 bits (u128 account ids, i128 amounts) travel as msgpack extension type
``EXT_BIG_INT`` holding the decimal digits, so every value is lossless; ``pack``/``unpack`` do both ends."""
from __future__ import annotations

from typing import Any

import msgspec

OP_BALANCE = 20                # {account_id, at_seq?, at_ms?}
OP_HISTORY = 21                # {account_id, first_seq?, last_seq?, since_ms?, until_ms?, limit?}
OP_BALANCES = 22               # {account_ids: [...]}
OP_SET_PARENT = 23             # {node_id, parent_id (nil: detach)}
OP_HIERARCHY_BALANCE = 24      # {node_id, currency, at_ms?}
OP_EVENTS_RANGE = 25           # {shard, first_seq?, last_seq?, since_ms?, until_ms?} -> {records: bin, next_seq}
QUERY_OPS = {OP_BALANCE: "BALANCE", OP_HISTORY: "HISTORY", OP_BALANCES: "BALANCES", OP_SET_PARENT: "SET_PARENT",
             OP_HIERARCHY_BALANCE: "HIERARCHY_BALANCE", OP_EVENTS_RANGE: "EVENTS_RANGE"}
EVENTS_RANGE_RECORDS_MAX = 65_536   # event records in one EVENTS_RANGE answer (whole seqs; next_seq continues)
# every op's payload may also carry read-your-writes: min_seqs {shard: seq} and wait_ms (bounded)

PAYLOAD_BYTES_MAX = 256 << 10   # a request payload larger than this is refused before decoding
WAIT_MS_MAX = 5000              # the longest read-your-writes wait a request may ask for
WAIT_MS_DEFAULT = 1000
EXT_BIG_INT = 1

_I64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1


def _wide(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v if _I64_MIN <= v <= _U64_MAX else msgspec.msgpack.Ext(EXT_BIG_INT, str(v).encode())
    if isinstance(v, dict):
        return {k: _wide(x) for k, x in v.items()}      # (keys: shard ids and names)
    if isinstance(v, (list, tuple)):
        return [_wide(x) for x in v]
    return v


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != EXT_BIG_INT or len(data) > 50:
        raise ValueError(f"unknown msgpack extension {code}")
    return int(bytes(data).decode("ascii"))


_decoder = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


def pack(v: Any) -> bytes:
    return msgspec.msgpack.encode(_wide(v))


def unpack(data: bytes | memoryview) -> Any:
    return _decoder.decode(data)
