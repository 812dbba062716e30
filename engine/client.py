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

How it works (the generic part is the service's client core, ``engine/service/client_core.py``; the
shard's ops, coalescing and DEDUP_EXPIRED settling are here). One I/O thread per client owns a DEALER per
replica. Calls from any number of threads or
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
import threading
import time
import uuid
from concurrent.futures import Future
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import numpy as np
import zmq

from engine import records as R
from engine._ledger import OpEncoder
from engine import wire as W
from engine.service.stream import StreamSubscriber, fetch_range
from engine.service.client_core import (ATTEMPT_TIMEOUT_S_DEFAULT, CLIENT_QUEUE_MAX, INFLIGHT_REQUESTS_MAX,
                                        RATE_LIMITED_BACKOFF_S, RETRY_BACKOFF_S, RETRYABLE, TIMEOUT_S_DEFAULT, Call,
                                        ClientError, Inflight, IoCore, RequestRefused, Unavailable,
                                        aio_future)
from engine.wire import Consistency, Op
from engine.service.futures import LightFuture

_RETRYABLE = RETRYABLE

__all__ = ["ATTEMPT_TIMEOUT_S_DEFAULT", "CLIENT_QUEUE_MAX", "INFLIGHT_REQUESTS_MAX", "RATE_LIMITED_BACKOFF_S",
           "RETRY_BACKOFF_S", "TIMEOUT_S_DEFAULT", "AsyncClient", "Client", "ClientError", "OutcomeUnknown",
           "RemoteResult", "RequestRefused", "Subscriber", "Unavailable"]


class OutcomeUnknown(ClientError):
    """A command was refused as issued before the dedup window's horizon (DEDUP_EXPIRED), and no replica
    holds enough of the event history to say whether an earlier attempt applied it. It will never be
    applied from now on; look for its effects by other means (the account's history)."""


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

    @classmethod
    def _of(cls, code: int, flags: int, seq_num: int, dedup_id: int, kind: int,
            events: np.ndarray | None) -> RemoteResult:
        """The same, from a result record's fields already taken out as ints (a batch's columns at once:
        field access on one ``np.void`` costs ~1 us each)."""
        self = cls.__new__(cls)
        self.code = _CODES[code] if code in _CODES else R.Code(code)
        self.duplicate = bool(flags & _DUPLICATE)
        self.seq_num = seq_num
        self.dedup_id = dedup_id
        self.kind = _KINDS[kind] if kind in _KINDS else (R.Kind(kind) if kind else 0)
        self._events = events
        return self

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


_CODES = {int(c): c for c in R.Code}
_KINDS = {int(k): k for k in R.Kind}
_DUPLICATE = int(R.ResultFlag.DUPLICATE)


# ----------------------------------------------------------------------------------------- the I/O core
_Call = Call
_Inflight = Inflight


class _IoCore(IoCore):
    """The service's client core with the shard's ops: APPLY goes to the leader; per-call commands queued
    together are coalesced into one APPLY batch; replies are result records (and events); a per-call
    command refused DEDUP_EXPIRED is settled by asking RESULT_OF (``_settle_expired``)."""

    write_ops = frozenset({int(Op.APPLY)})

    def _take_queue(self) -> None:
        now = time.monotonic()
        per_call: list[Call] = []
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

    def _new_request(self, calls: list[Call], now: float) -> None:
        c0 = calls[0]
        if c0.records is None:
            super()._new_request(calls, now)
            return
        req_id = self.next_req_id()
        offsets: list[int] = []
        off = 0
        records = [c.records for c in calls if c.records is not None]
        for r in records:
            offsets.append(off)
            off += len(r)
        payload = b"".join(r.tobytes() for r in records)
        header = W.Request(req_id, Op.APPLY, want_events=True)
        self._queue_request(Inflight(req_id, calls, header, payload, now + self.timeout_s, offsets=offsets))

    def _resolve(self, inf: _Inflight, reply: W.Reply, frames: list[zmq.Frame]) -> None:
        payload = frames[0].bytes if frames else b""
        c0 = inf.calls[0]
        if c0.records is not None:
            results = W.results_view(payload)
            events = np.frombuffer(frames[1].bytes, dtype=R.EVENT_DTYPE) if len(frames) > 1 else None
            self._saw(results)
            # the events come in seq order (new ones, then duplicates' older ones): sort once, then two
            # binary searches per call
            # each call's result record, its fields as columns taken out at once
            mine = results[np.asarray(inf.offsets, dtype=np.intp)]
            seq_col = mine["seq_num"]
            ids = mine["dedup_id"]
            dedup_ids = [lo | (hi << 64) for lo, hi in zip(ids[:, 0].tolist(), ids[:, 1].tolist())]
            lo_at: list[int] | None = None
            hi_at: list[int] | None = None
            if events is not None and len(events):
                # the events come in seq order (new ones, then duplicates' older ones): sort once, then
                # each call's range by two vectorized binary searches
                order = np.argsort(events["seq_num"], kind="stable")
                events = R.records_take(events, order)
                seqs = events["seq_num"]
                lo_at = np.searchsorted(seqs, seq_col, "left").tolist()
                hi_at = np.searchsorted(seqs, seq_col, "right").tolist()
            expired = int(R.Code.DEDUP_EXPIRED)
            for k, (c, code, flags, seq, kind) in enumerate(zip(inf.calls, mine["code"].tolist(),
                                                               mine["flags"].tolist(), seq_col.tolist(),
                                                               mine["kind"].tolist())):
                if code == expired and c.records is not None:
                    self._settle_expired(c, mine[k])
                    continue
                evs = None
                if seq and lo_at is not None and hi_at is not None and hi_at[k] > lo_at[k]:
                    assert events is not None
                    evs = events[lo_at[k]:hi_at[k]]
                c.future.set_result(RemoteResult._of(code, flags, seq, dedup_ids[k], kind, evs))
            return
        if c0.op == Op.APPLY:
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
        ask = _Call(Op.RESULT_OF, LightFuture(), payload=W.encode_ids([dedup_id]),
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
                 attempt_timeout_s: float = ATTEMPT_TIMEOUT_S_DEFAULT, keys: Any = None) -> None:
        """``keys``: the CURVE client keys (engine.service.security.ClientKeys; None: an insecure shard)."""
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a]
        self._io = _IoCore(addresses, timeout_s, attempt_timeout_s, keys)
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
        return self._submit_records(self._encode_command(name, *args, **kwargs))

    def _encode_command(self, name: str, *args: Any, **kwargs: Any) -> np.ndarray:
        """The op records of one command (``_command`` = this, then ``_submit_records``)."""
        if not kwargs.get("timestamp"):
            kwargs["timestamp"] = int(time.time() * 1000)     # the command's issued_ms (the first attempt's)
        with self._encoder_lock:
            return getattr(self._encoder, name)(*args, **kwargs)

    def _submit_records(self, records: np.ndarray) -> Future:
        return self._io.submit(_Call(Op.APPLY, LightFuture(), records=records))

    def _read(self, op: Op, payload: bytes = b"", consistency: str = "linearizable", **fields: Any) -> Future:
        try:
            level = _CONSISTENCY[consistency]
        except KeyError:
            raise ValueError(f"consistency must be one of {sorted(_CONSISTENCY)}") from None
        return self._io.submit(_Call(op, LightFuture(), payload=payload, consistency=level, **fields))

    def _apply_call(self, ops: np.ndarray, want_events: bool, shard_epoch: int = 0) -> Future:
        if not isinstance(ops, np.ndarray) or ops.dtype != R.OP_DTYPE:
            raise TypeError("ops must be a numpy array of engine.records.OP_DTYPE")
        if not 1 <= len(ops) <= R.BATCH_SIZE_MAX:
            raise ValueError(f"a batch holds 1..{R.BATCH_SIZE_MAX} records, not {len(ops)}")
        if not ops["issued_ms"].any():
            # stamp the batch with its issue time once: its retries re-send these bytes (to retry the batch
            # yourself after a failed call, past the dedup window, send the same issued_ms again)
            ops = R.records_copy(ops)
            ops["issued_ms"] = int(time.time() * 1000)
        return self._io.submit(_Call(Op.APPLY, LightFuture(), payload=np.ascontiguousarray(ops).tobytes(),
                                     want_events=want_events, shard_epoch=shard_epoch))


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

    def apply_batch(self, ops: np.ndarray, want_events: bool = False, shard_epoch: int = 0) -> Any:
        """Apply a batch of op records (up to 8190) as one request; returns the result records (and the
        events if ``want_events``: a tuple (results, events)). ``shard_epoch``: the shard map epoch the
        batch was routed with (a replica serving another refuses it STALE_EPOCH; 0: not checked)."""
        return self._apply_call(ops, want_events, shard_epoch).result()

    def apply_batch_async(self, ops: np.ndarray, shard_epoch: int = 0) -> Future:
        """Send a batch without waiting: a Future of the result records (for pipelining from one thread)."""
        return self._apply_call(ops, False, shard_epoch)

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
        return fetch_range(lambda a, b: self._read(Op.EVENTS, b"", consistency, first_seq=a, last_seq=b),
                           first_seq, last_seq, R.EVENT_DTYPE)

    def status(self, node: int | None = None, with_digest: bool = False) -> dict[str, Any]:
        """STATUS of replica ``node`` (an index into the address list), or of whichever answers."""
        fut = self._io.submit(_Call(Op.STATUS, LightFuture(), node=node, with_digest=with_digest))
        return msgspec.msgpack.decode(fut.result())


class AsyncClient(_ClientBase):
    """asyncio client: the same methods as ``Client``, as coroutines. Concurrent calls share batches."""

    @staticmethod
    async def _aw(fut: Future) -> Any:
        return await aio_future(fut)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def apply_batch(self, ops: np.ndarray, want_events: bool = False, shard_epoch: int = 0) -> Any:
        return await self._aw(self._apply_call(ops, want_events, shard_epoch))

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
        return R.records_concat(out, R.EVENT_DTYPE)

    async def status(self, node: int | None = None, with_digest: bool = False) -> dict[str, Any]:
        fut = self._io.submit(_Call(Op.STATUS, LightFuture(), node=node, with_digest=with_digest))
        return msgspec.msgpack.decode(await self._aw(fut))


_make_methods(Client, lambda self, fut: fut.result())
_make_methods(AsyncClient, lambda self, fut: AsyncClient._aw(fut))


# -------------------------------------------------------------------------------------- subscriber
class Subscriber(StreamSubscriber):
    """Yields the shard's events in seq order with no gap and no repeat, starting at ``from_seq``
    (``engine.service.stream.StreamSubscriber`` over a shard ``Client``'s EVENTS and STATUS): subscribes to
    every replica's PUB socket, fetches any missing range from the replicas' event stores. ``poll()``
    returns the next chunk of event records (all parts of whole seqs) or None; iterating blocks."""

    def __init__(self, pub_addresses: Sequence[str], client_addresses: Sequence[str], from_seq: int = 1,
                 *, idle_check_s: float = 0.5, timeout_s: float = TIMEOUT_S_DEFAULT, keys: Any = None) -> None:
        self.client = Client(client_addresses, timeout_s=timeout_s, keys=keys)
        super().__init__(pub_addresses, self.client.events, lambda: int(self.client.status().get("last_seq", 0)),
                         R.EVENT_DTYPE, from_seq, idle_check_s=idle_check_s, keys=keys)

