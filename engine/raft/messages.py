"""Raft wire types (msgspec Structs) and the frame codec the transport uses.

Every peer message carries ``src``, ``dst`` and ``term``. On the wire a message is a list of frames:
frame 0 is the msgpack header; the data of each entry of an AppendEntries, and the chunk of an
InstallSnapshot, travel as their own raw frames after it (never copied into msgpack). ``decode_frames``
validates counts and sizes and raises ValueError on anything malformed: a peer never crashes us.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Sequence, Union

import msgspec

NODE_ID_NONE = 0                 # "no vote" / "no leader": node ids start at 1
FRAMES_MAX = 1 + 65_536          # header + entry payloads of one message
FRAME_BYTES_MAX = 64 << 20


class EntryKind(IntEnum):
    NORMAL = 0     # application data
    CONFIG = 1     # data = msgpack list of voter ids (the whole new configuration)
    NOOP = 2       # appended by a new leader to commit an entry of its own term


class Entry(msgspec.Struct, array_like=True):
    term: int
    index: int
    kind: int
    data: bytes | memoryview = b""


class HardState(msgspec.Struct, array_like=True):
    term: int = 0
    vote: int = NODE_ID_NONE
    commit: int = 0


class SnapshotMeta(msgspec.Struct, array_like=True):
    index: int
    term: int
    config: list[int] = []


class RequestVote(msgspec.Struct, tag="rv", array_like=True):
    src: int
    dst: int
    term: int
    last_index: int
    last_term: int
    pre_vote: bool = False
    force: bool = False            # leadership transfer: ignore the leader lease


class RequestVoteResponse(msgspec.Struct, tag="rvr", array_like=True):
    src: int
    dst: int
    term: int
    granted: bool
    pre_vote: bool = False


class AppendEntries(msgspec.Struct, tag="ae", array_like=True):
    src: int
    dst: int
    term: int
    prev_index: int
    prev_term: int
    commit: int
    entries: list[Entry] = []
    read_seq: int = 0              # ReadIndex round this message confirms leadership for


class AppendEntriesResponse(msgspec.Struct, tag="aer", array_like=True):
    src: int
    dst: int
    term: int
    success: bool
    match_index: int               # success: last index known to match; reject: the follower's last index
    hint_index: int = 0            # reject: first index the leader should try next (fast backtracking)
    read_seq: int = 0


class InstallSnapshot(msgspec.Struct, tag="is", array_like=True):
    src: int
    dst: int
    term: int
    meta: SnapshotMeta
    offset: int
    done: bool
    data: bytes | memoryview = b""


class InstallSnapshotResponse(msgspec.Struct, tag="isr", array_like=True):
    src: int
    dst: int
    term: int
    index: int                     # the snapshot's index
    next_offset: int               # bytes received so far (0 after a mismatch: restart)
    done: bool = False


class TimeoutNow(msgspec.Struct, tag="tn", array_like=True):
    src: int
    dst: int
    term: int


class ReadIndexRequest(msgspec.Struct, tag="rir", array_like=True):
    src: int
    dst: int
    term: int
    ctx: bytes


class ReadIndexResponse(msgspec.Struct, tag="rip", array_like=True):
    src: int
    dst: int
    term: int
    ctx: bytes
    index: int
    ok: bool


Message = Union[RequestVote, RequestVoteResponse, AppendEntries, AppendEntriesResponse, InstallSnapshot,
                InstallSnapshotResponse, TimeoutNow, ReadIndexRequest, ReadIndexResponse]


# --- frame codec --------------------------------------------------------------------------------------
class _EntryHeader(msgspec.Struct, array_like=True):
    term: int
    index: int
    kind: int
    size: int


class _AEHeader(msgspec.Struct, tag="ae", array_like=True):
    src: int
    dst: int
    term: int
    prev_index: int
    prev_term: int
    commit: int
    entries: list[_EntryHeader]
    read_seq: int


class _ISHeader(msgspec.Struct, tag="is", array_like=True):
    src: int
    dst: int
    term: int
    meta: SnapshotMeta
    offset: int
    done: bool
    size: int


_Header = Union[RequestVote, RequestVoteResponse, _AEHeader, AppendEntriesResponse, _ISHeader,
                InstallSnapshotResponse, TimeoutNow, ReadIndexRequest, ReadIndexResponse]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Header)


def encode_frames(msg: Message) -> list[bytes | memoryview]:
    if isinstance(msg, AppendEntries):
        head = _AEHeader(msg.src, msg.dst, msg.term, msg.prev_index, msg.prev_term, msg.commit,
                         [_EntryHeader(e.term, e.index, int(e.kind), len(e.data)) for e in msg.entries],
                         msg.read_seq)
        return [_encoder.encode(head), *(e.data for e in msg.entries)]
    if isinstance(msg, InstallSnapshot):
        head = _ISHeader(msg.src, msg.dst, msg.term, msg.meta, msg.offset, msg.done, len(msg.data))
        return [_encoder.encode(head), msg.data]
    return [_encoder.encode(msg)]


def decode_frames(frames: Sequence) -> Message:
    """Decode what ``encode_frames`` made; frames may be bytes, memoryview or zmq.Frame."""
    if not frames or len(frames) > FRAMES_MAX:
        raise ValueError(f"a raft message has 1..{FRAMES_MAX} frames, got {len(frames)}")
    bufs = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    for b in bufs:
        if len(b) > FRAME_BYTES_MAX:
            raise ValueError(f"frame of {len(b)} bytes exceeds FRAME_BYTES_MAX")
    try:
        head = _decoder.decode(bufs[0])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"malformed raft message header: {exc}") from None
    if isinstance(head, _AEHeader):
        if len(bufs) != 1 + len(head.entries):
            raise ValueError(f"AppendEntries announces {len(head.entries)} entries, got {len(bufs) - 1} frames")
        entries = []
        for eh, b in zip(head.entries, bufs[1:]):
            if len(b) != eh.size:
                raise ValueError(f"entry {eh.index}: header says {eh.size} bytes, frame has {len(b)}")
            entries.append(Entry(eh.term, eh.index, eh.kind, b))
        return AppendEntries(head.src, head.dst, head.term, head.prev_index, head.prev_term, head.commit,
                             entries, head.read_seq)
    if isinstance(head, _ISHeader):
        if len(bufs) != 2 or len(bufs[1]) != head.size:
            raise ValueError("InstallSnapshot needs exactly one data frame of the announced size")
        return InstallSnapshot(head.src, head.dst, head.term, head.meta, head.offset, head.done, bufs[1])
    if len(bufs) != 1:
        raise ValueError(f"{type(head).__name__} takes no payload frames, got {len(bufs) - 1}")
    return head


_config_encoder = msgspec.msgpack.Encoder()
_config_decoder = msgspec.msgpack.Decoder(list[int])


def encode_config(voters: Sequence[int]) -> bytes:
    return _config_encoder.encode(sorted(set(voters)))


def decode_config(data: bytes | memoryview) -> list[int]:
    return _config_decoder.decode(data)
