"""Raft peer transport over ZeroMQ: one bound ROUTER for everything a replica receives, one DEALER per peer
for everything it sends.

Topology (documented choice): replica ``i`` binds ``ROUTER`` at its own address and connects one ``DEALER``
to each peer's ROUTER, with the DEALER's routing id set to ``peer_identity(i)``. So every directed pair
(i -> j) is its own TCP connection and its own bounded pipe: a slow or dead peer fills only its own queue.
The ROUTER never sends; it just tells us which peer a message came from, and a message whose ``src``
disagrees with the connection's identity is dropped (a misconfigured or confused peer cannot speak for
another).

Wire format: one ZeroMQ multipart message per Raft message, the frames produced by
``messages.encode_frames`` (frame 0 = msgpack header, then each entry payload / snapshot chunk as its own
raw frame). Large frames are sent with ``copy=False`` and received with ``copy=False``, so payloads are
not copied by Python on either side.

Failure behaviour (Raft tolerates message loss, so the transport never blocks and never raises on the
network's account):
- sends are ``NOBLOCK`` with ``ZMQ_IMMEDIATE``: a message to a peer that is down, or whose queue is at its
  high-water mark, is dropped and counted (``stats['dropped_send']``);
- reconnects are ZeroMQ's (``RECONNECT_IVL_MS`` .. ``RECONNECT_IVL_MAX_MS``), silent;
- a malformed message (bad header, too many frames, oversized frame, wrong src) is logged, counted and
  dropped; it never reaches the core and never raises out of ``recv``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import zmq

log = logging.getLogger(__name__)

# --- named limits -----------------------------------------------------------------------------------
SEND_QUEUE_MESSAGES_MAX = 1000          # SNDHWM per peer pipe (whole messages)
RECV_QUEUE_MESSAGES_MAX = 10000         # RCVHWM on the ROUTER (per connected peer)
MESSAGE_FRAMES_MAX = 1 + 8192           # header + entry payloads in one message
FRAME_SIZE_BYTES_MAX = 80 << 20         # ZMQ_MAXMSGSIZE: larger frames make ZeroMQ drop the connection
RECV_BATCH_MESSAGES_MAX = 1024          # messages drained by one recv_batch() call
RECONNECT_IVL_MS = 50
RECONNECT_IVL_MAX_MS = 500
HEARTBEAT_IVL_MS = 1000                 # ZMTP heartbeats detect a silently dead connection
HEARTBEAT_TIMEOUT_MS = 3000
COPY_THRESHOLD_BYTES = 64 << 10         # frames at least this big are sent zero-copy
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)

Frames = Sequence[bytes | memoryview | zmq.Frame]
Encoder = Callable[[Any], Sequence[bytes | memoryview]]
Decoder = Callable[[list[memoryview]], Any]


class TransportError(Exception):
    pass


def peer_identity(node_id: int) -> bytes:
    """The routing id a replica's DEALERs announce: ASCII so it reads well in traces."""
    if not isinstance(node_id, int) or node_id < 0:
        raise ValueError(f"node id must be a non-negative int, got {node_id!r}")
    return b"raft-%d" % node_id


def node_of_identity(identity: bytes) -> int | None:
    if not identity.startswith(b"raft-"):
        return None
    digits = identity[5:]
    if not digits.isdigit() or len(digits) > 19:
        return None
    return int(digits)


def _default_codec() -> tuple[Encoder, Decoder]:
    from engine.raft.messages import decode_frames, encode_frames
    return encode_frames, decode_frames


class Transport:
    """Owned by one thread (the driver's). ``socket`` is the ROUTER to register with a zmq.Poller."""

    def __init__(self, node_id: int, bind_address: str, peers: dict[int, str], *,
                 context: zmq.Context | None = None,
                 encode: Encoder | None = None, decode: Decoder | None = None,
                 send_queue_messages_max: int = SEND_QUEUE_MESSAGES_MAX,
                 recv_queue_messages_max: int = RECV_QUEUE_MESSAGES_MAX,
                 frame_size_bytes_max: int = FRAME_SIZE_BYTES_MAX,
                 message_frames_max: int = MESSAGE_FRAMES_MAX) -> None:
        if node_id in peers:
            raise ValueError(f"peers must not include this replica ({node_id})")
        if encode is None or decode is None:
            default_encode, default_decode = _default_codec()
            encode = encode or default_encode
            decode = decode or default_decode
        self.node_id = node_id
        self._encode = encode
        self._decode = decode
        self._own_context = context is None
        self._ctx = context if context is not None else zmq.Context()
        self._sndhwm = send_queue_messages_max
        self._frame_size_bytes_max = frame_size_bytes_max
        self._message_frames_max = message_frames_max
        self.stats = {"sent": 0, "dropped_send": 0, "received": 0, "dropped_malformed": 0}
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, recv_queue_messages_max)
        self.socket.setsockopt(zmq.MAXMSGSIZE, frame_size_bytes_max)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a restarted peer takes over its identity at once
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.socket.bind(bind_address)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._peers: dict[int, zmq.Socket] = {}
        self._peer_addresses: dict[int, str] = {}
        for peer_id, address in peers.items():
            self.add_peer(peer_id, address)

    # --- membership ----------------------------------------------------------------------------------
    def add_peer(self, peer_id: int, address: str) -> None:
        if peer_id == self.node_id:
            return
        if peer_id in self._peers:
            if self._peer_addresses[peer_id] == address:
                return
            self.remove_peer(peer_id)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, peer_identity(self.node_id))
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)                # never queue to a peer that is not connected
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.connect(address)
        self._peers[peer_id] = sock
        self._peer_addresses[peer_id] = address

    def remove_peer(self, peer_id: int) -> None:
        sock = self._peers.pop(peer_id, None)
        self._peer_addresses.pop(peer_id, None)
        if sock is not None:
            sock.close(linger=0)

    @property
    def peers(self) -> dict[int, str]:
        return dict(self._peer_addresses)

    # --- sending -------------------------------------------------------------------------------------
    def send(self, msg: Any) -> bool:
        """Encode and send one Raft message to msg.dst. False (and counted) when it was dropped."""
        frames = self._encode(msg)
        return self.send_frames(msg.dst, frames)

    def send_frames(self, dst: int, frames: Frames) -> bool:
        sock = self._peers.get(dst)
        if sock is None:
            self.stats["dropped_send"] += 1
            return False
        if not 1 <= len(frames) <= self._message_frames_max:
            raise TransportError(f"message of {len(frames)} frames: MESSAGE_FRAMES_MAX={self._message_frames_max}")
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                flags = _NOBLOCK_MORE if i < last else _NOBLOCK     # plain ints: an enum | costs ~1 us
                big = len(frame) >= COPY_THRESHOLD_BYTES if not isinstance(frame, zmq.Frame) else True
                sock.send(frame, flags, copy=not big)
        except zmq.Again:
            # Only the first frame can hit the HWM / no-connection check: a multipart message is
            # accepted or refused as a whole, so nothing partial is left in the pipe.
            self.stats["dropped_send"] += 1
            return False
        self.stats["sent"] += 1
        return True

    # --- receiving -----------------------------------------------------------------------------------
    def recv_frames(self) -> tuple[int | None, list[memoryview]] | None:
        """One raw message (sender id from the connection identity, payload frames), or None if none is
        waiting. Messages with too many frames are drained and dropped (returns (None, []))."""
        recv = self.socket.recv
        try:
            frame = recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return None
        identity = frame.bytes
        frames: list[memoryview] = []
        too_many = False
        while frame.more:              # (not getsockopt(RCVMORE): pyzmq builds an enum on every call)
            frame = recv(copy=False)
            if len(frames) >= self._message_frames_max:
                too_many = True
                continue
            frames.append(frame.buffer)
        peer = node_of_identity(identity)
        if too_many or not frames or peer is None:
            self.stats["dropped_malformed"] += 1
            log.warning("raft transport %d: dropped malformed message from %r (%s)", self.node_id, identity,
                        "too many frames" if too_many else "no frames" if not frames else "unknown identity")
            return None, []
        return peer, frames

    def recv(self) -> Any | None:
        """One decoded, validated Raft message; None if nothing is waiting or the next one was malformed."""
        got = self.recv_frames()
        if got is None:
            return None
        return self._decode_checked(*got)

    def _decode_checked(self, peer: int | None, frames: list[memoryview]) -> Any | None:
        if peer is None:
            return None
        try:
            msg = self._decode(frames)
        except Exception as exc:  # a peer's garbage must never take the replica down
            self.stats["dropped_malformed"] += 1
            log.warning("raft transport %d: dropped undecodable message from %d: %s", self.node_id, peer, exc)
            return None
        src = getattr(msg, "src", None)
        dst = getattr(msg, "dst", None)
        if src != peer or dst != self.node_id:
            self.stats["dropped_malformed"] += 1
            log.warning("raft transport %d: dropped message claiming src=%r dst=%r on the connection of %d",
                        self.node_id, src, dst, peer)
            return None
        self.stats["received"] += 1
        return msg

    def recv_batch(self, limit: int = RECV_BATCH_MESSAGES_MAX) -> list[Any]:
        """Drain up to `limit` waiting messages without blocking."""
        out: list[Any] = []
        for _ in range(limit):
            got = self.recv_frames()
            if got is None:
                break
            msg = self._decode_checked(*got)
            if msg is not None:
                out.append(msg)
        return out

    def close(self) -> None:
        for peer_id in list(self._peers):
            self.remove_peer(peer_id)
        self.socket.close(linger=0)
        if self._own_context:
            self._ctx.term()
