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

Everything here is shared by the node (`engine/node.py`) and the clients (`engine/client.py`).
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

PROTOCOL_VERSION = 1

# --- named limits (defaults; the node's config may lower or raise the configurable ones) -----------------
HEADER_BYTES_MAX = 4096                                 # a request header larger than this is refused
APPLY_PAYLOAD_BYTES_MAX = BATCH_SIZE_MAX * OP_DTYPE.itemsize
ID_BYTES = 16                                           # one u128 id in a GET_ACCOUNTS / RESULT_OF payload
IDS_PER_REQUEST_MAX = BATCH_SIZE_MAX                    # GET_ACCOUNTS / RESULT_OF ids in one request
# The default client frame limit (the node's ``frame_bytes_max``, its ZMQ_MAXMSGSIZE): the largest legal
# frame is a full APPLY batch; the allowance (one header's worth) leaves room for a record that grows.
FRAME_BYTES_MAX_DEFAULT = APPLY_PAYLOAD_BYTES_MAX + HEADER_BYTES_MAX
EVENTS_PER_REPLY_MAX = 65_536                           # event records in one EVENTS reply
RESULT_UNKNOWN = 0xFFFF                                 # RESULT_OF: this dedup_id is not remembered
EVENTS_TOPIC = b"ev"


class Op(IntEnum):
    """What a request asks for (``Request.op``)."""
    APPLY = 1          # payload: op records (<= BATCH_SIZE_MAX); reply payload: one result record each
    GET_ACCOUNTS = 2   # payload: u128 account ids; reply payload: JSON list of accounts (null if unknown),
                       # every integer but ``state`` a decimal string (lossless in any JSON parser)
    EVENTS = 3         # first_seq..last_seq; reply payload: event records (all parts of each seq)
    RESULT_OF = 4      # payload: u128 dedup ids; reply payload: result records (code RESULT_UNKNOWN if none)
    STATUS = 5         # reply payload: msgpack dict (role, term, leader, applied index, last_seq, digest)
    TOTALS = 6         # currency in Request.currency; reply payload: JSON {available, reserved, ...} of
                       # decimal strings


class Consistency(IntEnum):
    """How a read is served (``Request.consistency``)."""
    LINEARIZABLE = 0   # ReadIndex: confirmed by a quorum, then served from the local ledger (any replica)
    FOLLOWER = 1       # served by the replica it reaches once its ledger has applied seq >= min_seq


class Status(IntEnum):
    OK = 0
    NOT_LEADER = 1     # writes go to the leader: Reply.leader_id / leader_address say where, if known
    ERROR = 2          # Reply.error and Reply.message say what; nothing was applied


class ErrorCode(IntEnum):
    """Why a request failed. Whose fault: BAD_REQUEST, BATCH_TOO_LARGE, FRAME_TOO_LARGE, UNKNOWN_OP: the
    client's, nothing applied, do not retry as is. OVERLOADED, NOT_READY, TIMEOUT: retry later, with the
    same dedup ids. OUTCOME_UNKNOWN: the batch may or may not have been applied; retry with the same dedup
    ids (a retry is never applied twice) or ask RESULT_OF. EVENTS_UNAVAILABLE: this replica does not
    hold that range; ask another replica. RATE_LIMITED: an O(accounts) read (TOTALS, STATUS with the
    digest) over this replica's budget for them; retry after a pause (docs/protocol.md)."""
    NONE = 0
    BAD_REQUEST = 1
    BATCH_TOO_LARGE = 2
    FRAME_TOO_LARGE = 3
    UNKNOWN_OP = 4
    OVERLOADED = 5
    NOT_READY = 6
    TIMEOUT = 7
    OUTCOME_UNKNOWN = 8
    EVENTS_UNAVAILABLE = 9
    SHUTTING_DOWN = 10
    RATE_LIMITED = 11


class Request(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    req_id: int                       # chosen by the client, echoed in the reply (u64)
    op: int                           # Op
    consistency: int = 0              # Consistency, for reads
    min_seq: int = 0                  # FOLLOWER reads: wait until this replica applied seq >= min_seq
    first_seq: int = 0                # EVENTS
    last_seq: int = 0                 # EVENTS
    want_events: bool = False         # APPLY: also return the events the batch produced
    currency: str = ""                # TOTALS
    with_digest: bool = False         # STATUS: include the ledger's state digest (costs a full serialization)
    version: int = PROTOCOL_VERSION
    issued_ms: int = 0                # RESULT_OF: the commands were issued at or after this (bounds the search)


class Reply(msgspec.Struct, array_like=True):
    req_id: int
    status: int                       # Status
    error: int = 0                    # ErrorCode
    message: str = ""
    leader_id: int | None = None      # NOT_LEADER: the leader if known
    leader_address: str | None = None  # NOT_LEADER: the leader's client address if known
    last_seq: int = 0                 # the replica's ledger last_seq when it replied (read-your-writes)
    node_id: int = 0
    results_complete_since_ms: int = 0  # RESULT_OF: every command applied at or after this time (ms) is
                                        # found (in the dedup window or the event store's index)


class EventsHeader(msgspec.Struct, array_like=True):
    first_seq: int
    last_seq: int
    node_id: int


_req_encoder = msgspec.msgpack.Encoder()
_req_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_events_decoder = msgspec.msgpack.Decoder(EventsHeader)


def encode(msg: msgspec.Struct) -> bytes:
    return _req_encoder.encode(msg)


class UnsupportedVersion(ValueError):
    """A well-formed request header of another protocol version."""


def decode_request(data: bytes) -> Request:
    """Raises msgspec.DecodeError / ValueError on anything that is not a Request of a known version
    (``UnsupportedVersion`` for a well-formed header of another version)."""
    if len(data) > HEADER_BYTES_MAX:
        raise ValueError(f"request header of {len(data)} bytes exceeds HEADER_BYTES_MAX={HEADER_BYTES_MAX}")
    req = _req_decoder.decode(data)
    if req.version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {req.version} is not {PROTOCOL_VERSION}")
    if not 0 <= req.req_id < 1 << 64:
        raise ValueError("req_id must be an unsigned 64-bit integer")
    return req


def salvage_req_id(data: bytes | memoryview) -> int:
    """The req_id of a request header that does not decode, read from its first bytes only: if the frame
    starts with a msgpack array (fixarray, array 16 or array 32) whose first element is a non-negative
    integer below 2**64 (positive fixint, uint 8/16/32/64, or int 8/16/32/64 >= 0), that integer, whatever
    follows it; else 0. A refusal echoes it so the client can match it (docs/protocol.md, "Errors")."""
    b = bytes(data[:16])
    if not b:
        return 0
    t = b[0]
    if 0x90 <= t <= 0x9F:
        at = 1
    elif t == 0xDC:
        at = 3
    elif t == 0xDD:
        at = 5
    else:
        return 0
    if len(b) <= at:
        return 0
    t = b[at]
    if t <= 0x7F:
        return t
    widths = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
    n = widths.get(t)
    if n is None or len(b) < at + 1 + n:
        return 0
    v = int.from_bytes(b[at + 1:at + 1 + n], "big", signed=t >= 0xD0)
    return v if 0 <= v < 1 << 64 else 0


def decode_reply(data: bytes) -> Reply:
    return _reply_decoder.decode(data)


def decode_events_header(data: bytes) -> EventsHeader:
    return _events_decoder.decode(data)


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
