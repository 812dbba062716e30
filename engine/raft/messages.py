"""Raft wire types (msgspec Structs) and the frame codec the transport uses.

Every peer message carries ``src``, ``dst`` and ``term``. On the wire a message is a list of frames:
frame 0 is the msgpack header; the data of each entry of an AppendEntries, and the chunk of an
InstallSnapshot, travel as their own raw frames after it (never copied into msgpack).

What a peer sends is checked, never trusted: ``decode_frames`` checks the frame count and the sizes before
it decodes anything, then every field with ``message_fault`` (the checks that need no replica state), and
raises ``MessageRejected`` (a ValueError naming the reason) on anything wrong. The core runs
``message_fault`` again on every message it is given (the simulator hands it messages without a codec)
and adds the checks that need its state (docs/raft.md, "What a peer may send").
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Any

import msgspec

NODE_ID_NONE = 0                 # "no vote" / "no leader": node ids start at 1
# --- named limits (checked before decoding) ---------------------------------------------------------
FRAMES_MAX = 1 + 65_536          # header + entry payloads of one message
FRAME_BYTES_MAX = 64 << 20       # one entry payload or snapshot chunk
HEADER_BYTES_MAX = 4 << 20       # the msgpack header (65,536 entry headers of <= 37 bytes fit)
MESSAGE_BYTES_MAX = 256 << 20    # all frames of one message together
INDEX_MAX = (1 << 63) - 1        # indexes, terms, node ids, offsets: the log store keeps them in int64
VOTERS_MAX = 1024                # members of one configuration
READ_CTX_BYTES_MAX = 256         # a ReadIndex context (the driver's are 8 bytes)

# --- reasons a peer's message is rejected (counters are keyed by these) ---------------------------------
MALFORMED = "malformed"                            # undecodable header, frame counts or payload sizes disagree
OVERSIZED = "oversized"                            # too many frames, a frame or the message too large
BAD_FIELD = "bad_field"                            # an id, term, index, offset or size out of range
ENTRIES_NOT_CONTIGUOUS = "entries_not_contiguous"  # entry indexes are not prev_index+1, prev_index+2, ...
ENTRY_TERM_INVALID = "entry_term_invalid"          # an entry term above the message term, below prev_term or
                                                   # below the entry before it
ENTRY_KIND_INVALID = "entry_kind_invalid"          # unknown kind, or a CONFIG entry that is no voter list
SNAPSHOT_META_INVALID = "snapshot_meta_invalid"    # snapshot term above the message term, bad voter list
FAULT_REASONS = (MALFORMED, OVERSIZED, BAD_FIELD, ENTRIES_NOT_CONTIGUOUS, ENTRY_TERM_INVALID,
                 ENTRY_KIND_INVALID, SNAPSHOT_META_INVALID)


class MessageRejected(ValueError):
    """A peer's message that breaks the protocol; ``reason`` is one of FAULT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
    transferee: int = NODE_ID_NONE   # a leadership transfer to this member is under way: it may disrupt
                                     # the leader lease (added last: older peers ignore it, and it
                                     # defaults to none from them)


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


Message = (RequestVote | RequestVoteResponse | AppendEntries | AppendEntriesResponse | InstallSnapshot
           | InstallSnapshotResponse | TimeoutNow | ReadIndexRequest | ReadIndexResponse)


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
    transferee: int = NODE_ID_NONE


class _ISHeader(msgspec.Struct, tag="is", array_like=True):
    src: int
    dst: int
    term: int
    meta: SnapshotMeta
    offset: int
    done: bool
    size: int


_Header = (RequestVote | RequestVoteResponse | _AEHeader | AppendEntriesResponse | _ISHeader
           | InstallSnapshotResponse | TimeoutNow | ReadIndexRequest | ReadIndexResponse)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Header)


def encode_frames(msg: Message) -> list[bytes | memoryview]:
    if isinstance(msg, AppendEntries):
        head = _AEHeader(msg.src, msg.dst, msg.term, msg.prev_index, msg.prev_term, msg.commit,
                         [_EntryHeader(e.term, e.index, int(e.kind), len(e.data)) for e in msg.entries],
                         msg.read_seq, msg.transferee)
        return [_encoder.encode(head), *(e.data for e in msg.entries)]
    if isinstance(msg, InstallSnapshot):
        snap_head = _ISHeader(msg.src, msg.dst, msg.term, msg.meta, msg.offset, msg.done, len(msg.data))
        return [_encoder.encode(snap_head), msg.data]
    return [_encoder.encode(msg)]


def decode_frames(frames: Sequence[Any], *, message_bytes_max: int = MESSAGE_BYTES_MAX) -> Message:
    """Decode what ``encode_frames`` made; frames may be bytes, memoryview or zmq.Frame. Counts and sizes
    are checked before anything is decoded, every field after: raises MessageRejected (a ValueError)."""
    if not frames or len(frames) > FRAMES_MAX:
        raise MessageRejected(OVERSIZED if frames else MALFORMED,
                              f"a raft message has 1..{FRAMES_MAX} frames, got {len(frames)}")
    bufs = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    total = 0
    for b in bufs:
        if len(b) > FRAME_BYTES_MAX:
            raise MessageRejected(OVERSIZED, f"frame of {len(b)} bytes exceeds FRAME_BYTES_MAX={FRAME_BYTES_MAX}")
        total += len(b)
    if total > message_bytes_max:
        raise MessageRejected(OVERSIZED, f"message of {total} bytes exceeds {message_bytes_max}")
    if len(bufs[0]) > HEADER_BYTES_MAX:
        raise MessageRejected(OVERSIZED, f"header of {len(bufs[0])} bytes exceeds HEADER_BYTES_MAX={HEADER_BYTES_MAX}")
    try:
        head = _decoder.decode(bufs[0])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageRejected(MALFORMED, f"header: {exc}") from None
    msg: Message
    if isinstance(head, _AEHeader):
        if len(bufs) != 1 + len(head.entries):
            raise MessageRejected(MALFORMED, f"AppendEntries announces {len(head.entries)} entries, "
                                             f"got {len(bufs) - 1} frames")
        entries = []
        for eh, b in zip(head.entries, bufs[1:]):
            if len(b) != eh.size:
                raise MessageRejected(MALFORMED, f"entry {eh.index}: header says {eh.size} bytes, frame has {len(b)}")
            entries.append(Entry(eh.term, eh.index, eh.kind, b))
        msg = AppendEntries(head.src, head.dst, head.term, head.prev_index, head.prev_term, head.commit,
                            entries, head.read_seq, head.transferee)
    elif isinstance(head, _ISHeader):
        if len(bufs) != 2 or len(bufs[1]) != head.size:
            raise MessageRejected(MALFORMED, "InstallSnapshot needs exactly one data frame of the announced size")
        msg = InstallSnapshot(head.src, head.dst, head.term, head.meta, head.offset, head.done, bufs[1])
    else:
        if len(bufs) != 1:
            raise MessageRejected(MALFORMED, f"{type(head).__name__} takes no payload frames, got {len(bufs) - 1}")
        msg = head
    fault = message_fault(msg)
    if fault is not None:
        raise MessageRejected(*fault)
    return msg


# --- field checks ---------------------------------------------------------------------------------------
_ENTRY_KINDS = frozenset(int(k) for k in EntryKind)


def _in_range(*values: int) -> bool:
    for v in values:
        if not 0 <= v <= INDEX_MAX:
            return False
    return True


def _is_node(v: int) -> bool:
    return 1 <= v <= INDEX_MAX


def config_fault(voters: Any) -> str | None:
    """What is wrong with a voter list from a peer (a CONFIG entry's or a snapshot's), or None."""
    if not isinstance(voters, list) or not 1 <= len(voters) <= VOTERS_MAX:
        return f"a configuration has 1..{VOTERS_MAX} voters, got {voters!r:.80}"
    for v in voters:
        if type(v) is not int or not _is_node(v):
            return f"voter id {v!r:.40} is not a node id"
    if len(set(voters)) != len(voters):
        return f"duplicate voters in {voters!r:.80}"
    return None


def _append_fault(msg: AppendEntries) -> tuple[str, str] | None:
    if not (msg.term >= 1 and 0 <= msg.prev_index <= INDEX_MAX and 0 <= msg.prev_term <= INDEX_MAX
            and 0 <= msg.commit <= INDEX_MAX and 0 <= msg.read_seq <= INDEX_MAX and 0 <= msg.transferee <= INDEX_MAX):
        return BAD_FIELD, (f"AppendEntries term {msg.term} prev ({msg.prev_index}, {msg.prev_term}) commit "
                           f"{msg.commit} read_seq {msg.read_seq} transferee {msg.transferee}")
    if msg.prev_term > msg.term:
        return ENTRY_TERM_INVALID, f"prev_term {msg.prev_term} above the message term {msg.term}"
    expect, floor = msg.prev_index + 1, msg.prev_term
    for e in msg.entries:
        if e.index != expect:
            return ENTRIES_NOT_CONTIGUOUS, (f"entry index {e.index} where {expect} was due (prev_index "
                                            f"{msg.prev_index}, {len(msg.entries)} entries)")
        if not floor <= e.term <= msg.term:
            return ENTRY_TERM_INVALID, (f"entry {e.index} has term {e.term}: not in [{floor}, {msg.term}] "
                                        f"(terms never go back, never pass the leader's)")
        kind = e.kind
        if kind not in _ENTRY_KINDS:
            return ENTRY_KIND_INVALID, f"entry {e.index} has kind {kind!r:.20}"
        if kind == EntryKind.CONFIG:
            try:
                problem = config_fault(_config_decoder.decode(e.data))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                problem = f"undecodable voter list: {exc}"
            if problem is not None:
                return ENTRY_KIND_INVALID, f"CONFIG entry {e.index}: {problem}"
        expect, floor = expect + 1, e.term
    if expect - 1 > INDEX_MAX:
        return BAD_FIELD, f"entries run past INDEX_MAX (prev_index {msg.prev_index})"
    return None


def _response_fault(msg: AppendEntriesResponse) -> tuple[str, str] | None:
    if 0 <= msg.match_index <= INDEX_MAX and 0 <= msg.hint_index <= INDEX_MAX and 0 <= msg.read_seq <= INDEX_MAX:
        return None
    return BAD_FIELD, f"AppendEntriesResponse match {msg.match_index} hint {msg.hint_index} read_seq {msg.read_seq}"


def _vote_fault(msg: RequestVote) -> tuple[str, str] | None:
    if 1 <= msg.term and 0 <= msg.last_index <= INDEX_MAX and 0 <= msg.last_term <= msg.term:
        return None
    return BAD_FIELD, f"RequestVote term {msg.term} last ({msg.last_index}, {msg.last_term})"


def _snapshot_fault(msg: InstallSnapshot) -> tuple[str, str] | None:
    meta, term = msg.meta, msg.term
    if term < 1 or not _in_range(msg.offset, meta.index, meta.term, msg.offset + len(msg.data)):
        return BAD_FIELD, f"InstallSnapshot term {term} offset {msg.offset} meta ({meta.index}, {meta.term})"
    if meta.term > term or meta.index < 1 or meta.term < 1:
        return SNAPSHOT_META_INVALID, f"snapshot ({meta.index}, {meta.term}) in a message of term {term}"
    problem = config_fault(meta.config)
    if problem is not None:
        return SNAPSHOT_META_INVALID, problem
    return None


def _snapshot_response_fault(msg: InstallSnapshotResponse) -> tuple[str, str] | None:
    if 0 <= msg.index <= INDEX_MAX and 0 <= msg.next_offset <= INDEX_MAX:
        return None
    return BAD_FIELD, f"InstallSnapshotResponse index {msg.index} next_offset {msg.next_offset}"


def _timeout_now_fault(msg: TimeoutNow) -> tuple[str, str] | None:
    return None if msg.term >= 1 else (BAD_FIELD, "TimeoutNow of term 0")


def _read_fault(msg: ReadIndexRequest | ReadIndexResponse) -> tuple[str, str] | None:
    if len(msg.ctx) <= READ_CTX_BYTES_MAX and (not isinstance(msg, ReadIndexResponse) or 0 <= msg.index <= INDEX_MAX):
        return None
    return BAD_FIELD, f"{type(msg).__name__} ctx of {len(msg.ctx)} bytes (READ_CTX_BYTES_MAX={READ_CTX_BYTES_MAX})"


def _no_fault(msg: Any) -> tuple[str, str] | None:
    return None


_FAULT_CHECKS: dict[type, Any] = {
    AppendEntries: _append_fault, AppendEntriesResponse: _response_fault, RequestVote: _vote_fault,
    RequestVoteResponse: _no_fault, InstallSnapshot: _snapshot_fault,
    InstallSnapshotResponse: _snapshot_response_fault, TimeoutNow: _timeout_now_fault,
    ReadIndexRequest: _read_fault, ReadIndexResponse: _read_fault,
}


def message_fault(msg: Any) -> tuple[str, str] | None:
    """(reason, detail) when a peer's message is invalid on its own, whatever the receiver's state: ids,
    terms, indexes and sizes in range; an AppendEntries' entries numbered prev_index+1, prev_index+2, ...
    with terms in [prev_term, term], never decreasing, of a known kind (a CONFIG entry a valid voter list);
    an InstallSnapshot's meta no newer than its term, with a valid voter list and a chunk that fits in
    INDEX_MAX. None when it is fine. (On every message, twice: kept to ~1 us for the common ones.)"""
    src, dst, term = msg.src, msg.dst, msg.term
    if not (0 < src <= INDEX_MAX and 0 < dst <= INDEX_MAX and 0 <= term <= INDEX_MAX) or src == dst:
        return BAD_FIELD, f"{type(msg).__name__} src={src} dst={dst} term={term}"
    return _FAULT_CHECKS[type(msg)](msg)


_config_encoder = msgspec.msgpack.Encoder()
_config_decoder = msgspec.msgpack.Decoder(list[int])


def encode_config(voters: Iterable[int]) -> bytes:
    return _config_encoder.encode(sorted(set(voters)))


def decode_config(data: bytes | memoryview) -> list[int]:
    return _config_decoder.decode(data)
