"""Clients of the Marker: submit cross-shard transfers, multi-leg transfers and sagas; wait for or query
their outcome.

    from marker import Client
    with Client.from_system("D/system.toml") as m:
        r = m.transfer(dedup_id=42, from_account_id=1, to_account_id=2, amount=5_00, currency="USD")
        assert r.code == Code.OK            # or the business code that made it fail (nothing moved then)
        m.get_workflow(42)["state"]         # "SUCCEEDED"

The dedup id IS the workflow id: re-sending the same dedup id (from this client or any other, while the
Marker remembers the workflow) is the same workflow; its outcome comes back and nothing moves again. A
call retries on its own (same bytes) until ``timeout_s``; when it gives up, the workflow may still be
running: ``WorkflowPending`` says so, and ``get_workflow`` (or the same call again) gives the outcome
later. To retry safely after your own process restarted, pass the first attempt's ``timestamp``
(its issue time, ms) again, as with the ledger's commands.

With several Marker groups (``[[marker.group]]`` in system.toml) a workflow goes to the group that ranks
first for it by rendezvous hashing (marker/groups.py); every client and every group computes the same, and
a group refuses a workflow that is not its own (WRONG_GROUP).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import msgspec
import numpy as np

from engine.records import Code
from engine.service.security import client_keys_of_system
from engine.service.client_core import (ATTEMPT_TIMEOUT_S_DEFAULT, Call, ClientError, IoCore, RequestRefused,
                                        Unavailable, aio_future, then)
from engine.service.protocol import OP_EVENTS, OP_STATUS, Consistency, ErrorCode
from engine.service.stream import StreamSubscriber, fetch_range
from engine.system import Group, System
from engine.service.futures import LightFuture
from marker import wire as MW
from marker.commands import (BatchStep, SagaSpec, TccSpec, TransferStep, saga_spec, tcc_spec, u128_bytes)
from marker.events import MARKER_EVENT_DTYPE
from marker.groups import GroupMap
from marker.workflow import MarkerCode

TIMEOUT_S_DEFAULT = 30.0
DEADLINE_MS_DEFAULT = 60_000          # a workflow's phase 1 must end this long after it was issued
WAIT_MS_PER_ATTEMPT = 2_000           # a SUBMIT is held this long for its outcome, then asked again
OVERLOADED_BACKOFF_S = 0.05


class WorkflowRefused(ClientError):
    """The Marker refused to create the workflow (nothing ran): ``reason`` OVERLOADED, DRAINING,
    INVALID_SPEC, EXPIRED (issued before the Marker's horizon: it may have run before; ask get_workflow)
    or ISSUED_IN_FUTURE."""

    def __init__(self, workflow_id: int, reason: str, message: str) -> None:
        super().__init__(f"workflow {workflow_id}: {reason}: {message}")
        self.workflow_id = workflow_id
        self.reason = reason


class WorkflowPending(ClientError):
    """The call's timeout passed before the workflow finished: it goes on (ask ``get_workflow``)."""

    def __init__(self, workflow_id: int, state: str) -> None:
        super().__init__(f"workflow {workflow_id} has not finished within the call's timeout (state {state}); "
                         "it goes on: ask get_workflow, or call again with the same dedup_id")
        self.workflow_id = workflow_id
        self.state = state


class WorkflowResult:
    """A finished workflow. ``code``: ``Code.OK``, or the ledger's business code that made it fail (a
    ``Code``), or a ``MarkerCode`` (DEADLINE_EXCEEDED); ``state``: SUCCEEDED, FAILED or STUCK;
    ``duplicate``: this call found the workflow already submitted."""
    __slots__ = ("workflow_id", "code", "state", "duplicate")

    def __init__(self, workflow_id: int, code: int, state: str, duplicate: bool) -> None:
        self.workflow_id = workflow_id
        self.code: Code | MarkerCode | int = _code(code)
        self.state = state
        self.duplicate = duplicate

    @property
    def ok(self) -> bool:
        return self.code == Code.OK and self.state == "SUCCEEDED"

    def __repr__(self) -> str:
        name = getattr(self.code, "name", str(self.code))
        return f"WorkflowResult({self.workflow_id}, {name}, {self.state}{', duplicate' if self.duplicate else ''})"


def _code(c: int | None) -> Code | MarkerCode | int:
    if c is None:
        return -1
    for enum in (Code, MarkerCode):
        try:
            return enum(c)
        except ValueError:
            pass
    return c


class _MarkerIo(IoCore):
    write_ops = frozenset({MW.OP_SUBMIT, MW.OP_DRAIN})
    thread_name = "zwallet-marker-client-io"


class _Base:
    def __init__(self, addresses: Sequence[str] | str | Sequence[Sequence[str]], *,
                 timeout_s: float = TIMEOUT_S_DEFAULT,
                 attempt_timeout_s: float = WAIT_MS_PER_ATTEMPT / 1000 + ATTEMPT_TIMEOUT_S_DEFAULT,
                 keys: Any = None) -> None:
        """``addresses``: the client addresses of one Marker group (a list or comma-separated), or a list of
        groups (each a list). ``keys``: CURVE client keys (engine.service.security.ClientKeys; None: insecure)."""
        if isinstance(addresses, str):
            groups = [[a for a in addresses.split(",") if a]]
        elif addresses and not isinstance(addresses[0], str):
            groups = [list(g) for g in addresses]
        else:
            groups = [list(addresses)]                        # type: ignore[arg-type]
        if not groups or not all(groups):
            raise ValueError("a Marker client needs the client addresses of at least one Marker group")
        self.timeout_s = timeout_s
        self._ios = [_MarkerIo(g, timeout_s, attempt_timeout_s, keys) for g in groups]
        # group ids in the order given (1..n unless from_system says otherwise); routing: marker/groups.py
        self._group_map = GroupMap([Group(k + 1, tuple(g)) for k, g in enumerate(groups)])
        self._io_by_group = {k + 1: io for k, io in enumerate(self._ios)}
        self._lock = threading.Lock()

    @classmethod
    def from_system(cls, path: str, **kwargs: Any) -> Any:
        """The client of the system described by ``path`` (a system.toml, as ``zwallet up`` writes),
        authenticated with the local system's admin client key ([security] client_key) unless ``keys``."""
        system = System.load(path)
        if not system.markers:
            raise ValueError(f"{path}: no [marker] table")
        if "keys" not in kwargs:
            kwargs["keys"] = client_keys_of_system(system)
        client = cls([list(g.clients) for g in system.markers], **kwargs)
        client._group_map = GroupMap(system.markers)
        client._io_by_group = {g.id: io for g, io in zip(system.markers, client._ios)}
        return client

    def close(self) -> None:
        for io in self._ios:
            io.close()

    # ------------------------------------------------------------------------------------ building
    def _io_of(self, workflow_id: int) -> IoCore:
        if len(self._ios) == 1:
            return self._ios[0]
        return self._io_by_group[self._group_map.owner(workflow_id)]

    @staticmethod
    def _times(timestamp: int | None, deadline_ms: int | None) -> tuple[int, int]:
        issued = int(timestamp) if timestamp else int(time.time() * 1000)
        return issued, int(deadline_ms) if deadline_ms else issued + DEADLINE_MS_DEFAULT

    def _tcc(self, dedup_id: int, legs: Iterable[tuple[int, int, str]], timestamp: int | None,
             deadline_ms: int | None) -> TccSpec:
        issued, deadline = self._times(timestamp, deadline_ms)
        return tcc_spec(int(dedup_id), [(int(a), int(m), str(c)) for a, m, c in legs], issued_ms=issued,
                        deadline_ms=deadline)

    def _submit(self, specs: list[TccSpec | SagaSpec], wait_ms: int) -> Future:
        """One SUBMIT request (all specs to the group of the first one's id): a Future of SubmitReplies."""
        wid = int.from_bytes(specs[0].workflow_id, "little")
        payload = MW.encode(MW.SubmitRequest(wait_ms, specs))
        inner = self._io_of(wid).submit(Call(MW.OP_SUBMIT, LightFuture(), payload=payload))
        return then(inner, MW.decode_submit_replies, "SUBMIT")

    def _run_to_outcome(self, spec: TccSpec | SagaSpec) -> WorkflowResult:
        """Submit one workflow and wait for its outcome (blocking), re-asking until ``timeout_s``."""
        run = _Outcome(self, spec)
        while True:
            fut = run.attempt()
            try:
                replies = fut.result()
            except BaseException as exc:  # noqa: BLE001 - judged by run.judge: raised, or asked again
                replies = exc
            done, pause = run.judge(replies)
            if done is not None:
                return done
            if pause:
                time.sleep(pause)

    # ------------------------------------------------------------------------------------ reading
    def _get_workflows_future(self, workflow_ids: Sequence[int]) -> Future:
        ids = [int(w) for w in workflow_ids]
        payload = b"".join(u128_bytes(w) for w in ids)
        inner = self._io_of(ids[0]).submit(Call(MW.OP_GET_WORKFLOW, LightFuture(), payload=payload,
                                                consistency=Consistency.LINEARIZABLE))
        return then(inner, lambda raw: [_from_wire(w) for w in msgspec.msgpack.decode(raw)], "GET_WORKFLOW")

    def _status_future(self, node: int | None, group: int) -> Future:
        inner = self._ios[group].submit(Call(OP_STATUS, LightFuture(), node=node))
        return then(inner, msgspec.msgpack.decode, "STATUS")


class _Outcome:
    """One workflow submitted until it has an outcome, the loop of ``Client``'s blocking calls and of
    ``AsyncClient``'s coroutines: ``attempt()`` sends the SUBMIT (a Future of its replies), ``judge(replies or
    the exception)`` says (the result, None) when it finished, raises what the caller must see, or says
    (None, seconds to wait) before the next attempt."""

    def __init__(self, client: _Base, spec: TccSpec | SagaSpec) -> None:
        self.client = client
        self.spec = spec
        self.wid = int.from_bytes(spec.workflow_id, "little")
        self.deadline = time.monotonic() + client.timeout_s
        self.duplicate: bool | None = None
        self.state = "UNKNOWN"

    def attempt(self) -> Future:
        left_ms = int((self.deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise WorkflowPending(self.wid, self.state)
        return self.client._submit([self.spec], min(WAIT_MS_PER_ATTEMPT, left_ms))

    def judge(self, replies: Any) -> tuple[WorkflowResult | None, float]:
        wid = self.wid
        if isinstance(replies, Unavailable):
            return None, 0.0                               # the group is electing or unreachable: again
        if isinstance(replies, RequestRefused) and replies.code == ErrorCode.WRONG_GROUP:
            raise WorkflowRefused(wid, "EXPIRED" if "removed" in str(replies) else "WRONG_GROUP",
                                  str(replies)) from None
        if isinstance(replies, BaseException):
            raise replies
        r = replies[0]
        if r.status == "refused":
            if r.reason == "OVERLOADED" and time.monotonic() < self.deadline:
                return None, OVERLOADED_BACKOFF_S
            raise WorkflowRefused(wid, r.reason, r.message)
        if r.status == "error":
            raise ClientError(f"workflow {wid}: {r.reason}: {r.message}")
        if self.duplicate is None:
            self.duplicate = r.status == "duplicate"
        self.state = r.state
        if r.finished:
            return WorkflowResult(wid, r.code if r.code is not None else -1, r.state, self.duplicate), 0.0
        return None, 0.0


def _from_wire(w: dict[str, Any] | None) -> dict[str, Any] | None:
    if w is None:
        return None
    out = dict(w)
    out["workflow_id"] = int.from_bytes(w["workflow_id"], "little")
    out["jobs"] = [dict(j, dedup_id=int.from_bytes(j["dedup_id"], "little")) for j in w["jobs"]]
    return out


class Client(_Base):
    """Blocking Marker client; thread-safe."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transfer(self, dedup_id: int, from_account_id: int, to_account_id: int, amount: int, currency: str, *,
                 timestamp: int | None = None, deadline_ms: int | None = None) -> WorkflowResult:
        """Move ``amount`` from one account to another, on the same shard or two: a TCC workflow. Returns
        once it has its outcome: ``.code`` OK, or the business code that made it fail (nothing moved)."""
        legs = [(from_account_id, -int(amount), currency), (to_account_id, int(amount), currency)]
        return self._run_to_outcome(self._tcc(dedup_id, legs, timestamp, deadline_ms))

    def transfer_multi(self, dedup_id: int, legs: Iterable[tuple[int, int, str]], *, timestamp: int | None = None,
                       deadline_ms: int | None = None) -> WorkflowResult:
        """An atomic multi-leg transfer: legs ``(account_id, signed_amount, currency)``, zero-sum per
        currency, over any accounts on any shards."""
        return self._run_to_outcome(self._tcc(dedup_id, legs, timestamp, deadline_ms))

    def saga(self, dedup_id: int, steps: Sequence[TransferStep | BatchStep], *, timestamp: int | None = None,
             deadline_ms: int | None = None) -> WorkflowResult:
        """Ordered steps (``marker.commands.transfer_step`` / ``batch_step``); a failing step compensates
        the ones before it, in reverse."""
        issued, deadline = self._times(timestamp, deadline_ms)
        return self._run_to_outcome(saga_spec(int(dedup_id), list(steps), issued_ms=issued, deadline_ms=deadline))

    def transfer_many(self, transfers: Sequence[tuple[int, int, int, int, str]], *, wait: bool = True,
                      timestamp: int | None = None) -> list[MW.SubmitReply]:
        """Many transfers ``(dedup_id, from, to, amount, currency)`` in one SUBMIT request (batched); with
        ``wait`` the reply comes once they have all finished (or after the wait: check ``finished``)."""
        specs: list[TccSpec | SagaSpec] = [self._tcc(d, [(f, -int(a), c), (t, int(a), c)], timestamp, None)
                                           for d, f, t, a, c in transfers]
        return self._submit(specs, int(self.timeout_s * 1000) if wait else 0).result()

    def submit_async(self, specs: list[TccSpec | SagaSpec], wait_ms: int = 0) -> Future:
        """Send one SUBMIT of ready-made specs without waiting: a Future of ``SubmitReply`` list."""
        return self._submit(specs, wait_ms)

    def get_workflow(self, workflow_id: int) -> dict[str, Any] | None:
        """The workflow's state, outcome code and every job (shard, kind, dedup id, state, result code, seq);
        None if the Marker does not know it (never submitted, or finished and evicted)."""
        return self._get_workflows_future([workflow_id]).result()[0]

    def get_workflows(self, workflow_ids: Sequence[int]) -> list[dict[str, Any] | None]:
        return self._get_workflows_future(workflow_ids).result()

    def events(self, first_seq: int, last_seq: int, group: int = 0) -> np.ndarray:
        """The Marker group's events of seqs first_seq..last_seq (``MARKER_EVENT_DTYPE`` records), from its
        replicas' event stores."""
        io = self._ios[group]
        return fetch_range(lambda a, b: io.submit(Call(OP_EVENTS, LightFuture(), first_seq=a, last_seq=b)),
                           first_seq, last_seq, MARKER_EVENT_DTYPE)

    def drain(self, on: bool = True, group: int = 0) -> None:
        """Make a Marker group refuse new workflows (``on``) while it finishes what it has, or accept again."""
        inner = self._ios[group].submit(Call(MW.OP_DRAIN, LightFuture(), payload=msgspec.msgpack.encode(bool(on))))
        inner.result()

    def status(self, node: int | None = None, group: int = 0) -> dict[str, Any]:
        return self._status_future(node, group).result()


class AsyncClient(_Base):
    """The same for asyncio: every method is a coroutine."""

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _outcome(self, spec: TccSpec | SagaSpec) -> WorkflowResult:
        """As ``Client``'s calls, without a thread per call (concurrent calls share the client's I/O)."""
        run = _Outcome(self, spec)
        while True:
            fut = run.attempt()
            try:
                replies = await aio_future(fut)
            except Exception as exc:  # noqa: BLE001 - judged by run.judge: raised, or asked again
                replies = exc
            done, pause = run.judge(replies)
            if done is not None:
                return done
            if pause:
                await asyncio.sleep(pause)

    async def transfer(self, dedup_id: int, from_account_id: int, to_account_id: int, amount: int, currency: str,
                       *, timestamp: int | None = None, deadline_ms: int | None = None) -> WorkflowResult:
        legs = [(from_account_id, -int(amount), currency), (to_account_id, int(amount), currency)]
        return await self._outcome(self._tcc(dedup_id, legs, timestamp, deadline_ms))

    async def transfer_multi(self, dedup_id: int, legs: Iterable[tuple[int, int, str]], *,
                             timestamp: int | None = None, deadline_ms: int | None = None) -> WorkflowResult:
        return await self._outcome(self._tcc(dedup_id, legs, timestamp, deadline_ms))

    async def saga(self, dedup_id: int, steps: Sequence[TransferStep | BatchStep], *,
                   timestamp: int | None = None, deadline_ms: int | None = None) -> WorkflowResult:
        issued, deadline = self._times(timestamp, deadline_ms)
        return await self._outcome(saga_spec(int(dedup_id), list(steps), issued_ms=issued, deadline_ms=deadline))

    async def get_workflow(self, workflow_id: int) -> dict[str, Any] | None:
        return (await aio_future(self._get_workflows_future([workflow_id])))[0]

    async def status(self, node: int | None = None, group: int = 0) -> dict[str, Any]:
        return await aio_future(self._status_future(node, group))


class Subscriber(StreamSubscriber):
    """A Marker group's events in seq order, no gap, no repeat (created / job done / decided / finished ...):
    its replicas' PUB sockets, gaps fetched with EVENTS. ``Subscriber.from_system(path, from_seq=1)``."""

    def __init__(self, pub_addresses: Sequence[str], client_addresses: Sequence[str], from_seq: int = 1,
                 *, idle_check_s: float = 0.5, timeout_s: float = 10.0, keys: Any = None) -> None:
        self.client = Client(list(client_addresses), timeout_s=timeout_s, keys=keys)
        super().__init__(pub_addresses, self.client.events, lambda: int(self.client.status().get("last_seq", 0)),
                         MARKER_EVENT_DTYPE, from_seq, idle_check_s=idle_check_s, keys=keys)

    @classmethod
    def from_system(cls, path: str, from_seq: int = 1, group: int = 0, **kwargs: Any) -> Subscriber:
        system = System.load(path)
        g = system.markers[group]
        if "keys" not in kwargs:
            kwargs["keys"] = client_keys_of_system(system)
        return cls(list(g.pubs), list(g.clients), from_seq, **kwargs)



__all__ = ["Subscriber", "AsyncClient", "Client", "RequestRefused", "Unavailable", "WorkflowPending", "WorkflowRefused",
           "WorkflowResult"]
