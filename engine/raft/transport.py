"""Raft peer transport over ZeroMQ: one bound ROUTER for everything a replica receives, one DEALER per peer
for everything it sends.

Topology (documented choice): replica ``i`` binds ``ROUTER`` at its own address and connects one ``DEALER``
to each peer's ROUTER, with the DEALER's routing id set to ``peer_identity(i)``. So every directed pair
(i -> j) is its own TCP connection and its own bounded pipe: a slow or dead peer fills only its own queue.
The ROUTER never sends; it just tells us which peer a message came from, and a message whose ``src``
disagrees with the connection's identity is dropped (a misconfigured or confused peer cannot speak for
another).

Security (``security``, an ``engine.service.security.ServerSecurity``; None: insecure): the ROUTER is a
CURVE server in the RAFT_DOMAIN (its context's ZAP handler admits only the group's peer keys) and each DEALER
authenticates with this replica's own peer key. A peer's identity is the key it authenticated with: the
routing id a message arrives under must be ``peer_identity`` of the replica whose key that is (the frame's
ZAP ``User-Id``), else the message is dropped and counted (``wrong_key``), never decoded.

Wire format: one ZeroMQ multipart message per Raft message, the frames produced by
``messages.encode_frames`` (frame 0 = msgpack header, then each entry payload / snapshot chunk as its own
raw frame). Large frames are sent with ``copy=False`` and received with ``copy=False``, so payloads are
not copied by Python on either side.

Failure behaviour (Raft tolerates message loss, so the transport never blocks and never raises on the
network's account):
- sends are ``NOBLOCK`` with ``ZMQ_IMMEDIATE``: a message to a peer that is down, or whose queue is at its
  high-water mark, is dropped and counted (``stats['dropped_send']``);
- reconnects are ZeroMQ's (``RECONNECT_IVL_MS`` .. ``RECONNECT_IVL_MAX_MS``), silent;
- a malformed message (bad header, too many frames or bytes, oversized frame, a field out of range, an
  identity that is no peer of this replica, a src that is not the connection's, a routing id that is not
  the replica whose key the connection authenticated with) is counted (in
  ``stats['dropped_malformed']`` and by reason in ``rejected``), logged at a bounded rate (``RejectLog``)
  and dropped; it never reaches the core and never raises out of ``recv``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from engine.raft.messages import (
    FAULT_REASONS,
    MALFORMED,
    MESSAGE_BYTES_MAX,
    OVERSIZED,
    MessageRejected,
)

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
REJECT_LOG_INTERVAL_S = 10.0            # at most one log line per interval about rejected peer messages

# --- reasons a message is dropped here, besides the decoder's (messages.FAULT_REASONS) -------------------
UNKNOWN_IDENTITY = "unknown_identity"   # a routing id that is not raft-<id>
UNKNOWN_PEER = "unknown_peer"           # raft-<id> of a replica that is not a peer of this one
WRONG_SRC_OR_DST = "wrong_src_or_dst"   # src is not the connection's peer, or dst is not this replica
WRONG_KEY = "wrong_key"                 # the routing id is not the replica whose CURVE key authenticated
TRANSPORT_REJECT_REASONS = FAULT_REASONS + (UNKNOWN_IDENTITY, UNKNOWN_PEER, WRONG_SRC_OR_DST, WRONG_KEY)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)

Frames = Sequence[bytes | memoryview | zmq.Frame]
Encoder = Callable[[Any], Sequence[bytes | memoryview]]
Decoder = Callable[[list[memoryview]], Any]


class TransportError(Exception):
    pass


class RejectLog:
    """Logs rejected peer messages at WARNING without letting a flood of them flood the log: the first
    one at once, then at most one line per ``interval_s`` that sums up what was rejected meanwhile (by
    reason, with the latest detail). ``flush(now)`` writes a due summary without waiting for the next one."""

    def __init__(self, who: str, logger: logging.Logger | None = None,
                 interval_s: float = REJECT_LOG_INTERVAL_S) -> None:
        self._who = who
        self._log = logger or log
        self._interval_s = interval_s
        self._due_s = 0.0
        self._since_s = 0.0
        self._pending: dict[str, int] = {}
        self._last = ""

    def add(self, reason: str, detail: str, now: float, count: int = 1) -> None:
        self._pending[reason] = self._pending.get(reason, 0) + count
        self._last = detail
        if now >= self._due_s:
            self.flush(now)

    def flush(self, now: float) -> None:
        if not self._pending or now < self._due_s:
            return
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self._pending.items()))
        window = f" in the last {now - self._since_s:.0f} s" if self._since_s else ""
        self._log.warning("%s: rejected peer messages%s: %s; latest: %s", self._who, window, counts, self._last)
        self._pending = {}
        self._since_s = now
        self._due_s = now + self._interval_s


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
                 message_frames_max: int = MESSAGE_FRAMES_MAX,
                 message_bytes_max: int = MESSAGE_BYTES_MAX, only_peers: bool = True, security: Any = None) -> None:
        """``only_peers``: drop messages from replicas that are not in ``peers`` (a replica answers only
        its peers anyway: it has no connection to send to anyone else)."""
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
        self._message_bytes_max = message_bytes_max
        self._only_peers = only_peers
        self.stats = {"sent": 0, "dropped_send": 0, "received": 0, "dropped_malformed": 0}
        # dropped_malformed by reason (fixed keys: another thread may copy it while this one counts)
        self.rejected: dict[str, int] = dict.fromkeys(TRANSPORT_REJECT_REASONS, 0)
        self.reject_log = RejectLog(f"raft transport {node_id}")
        self._security = security
        self._auth: Any = None
        if security is not None:
            from engine.service.security import RAFT_DOMAIN
            self._auth = security.start_authenticator(self._ctx)     # before the bind
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, recv_queue_messages_max)
        self.socket.setsockopt(zmq.MAXMSGSIZE, frame_size_bytes_max)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a restarted peer takes over its identity at once
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if security is not None:
            security.configure_server(self.socket, RAFT_DOMAIN)
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
        if self._security is not None:
            self._security.configure_peer_client(sock)
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
    def _drop(self, reason: str, detail: str) -> None:
        self.stats["dropped_malformed"] += 1
        self.rejected[reason] += 1
        self.reject_log.add(reason, detail, time.monotonic())

    def recv_frames(self) -> tuple[int | None, list[memoryview]] | None:
        """One raw message (sender id from the connection identity, payload frames), or None if none is
        waiting. Messages with too many frames or bytes, or from an identity that is not a peer, are drained
        and dropped (returns (None, []))."""
        recv = self.socket.recv
        try:
            frame = recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return None
        identity = frame.bytes
        frames: list[memoryview] = []
        size = 0
        too_many = False
        key_peer: int | None = -1
        while frame.more:              # (not getsockopt(RCVMORE): pyzmq builds an enum on every call)
            frame = recv(copy=False)
            if key_peer == -1 and self._security is not None:
                key_peer = self._security.peer_of_key(frame.get("User-Id"))
            if too_many or len(frames) >= self._message_frames_max:
                too_many = True        # (drained: a multipart message arrives whole)
                continue
            buf = frame.buffer
            size += len(buf)
            if size > self._message_bytes_max:
                too_many = True
                frames = []
                continue
            frames.append(buf)
        peer = node_of_identity(identity)
        if too_many:
            self._drop(OVERSIZED, f"message from {identity!r:.40}: more than {self._message_frames_max} frames "
                                  f"or {self._message_bytes_max} bytes")
        elif not frames:
            self._drop(MALFORMED, f"message from {identity!r:.40} without frames")
        elif peer is None:
            self._drop(UNKNOWN_IDENTITY, f"message from the unknown identity {identity!r:.40}")
        elif self._only_peers and peer not in self._peers:
            self._drop(UNKNOWN_PEER, f"message from {peer}, not a peer of {self.node_id}")
        elif self._security is not None and key_peer != peer:
            self._drop(WRONG_KEY, f"message under the routing id of {peer} on a connection authenticated "
                                  f"as {'no peer' if key_peer is None else key_peer}")
        else:
            return peer, frames
        return None, []

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
        except MessageRejected as exc:
            self._drop(exc.reason, f"from {peer}: {exc.detail}")
            return None
        except Exception as exc:  # noqa: BLE001 -- a peer's garbage must never take the replica down
            self._drop(MALFORMED, f"from {peer}: {exc}")
            return None
        src = getattr(msg, "src", None)
        dst = getattr(msg, "dst", None)
        if src != peer or dst != self.node_id:
            self._drop(WRONG_SRC_OR_DST, f"message claiming src={src!r} dst={dst!r} on the connection of {peer}")
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
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self._ctx.term()
