"""The client core every replicated service's client builds on: leader tracking, NOT_LEADER redirects,
same-bytes retries, deadlines and attempt timeouts, over the header of ``engine/service/protocol.py``.

``IoCore`` owns one I/O thread and a DEALER per replica; a client (the shard's ``engine.client.Client``,
the Marker's) builds ``Call``s for its ops and payloads, hands them to ``submit`` and waits for (or awaits)
their futures. Retries re-send the same bytes, so the same dedup ids: exactly-once is the server's, by id.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq

from engine.service import protocol as P
from engine.service.protocol import Consistency, ErrorCode, Status
from engine.zmq_io import Waker, recv_message
from engine.service.futures import LightFuture

TIMEOUT_S_DEFAULT = 10.0
ATTEMPT_TIMEOUT_S_DEFAULT = 1.0
RETRY_BACKOFF_S = 0.02
RATE_LIMITED_BACKOFF_S = 0.1         # a replica's budget for O(state) reads refills in about this long
INFLIGHT_REQUESTS_MAX = 4096          # requests this client has sent and not yet had answered
CLIENT_QUEUE_MAX = 100_000            # calls waiting for the I/O thread

RETRYABLE = frozenset({ErrorCode.OVERLOADED, ErrorCode.NOT_READY, ErrorCode.TIMEOUT, ErrorCode.OUTCOME_UNKNOWN,
                       ErrorCode.SHUTTING_DOWN, ErrorCode.EVENTS_UNAVAILABLE, ErrorCode.RATE_LIMITED})


class ClientError(Exception):
    pass


class RequestRefused(ClientError):
    """The server refused the request as malformed or too large (the caller's fault); nothing was applied."""

    def __init__(self, code: ErrorCode, message: str, shard_epoch: int = 0) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.shard_epoch = shard_epoch     # WRONG_SHARD / STALE_EPOCH: the shard map epoch the replica serves


class Unavailable(ClientError):
    """No answer within the call's timeout. For a write the outcome is unknown: retry with the same dedup
    id (never applied twice) or ask for its result."""


def then(inner: Future, decode: Any, what: str) -> Future:
    """A Future of ``decode(inner's result)``: the reply decoded by an app's client. ``inner``'s exception
    passes through; ``decode`` returns the value, or an exception instance to fail with (the server's
    refusal, as the app's client raises it); a reply ``decode`` cannot read fails with a ClientError naming
    ``what`` (the server's bug, said as such)."""
    out: Future = LightFuture()

    def done(f: Future) -> None:
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        try:
            v = decode(f.result())
        except Exception as e:  # noqa: BLE001 - a reply that does not decode is the server's bug
            out.set_exception(ClientError(f"undecodable {what} reply: {e}"))
            return
        if isinstance(v, BaseException):
            out.set_exception(v)
        else:
            out.set_result(v)
    inner.add_done_callback(done)
    return out


class _LoopBridge:
    """Hands finished client futures (set on an I/O thread) to one asyncio loop in batches: one
    ``call_soon_threadsafe`` (a write to the loop's self-pipe, ~40-80 us here with the GIL handed over) per
    batch of completions instead of one per future, as ``asyncio.wrap_future`` does. ``post`` queues first,
    then schedules a drain only if none is pending; ``_drain`` clears the flag first, then empties the queue:
    a post that saw the flag set queued before the drain looks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: collections.deque[tuple[asyncio.Future, Future]] = collections.deque()
        self._pending = False

    def post(self, afut: asyncio.Future, fut: Future) -> None:
        self._queue.append((afut, fut))
        if not self._pending:
            self._pending = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:          # the loop is closed: nobody awaits these any more
                self._queue.clear()

    def _drain(self) -> None:
        self._pending = False
        q = self._queue
        while q:
            afut, fut = q.popleft()
            if afut.done():               # cancelled by its awaiter meanwhile
                continue
            exc = fut.exception()
            if exc is not None:
                afut.set_exception(exc)
            else:
                afut.set_result(fut.result())


_bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBridge] = weakref.WeakKeyDictionary()


def aio_future(fut: Future) -> asyncio.Future:
    """An asyncio future of the running loop that gets ``fut``'s outcome: ``asyncio.wrap_future`` for the
    clients' futures, with the loop woken once per batch of completions (``_LoopBridge``)."""
    loop = asyncio.get_running_loop()
    bridge = _bridges.get(loop)
    if bridge is None:
        bridge = _bridges[loop] = _LoopBridge(loop)
    afut = loop.create_future()
    post = bridge.post
    fut.add_done_callback(lambda f: post(afut, f))
    return afut


@dataclass(slots=True)
class Call:
    op: int
    future: Future
    payload: bytes = b""
    records: Any = None                      # items an app's core coalesces into one request (the shard:
                                             # a per-call command's op records); None: a request of its own
    want_events: bool = False
    consistency: int = 0
    first_seq: int = 0
    last_seq: int = 0
    currency: str = ""
    with_digest: bool = False
    node: int | None = None                  # a fixed replica (status of one replica), else routed
    with_reply: bool = False                 # the future gets (reply header, payload)
    issued_ms: int = 0                       # RESULT_OF: the commands were issued at or after this
    shard_epoch: int = 0                     # writes routed by a shard map: its epoch (0: not checked)


@dataclass(slots=True)
class Inflight:
    req_id: int
    calls: list[Call]                        # one, or several per-call commands sharing a batch
    header: P.Request
    payload: bytes
    deadline: float
    node: int = -1
    attempt_deadline: float = 0.0
    not_before: float = 0.0
    tried: set[int] = field(default_factory=set)
    offsets: list[int] = field(default_factory=list)


class IoCore:
    """One I/O thread owning a DEALER per replica. ``submit(call)`` (any thread) queues a call; the thread
    turns calls into requests (``_take_queue``/``_new_request``: one request per call unless an app
    coalesces), sends each to the leader if it is a write (``write_ops``) or a linearizable read, to any
    replica for a FOLLOWER read, follows NOT_LEADER redirects (connecting to a leader address it did not
    know), re-sends the SAME bytes after ``attempt_timeout_s`` without an answer or a retryable error
    (``retryable``), and fails the call with ``Unavailable`` once ``timeout_s`` has passed. An OK reply
    goes to ``_resolve`` (default: the future gets the payload, or (reply, payload) with ``with_reply``).

    An app's client subclasses it: ``write_ops`` (its ops that go to the leader), and optionally
    ``_take_queue`` (coalescing), ``_new_request`` (header fields) and ``_resolve`` (decoding replies; it
    runs on the I/O thread and may ``submit`` follow-up calls, as the shard's DEDUP_EXPIRED settling does)."""

    write_ops: frozenset[int] = frozenset()
    retryable: frozenset[ErrorCode] = RETRYABLE
    thread_name = "zwallet-client-io"

    def __init__(self, addresses: Sequence[str], timeout_s: float, attempt_timeout_s: float,
                 keys: Any = None) -> None:
        """``keys``: an engine.service.security.ClientKeys (CURVE: this client's key pair and the servers'
        public key), or None for an insecure system (no CURVE: a secure server gives such a client nothing)."""
        if not addresses:
            raise ValueError("a client needs at least one replica address")
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.keys = keys
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []
        self.leader: int | None = None
        self.rr = itertools.count()
        self.last_seq_seen = 0
        self._queue: collections.deque[Call] = collections.deque()
        self._waker = Waker()
        self._ids = itertools.count(1)
        self._inflight: dict[int, Inflight] = {}
        self._waiting: list[Inflight] = []       # to (re)send when their not_before comes
        self._stop = threading.Event()
        self._lock = threading.Lock()
        for addr in self.addresses:
            self._add_socket(addr)
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def _add_socket(self, addr: str) -> int:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.setsockopt(zmq.IMMEDIATE, 1)           # no queueing for a replica that is down: try another
        if self.keys is not None:
            self.keys.configure_client(s)
        s.connect(addr)
        self.socks.append(s)
        if addr not in self.addresses:
            self.addresses.append(addr)
        return len(self.socks) - 1

    def submit(self, call: Call) -> Future:
        if self._stop.is_set():
            raise ClientError("the client is closed")
        if len(self._queue) >= CLIENT_QUEUE_MAX:
            raise ClientError(f"CLIENT_QUEUE_MAX={CLIENT_QUEUE_MAX} calls are already waiting")
        self._queue.append(call)
        self._waker.wake()
        return call.future

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._waker.wake()
        self._thread.join(5)
        self._waker.close()

    # --- I/O thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._waker.fd, zmq.POLLIN)
        registered = 0
        try:
            while not self._stop.is_set():
                while registered < len(self.socks):
                    poller.register(self.socks[registered], zmq.POLLIN)
                    registered += 1
                timeout = self._next_timeout_ms()
                events = dict(poller.poll(timeout))
                if self._waker.fd in events:
                    self._waker.drain()
                for idx, s in enumerate(self.socks):
                    if s in events:
                        self._receive(idx, s)
                self._take_queue()
                self._send_due()
                self._expire()
        finally:
            err = ClientError("the client was closed")
            for inf in list(self._inflight.values()) + self._waiting:
                for c in inf.calls:
                    if not c.future.done():
                        c.future.set_exception(err)
            while self._queue:
                c = self._queue.popleft()
                if not c.future.done():
                    c.future.set_exception(err)
            for s in self.socks:
                s.close(0)
            self.ctx.term()

    def _next_timeout_ms(self) -> int:
        if self._waiting:
            return 2
        if self._inflight:
            return 20
        return 200

    def _take_queue(self) -> None:
        now = time.monotonic()
        while self._queue and len(self._inflight) + len(self._waiting) < INFLIGHT_REQUESTS_MAX:
            self._new_request([self._queue.popleft()], now)

    def _new_request(self, calls: list[Call], now: float) -> None:
        """Queue one request for ``calls`` (its header from the first call's fields; payload as given)."""
        c0 = calls[0]
        req_id = next(self._ids)
        min_seq = self.last_seq_seen if c0.consistency == Consistency.FOLLOWER else 0
        header = P.Request(req_id, c0.op, consistency=c0.consistency, min_seq=min_seq,
                           first_seq=c0.first_seq, last_seq=c0.last_seq, want_events=c0.want_events,
                           currency=c0.currency, with_digest=c0.with_digest, issued_ms=c0.issued_ms,
                           shard_epoch=c0.shard_epoch)
        self._queue_request(Inflight(req_id, calls, header, c0.payload, now + self.timeout_s))

    def _queue_request(self, inf: Inflight) -> None:
        self._waiting.append(inf)

    def next_req_id(self) -> int:
        return next(self._ids)

    def _target(self, inf: Inflight) -> int:
        c0 = inf.calls[0]
        if c0.node is not None:
            return c0.node
        is_read = inf.header.op not in self.write_ops
        if is_read and c0.consistency == Consistency.FOLLOWER:
            return next(self.rr) % len(self.socks)
        if is_read and inf.header.op == P.OP_EVENTS and inf.tried:
            untried = [i for i in range(len(self.socks)) if i not in inf.tried]
            if untried:
                return untried[0]
        if self.leader is not None:
            return self.leader
        return next(self.rr) % len(self.socks)

    def _send_due(self) -> None:
        if not self._waiting:
            return
        now = time.monotonic()
        still = []
        for inf in self._waiting:
            if inf.not_before > now:
                still.append(inf)
                continue
            node = self._target(inf)
            inf.node = node
            inf.tried.add(node)
            inf.attempt_deadline = now + self.attempt_timeout_s
            try:
                s = self.socks[node]
                s.send(P.encode(inf.header), zmq.SNDMORE | zmq.NOBLOCK)
                s.send(inf.payload, 0, copy=len(inf.payload) < 65536)
            except zmq.Again:                    # not connected (down, restarting) or its queue is full
                if self.leader == node:
                    self.leader = None
                inf.not_before = now + RETRY_BACKOFF_S
                still.append(inf)
                continue
            self._inflight[inf.req_id] = inf
        self._waiting = still

    def _retry(self, inf: Inflight, delay_s: float, forget_leader: bool = False) -> None:
        self._inflight.pop(inf.req_id, None)
        if forget_leader and self.leader == inf.node:
            self.leader = None
        inf.not_before = time.monotonic() + delay_s
        self._waiting.append(inf)

    def _expire(self) -> None:
        now = time.monotonic()
        for inf in list(self._inflight.values()):
            if now >= inf.deadline:
                self._inflight.pop(inf.req_id, None)
                self._fail(inf, Unavailable(f"no answer within {self.timeout_s}s (last tried "
                                            f"{self.addresses[inf.node]}); a write's outcome is unknown: "
                                            "retry with the same dedup id"))
            elif now >= inf.attempt_deadline:
                # this replica did not answer: try elsewhere (the next replica redirects us if needed)
                if self.leader == inf.node:
                    self.leader = None
                self._retry(inf, 0.0)
        still = []
        for inf in self._waiting:
            if now >= inf.deadline:
                self._fail(inf, Unavailable(f"no answer within {self.timeout_s}s; a write's outcome is "
                                            "unknown: retry with the same dedup id"))
            else:
                still.append(inf)
        self._waiting = still

    def _fail(self, inf: Inflight, exc: BaseException) -> None:
        for c in inf.calls:
            if not c.future.done():
                c.future.set_exception(exc)

    def _receive(self, idx: int, sock: zmq.Socket) -> None:
        for _ in range(10_000):
            try:
                frames = recv_message(sock)
            except zmq.Again:
                return
            head, frames = frames[0], frames[1:]
            try:
                reply = P.decode_reply(head)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            inf = self._inflight.get(reply.req_id)
            if inf is None:
                continue                         # a late answer to a request already answered
            self._on_reply(idx, inf, reply, frames)

    def _on_reply(self, idx: int, inf: Inflight, reply: P.Reply, frames: list[zmq.Frame]) -> None:
        status = reply.status
        if status == Status.OK:
            self._inflight.pop(inf.req_id, None)
            if inf.header.op in self.write_ops and inf.calls[0].node is None:
                self.leader = idx
            try:
                self._resolve(inf, reply, frames)
            except Exception as exc:  # noqa: BLE001 - a reply that does not parse: fail, do not kill the thread
                self._fail(inf, ClientError(f"malformed reply: {exc}"))
            return
        if idx != inf.node:
            return                               # a stale answer from a replica we no longer wait on
        if status == Status.NOT_LEADER:
            target = None
            if reply.leader_address:
                if reply.leader_address in self.addresses:
                    target = self.addresses.index(reply.leader_address)
                else:
                    target = self._add_socket(reply.leader_address)
            self.leader = target
            self._retry(inf, 0.0 if target is not None and target != idx else RETRY_BACKOFF_S * 5)
            return
        code = ErrorCode(reply.error) if reply.error in ErrorCode._value2member_map_ else ErrorCode.BAD_REQUEST
        if code is ErrorCode.EVENTS_UNAVAILABLE and len(inf.tried) >= len(self.socks):
            self._inflight.pop(inf.req_id, None)  # every replica was asked and none holds it: say so now
            self._fail(inf, RequestRefused(code, f"no replica holds these events (last: {reply.message})"))
            return
        if code in self.retryable:
            self._retry(inf, RATE_LIMITED_BACKOFF_S if code is ErrorCode.RATE_LIMITED else RETRY_BACKOFF_S)
            return
        self._inflight.pop(inf.req_id, None)
        self._fail(inf, RequestRefused(code, reply.message, reply.shard_epoch))

    def _resolve(self, inf: Inflight, reply: P.Reply, frames: list[zmq.Frame]) -> None:
        payload = frames[0].bytes if frames else b""
        c0 = inf.calls[0]
        c0.future.set_result((reply, payload) if c0.with_reply else payload)
