"""The request/reply header every replicated service speaks on its ROUTER (the shard, the Marker, the counter).

One request is exactly two frames, one reply two or three::

    request:  [header: msgpack Request]  [payload: bytes, possibly empty]
    reply:    [header: msgpack Reply]    [payload: bytes, possibly empty]  ([extra: bytes], app-defined)

and the service's event stream goes out on its PUB socket as ``[EVENTS_TOPIC] [msgpack EventsHeader] [records]``.

``Request.op`` is the application's, except the two ops every service answers the same way (served by the
machinery, ``engine/service/server.py``): ``OP_EVENTS`` (a range of the event stream, from the event
store) and ``OP_STATUS`` (role, term, leader, indexes, the app's fields). An app numbers its own ops
around them. Some header fields are the shard's (``want_events``, ``currency``, ``issued_ms``): another app
may leave them at their defaults or give them its own meaning; the header layout is fixed (its field order
is the wire format) and shared so that a client core, refusals and redirects are one piece of code.
"""
from __future__ import annotations

from enum import IntEnum

import msgspec

PROTOCOL_VERSION = 1

HEADER_BYTES_MAX = 4096                                 # a request header larger than this is refused
EVENTS_PER_REPLY_MAX = 65_536                           # event records in one EVENTS reply
EVENTS_TOPIC = b"ev"

OP_EVENTS = 3         # first_seq..last_seq; reply payload: event records (every record of each seq)
OP_STATUS = 5         # reply payload: msgpack dict (role, term, leader, applied index, last_seq, app fields)
SERVICE_OPS = frozenset({OP_EVENTS, OP_STATUS})


class Consistency(IntEnum):
    """How a read is served (``Request.consistency``)."""
    LINEARIZABLE = 0   # ReadIndex: confirmed by a quorum, then served from the local state (any replica)
    FOLLOWER = 1       # served by the replica it reaches once its state has applied seq >= min_seq


class Status(IntEnum):
    OK = 0
    NOT_LEADER = 1     # writes go to the leader: Reply.leader_id / leader_address say where, if known
    ERROR = 2          # Reply.error and Reply.message say what; nothing was applied


class ErrorCode(IntEnum):
    """Why a request failed. Whose fault: BAD_REQUEST, BATCH_TOO_LARGE, FRAME_TOO_LARGE, UNKNOWN_OP: the
    client's, nothing applied, do not retry as is. OVERLOADED, NOT_READY, TIMEOUT: retry later, with the
    same dedup ids. OUTCOME_UNKNOWN: the batch may or may not have been applied; retry with the same dedup
    ids (a retry is never applied twice) or ask RESULT_OF. EVENTS_UNAVAILABLE: this replica does not
    hold that range; ask another replica. UNAUTHORIZED: the client's key may not do that (do not retry).
    RATE_LIMITED: an O(state) read (TOTALS, STATUS with the
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
    WRONG_SHARD = 12   # the shard map gives an account of the request to another shard (Reply.shard_epoch:
                       # the map this replica serves); nothing applied: refresh the map and route again
    STALE_EPOCH = 13   # the request was routed with a shard map epoch other than this replica's
                       # (Reply.shard_epoch); nothing applied
    WRONG_GROUP = 14   # a Marker group asked to run a workflow another group owns (or a removed one ran);
                       # nothing created: the message says which (marker/groups.py)
    UNAUTHORIZED = 15  # the client's key (CURVE) lacks the rights the request needs (read-only writing, an
                       # account outside its ranges, admin ops); nothing applied: docs/security.md
    NOT_AVAILABLE = 16  # a read-your-writes query (query/): the view had not reached the asked seq per shard
                        # within the bounded wait; the message says how far it is. Retry later


class Request(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    req_id: int                       # chosen by the client, echoed in the reply (u64)
    op: int                           # the app's op (or OP_EVENTS / OP_STATUS)
    consistency: int = 0              # Consistency, for reads
    min_seq: int = 0                  # FOLLOWER reads: wait until this replica applied seq >= min_seq
    first_seq: int = 0                # EVENTS
    last_seq: int = 0                 # EVENTS
    want_events: bool = False         # shard APPLY: also return the events the batch produced
    currency: str = ""                # shard TOTALS
    with_digest: bool = False         # STATUS: accepted for compatibility (the digest is always there)
    version: int = PROTOCOL_VERSION
    issued_ms: int = 0                # shard RESULT_OF: the commands were issued at or after this
    shard_epoch: int = 0              # shard writes: the shard map epoch the router used (0: not checked)


class Reply(msgspec.Struct, array_like=True):
    req_id: int
    status: int                       # Status
    error: int = 0                    # ErrorCode
    message: str = ""
    leader_id: int | None = None      # NOT_LEADER: the leader if known
    leader_address: str | None = None  # NOT_LEADER: the leader's client address if known
    last_seq: int = 0                 # the replica's event stream last_seq when it replied (read-your-writes)
    node_id: int = 0
    results_complete_since_ms: int = 0  # shard RESULT_OF: every command applied at or after this time (ms)
                                        # is found (in the dedup window or the event store's index)
    shard_epoch: int = 0              # errors of a replica that serves a shard map: its epoch (WRONG_SHARD,
                                      # STALE_EPOCH say the router's map is not this one)


class EventsHeader(msgspec.Struct, array_like=True):
    first_seq: int
    last_seq: int
    node_id: int


_encoder = msgspec.msgpack.Encoder()
_req_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_events_decoder = msgspec.msgpack.Decoder(EventsHeader)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


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
