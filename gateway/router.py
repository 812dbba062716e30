"""The routing library: the whole system (system.toml) as one ledger, in-process.

    from gateway.router import Router
    r = Router("D/system.toml")
    r.transfer(7, 1, 2, 5_00, "USD").result()     # a Future: accounts 1 and 2 on one shard or two

``Router`` holds the shard map (account id -> shard), one ``engine.client.Client`` per shard (leader tracking,
same-bytes retries and batching are that client's: concurrent calls to one shard share batches) and the
Marker client. Every method returns a ``concurrent.futures.Future``:

- a command on one account, or on accounts that are all on one shard, goes straight to that shard;
- a transfer (or a batch balance operation) between accounts on several shards becomes a Marker workflow
  whose workflow id IS the command's dedup id: a TCC multi-leg transfer (atomic, isolated) when it is
  zero-sum per currency without preconditions, else a saga of one batch step per shard (atomic in outcome:
  a failed step compensates the earlier ones; not isolated);
- a shard's WRONG_SHARD / STALE_EPOCH refusal (nothing was applied) makes the router reload the system file
  (one reload for any number of concurrent refusals, at most one per ``RELOAD_INTERVAL_MIN_S``) and route
  the same command again, with the same dedup id and the same issue time, up to ``ROUTE_ATTEMPTS_MAX`` times.

Commands that name no account (``tcc_confirm``/``tcc_cancel`` by txn id, ``compensate`` by the original's
dedup id) are located: a txn the router itself tried is remembered (bounded); otherwise the confirm/cancel
goes to every shard (a shard that never saw the txn answers TXN_NOT_FOUND, or records a null cancel, which is
what anti-suspension wants) and the result of the shard that held it comes back. ``compensate`` asks every
shard's RESULT_OF for the original and sends the compensation where it applied (a null compensation on every
shard if none has it: a late original is then refused wherever it lands).

``tcc_try`` is a shard's phase-1 step: its specs must all be on one shard (ValueError otherwise: a
cross-shard atomic movement is ``transfer`` / ``batch_balance_operation``, which the Marker runs as TCC).
"""
from __future__ import annotations

import collections
import contextvars
import functools
import hashlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from engine import records as R
from engine._ledger import UNCHANGED
from engine.client import Client as ShardClient
from engine.client import ClientError, RequestRefused, Unavailable
from engine.records import Code, Kind
from engine.service.protocol import ErrorCode
from engine.service.security import OPERATE, READ, Rights, client_keys_of_system, ops_outside
from engine.wire import Op, decode_ids
from engine.shard_map import ShardMap
from engine.system import Group, System
from engine.service.futures import LightFuture
from gateway.result import Result

ROUTE_ATTEMPTS_MAX = 4                 # routings of one command (the first + re-routes after a map reload)
RELOAD_INTERVAL_MIN_S = 0.05           # system-file reloads at most this often (coalesced refusals)
TXN_SHARDS_REMEMBERED_MAX = 1 << 20    # txn id -> shard of tries this router sent (LRU)
WORKFLOW_TIMEOUT_S_DEFAULT = 30.0      # a workflow call waits this long for its outcome, then WorkflowPending
WORKFLOW_WAIT_MS = 2_000               # one SUBMIT is held this long for its outcome, then asked again
SUBMITS_INFLIGHT_MAX = 32              # SUBMIT requests in flight to the Marker
SUBMIT_SPECS_BATCH_MAX = 256            # workflows batched into one SUBMIT (one Marker entry holds 256)
OVERLOADED_BACKOFF_S = 0.05
DEADLINE_MS_DEFAULT = 60_000           # a workflow's phase 1 ends this long after it was issued
REFUSED_REROUTE = frozenset({ErrorCode.WRONG_SHARD, ErrorCode.STALE_EPOCH})



def now_ms() -> int:
    return int(time.time() * 1000)


def _id(v: Any) -> int:
    import uuid
    return v.int if isinstance(v, uuid.UUID) else int(v)


def derive_id(request_id: int, tag: bytes, index: int = 0) -> int:
    """A 128-bit id derived from a business request id (the same function as marker/workflow.py's, with the
    gateway's tags): every account-level id of a business request is one of these, so any gateway replica
    retrying the request sends the same ids."""
    h = hashlib.blake2b(int(request_id).to_bytes(16, "little") + b"gw:" + tag + index.to_bytes(4, "little"),
                        digest_size=16).digest()
    return int.from_bytes(h, "little") or 1


# The rights of the caller a gateway service runs a command for (gateway/server.py sets it around each
# CALL; the router carries it into its retries and worker threads). None: no caller (an in-process router
# of an embedder with its own key), refused when the router enforces callers.
CALLER: contextvars.ContextVar[Rights | None] = contextvars.ContextVar("zwallet_gateway_caller", default=None)
_MANAGEMENT_KINDS = tuple(int(k) for k in (Kind.CREATE_ACCOUNT, Kind.DELETE_ACCOUNT, Kind.LOCK_ACCOUNT,
                                           Kind.UNLOCK_ACCOUNT, Kind.UPDATE_ACCOUNT_CONFIG))


def caller_refusal(shard: int | None, ops: np.ndarray | None, *, need: str = READ, unrestricted: bool = False,
                   ids: Sequence[int] = ()) -> str:
    """Why the current CALLER may not do this ("" if it may): the same checks, in the same words, as a
    shard or the Marker make for a key that reaches them directly (engine/service/server.py, engine/node.py)."""
    r = CALLER.get()
    if r is None:
        return "no caller rights on this path of the gateway (refused rather than run with the gateway's key)"
    if ops is not None:
        return ops_outside(r, ops, _MANAGEMENT_KINDS, int(Kind.TRANSFER), shard) or "" if not r.is_admin else ""
    if not r.has(need):
        return f"{r.describe()} may not do this (needs {need})"
    if unrestricted and r.restricted:
        return f"{r.describe()} is restricted: this reads or moves accounts of every range (needs unrestricted)"
    if shard is not None and not r.allows_shard(shard):
        return f"{r.describe()} may not reach shard {shard}"
    bad = r.outside(ids)
    if bad is not None:
        return f"account {bad} is outside the ranges of {r.describe()}"
    return ""


def _in_caller(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` to run later on another thread (a Future's callback) in the context of now: with CALLER."""
    ctx = contextvars.copy_context()
    return lambda *a: ctx.copy().run(fn, *a)


def _refused(why: str) -> Future:
    return _failed(RequestRefused(ErrorCode.UNAUTHORIZED, why + "; nothing was applied"))


class _GuardedShard:
    """A shard client of the gateway service: every command and read is checked against its caller's
    rights (``caller_refusal``) before it is sent with the gateway's key."""

    def __init__(self, client: ShardClient, shard_id: int, router: Any) -> None:
        self._c = client
        self._sid = shard_id

    def _command(self, name: str, *args: Any, **kwargs: Any) -> Future:
        records = self._c._encode_command(name, *args, **kwargs)
        why = caller_refusal(self._sid, records)
        return _refused(why) if why else self._c._submit_records(records)

    def _apply_call(self, ops: np.ndarray, want_events: bool, shard_epoch: int = 0) -> Future:
        if not isinstance(ops, np.ndarray) or ops.dtype != R.OP_DTYPE:
            raise TypeError("ops must be a numpy array of engine.records.OP_DTYPE")
        why = caller_refusal(self._sid, ops)
        return _refused(why) if why else self._c._apply_call(ops, want_events, shard_epoch)

    def _read(self, op: Op, payload: bytes = b"", consistency: str = "linearizable", **fields: Any) -> Future:
        if op == Op.GET_ACCOUNTS:
            why = caller_refusal(self._sid, None, ids=decode_ids(payload))
        elif op == Op.RESULT_OF:
            why = caller_refusal(self._sid, None)
        else:
            why = caller_refusal(self._sid, None, unrestricted=True)
        return _refused(why) if why else self._c._read(op, payload, consistency, **fields)

    def events(self, first_seq: int, last_seq: int, consistency: str = "linearizable") -> np.ndarray:
        why = caller_refusal(self._sid, None, unrestricted=True)
        if why:
            raise RequestRefused(ErrorCode.UNAUTHORIZED, why)
        return self._c.events(first_seq, last_seq, consistency)

    def __getattr__(self, name: str) -> Any:      # close, status, ... (no account data)
        return getattr(self._c, name)


class _Scheduler:
    """One thread for the router's own work: reloads, delayed retries, Marker batching. Callbacks of the
    shard and Marker clients (on their I/O threads) hand their follow-up work here, so no I/O thread ever
    blocks on a file read or waits on another client."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="zwallet-gateway-router", daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        # run in the scheduling context: a retry keeps its caller's rights (CALLER)
        task: Callable[[], None] = functools.partial(contextvars.copy_context().run, fn)
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._seq), task))
            self._cv.notify()

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.call_later(0.0, fn)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(5)

    def _run(self) -> None:
        import logging
        log = logging.getLogger("zwallet.gateway")
        while True:
            with self._cv:
                while not self._stop and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stop:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:                # a bug in one task must not stop the router's thread
                log.exception("gateway router task failed")


def _chain(inner: Future, out: Future, fn: Callable[[Any], Any]) -> None:
    """``out`` gets ``fn(inner.result())``, or inner's exception (or fn's)."""
    def done(f: Future) -> None:
        if out.done():
            return
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        try:
            out.set_result(fn(f.result()))
        except Exception as e:  # noqa: BLE001 - whatever fn raises is the caller's exception
            out.set_exception(e)
    inner.add_done_callback(done)


def _gather(futs: Sequence[Future]) -> Future:
    """A Future of the list of results, or the first exception once all are done."""
    out: Future = LightFuture()
    left = [len(futs)]
    lock = threading.Lock()
    if not futs:
        out.set_result([])
        return out

    def done(_f: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        for f in futs:
            exc = f.exception()
            if exc is not None:
                out.set_exception(exc)
                return
        out.set_result([f.result() for f in futs])
    for f in futs:
        f.add_done_callback(done)
    return out


def _done(value: Any) -> Future:
    f: Future = LightFuture()
    f.set_result(value)
    return f


def _failed(exc: BaseException) -> Future:
    f: Future = LightFuture()
    f.set_exception(exc)
    return f


class _Wf:
    __slots__ = ("spec", "future", "deadline", "status", "kind", "group")

    def __init__(self, spec: Any, future: Future, deadline: float, kind: int, group: int) -> None:
        self.spec = spec
        self.future = future
        self.deadline = deadline
        self.status: str | None = None
        self.kind = kind
        self.group = group


class _Workflows:
    """Marker workflows as Futures, batched: workflows submitted meanwhile share SUBMIT requests (per Marker
    group), each SUBMIT held up to WORKFLOW_WAIT_MS for its outcomes; an unfinished workflow is asked again
    (a re-submit of a known workflow id is a duplicate: it waits again, nothing runs twice) until its call's
    timeout, then fails with ``marker.client.WorkflowPending`` (it goes on: ask result_of / get_workflow)."""

    def __init__(self, marker: Any, groups: Any, sched: _Scheduler, timeout_s: float) -> None:
        self.marker = marker
        self.groups = groups                 # marker.groups.GroupMap: the same owner as the Marker client's
        self.sched = sched
        self.timeout_s = timeout_s
        self._queue: collections.deque[_Wf] = collections.deque()
        self._submits = 0
        self._flush_pending = False
        self._lock = threading.Lock()

    def group_of(self, workflow_id: int) -> int:
        """The Marker group a workflow goes to (rendezvous hashing, marker/groups.py): one SUBMIT carries
        workflows of one group only (the Marker client sends it to its first workflow's group)."""
        owner: int = self.groups.owner(workflow_id)
        return owner

    def run(self, spec: Any, kind: int) -> Future:
        wid = int.from_bytes(spec.workflow_id, "little")
        w = _Wf(spec, LightFuture(), time.monotonic() + self.timeout_s, kind, self.group_of(wid))
        self._enqueue(w)
        return w.future

    def _enqueue(self, w: _Wf) -> None:
        with self._lock:
            self._queue.append(w)
            if self._flush_pending:
                return
            self._flush_pending = True
        self.sched.call_soon(self._flush)

    def _flush(self) -> None:
        with self._lock:
            self._flush_pending = False
            while self._queue and self._submits < SUBMITS_INFLIGHT_MAX:
                first = self._queue.popleft()
                batch = [first]
                rest: collections.deque[_Wf] = collections.deque()
                while self._queue and len(batch) < SUBMIT_SPECS_BATCH_MAX:
                    w = self._queue.popleft()
                    (batch if w.group == first.group else rest).append(w)
                rest.extend(self._queue)
                self._queue = rest
                self._submits += 1
                self._send(batch)

    def _send(self, batch: list[_Wf]) -> None:
        left_ms = int((min(w.deadline for w in batch) - time.monotonic()) * 1000)
        wait_ms = max(1, min(WORKFLOW_WAIT_MS, left_ms))
        try:
            f = self.marker.submit_async([w.spec for w in batch], wait_ms)
        except ClientError as exc:
            f = _failed(exc)
        f.add_done_callback(lambda f, b=batch: self.sched.call_soon(lambda: self._answered(b, f)))

    def _answered(self, batch: list[_Wf], f: Future) -> None:
        from marker.client import WorkflowPending, WorkflowRefused, WorkflowResult
        with self._lock:
            self._submits -= 1
        now = time.monotonic()
        exc = f.exception()
        again: list[_Wf] = []
        later: list[_Wf] = []
        if exc is not None:
            for w in batch:
                wid = int.from_bytes(w.spec.workflow_id, "little")
                if isinstance(exc, Unavailable) and now < w.deadline:
                    again.append(w)                     # the Marker group is electing: ask again
                elif isinstance(exc, Unavailable):
                    w.future.set_exception(WorkflowPending(wid, w.status or "UNKNOWN"))
                else:
                    w.future.set_exception(exc)
        else:
            replies = f.result()
            if len(replies) != len(batch):          # the Marker answers every spec: anything else is its bug
                for w in batch:
                    w.future.set_exception(ClientError(f"the Marker answered {len(replies)} of {len(batch)} "
                                                       "workflows of one SUBMIT"))
                replies = []
            for w, r in zip(batch, replies):
                wid = int.from_bytes(w.spec.workflow_id, "little")
                if r.status == "refused":
                    if r.reason == "OVERLOADED" and now < w.deadline:
                        later.append(w)
                    else:
                        w.future.set_exception(WorkflowRefused(wid, r.reason, r.message))
                    continue
                if r.status == "error":
                    w.future.set_exception(ClientError(f"workflow {wid}: {r.reason}: {r.message}"))
                    continue
                if w.status is None:
                    w.status = r.status
                if r.finished:
                    wf = WorkflowResult(wid, r.code if r.code is not None else -1, r.state,
                                        w.status == "duplicate")
                    w.future.set_result(Result.of_workflow(wf, w.kind))
                elif now < w.deadline:
                    again.append(w)
                else:
                    w.future.set_exception(WorkflowPending(wid, r.state))
        for w in again:
            self._enqueue(w)
        for w in later:
            self.sched.call_later(OVERLOADED_BACKOFF_S, functools.partial(self._enqueue, w))
        with self._lock:
            if self._queue and not self._flush_pending:
                self._flush_pending = True
                self.sched.call_soon(self._flush)


class Router:
    """The system as one ledger, in-process (module docstring). Thread-safe; every method returns a Future."""

    def __init__(self, system: System | str, *, timeout_s: float = 10.0, attempt_timeout_s: float = 1.0,
                 workflow_timeout_s: float = WORKFLOW_TIMEOUT_S_DEFAULT, keys: Any = "system",
                 enforce_callers: bool = False) -> None:
        """``keys``: the CURVE client keys the router reaches shards and the Marker with (None: insecure;
        by default the system's admin client key, as system.toml's [security] table names it).
        ``enforce_callers`` (the gateway service): every command is checked against its caller's rights
        (``CALLER``) before it leaves, exactly as a shard or the Marker would check them directly; a path
        without a caller is refused, never run with the gateway's own key."""
        if isinstance(system, str):
            system = System.load(system)
        self.keys = client_keys_of_system(system) if keys == "system" else keys
        self.enforce_callers = enforce_callers
        self.path = system.path
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.system = system
        self.shard_map: ShardMap = system.shard_map
        self.shards: dict[int, ShardClient] = {}
        self._shard_addrs: dict[int, tuple[str, ...]] = {}
        self._retired: list[ShardClient] = []
        self.sched = _Scheduler()
        self._connect_shards(system)
        self.marker: Any = None
        self.workflows: _Workflows | None = None
        if system.markers:
            import marker as marker_pkg
            from marker.groups import GroupMap
            if system.path is not None:     # the groups' ids and removals as system.toml says
                self.marker = marker_pkg.Client.from_system(system.path, timeout_s=workflow_timeout_s,
                                                            keys=self.keys)
            else:
                self.marker = marker_pkg.Client([list(g.clients) for g in system.markers],
                                                timeout_s=workflow_timeout_s, keys=self.keys)
            groups = GroupMap(system.markers if system.path is not None else
                              [Group(k + 1, g.clients) for k, g in enumerate(system.markers)])
            self.workflows = _Workflows(self.marker, groups, self.sched, workflow_timeout_s)
        self.reloads = 0
        self._reload: Future | None = None
        self._last_reload = 0.0
        self._lock = threading.Lock()
        self._txn_shards: collections.OrderedDict[int, int] = collections.OrderedDict()

    def _connect_shards(self, system: System) -> None:
        for sid in system.shard_map.shards:
            addrs = system.shard_clients(sid)
            if self._shard_addrs.get(sid) != addrs:
                old = self.shards.get(sid)
                client = ShardClient(list(addrs), timeout_s=self.timeout_s,
                                     attempt_timeout_s=self.attempt_timeout_s, keys=self.keys)
                self.shards[sid] = _GuardedShard(client, sid, self) if self.enforce_callers else client  # type: ignore[assignment]
                self._shard_addrs[sid] = addrs
                if old is not None:        # calls in flight on it finish (or time out) first
                    self._retired.append(old)
                    self.sched.call_later(self.timeout_s + 1.0, old.close)

    def close(self) -> None:
        self.sched.close()
        if self.marker is not None:
            self.marker.close()
        for c in [*self.shards.values(), *self._retired]:
            c.close()                      # closing twice is a no-op

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ the shard map
    def shard_of(self, account_id: Any) -> int:
        return self.shard_map.shard_of(_id(account_id))

    def refresh(self, map_used: ShardMap) -> Future:
        """Reload the system file unless it was reloaded since ``map_used`` was the router's map; coalesced:
        every caller meanwhile gets the same Future (done when the reload is)."""
        with self._lock:
            if self.shard_map is not map_used:
                return _done(None)
            if self._reload is not None:
                return self._reload
            if self.path is None:
                return _failed(ClientError("the shard map is stale and this router has no system file to reload"))
            fut: Future = LightFuture()
            self._reload = fut
            delay = max(0.0, self._last_reload + RELOAD_INTERVAL_MIN_S - time.monotonic())
        self.sched.call_later(delay, lambda: self._do_reload(fut))
        return fut

    def _do_reload(self, fut: Future) -> None:
        try:
            assert self.path is not None
            system = System.load(self.path)
            with self._lock:
                self._connect_shards(system)
                self.system = system
                self.shard_map = system.shard_map
                self.reloads += 1
        except (ValueError, OSError) as exc:
            with self._lock:
                self._reload = None
                self._last_reload = time.monotonic()
            fut.set_exception(ClientError(f"reloading {self.path}: {exc}"))
            return
        with self._lock:
            self._reload = None
            self._last_reload = time.monotonic()
        fut.set_result(None)

    def routed(self, plan: Callable[[ShardMap], Future]) -> Future:
        """``plan(shard_map)`` sends a command by the current map; a WRONG_SHARD / STALE_EPOCH refusal
        reloads the map and plans again (the plan must reuse its ids and issue time)."""
        out: Future = LightFuture()
        caller = contextvars.copy_context()      # every attempt (re-planned on a client thread) as the caller

        def attempt(n: int) -> None:
            caller.copy().run(_attempt, n)

        def _attempt(n: int) -> None:
            smap = self.shard_map
            try:
                f = plan(smap)
            except Exception as exc:  # noqa: BLE001 - a bad argument is the caller's exception
                out.set_exception(exc)
                return

            def done(f: Future) -> None:
                exc = f.exception()
                if (isinstance(exc, RequestRefused) and exc.code in REFUSED_REROUTE
                        and n + 1 < ROUTE_ATTEMPTS_MAX):
                    def reloaded(r: Future) -> None:
                        if r.exception() is not None:
                            out.set_exception(exc)
                        else:
                            attempt(n + 1)
                    self.refresh(smap).add_done_callback(reloaded)
                    return
                if exc is not None:
                    out.set_exception(exc)
                else:
                    out.set_result(f.result())
            f.add_done_callback(done)
        attempt(0)
        return out

    # ------------------------------------------------------------------------------ building blocks
    def _shard_command(self, shard: int, name: str, *args: Any, **kwargs: Any) -> Future:
        out: Future = LightFuture()
        try:
            inner = self.shards[shard]._command(name, *args, **kwargs)
        except ClientError as exc:
            return _failed(exc)
        _chain(inner, out, lambda r: Result.of_shard(r, shard))
        return out

    def _one_shard(self, account_id: Any, name: str, *args: Any, **kwargs: Any) -> Future:
        kwargs["timestamp"] = kwargs.get("timestamp") or now_ms()
        acct = _id(account_id)
        return self.routed(lambda smap: self._shard_command(smap.shard_of(acct), name, *args, **kwargs))

    def _legs_shards(self, smap: ShardMap, accounts: Iterable[int]) -> set[int]:
        return {smap.shard_of(a) for a in accounts}

    def _workflow(self, spec: Any, kind: int) -> Future:
        if self.enforce_callers:
            # a workflow runs with the Marker's key on every shard it names: the caller's rights must cover
            # every account of it, as the Marker checks a restricted key itself (docs/security.md)
            why = caller_refusal(None, None, need=OPERATE)
            r = CALLER.get()
            if not why and r is not None and r.restricted:
                from marker.commands import workflow_refusal
                why = workflow_refusal(r, [spec], self.shard_map)
            if why:
                return _refused(why)
        if self.workflows is None:
            return _failed(ClientError("this system has no Marker ([marker] in system.toml): a command over "
                                       "several shards cannot run"))
        return self.workflows.run(spec, kind)

    # ------------------------------------------------------------------------- the Ledger's commands
    def create_account(self, dedup_id: Any, account_id: Any, currency: str, lower_limit: int | None = 0,
                       upper_limit: int | None = None, *, timestamp: int = 0) -> Future:
        return self._one_shard(account_id, "create_account", dedup_id, account_id, currency, lower_limit,
                               upper_limit, timestamp=timestamp)

    def delete_account(self, dedup_id: Any, account_id: Any, *, timestamp: int = 0) -> Future:
        return self._one_shard(account_id, "delete_account", dedup_id, account_id, timestamp=timestamp)

    def lock_account(self, dedup_id: Any, account_id: Any, *, timestamp: int = 0) -> Future:
        return self._one_shard(account_id, "lock_account", dedup_id, account_id, timestamp=timestamp)

    def unlock_account(self, dedup_id: Any, account_id: Any, *, timestamp: int = 0) -> Future:
        return self._one_shard(account_id, "unlock_account", dedup_id, account_id, timestamp=timestamp)

    def update_account_config(self, dedup_id: Any, account_id: Any, *, lower_limit: Any = UNCHANGED,
                              upper_limit: Any = UNCHANGED, timestamp: int = 0) -> Future:
        return self._one_shard(account_id, "update_account_config", dedup_id, account_id, lower_limit=lower_limit,
                               upper_limit=upper_limit, timestamp=timestamp)

    def reserve(self, dedup_id: Any, account_id: Any, reservation_id: Any, amount: int, *,
                timestamp: int = 0) -> Future:
        return self._one_shard(account_id, "reserve", dedup_id, account_id, reservation_id, amount,
                               timestamp=timestamp)

    def release(self, dedup_id: Any, account_id: Any, reservation_id: Any, amount: int | None = None, *,
                timestamp: int = 0) -> Future:
        return self._one_shard(account_id, "release", dedup_id, account_id, reservation_id, amount,
                               timestamp=timestamp)

    def transfer(self, dedup_id: Any, from_account_id: Any, to_account_id: Any, amount: int, currency: str,
                 expected_from_balance: int | None = None, expected_to_balance: int | None = None, *,
                 timestamp: int = 0) -> Future:
        """Between any two accounts: one shard's transfer, or a Marker TCC transfer (workflow id = dedup_id)
        across two shards; with expected balances across shards, a saga of two batch steps (the debit with
        its precondition, then the credit with its own; a failed credit compensates the debit)."""
        ts = timestamp or now_ms()
        d, a, b = _id(dedup_id), _id(from_account_id), _id(to_account_id)

        def plan(smap: ShardMap) -> Future:
            sa, sb = smap.shard_of(a), smap.shard_of(b)
            if sa == sb:
                return self._shard_command(sa, "transfer", d, a, b, amount, currency, expected_from_balance,
                                           expected_to_balance, timestamp=ts)
            _check_amount(amount)
            _check_currency(currency)
            if amount <= 0:          # what the shard's transfer answers; a negative leg would move money back
                return _done(Result(Code.INVALID_AMOUNT, False, 0, d, Kind.TRANSFER))
            from marker.commands import batch_step, saga_spec, tcc_spec
            spec: Any
            if expected_from_balance is None and expected_to_balance is None:
                spec = tcc_spec(d, [(a, -int(amount), currency), (b, int(amount), currency)], issued_ms=ts,
                                deadline_ms=ts + DEADLINE_MS_DEFAULT)
            else:
                pre_a = [(a, int(expected_from_balance))] if expected_from_balance is not None else []
                pre_b = [(b, int(expected_to_balance))] if expected_to_balance is not None else []
                spec = saga_spec(d, [batch_step([(a, -int(amount), currency)], pre_a),
                                     batch_step([(b, int(amount), currency)], pre_b)],
                                 issued_ms=ts, deadline_ms=ts + DEADLINE_MS_DEFAULT)
            return self._workflow(spec, Kind.TRANSFER)
        return self.routed(plan)

    def batch_balance_operation(self, dedup_id: Any, specs: Iterable[tuple[Any, int, str]],
                                preconditions: Iterable[tuple[Any, int]] = (), *, timestamp: int = 0) -> Future:
        """On one shard: that shard's atomic batch. Across shards: a Marker workflow (id = dedup_id): TCC
        when the specs sum to zero per currency and there are no preconditions (atomic and isolated), else a
        saga of one batch step per shard, each with its own shard's preconditions (atomic in outcome: a
        failed step compensates the earlier ones; intermediate states are visible)."""
        ts = timestamp or now_ms()
        d = _id(dedup_id)
        sp = [(_id(a), int(m), str(c)) for a, m, c in specs]
        pre = [(_id(a), int(e)) for a, e in preconditions]
        return self.routed(lambda smap: self._movement(smap, d, sp, pre, ts, Kind.BATCH_BALANCE))

    def _movement(self, smap: ShardMap, d: int, sp: list[tuple[int, int, str]], pre: list[tuple[int, int]],
                  ts: int, kind: int) -> Future:
        shards = self._legs_shards(smap, [a for a, _, _ in sp] + [a for a, _ in pre])
        if len(shards) <= 1:
            sid = shards.pop() if shards else smap.shards[0]
            return self._shard_command(sid, "batch_balance_operation", d, sp, pre, timestamp=ts)
        from marker.commands import batch_step, saga_spec, tcc_spec
        merged: dict[tuple[int, str], int] = {}
        for a, m, c in sp:
            _check_currency(c)
            merged[(a, c)] = merged.get((a, c), 0) + m
        sums: dict[str, int] = {}
        for (_, c), m in merged.items():
            sums[c] = sums.get(c, 0) + m
        legs = [(a, m, c) for (a, c), m in merged.items() if m]
        accounts = [a for a, _, _ in legs]
        if not pre and all(s == 0 for s in sums.values()) and len(legs) >= 2 and len(set(accounts)) == len(accounts):
            spec: Any = tcc_spec(d, legs, issued_ms=ts, deadline_ms=ts + DEADLINE_MS_DEFAULT)
        else:
            by_shard: dict[int, tuple[list[tuple[int, int, str]], list[tuple[int, int]]]] = {}
            for a, m, c in sp:
                by_shard.setdefault(smap.shard_of(a), ([], []))[0].append((a, m, c))
            for a, e in pre:
                by_shard.setdefault(smap.shard_of(a), ([], []))[1].append((a, e))
            for s, (legs_s, _) in by_shard.items():
                if not legs_s:
                    raise ValueError(f"preconditions on shard {s} with no spec there: a cross-shard batch checks "
                                     "preconditions only on shards it changes")
            steps: list[Any] = [batch_step(legs_s, pre_s) for _, (legs_s, pre_s) in sorted(by_shard.items())]
            spec = saga_spec(d, steps, issued_ms=ts, deadline_ms=ts + DEADLINE_MS_DEFAULT)
        return self._workflow(spec, kind)

    def move(self, dedup_id: int, legs: Sequence[tuple[int, int, str]], *, timestamp: int = 0,
             kind: int = Kind.BATCH_BALANCE) -> Future:
        """An atomic, zero-sum money movement (the business API's building block): one shard's batch
        balance operation, or one Marker TCC workflow across shards. Legs on the same account are merged."""
        ts = timestamp or now_ms()
        merged: dict[tuple[int, str], int] = {}
        for a, m, c in legs:
            merged[(_id(a), str(c))] = merged.get((_id(a), str(c)), 0) + int(m)
        sums: dict[str, int] = {}
        for (_, c), m in merged.items():
            sums[c] = sums.get(c, 0) + m
        bad = sorted(c for c, s in sums.items() if s)
        if bad:
            return _failed(ValueError(f"the legs do not sum to zero in {bad}"))
        sp = [(a, m, c) for (a, c), m in merged.items() if m]
        if len(sp) < 2:
            return _failed(ValueError("a movement needs at least two accounts with a non-zero change"))
        return self.routed(lambda smap: self._movement(smap, _id(dedup_id), sp, [], ts, kind))

    def tcc_try(self, dedup_id: Any, txn_id: Any, specs: Iterable[tuple[Any, int, str]], *,
                timestamp: int = 0, expires_ms: int = 0) -> Future:
        ts = timestamp or now_ms()
        sp = [(_id(a), int(m), str(c)) for a, m, c in specs]
        txn = _id(txn_id)

        def plan(smap: ShardMap) -> Future:
            shards = self._legs_shards(smap, [a for a, _, _ in sp])
            if len(shards) > 1:
                raise ValueError(f"tcc_try's specs are on shards {sorted(shards)}: a try is one shard's phase 1; "
                                 "move money across shards atomically with transfer or batch_balance_operation "
                                 "(the Marker runs them as TCC)")
            sid = shards.pop() if shards else smap.shards[0]
            self._remember_txn(txn, sid)
            return self._shard_command(sid, "tcc_try", dedup_id, txn, sp, timestamp=ts, expires_ms=expires_ms)
        return self.routed(plan)

    def _remember_txn(self, txn: int, shard: int) -> None:
        with self._lock:
            self._txn_shards[txn] = shard
            self._txn_shards.move_to_end(txn)
            while len(self._txn_shards) > TXN_SHARDS_REMEMBERED_MAX:
                self._txn_shards.popitem(last=False)

    def _by_txn(self, name: str, dedup_id: Any, txn_id: Any, timestamp: int, not_there: Code) -> Future:
        ts = timestamp or now_ms()
        txn = _id(txn_id)
        with self._lock:
            known = self._txn_shards.get(txn)

        def plan(smap: ShardMap) -> Future:
            if known is not None and known in smap.shards:
                return self._shard_command(known, name, dedup_id, txn, timestamp=ts)
            futs = [self._shard_command(s, name, dedup_id, txn, timestamp=ts) for s in smap.shards]
            out: Future = LightFuture()
            _chain(_gather(futs), out, lambda rs: _pick(rs, not_there))
            return out
        return self.routed(plan)

    def tcc_confirm(self, dedup_id: Any, txn_id: Any, *, timestamp: int = 0) -> Future:
        return self._by_txn("tcc_confirm", dedup_id, txn_id, timestamp, Code.TXN_NOT_FOUND)

    def tcc_cancel(self, dedup_id: Any, txn_id: Any, *, timestamp: int = 0) -> Future:
        return self._by_txn("tcc_cancel", dedup_id, txn_id, timestamp, Code.NULL_CANCELLED)

    def compensate(self, dedup_id: Any, original_dedup_id: Any, *, timestamp: int = 0) -> Future:
        ts = timestamp or now_ms()
        orig = _id(original_dedup_id)

        def plan(smap: ShardMap) -> Future:
            out: Future = LightFuture()
            looks = [self._read_results(s, [orig]) for s in smap.shards]

            def located(rs: Future) -> None:
                exc = rs.exception()
                if exc is not None:
                    out.set_exception(exc)
                    return
                where = [s for s, r in zip(smap.shards, rs.result()) if r[0] is not None]
                targets = where[:1] or list(smap.shards)
                futs = [self._shard_command(s, "compensate", dedup_id, orig, timestamp=ts) for s in targets]
                _chain(_gather(futs), out, lambda res: _pick(res, Code.NULL_COMPENSATED))
            _gather(looks).add_done_callback(_in_caller(located))    # it sends: as the caller
            return out
        return self.routed(plan)

    # ------------------------------------------------------------------------------ reads
    def _read_results(self, shard: int, ids: list[int]) -> Future:
        from engine.client import _result_of
        from engine.wire import Op, encode_ids
        out: Future = LightFuture()
        _chain(self.shards[shard]._read(Op.RESULT_OF, encode_ids(ids)), out, _result_of)
        return out

    def _read_accounts(self, shard: int, ids: list[int], consistency: str) -> Future:
        from engine.client import _accounts
        from engine.wire import Op, encode_ids
        out: Future = LightFuture()
        _chain(self.shards[shard]._read(Op.GET_ACCOUNTS, encode_ids(ids), consistency), out, _accounts)
        return out

    def get_accounts(self, account_ids: Iterable[Any], consistency: str = "linearizable") -> Future:
        ids = [_id(a) for a in account_ids]
        smap = self.shard_map
        groups: dict[int, list[int]] = {}
        for k, a in enumerate(ids):
            groups.setdefault(smap.shard_of(a), []).append(k)
        shards = sorted(groups)
        futs = [self._read_accounts(s, [ids[k] for k in groups[s]], consistency) for s in shards]
        out: Future = LightFuture()

        def merge(lists: list[list[Any]]) -> list[Any]:
            res: list[Any] = [None] * len(ids)
            for s, got in zip(shards, lists):
                for k, acc in zip(groups[s], got):
                    res[k] = acc
            return res
        _chain(_gather(futs), out, merge)
        return out

    def get_account(self, account_id: Any, consistency: str = "linearizable") -> Future:
        out: Future = LightFuture()
        _chain(self.get_accounts([account_id], consistency), out, lambda r: r[0])
        return out

    def results_of(self, dedup_ids: Iterable[Any]) -> Future:
        """Each id's result: from the shard that applied it, or (a command that ran as a workflow) the
        Marker's finished workflow of that id; None if nothing knows it (or its workflow has not finished)."""
        ids = [_id(d) for d in dedup_ids]
        shards = list(self.shard_map.shards)
        futs = [self._read_results(s, ids) for s in shards]
        # the Marker's workflows are read with an unrestricted key only (as the Marker itself would check)
        no_workflows = self.enforce_callers and bool(caller_refusal(None, None, unrestricted=True))
        wf: Future = (_done([None] * len(ids)) if self.marker is None or not ids or no_workflows
                      else self.marker._get_workflows_future(ids))
        out: Future = LightFuture()

        def merge(parts: list[Any]) -> list[Result | None]:
            *per_shard, wfs = parts
            res: list[Result | None] = []
            for k, d in enumerate(ids):
                got: Result | None = None
                for s, rs in zip(shards, per_shard):
                    if rs[k] is not None:
                        got = Result.of_shard(rs[k], s)
                        break
                w = wfs[k]
                if got is None and w is not None and w.get("state") in ("SUCCEEDED", "FAILED", "STUCK"):
                    got = Result(w.get("code") or 0, True, 0, d, Kind.TRANSFER, None, w["state"], {})
                res.append(got)
            return res
        _chain(_gather([*futs, wf]), out, merge)
        return out

    def result_of(self, dedup_id: Any) -> Future:
        out: Future = LightFuture()
        _chain(self.results_of([dedup_id]), out, lambda r: r[0])
        return out

    def totals(self, currency: str, consistency: str = "linearizable") -> Future:
        """Every shard's totals of ``currency``, summed (each shard read at its own linearizable point)."""
        from engine.wire import Op, decode_totals
        futs = []
        for s in self.shard_map.shards:
            f: Future = LightFuture()
            _chain(self.shards[s]._read(Op.TOTALS, b"", consistency, currency=currency), f, decode_totals)
            futs.append(f)
        out: Future = LightFuture()

        def add(parts: list[dict[str, int]]) -> dict[str, int]:
            tot: dict[str, int] = {}
            for p in parts:
                for k, v in p.items():
                    tot[k] = tot.get(k, 0) + int(v)
            return tot
        _chain(_gather(futs), out, add)
        return out

    def events(self, first_seq: int, last_seq: int, shard: int | None = None) -> np.ndarray:
        """A shard's events (each shard has its own seq-numbered stream): ``shard`` may be left out only when
        the system has one shard. Blocking."""
        if shard is None:
            if len(self.shard_map.shards) != 1:
                raise ValueError(f"events are per shard: pass shard= (one of {list(self.shard_map.shards)})")
            shard = self.shard_map.shards[0]
        if shard not in self.shards:
            raise ValueError(f"no shard {shard} (shards: {sorted(self.shards)})")
        return self.shards[shard].events(first_seq, last_seq)

    def apply_batch(self, ops: np.ndarray, want_events: bool = False) -> Future:
        """One shard's batch of op records (every account it names on one shard), routed with the map's
        epoch (a replica serving another epoch refuses it STALE_EPOCH, and the router re-routes it)."""
        if not isinstance(ops, np.ndarray) or ops.dtype != R.OP_DTYPE:
            return _failed(TypeError("ops must be a numpy array of engine.records.OP_DTYPE"))
        if not ops["issued_ms"].any():
            ops = R.records_copy(ops)
            ops["issued_ms"] = now_ms()

        def plan(smap: ShardMap) -> Future:
            acc = ops["account_id"]
            named = (acc[:, 0] | acc[:, 1]) != 0
            shards = set(np.unique(smap.shards_of(acc[named])).tolist())
            transfers = ops["kind"] == int(Kind.TRANSFER)
            if transfers.any():
                shards |= set(np.unique(smap.shards_of(ops["other_id"][transfers])).tolist())
            if len(shards) > 1:
                raise ValueError(f"apply_batch sends one shard's batch; these records name accounts on shards "
                                 f"{sorted(shards)}: use the per-command methods (or split the batch by shard)")
            sid = shards.pop() if shards else smap.shards[0]
            return self.shards[sid]._apply_call(ops, want_events, smap.epoch)
        return self.routed(plan)


def _pick(results: list[Result], not_there: Code) -> Result:
    """Of one command sent to several shards, the result of the shard that held its subject."""
    for r in results:
        if r.code != not_there:
            return r
    return results[0]


def _check_amount(amount: int) -> None:
    if not isinstance(amount, (int, np.integer)) or isinstance(amount, bool):
        raise TypeError("amount must be an int (minor units)")


def _check_currency(currency: str) -> None:
    if not isinstance(currency, str):
        raise TypeError("currency must be a str")
    if not currency or len(currency) > R.CURRENCY_SIZE_MAX or not currency.isascii() or not currency.isprintable() \
            or " " in currency:
        raise ValueError(f"invalid currency {currency!r}")
