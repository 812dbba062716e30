"""The Marker's client protocol: its ops on the service header (``engine/service/protocol.py``).

Every request is the service's two frames ``[Request header] [payload]``; replies ``[Reply header] [payload]``.

| op | name | kind | payload | reply payload |
|---|---|---|---|---|
| 1 | SUBMIT | write | msgpack ``[wait_ms, [spec, ...]]`` (``marker.commands``) | msgpack list of ``SubmitReply`` |
| 2 | GET_WORKFLOW | read | workflow ids, 16-byte little-endian each | msgpack list of workflow dicts (or nil) |
| 3 | EVENTS | read | (service op) ``first_seq``..``last_seq`` | ``marker.events.MARKER_EVENT_DTYPE`` records |
| 4 | DRAIN | write | msgpack bool: refuse new workflows (true) or accept them again | msgpack ``SubmitReply`` |
| 5 | STATUS | local | (service op) | msgpack dict (the machine's and the driver's fields) |

SUBMIT with ``wait_ms`` > 0 is answered once every workflow of the request has finished (SUCCEEDED, FAILED
or STUCK), or after ``wait_ms`` with the states they have then (``finished`` false: ask GET_WORKFLOW, or
re-submit the same specs, which is safe: a workflow id already known is a duplicate and waits again).
"""
from __future__ import annotations

import msgspec

from marker.commands import SagaSpec, TccSpec

OP_SUBMIT = 1
OP_GET_WORKFLOW = 2
OP_EVENTS = 3
OP_DRAIN = 4
OP_STATUS = 5

SUBMIT_SPECS_MAX = 4096                 # specs in one SUBMIT request
SUBMIT_BYTES_MAX = 8 << 20              # a SUBMIT payload, checked before decoding
WAIT_MS_MAX = 120_000                   # the longest a SUBMIT may ask to be held for its outcome
WORKFLOW_IDS_MAX = 4096                 # ids in one GET_WORKFLOW


class SubmitReply(msgspec.Struct, array_like=True):
    """What happened to one submitted spec. ``status``: created | duplicate | refused | error.
    ``finished``: the workflow reached its outcome (``code``: 0 = OK, else the ledger's business code, or
    a Marker code >= 1000); ``state`` its WorkflowState name."""
    workflow_id: bytes
    status: str
    state: str = ""
    code: int | None = None
    finished: bool = False
    reason: str = ""
    message: str = ""


class SubmitRequest(msgspec.Struct, array_like=True):
    wait_ms: int
    specs: list[TccSpec | SagaSpec]


_submit_decoder = msgspec.msgpack.Decoder(SubmitRequest)
_replies_decoder = msgspec.msgpack.Decoder(list[SubmitReply])
_encoder = msgspec.msgpack.Encoder()


def encode(obj: object) -> bytes:
    return _encoder.encode(obj)


def decode_submit(data: bytes | memoryview) -> SubmitRequest:
    """A SUBMIT payload (its size already checked). ValueError for anything that is not one."""
    try:
        req = _submit_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"bad SUBMIT payload: {exc}") from None
    if not 1 <= len(req.specs) <= SUBMIT_SPECS_MAX:
        raise ValueError(f"a SUBMIT carries 1..{SUBMIT_SPECS_MAX} specs, not {len(req.specs)}")
    if not 0 <= req.wait_ms <= WAIT_MS_MAX:
        raise ValueError(f"wait_ms must be 0..{WAIT_MS_MAX}")
    return req


def decode_submit_replies(data: bytes) -> list[SubmitReply]:
    return _replies_decoder.decode(data)
