"""Clients of the query service: ``query.Client`` (sync) and ``query.AsyncClient`` (asyncio), on the common
client core (``engine.service.client_core.IoCore``: deadlines, retries of the same bytes, the I/O thread).

``Client.from_system(path)`` reads ``[query] clients`` from system.toml. Every read takes ``min_seqs``
({shard: seq}, e.g. the seq a write returned: read-your-writes) and ``wait_ms``; the service answers once its
view reached them, or raises ``NotAvailable`` (how far the view is) after the bounded wait.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any, Self

import numpy as np

from engine.records import EVENT_DTYPE
from engine.service.client_core import Call, IoCore, RequestRefused, aio_future, then
from engine.service.protocol import OP_STATUS, ErrorCode
from engine.system import System
from query import wire as W

TIMEOUT_S_DEFAULT = 10.0


class NotAvailable(Exception):
    """The view had not reached the asked seqs within the wait; ``message`` says how far it is."""


class QueryRefused(ValueError):
    """The service refused the query (the caller's fault: malformed, or beyond its key's rights); ``code``:
    the protocol's ErrorCode (BAD_REQUEST, UNAUTHORIZED, ...)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


class _Core(IoCore):
    write_ops = frozenset({W.OP_SET_PARENT})
    thread_name = "zwallet-query-client-io"


def _decode(payload: bytes) -> Any:
    return W.unpack(payload)


def _translate(fut: Future) -> Future:
    out: Future = Future()

    def done(f: Future) -> None:
        exc = f.exception()
        if isinstance(exc, RequestRefused):
            out.set_exception(NotAvailable(str(exc)) if exc.code is ErrorCode.NOT_AVAILABLE
                              else QueryRefused(str(exc), exc.code))
        elif exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(f.result())
    fut.add_done_callback(done)
    return out


class _Base:
    def __init__(self, addresses: Iterable[str] | str, *, timeout_s: float = TIMEOUT_S_DEFAULT,
                 keys: Any = None) -> None:
        """``keys``: an engine.service.security.ClientKeys (CURVE), or None for an insecure system."""
        addrs = [addresses] if isinstance(addresses, str) else list(addresses)
        # a read-your-writes request waits at the service up to WAIT_MS_MAX: attempts outlast it
        self._core = _Core(addrs, timeout_s=max(timeout_s, W.WAIT_MS_MAX / 1000 + 1),
                           attempt_timeout_s=W.WAIT_MS_MAX / 1000 + 1, keys=keys)

    @classmethod
    def from_system(cls, path: str, **kw: Any) -> Self:
        system = System.load(path)
        table = system.extra.get("query")
        if not isinstance(table, dict) or not table.get("clients"):
            raise ValueError(f"{path}: no [query] clients (is the query service part of this system?)")
        if "keys" not in kw:
            from engine.service.security import client_keys_of_system
            kw["keys"] = client_keys_of_system(system)        # the local system's admin key
        return cls([str(a) for a in table["clients"]], **kw)

    def close(self) -> None:
        self._core.close()

    def _call(self, op: int, args: dict[str, Any], min_seqs: Mapping[int, int] | None, wait_ms: int | None) -> Future:
        if min_seqs:
            args["min_seqs"] = {int(k): int(v) for k, v in min_seqs.items()}
        if wait_ms is not None:
            args["wait_ms"] = wait_ms
        inner = self._core.submit(Call(op, Future(), payload=W.pack(args)))
        return then(_translate(inner), _decode, "query")

    def _status(self) -> Future:
        return then(self._core.submit(Call(OP_STATUS, Future())), _decode, "STATUS")


class Client(_Base):
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def balance(self, account_id: int, at_seq: int | None = None, at_ms: int | None = None, *,
                min_seqs: Mapping[int, int] | None = None, wait_ms: int | None = None) -> dict[str, Any] | None:
        """The account now, at a seq of its shard, or at a time; None if it did not exist (then)."""
        return self._call(W.OP_BALANCE, {"account_id": account_id, "at_seq": at_seq, "at_ms": at_ms},
                          min_seqs, wait_ms).result()

    def balances(self, account_ids: Iterable[int], *, min_seqs: Mapping[int, int] | None = None,
                 wait_ms: int | None = None) -> dict[str, Any]:
        return self._call(W.OP_BALANCES, {"account_ids": list(account_ids)}, min_seqs, wait_ms).result()

    def history(self, account_id: int, first_seq: int | None = None, last_seq: int | None = None,
                since_ms: int | None = None, until_ms: int | None = None, *, limit: int | None = None,
                min_seqs: Mapping[int, int] | None = None, wait_ms: int | None = None) -> dict[str, Any]:
        """A page of the account's versions in the range, newest first (``next_last_seq``: the next page)."""
        return self._call(W.OP_HISTORY, {"account_id": account_id, "first_seq": first_seq, "last_seq": last_seq,
                                         "since_ms": since_ms, "until_ms": until_ms, "limit": limit},
                          min_seqs, wait_ms).result()

    def set_parent(self, node_id: int, parent_id: int | None) -> dict[str, Any]:
        """Move a node under a group (an id that is no account becomes a group node); None detaches it."""
        return self._call(W.OP_SET_PARENT, {"node_id": node_id, "parent_id": parent_id}, None, None).result()

    def hierarchy_balance(self, node_id: int, currency: str, at_ms: int | None = None, *,
                          at_seqs: Mapping[int, int] | None = None, min_seqs: Mapping[int, int] | None = None,
                          wait_ms: int | None = None) -> dict[str, Any]:
        """The node's sums in ``currency`` (now, as of ``at_ms``, or at ``at_seqs`` {shard: seq}) and ``seqs``:
        the seq per shard they reflect."""
        return self._call(W.OP_HIERARCHY_BALANCE, {"node_id": node_id, "currency": currency, "at_ms": at_ms,
                                                   "at_seqs": None if at_seqs is None else dict(at_seqs)},
                          min_seqs, wait_ms).result()

    def events(self, shard: int, first_seq: int | None = None, last_seq: int | None = None,
               since_ms: int | None = None, until_ms: int | None = None) -> dict[str, Any]:
        """A shard's event records (``engine.records.EVENT_DTYPE``, under ``records``) by seq and/or time
        range, up to what the view has applied; at most EVENTS_RANGE_RECORDS_MAX records, ``next_seq`` continues."""
        out = self._call(W.OP_EVENTS_RANGE, {"shard": shard, "first_seq": first_seq, "last_seq": last_seq,
                                             "since_ms": since_ms, "until_ms": until_ms}, None, None).result()
        out["records"] = np.frombuffer(out["records"], dtype=EVENT_DTYPE)
        return out

    def status(self) -> dict[str, Any]:
        return self._status().result()


class AsyncClient(_Base):
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def balance(self, account_id: int, at_seq: int | None = None, at_ms: int | None = None, *,
                      min_seqs: Mapping[int, int] | None = None, wait_ms: int | None = None) -> dict[str, Any] | None:
        return await aio_future(self._call(W.OP_BALANCE, {"account_id": account_id, "at_seq": at_seq, "at_ms": at_ms},
                                           min_seqs, wait_ms))

    async def balances(self, account_ids: Iterable[int], *, min_seqs: Mapping[int, int] | None = None,
                       wait_ms: int | None = None) -> dict[str, Any]:
        return await aio_future(self._call(W.OP_BALANCES, {"account_ids": list(account_ids)}, min_seqs, wait_ms))

    async def history(self, account_id: int, first_seq: int | None = None, last_seq: int | None = None,
                      since_ms: int | None = None, until_ms: int | None = None, *, limit: int | None = None,
                      min_seqs: Mapping[int, int] | None = None, wait_ms: int | None = None) -> dict[str, Any]:
        return await aio_future(self._call(W.OP_HISTORY, {
            "account_id": account_id, "first_seq": first_seq, "last_seq": last_seq, "since_ms": since_ms,
            "until_ms": until_ms, "limit": limit}, min_seqs, wait_ms))

    async def set_parent(self, node_id: int, parent_id: int | None) -> dict[str, Any]:
        return await aio_future(self._call(W.OP_SET_PARENT, {"node_id": node_id, "parent_id": parent_id}, None, None))

    async def hierarchy_balance(self, node_id: int, currency: str, at_ms: int | None = None, *,
                                at_seqs: Mapping[int, int] | None = None, min_seqs: Mapping[int, int] | None = None,
                                wait_ms: int | None = None) -> dict[str, Any]:
        return await aio_future(self._call(W.OP_HIERARCHY_BALANCE, {
            "node_id": node_id, "currency": currency, "at_ms": at_ms,
            "at_seqs": None if at_seqs is None else dict(at_seqs)}, min_seqs, wait_ms))

    async def events(self, shard: int, first_seq: int | None = None, last_seq: int | None = None,
                     since_ms: int | None = None, until_ms: int | None = None) -> dict[str, Any]:
        out = await aio_future(self._call(W.OP_EVENTS_RANGE, {
            "shard": shard, "first_seq": first_seq, "last_seq": last_seq, "since_ms": since_ms,
            "until_ms": until_ms}, None, None))
        out["records"] = np.frombuffer(out["records"], dtype=EVENT_DTYPE)
        return out

    async def status(self) -> dict[str, Any]:
        return await aio_future(self._status())
