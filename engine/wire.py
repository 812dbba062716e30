"""The client protocol of a shard node: frame layouts, request and reply headers, error codes, limits.

Every client talks to a node's ROUTER from a DEALER. One request is exactly two frames, one reply two or
three:

    request:  [header: msgpack Request]  [payload: bytes, possibly empty]
    reply:    [header: msgpack Reply]    [payload: bytes, possibly empty]  ([events: bytes] for APPLY
                                                                            with want_events)

Payloads of the hot path are raw fixed-size records (``engine.records``), never msgpack: op records in,
result records out. The header is a msgspec Struct encoded as a msgpack array (``array_like``), so it costs
well under a microsecond to decode. Events go out on the node's PUB socket as

    [b"ev"]  [header: msgpack EventsHeader]  [event records]

Everything here is shared by the node (`engine/node.py`) and the clients (`engine/client.py`). The header
(``Request``, ``Reply``, ``Status``, ``ErrorCode``, ``Consistency``, ``EventsHeader``) is every replicated
service's: it lives in ``engine/service/protocol.py`` and is re-exported here; the ops and payloads below
are the shard's.
"""
from __future__ import annotations

import json
from enum import IntEnum
from typing import Any

import msgspec
import numpy as np

from engine.records import (
    BATCH_SIZE_MAX,
    OP_DTYPE,
    RESULT_DTYPE,
    State,
    put_u128,
)

# the generic header (every replicated service's), re-exported here: engine/service/protocol.py
from engine.service.protocol import (EVENTS_PER_REPLY_MAX, EVENTS_TOPIC, HEADER_BYTES_MAX, OP_EVENTS, OP_STATUS,
                                     PROTOCOL_VERSION, Consistency, ErrorCode, EventsHeader, Reply, Request, Status,
                                     UnsupportedVersion, decode_events_header, decode_reply, decode_request, encode,
                                     salvage_req_id)

__all__ = ["EVENTS_PER_REPLY_MAX", "EVENTS_TOPIC", "HEADER_BYTES_MAX", "PROTOCOL_VERSION", "Consistency", "ErrorCode",
           "EventsHeader", "Reply", "Request", "Status", "UnsupportedVersion", "decode_events_header",
           "decode_reply", "decode_request", "encode", "salvage_req_id", "Op", "APPLY_PAYLOAD_BYTES_MAX", "ID_BYTES",
           "IDS_PER_REQUEST_MAX", "FRAME_BYTES_MAX_DEFAULT", "RESULT_UNKNOWN", "encode_ids", "decode_ids",
           "encode_accounts", "decode_accounts", "encode_totals", "decode_totals", "results_view", "TOTALS_FIELDS"]

# --- named limits of the shard (defaults; the node's config may lower or raise the configurable ones) ----
APPLY_PAYLOAD_BYTES_MAX = BATCH_SIZE_MAX * OP_DTYPE.itemsize
ID_BYTES = 16                                           # one u128 id in a GET_ACCOUNTS / RESULT_OF payload
IDS_PER_REQUEST_MAX = BATCH_SIZE_MAX                    # GET_ACCOUNTS / RESULT_OF ids in one request
# The default client frame limit (the node's ``frame_bytes_max``, its ZMQ_MAXMSGSIZE): the largest legal
# frame is a full APPLY batch; the allowance (one header's worth) leaves room for a record that grows.
FRAME_BYTES_MAX_DEFAULT = APPLY_PAYLOAD_BYTES_MAX + HEADER_BYTES_MAX
RESULT_UNKNOWN = 0xFFFF                                 # RESULT_OF: this dedup_id is not remembered


class Op(IntEnum):
    """What a request asks for (``Request.op``). EVENTS and STATUS are the service's (every app's)."""
    APPLY = 1          # payload: op records (<= BATCH_SIZE_MAX); reply payload: one result record each
    GET_ACCOUNTS = 2   # payload: u128 account ids; reply payload: JSON list of accounts (null if unknown),
                       # every integer but ``state`` a decimal string (lossless in any JSON parser)
    EVENTS = OP_EVENTS  # first_seq..last_seq; reply payload: event records (all parts of each seq)
    RESULT_OF = 4      # payload: u128 dedup ids; reply payload: result records (code RESULT_UNKNOWN if none)
    STATUS = OP_STATUS  # reply payload: msgpack dict (role, term, leader, applied index, last_seq, digest)
    TOTALS = 6         # currency in Request.currency; reply payload: JSON {available, reserved, ...} of
                       # decimal strings


# --- id and account payloads ------------------------------------------------------------------------
def encode_ids(ids: list[int]) -> bytes:
    arr = np.zeros((len(ids), 2), dtype="<u8")
    if ids:
        put_u128(arr, [int(getattr(i, "int", i)) for i in ids])
    return arr.tobytes()


def decode_ids(payload: bytes | memoryview) -> list[int]:
    if len(payload) % ID_BYTES:
        raise ValueError(f"an id list is a whole number of {ID_BYTES}-byte little-endian u128 values")
    words = np.frombuffer(payload, dtype="<u8")
    return [lo | (hi << 64) for lo, hi in zip(words[0::2].tolist(), words[1::2].tolist())]


# GET_ACCOUNTS and TOTALS are JSON with every integer but ``state`` as a decimal string: 128-bit values
# (and sums beyond them) survive any JSON parser (JavaScript's JSON.parse rounds numbers above 2**53).
_ACCOUNT_INTS = ("account_id", "available", "reserved", "lower_limit", "upper_limit", "version")
_ACCOUNT_MAPS = ("reservations", "pending_in", "pending_out")
TOTALS_FIELDS = ("available", "reserved", "pending_in", "pending_out")


def _account_json(a: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: (None if a[k] is None else str(a[k])) for k in _ACCOUNT_INTS}
    out["currency"] = a["currency"]
    out["state"] = int(a["state"])
    for name in _ACCOUNT_MAPS:
        out[name] = [[str(k), str(v)] for k, v in a[name].items()]
    return out


def encode_accounts(accounts: list[dict[str, Any] | None]) -> bytes:
    """JSON, one entry per id: null or the account, integers as decimal strings and its maps as lists of
    ``[id, amount]`` string pairs (docs/protocol.md, "GET_ACCOUNTS")."""
    return msgspec.json.encode([None if a is None else _account_json(a) for a in accounts])


def decode_accounts(payload: bytes) -> list[dict[str, Any] | None]:
    """The inverse of ``encode_accounts``: the dicts ``Ledger.get_account`` returns."""
    out: list[dict[str, Any] | None] = []
    for a in json.loads(payload):
        if a is None:
            out.append(None)
            continue
        for k in _ACCOUNT_INTS:
            if a[k] is not None:
                a[k] = int(a[k])
        a["state"] = State(a["state"])
        for name in _ACCOUNT_MAPS:
            a[name] = {int(k): int(v) for k, v in a[name]}
        out.append(a)
    return out


def encode_totals(totals: dict[str, int]) -> bytes:
    return msgspec.json.encode({k: str(totals[k]) for k in TOTALS_FIELDS})


def decode_totals(payload: bytes) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads(payload).items()}


def results_view(payload: bytes) -> np.ndarray:
    if len(payload) % RESULT_DTYPE.itemsize:
        raise ValueError("result payload is not a whole number of result records")
    return np.frombuffer(payload, dtype=RESULT_DTYPE)
