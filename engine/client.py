"""Clients of a replicated shard: ``Client`` (blocking) and ``AsyncClient`` (asyncio), plus ``Subscriber``.

Both clients have the embedded ``Ledger``'s methods, so code moves from embedded to replicated by changing
the line that makes the ledger::

    ledger = Ledger()                                              # embedded
    ledger = Client(["tcp://127.0.0.1:7101", "tcp://127.0.0.1:7102", "tcp://127.0.0.1:7103"])
    ledger.transfer(3, 200, 100, 5_00, "USD").code                 # the same call either way

(``timestamp=`` is the command's issue time in ms, its ``issued_ms``; it defaults to now. The leader's
clock stamps the events. To retry a command yourself after a failed call, pass the first attempt's time
again: see "exactly-once past the window" below.)
``apply_batch(ops)`` is the binary hot path: a numpy array of op records in, result records out.

How it works. One I/O thread per client owns a DEALER per replica. Calls from any number of threads or
coroutines are queued to it; per-call commands that are queued together travel in ONE batch (pipelining:
many concurrent calls share batches), and any number of requests can be in flight. Writes go to the
leader: a replica that is not the leader answers NOT_LEADER with the leader's address and the request is
re-sent there. A request that gets no answer within ``attempt_timeout_s``, or a retryable error
(OVERLOADED, TIMEOUT, OUTCOME_UNKNOWN, ...), is re-sent with the SAME bytes, so the same dedup ids: the
ledger applies a command at most once, and a retry of an applied one returns its original result (with
``duplicate=True``). When ``timeout_s`` runs out the call raises ``Unavailable``: the outcome of a write is
then unknown, and the caller retries it with the same dedup id (or asks ``result_of``).

Exactly-once past the window. A command carries the time it was first issued (``issued_ms``, kept across
retries: they re-send the same bytes). A retry that reaches the shard after its command left the dedup
window is refused with DEDUP_EXPIRED, never applied again. A per-call command refused so is settled by the
client, never retried blindly: it asks RESULT_OF, which answers from the replicas' event stores for as long
as they keep the events, and returns the original outcome (``duplicate=True``) or, if the command is
definitely not there (the store covers everything applied since it was issued), the DEDUP_EXPIRED result
itself: the command was not applied and never will be. Otherwise it raises ``OutcomeUnknown``.

Reads are linearizable by default; ``consistency="follower"`` reads from any replica that has applied at
least everything this client has seen (read-your-writes by seq_num).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import msgspec
import numpy as np
import zmq

from engine import records as R
from engine._ledger import OpEncoder
from engine import wire as W
from engine.zmq_io import Waker, recv_message
from engine.wire import Consistency, ErrorCode, Op, Status

TIMEOUT_S_DEFAULT = 10.0
ATTEMPT_TIMEOUT_S_DEFAULT = 1.0
RETRY_BACKOFF_S = 0.02
RATE_LIMITED_BACKOFF_S = 0.1         # a replica's budget for O(accounts) reads refills in about this long
INFLIGHT_REQUESTS_MAX = 4096          # requests this client has sent and not yet had answered
CLIENT_QUEUE_MAX = 100_000            # calls waiting for the I/O thread

_RETRYABLE = {ErrorCode.OVERLOADED, ErrorCode.NOT_READY, ErrorCode.TIMEOUT, ErrorCode.OUTCOME_UNKNOWN,
              ErrorCode.SHUTTING_DOWN, ErrorCode.EVENTS_UNAVAILABLE, ErrorCode.RATE_LIMITED}
_WRITE_OPS = {Op.APPLY}


class ClientError(Exception):
    pass


class RequestRefused(ClientError):
    """The node refused the request as malformed or too large (the caller's fault); nothing was applied."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class OutcomeUnknown(ClientError):
    """A command was refused as issued before the dedup window's horizon (DEDUP_EXPIRED), and no replica
    holds enough of the event history to say whether an earlier attempt applied it. It will never be
    applied from now on; look for its effects by other means (the account's history)."""


class Unavailable(ClientError):
    """No answer within the call's timeout. For a write the outcome is unknown: retry with the same dedup
    id (never applied twice) or ask ``result_of``."""


class RemoteResult:
    """The outcome of one command, like the embedded ``Result``: ``code``, ``duplicate``, ``seq_num``,
    ``dedup_id``, ``kind``, ``ok`` and ``accounts`` (the accounts it changed, as right after it)."""
    __slots__ = ("code", "duplicate", "seq_num", "dedup_id", "kind", "_events")

    def __init__(self, rec: np.void, events: np.ndarray | None) -> None:
        self.code = R.Code(int(rec["code"]))
        self.duplicate = bool(int(rec["flags"]) & R.ResultFlag.DUPLICATE)
        self.seq_num = int(rec["seq_num"])
        self.dedup_id = R.get_u128(rec["dedup_id"])[0]
        self.kind = R.Kind(int(rec["kind"])) if int(rec["kind"]) else 0
        self._events = events

    @property
    def ok(self) -> bool:
        return self.code in R.SUCCESS_CODES

    @property
    def accounts(self) -> dict[int, dict[str, Any]]:
        if self.seq_num == 0 or self._events is None:
            return {}
        return R.accounts_from_events(self._events)

    def __repr__(self) -> str:
        return (f"RemoteResult(code={self.code.name}, duplicate={self.duplicate}, seq_num={self.seq_num}, "
                f"dedup_id={self.dedup_id})")


# ----------------------------------------------------------------------------------------- the I/O core
@dataclass(slots=True)
class _Call:
    op: Op
    future: Future
    payload: bytes = b""
    records: np.ndarray | None = None        # per-call command: its op records (coalesced by the I/O thread)
    want_events: bool = False
    consistency: int = 0
    first_seq: int = 0
    last_seq: int = 0
    currency: str = ""
    with_digest: bool = False
    node: int | None = None                  # a fixed replica (status of one replica), else routed
    with_reply: bool = False                 # the future gets (reply header, payload)
    issued_ms: int = 0                       # RESULT_OF: the commands were issued at or after this


@dataclass(slots=True)
class _Inflight:
    req_id: int
    calls: list[_Call]                       # one, or several per-call commands sharing a batch
    header: W.Request
    payload: bytes
    deadline: float
    node: int = -1
    attempt_deadline: float = 0.0
    not_before: float = 0.0
    tried: set[int] = field(default_factory=set)
    offsets: list[int] = field(default_factory=list)


class _IoCore:
    def __init__(self, addresses: Sequence[str], timeout_s: float, attempt_timeout_s: float) -> None:
        if not addresses:
            raise ValueError("a client needs at least one replica address")
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []
        self.leader: int | None = None
        self.rr = itertools.count()
        self.last_seq_seen = 0
        self._queue: collections.deque[_Call] = collections.deque()
        self._waker = Waker()
        self._ids = itertools.count(1)
        self._inflight: dict[int, _Inflight] = {}
        self._waiting: list[_Inflight] = []       # to (re)send when their not_before comes
        self._stop = threading.Event()
        self._lock = threading.Lock()
        for addr in self.addresses:
            self._add_socket(addr)
        self._thread = threading.Thread(target=self._run, name="zwallet-client-io", daemon=True)
        self._thread.start()

    def _add_socket(self, addr: str) -> int:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.setsockopt(zmq.IMMEDIATE, 1)           # no queueing for a replica that is down: try another
        s.connect(addr)
        self.socks.append(s)
        if addr not in self.addresses:
            self.addresses.append(addr)
        return len(self.socks) - 1

    def submit(self, call: _Call) -> Future:
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
        per_call: list[_Call] = []
        per_call_records = 0
        while self._queue and len(self._inflight) + len(self._waiting) < INFLIGHT_REQUESTS_MAX:
            c = self._queue.popleft()
            if c.records is not None:
                if per_call_records + len(c.records) > R.BATCH_SIZE_MAX:
                    self._new_request(per_call, now)
                    per_call, per_call_records = [], 0
                per_call.append(c)
                per_call_records += len(c.records)
            else:
                self._new_request([c], now)
        if per_call:
            self._new_request(per_call, now)

    def _new_request(self, calls: list[_Call], now: float) -> None:
        c0 = calls[0]
        req_id = next(self._ids)
        offsets: list[int] = []
        if c0.records is not None:
            off = 0
            records = [c.records for c in calls if c.records is not None]
            for r in records:
                offsets.append(off)
                off += len(r)
            payload = b"".join(r.tobytes() for r in records)
            header = W.Request(req_id, Op.APPLY, want_events=True)
        else:
            payload = c0.payload
            min_seq = self.last_seq_seen if c0.consistency == Consistency.FOLLOWER else 0
            header = W.Request(req_id, c0.op, consistency=c0.consistency, min_seq=min_seq,
                               first_seq=c0.first_seq, last_seq=c0.last_seq, want_events=c0.want_events,
                               currency=c0.currency, with_digest=c0.with_digest, issued_ms=c0.issued_ms)
        inf = _Inflight(req_id, calls, header, payload, now + self.timeout_s, offsets=offsets)
        self._waiting.append(inf)

    def _target(self, inf: _Inflight) -> int:
        c0 = inf.calls[0]
        if c0.node is not None:
            return c0.node
        is_read = c0.records is None and c0.op is not Op.APPLY
        if is_read and c0.consistency == Consistency.FOLLOWER:
            return next(self.rr) % len(self.socks)
        if is_read and inf.header.op == Op.EVENTS and inf.tried:
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
                s.send(W.encode(inf.header), zmq.SNDMORE | zmq.NOBLOCK)
                s.send(inf.payload, 0, copy=len(inf.payload) < 65536)
            except zmq.Again:                    # not connected (down, restarting) or its queue is full
                if self.leader == node:
                    self.leader = None
                inf.not_before = now + RETRY_BACKOFF_S
                still.append(inf)
                continue
            self._inflight[inf.req_id] = inf
        self._waiting = still

    def _retry(self, inf: _Inflight, delay_s: float, forget_leader: bool = False) -> None:
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

    def _fail(self, inf: _Inflight, exc: BaseException) -> None:
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
                reply = W.decode_reply(head)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            inf = self._inflight.get(reply.req_id)
            if inf is None:
                continue                         # a late answer to a request already answered
            self._on_reply(idx, inf, reply, frames)

    def _on_reply(self, idx: int, inf: _Inflight, reply: W.Reply, frames: list[zmq.Frame]) -> None:
        status = reply.status
        if status == Status.OK:
            self._inflight.pop(inf.req_id, None)
            if inf.header.op == Op.APPLY and inf.calls[0].node is None:
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
        if code in _RETRYABLE:
            self._retry(inf, RATE_LIMITED_BACKOFF_S if code is ErrorCode.RATE_LIMITED else RETRY_BACKOFF_S)
            return
        self._inflight.pop(inf.req_id, None)
        self._fail(inf, RequestRefused(code, reply.message))

    def _resolve(self, inf: _Inflight, reply: W.Reply, frames: list[zmq.Frame]) -> None:
        payload = frames[0].bytes if frames else b""
        c0 = inf.calls[0]
        if c0.records is not None:
            results = W.results_view(payload)
            events = np.frombuffer(frames[1].bytes, dtype=R.EVENT_DTYPE) if len(frames) > 1 else None
            self._saw(results)
            # the events come in seq order (new ones, then duplicates' older ones): sort once, then two
            # binary searches per call
            seqs = None
            if events is not None and len(events):
                order = np.argsort(events["seq_num"], kind="stable")
                events = events[order]
                seqs = events["seq_num"]
            for c, off in zip(inf.calls, inf.offsets):
                rec = results[off]
                evs = None
                seq = int(rec["seq_num"])
                if seqs is not None and seq:
                    a = int(np.searchsorted(seqs, seq, "left"))
                    b = int(np.searchsorted(seqs, seq, "right"))
                    if b > a:
                        evs = events[a:b] if events is not None else None
                if int(rec["code"]) == R.Code.DEDUP_EXPIRED and c.records is not None:
                    self._settle_expired(c, rec)
                    continue
                c.future.set_result(RemoteResult(rec, evs))
            return
        if c0.op is Op.APPLY:
            results = W.results_view(payload)
            self._saw(results)
            if c0.want_events and len(frames) > 1:
                c0.future.set_result((results, np.frombuffer(frames[1].bytes, dtype=R.EVENT_DTYPE)))
            else:
                c0.future.set_result(results)
            return
        c0.future.set_result((reply, payload) if c0.with_reply else payload)

    def _settle_expired(self, c: _Call, rec: np.void) -> None:
        """A per-call command refused as issued before the dedup horizon: an earlier attempt may have
        applied it. Ask RESULT_OF (the event stores' durable index) and settle the call with a definite
        outcome, or OutcomeUnknown."""
        assert c.records is not None
        issued = int(c.records[0]["issued_ms"])
        dedup_id = R.get_u128(rec["dedup_id"])[0]
        refusal = RemoteResult(rec, None)
        ask = _Call(Op.RESULT_OF, Future(), payload=W.encode_ids([dedup_id]),
                    consistency=Consistency.LINEARIZABLE, with_reply=True, issued_ms=issued)

        def done(f: Future) -> None:
            try:
                reply, payload = f.result()
                found = W.results_view(payload)[0]
            except Exception as exc:  # noqa: BLE001 - any failure of the question leaves the outcome unknown
                c.future.set_exception(OutcomeUnknown(f"dedup_id {dedup_id} was refused as DEDUP_EXPIRED and "
                                                      f"RESULT_OF failed: {exc}"))
                return
            if int(found["code"]) != W.RESULT_UNKNOWN:
                c.future.set_result(RemoteResult(found, None))        # applied (or refused) before: that result
            elif issued >= reply.results_complete_since_ms + R.ISSUED_AHEAD_MAX_MS:
                c.future.set_result(refusal)                          # definitely never applied
            else:
                c.future.set_exception(OutcomeUnknown(
                    f"dedup_id {dedup_id} (issued_ms {issued}) left the dedup window and the replicas' event "
                    f"history before it (complete since {reply.results_complete_since_ms} ms): whether an "
                    "earlier attempt applied it is unknown; it will not be applied from now on"))

        ask.future.add_done_callback(done)
        try:
            self.submit(ask)
        except ClientError as exc:
            c.future.set_exception(OutcomeUnknown(f"dedup_id {dedup_id}: DEDUP_EXPIRED, and {exc}"))

    def _saw(self, results: np.ndarray) -> None:
        if len(results):
            m = int(results["seq_num"].max())
            if m > self.last_seq_seen:
                self.last_seq_seen = m


# --------------------------------------------------------------------------------- the shared surface
_CONSISTENCY = {"linearizable": Consistency.LINEARIZABLE, "follower": Consistency.FOLLOWER}


class _ClientBase:
    """Builds calls and hands them to the I/O thread; ``Client`` waits for their futures, ``AsyncClient``
    awaits them."""

    def __init__(self, addresses: Sequence[str] | str, *, timeout_s: float = TIMEOUT_S_DEFAULT,
                 attempt_timeout_s: float = ATTEMPT_TIMEOUT_S_DEFAULT) -> None:
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a]
        self._io = _IoCore(addresses, timeout_s, attempt_timeout_s)
        self._encoder = OpEncoder()
        self._encoder_lock = threading.Lock()

    @property
    def leader_address(self) -> str | None:
        return self._io.addresses[self._io.leader] if self._io.leader is not None else None

    @property
    def last_seq_seen(self) -> int:
        return self._io.last_seq_seen

    def close(self) -> None:
        self._io.close()

    def _command(self, name: str, *args: Any, **kwargs: Any) -> Future:
        if not kwargs.get("timestamp"):
            kwargs["timestamp"] = int(time.time() * 1000)     # the command's issued_ms (the first attempt's)
        with self._encoder_lock:
            records = getattr(self._encoder, name)(*args, **kwargs)
        return self._io.submit(_Call(Op.APPLY, Future(), records=records))

    def _read(self, op: Op, payload: bytes = b"", consistency: str = "linearizable", **fields: Any) -> Future:
        try:
            level = _CONSISTENCY[consistency]
        except KeyError:
            raise ValueError(f"consistency must be one of {sorted(_CONSISTENCY)}") from None
        return self._io.submit(_Call(op, Future(), payload=payload, consistency=level, **fields))

    def _apply_call(self, ops: np.ndarray, want_events: bool) -> Future:
        if not isinstance(ops, np.ndarray) or ops.dtype != R.OP_DTYPE:
            raise TypeError("ops must be a numpy array of engine.records.OP_DTYPE")
        if not 1 <= len(ops) <= R.BATCH_SIZE_MAX:
            raise ValueError(f"a batch holds 1..{R.BATCH_SIZE_MAX} records, not {len(ops)}")
        if not ops["issued_ms"].any():
            # stamp the batch with its issue time once: its retries re-send these bytes (to retry the batch
            # yourself after a failed call, past the dedup window, send the same issued_ms again)
            ops = ops.copy()
            ops["issued_ms"] = int(time.time() * 1000)
        return self._io.submit(_Call(Op.APPLY, Future(), payload=np.ascontiguousarray(ops).tobytes(),
                                     want_events=want_events))


def _ids(ids: Iterable[Any]) -> list[int]:
    return [i.int if isinstance(i, uuid.UUID) else int(i) for i in ids]


def _accounts(payload: bytes) -> list[dict[str, Any] | None]:
    return W.decode_accounts(payload)


def _result_of(payload: bytes) -> list[RemoteResult | None]:
    out: list[RemoteResult | None] = []
    for rec in W.results_view(payload):
        out.append(None if int(rec["code"]) == W.RESULT_UNKNOWN else RemoteResult(rec, None))
    return out


def _make_methods(cls: type, wrap: Any) -> type:
    """Give ``cls`` the embedded Ledger's command methods; ``wrap(future)`` turns a future into the
    return value (blocking or awaitable)."""
    for name in ("create_account", "delete_account", "lock_account", "unlock_account",
                 "update_account_config", "transfer", "batch_balance_operation", "reserve", "release",
                 "tcc_try", "tcc_confirm", "tcc_cancel", "compensate"):
        def method(self: Any, *args: Any, _name: str = name, **kwargs: Any) -> Any:
            return wrap(self, self._command(_name, *args, **kwargs))
        method.__name__ = name
        method.__doc__ = f"Same arguments and result as ``Ledger.{name}``, applied by the replicated shard."
        setattr(cls, name, method)
    return cls


class Client(_ClientBase):
    """Blocking client; thread-safe (calls from many threads share batches)."""

    # the embedded Ledger's command methods, set by _make_methods below (declared for type checkers)
    create_account: Callable[..., RemoteResult]
    delete_account: Callable[..., RemoteResult]
    lock_account: Callable[..., RemoteResult]
    unlock_account: Callable[..., RemoteResult]
    update_account_config: Callable[..., RemoteResult]
    transfer: Callable[..., RemoteResult]
    batch_balance_operation: Callable[..., RemoteResult]
    reserve: Callable[..., RemoteResult]
    release: Callable[..., RemoteResult]
    tcc_try: Callable[..., RemoteResult]
    tcc_confirm: Callable[..., RemoteResult]
    tcc_cancel: Callable[..., RemoteResult]
    compensate: Callable[..., RemoteResult]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def apply_batch(self, ops: np.ndarray, want_events: bool = False) -> Any:
        """Apply a batch of op records (up to 8190) as one request; returns the result records (and the
        events if ``want_events``: a tuple (results, events))."""
        return self._apply_call(ops, want_events).result()

    def apply_batch_async(self, ops: np.ndarray) -> Future:
        """Send a batch without waiting: a Future of the result records (for pipelining from one thread)."""
        return self._apply_call(ops, False)

    def get_account(self, account_id: Any, consistency: str = "linearizable") -> dict[str, Any] | None:
        return self.get_accounts([account_id], consistency)[0]

    def get_accounts(self, account_ids: Iterable[Any],
                     consistency: str = "linearizable") -> list[dict[str, Any] | None]:
        return _accounts(self._read(Op.GET_ACCOUNTS, W.encode_ids(_ids(account_ids)), consistency).result())

    def result_of(self, dedup_id: Any, consistency: str = "linearizable") -> RemoteResult | None:
        return self.results_of([dedup_id], consistency)[0]

    def results_of(self, dedup_ids: Iterable[Any], consistency: str = "linearizable") -> list[RemoteResult | None]:
        return _result_of(self._read(Op.RESULT_OF, W.encode_ids(_ids(dedup_ids)), consistency).result())

    def totals(self, currency: str, consistency: str = "linearizable") -> dict[str, int]:
        return W.decode_totals(self._read(Op.TOTALS, b"", consistency, currency=currency).result())

    def events(self, first_seq: int, last_seq: int, consistency: str = "linearizable") -> np.ndarray:
        """Event records of seqs first_seq..last_seq (inclusive, every part), from the replicas' event
        stores; long ranges are fetched in pieces."""
        out = []
        seq = first_seq
        while seq <= last_seq:
            evs = np.frombuffer(self._read(Op.EVENTS, b"", consistency, first_seq=seq, last_seq=last_seq).result(),
                                dtype=R.EVENT_DTYPE)
            if not len(evs):
                break
            out.append(evs)
            seq = int(evs["seq_num"][-1]) + 1
        return np.concatenate(out) if out else np.zeros(0, dtype=R.EVENT_DTYPE)

    def status(self, node: int | None = None, with_digest: bool = False) -> dict[str, Any]:
        """STATUS of replica ``node`` (an index into the address list), or of whichever answers."""
        fut = self._io.submit(_Call(Op.STATUS, Future(), node=node, with_digest=with_digest))
        return msgspec.msgpack.decode(fut.result())


class AsyncClient(_ClientBase):
    """asyncio client: the same methods as ``Client``, as coroutines. Concurrent calls share batches."""

    @staticmethod
    async def _aw(fut: Future) -> Any:
        return await asyncio.wrap_future(fut)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def apply_batch(self, ops: np.ndarray, want_events: bool = False) -> Any:
        return await self._aw(self._apply_call(ops, want_events))

    async def get_account(self, account_id: Any, consistency: str = "linearizable") -> dict[str, Any] | None:
        return (await self.get_accounts([account_id], consistency))[0]

    async def get_accounts(self, account_ids: Iterable[Any],
                           consistency: str = "linearizable") -> list[dict[str, Any] | None]:
        return _accounts(await self._aw(self._read(Op.GET_ACCOUNTS, W.encode_ids(_ids(account_ids)), consistency)))

    async def result_of(self, dedup_id: Any, consistency: str = "linearizable") -> RemoteResult | None:
        return (await self.results_of([dedup_id], consistency))[0]

    async def results_of(self, dedup_ids: Iterable[Any],
                         consistency: str = "linearizable") -> list[RemoteResult | None]:
        return _result_of(await self._aw(self._read(Op.RESULT_OF, W.encode_ids(_ids(dedup_ids)), consistency)))

    async def totals(self, currency: str, consistency: str = "linearizable") -> dict[str, int]:
        return W.decode_totals(await self._aw(self._read(Op.TOTALS, b"", consistency, currency=currency)))

    async def events(self, first_seq: int, last_seq: int, consistency: str = "linearizable") -> np.ndarray:
        out = []
        seq = first_seq
        while seq <= last_seq:
            raw = await self._aw(self._read(Op.EVENTS, b"", consistency, first_seq=seq, last_seq=last_seq))
            evs = np.frombuffer(raw, dtype=R.EVENT_DTYPE)
            if not len(evs):
                break
            out.append(evs)
            seq = int(evs["seq_num"][-1]) + 1
        return np.concatenate(out) if out else np.zeros(0, dtype=R.EVENT_DTYPE)

    async def status(self, node: int | None = None, with_digest: bool = False) -> dict[str, Any]:
        fut = self._io.submit(_Call(Op.STATUS, Future(), node=node, with_digest=with_digest))
        return msgspec.msgpack.decode(await self._aw(fut))


_make_methods(Client, lambda self, fut: fut.result())
_make_methods(AsyncClient, lambda self, fut: AsyncClient._aw(fut))


# -------------------------------------------------------------------------------------- subscriber
class Subscriber:
    """Yields the shard's events in seq order with no gap and no repeat, starting at ``from_seq``.

    Subscribes to every replica's PUB socket (any one alive is enough); when what arrives skips ahead of
    the next expected seq (a lost message, a slow start, a failover), or nothing arrives for
    ``idle_check_s`` while the shard is ahead, the missing range is fetched from the replicas' event
    stores through a ``Client``. ``poll()`` returns the next chunk of event records (all parts of whole
    seqs) or None; iterating blocks."""

    def __init__(self, pub_addresses: Sequence[str], client_addresses: Sequence[str], from_seq: int = 1,
                 *, idle_check_s: float = 0.5, timeout_s: float = TIMEOUT_S_DEFAULT) -> None:
        if from_seq < 1:
            raise ValueError("from_seq starts at 1")
        self.next_seq = from_seq
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.sub.setsockopt(zmq.SUBSCRIBE, W.EVENTS_TOPIC)
        for a in pub_addresses:
            self.sub.connect(a)
        self.client = Client(client_addresses, timeout_s=timeout_s)
        self.idle_check_s = idle_check_s
        self._last_progress = time.monotonic()
        self.fetched_ranges = 0

    def close(self) -> None:
        self.sub.close(0)
        self.ctx.term()
        self.client.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self, evs: np.ndarray) -> np.ndarray | None:
        seqs = evs["seq_num"]
        keep = evs[seqs >= self.next_seq]
        if not len(keep):
            return None
        if int(keep["seq_num"][0]) != self.next_seq:
            return None
        self.next_seq = int(keep["seq_num"][-1]) + 1
        self._last_progress = time.monotonic()
        return keep

    def _fetch(self, last_seq: int) -> np.ndarray | None:
        evs = self.client.events(self.next_seq, last_seq)
        self.fetched_ranges += 1
        return self._take(evs) if len(evs) else None

    def poll(self, timeout_ms: int = 1000) -> np.ndarray | None:
        if self.sub.poll(timeout_ms):
            topic = self.sub.recv()
            frames = []
            while self.sub.rcvmore:
                frames.append(self.sub.recv())
            if topic != W.EVENTS_TOPIC or len(frames) != 2:
                return None
            try:
                head = W.decode_events_header(frames[0])
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None
            if head.last_seq < self.next_seq:
                return None                        # already delivered (another replica's copy)
            if head.first_seq > self.next_seq:
                return self._fetch(head.first_seq - 1)   # a gap: fill it from an event store first
            return self._take(np.frombuffer(frames[1], dtype=R.EVENT_DTYPE))
        if time.monotonic() - self._last_progress >= self.idle_check_s:
            self._last_progress = time.monotonic()
            head = self.client.status().get("last_seq", 0)
            if head >= self.next_seq:
                return self._fetch(head)
        return None

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            evs = self.poll(1000)
            if evs is not None:
                yield evs
