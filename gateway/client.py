"""``gateway.Client`` / ``gateway.AsyncClient``: the whole system with the embedded Ledger's methods.

    import gateway
    ledger = gateway.Client.from_system("D/system.toml")        # was: ledger = Ledger()
    ledger.transfer(3, 200, 100, 5_00, "USD").code              # accounts on one shard or two: the same call
    ledger.pay(request_id=9, payer=200, merchant=100, amount=5_00, currency="USD", fee=10, fee_account=7)

Two ways to reach the system, the same methods either way:
- ``gateway.Client(addresses)``: through the gateway service (``zwallet gateway``); ``addresses`` are the
  gateway replicas' client addresses (any replica serves any request; a request that gets no answer is
  re-sent, the same bytes, to another one);
- ``gateway.Client.direct(system)``: in-process routing (``gateway.router.Router``): straight to the shard
  leaders and the Marker, no gateway hop.
``from_system(path)`` uses the gateway listed in system.toml (``[gateway] clients``) when there is one, else
routes in-process; ``from_system(path, direct=True)`` always routes in-process.

The Ledger's commands return a ``gateway.Result`` (the Ledger's ``Result`` shape: ``code``, ``duplicate``,
``seq_num``, ``dedup_id``, ``kind``, ``ok``, ``accounts``; plus ``shard`` and ``workflow_state``). What is
per shard on the embedded Ledger stays per shard: ``events(first_seq, last_seq, shard=...)``; ``totals`` is
summed over the shards. Differences from the embedded Ledger, all of them: ``tcc_try``'s specs must be on one
shard (a cross-shard atomic movement is ``transfer`` / ``batch_balance_operation``); a cross-shard command's
Result has ``seq_num`` 0 and no ``accounts``; ``apply_batch`` takes one shard's records.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from engine._ledger import UNCHANGED
from engine.client import ClientError, RequestRefused, Unavailable
from engine.service.client_core import Call, IoCore, aio_future, then
from engine.service.security import client_keys_of_system
from engine.system import System
from engine.service.futures import LightFuture
from gateway import wire as GW
from marker.client import WorkflowPending, WorkflowRefused

CLIENT_TIMEOUT_S_DEFAULT = 40.0          # a call through the gateway: longer than the gateway's workflow wait
ATTEMPT_TIMEOUT_S_DEFAULT = 3.0          # a gateway answers within its hold (2 s: the outcome, or TIMEOUT and
                                         # the client re-sends the same bytes); no answer: try another replica


class RemoteError(ClientError):
    """An exception the gateway raised for a call; ``kind`` is its class name there."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _reply_value(raw: bytes) -> Any:
    """A gateway reply: the call's value, or the exception it raised there (as ours, see ``_exception``)."""
    v = GW.decode(raw)
    if isinstance(v, list) and len(v) == 2 and v[0] == "ok":
        return GW.account_states(v[1])
    if isinstance(v, list) and len(v) in (3, 4) and v[0] == "err":
        fields = v[3] if len(v) == 4 and isinstance(v[3], dict) else {}
        return _exception(str(v[1]), str(v[2]), fields)
    return ClientError("malformed gateway reply")


def _exception(kind: str, message: str, fields: dict[str, Any]) -> BaseException:
    """The exception the gateway raised, as the same class here where it is one of ours (so ``except
    marker.client.WorkflowPending`` works the same in-process and through the service)."""
    from gateway.business import TemplateError
    simple: dict[str, type[BaseException]] = {"ValueError": ValueError, "TypeError": TypeError,
                                               "TemplateError": TemplateError}
    if kind in simple:
        return simple[kind](message)
    if kind in ("Unavailable", "OutcomeUnknown"):
        return Unavailable(message)
    wid = fields.get("workflow_id")
    if kind == "WorkflowPending" and isinstance(wid, int):
        return WorkflowPending(wid, str(fields.get("state", "UNKNOWN")))
    if kind == "WorkflowRefused" and isinstance(wid, int):
        e = WorkflowRefused(wid, str(fields.get("reason", "")), message)
        e.args = (message,)
        return e
    if kind == "RequestRefused" and isinstance(fields.get("code"), int):
        from engine.service.protocol import ErrorCode
        code = fields["code"]
        return RequestRefused(ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.BAD_REQUEST,
                              message)
    return RemoteError(kind, message)


class _GatewayIo(IoCore):
    write_ops = frozenset({GW.OP_CALL})      # any replica answers; the one that did is kept
    thread_name = "zwallet-gateway-client-io"


class _ServiceTransport:
    def __init__(self, addresses: Sequence[str], timeout_s: float, attempt_timeout_s: float, keys: Any) -> None:
        self.io = _GatewayIo(addresses, timeout_s, attempt_timeout_s, keys)

    def submit(self, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Future:
        payload = GW.encode_call(name, list(args), kwargs)
        if len(payload) > GW.CALL_BYTES_MAX:
            raise ValueError(f"a call of {len(payload)} bytes exceeds CALL_BYTES_MAX={GW.CALL_BYTES_MAX}")
        inner = self.io.submit(Call(GW.OP_CALL, LightFuture(), payload=payload))
        return then(inner, _reply_value, "gateway")

    def status(self, node: int | None = None) -> Future:
        import msgspec
        inner = self.io.submit(Call(GW.OP_STATUS, LightFuture(), node=node))
        out: Future = LightFuture()
        inner.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception() is not None
                                else out.set_result(msgspec.msgpack.decode(f.result())))
        return out

    def close(self) -> None:
        self.io.close()


class _LocalTransport:
    def __init__(self, system: System | str, templates: str | None, **router_kw: Any) -> None:
        from gateway.business import load_templates
        from gateway.ops import Gateway
        from gateway.router import Router
        self.gateway = Gateway(Router(system, **router_kw), load_templates(templates) if templates else None)

    def submit(self, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Future:
        return self.gateway.call(name, args, kwargs)

    def status(self, node: int | None = None) -> Future:
        f: Future = LightFuture()
        r = self.gateway.router
        f.set_result({"role": "in-process", "shard_epoch": r.shard_map.epoch, "reloads": r.reloads,
                      "shards": list(r.shard_map.shards)})
        return f

    def close(self) -> None:
        self.gateway.close()


class _Api:
    """The methods, shared by ``Client`` (each returns the value) and ``AsyncClient`` (each returns an
    awaitable). Argument names are the embedded Ledger's."""

    def __init__(self, addresses: Sequence[str] | str, *, timeout_s: float = CLIENT_TIMEOUT_S_DEFAULT,
                 attempt_timeout_s: float = ATTEMPT_TIMEOUT_S_DEFAULT, keys: Any = None) -> None:
        """Through the gateway service: ``addresses`` are its replicas' client addresses; ``keys`` the CURVE
        client keys (engine.service.security.ClientKeys; None: an insecure system)."""
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a]
        self._t: Any = _ServiceTransport(list(addresses), timeout_s, attempt_timeout_s, keys)

    @classmethod
    def direct(cls, system: System | str, *, templates: str | None = None, **router_kw: Any) -> Any:
        """In-process routing (no gateway hop): ``system`` is a System or a system.toml path; ``templates``
        an operator's templates file; ``router_kw`` go to ``gateway.router.Router``."""
        self = cls.__new__(cls)
        self._t = _LocalTransport(system, templates, **router_kw)
        return self

    @classmethod
    def from_system(cls, path: str, *, direct: bool | None = None, templates: str | None = None,
                    **kwargs: Any) -> Any:
        """The system of ``path`` (a system.toml): through the gateway it lists (``[gateway] clients``), or
        in-process if it lists none or ``direct`` is true."""
        system = System.load(path)
        if "keys" not in kwargs:                       # the local system's admin client key
            kwargs["keys"] = client_keys_of_system(system)
        gw = system.extra.get("gateway", {})
        clients = list(gw.get("clients", [])) if isinstance(gw, dict) else []
        if clients and not direct:
            if templates:
                raise ValueError("templates are the gateway service's (zwallet gateway --templates); pass "
                                 "direct=True to route in-process with your own")
            return cls(clients, **kwargs)
        return cls.direct(system, templates=templates, **kwargs)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        self._t.close()

    # ------------------------------------------------------------------- the embedded Ledger's commands
    def create_account(self, dedup_id: Any, account_id: Any, currency: str, lower_limit: int | None = 0,
                       upper_limit: int | None = None, *, timestamp: int = 0) -> Any:
        return self._call("create_account", dedup_id, account_id, currency, lower_limit, upper_limit,
                          timestamp=timestamp)

    def delete_account(self, dedup_id: Any, account_id: Any, *, timestamp: int = 0) -> Any:
        return self._call("delete_account", dedup_id, account_id, timestamp=timestamp)

    def lock_account(self, dedup_id: Any, account_id: Any, *, timestamp: int = 0) -> Any:
        return self._call("lock_account", dedup_id, account_id, timestamp=timestamp)

    def unlock_account(self, dedup_id: Any, account_id: Any, *, timestamp: int = 0) -> Any:
        return self._call("unlock_account", dedup_id, account_id, timestamp=timestamp)

    def update_account_config(self, dedup_id: Any, account_id: Any, *, lower_limit: Any = UNCHANGED,
                              upper_limit: Any = UNCHANGED, timestamp: int = 0) -> Any:
        return self._call("update_account_config", dedup_id, account_id, lower_limit=lower_limit,
                          upper_limit=upper_limit, timestamp=timestamp)

    def transfer(self, dedup_id: Any, from_account_id: Any, to_account_id: Any, amount: int, currency: str,
                 expected_from_balance: int | None = None, expected_to_balance: int | None = None, *,
                 timestamp: int = 0) -> Any:
        return self._call("transfer", dedup_id, from_account_id, to_account_id, amount, currency,
                          expected_from_balance, expected_to_balance, timestamp=timestamp)

    def batch_balance_operation(self, dedup_id: Any, specs: Iterable[tuple[Any, int, str]],
                                preconditions: Iterable[tuple[Any, int]] = (), *, timestamp: int = 0) -> Any:
        return self._call("batch_balance_operation", dedup_id, [list(s) for s in specs],
                          [list(p) for p in preconditions], timestamp=timestamp)

    def reserve(self, dedup_id: Any, account_id: Any, reservation_id: Any, amount: int, *,
                timestamp: int = 0) -> Any:
        return self._call("reserve", dedup_id, account_id, reservation_id, amount, timestamp=timestamp)

    def release(self, dedup_id: Any, account_id: Any, reservation_id: Any, amount: int | None = None, *,
                timestamp: int = 0) -> Any:
        return self._call("release", dedup_id, account_id, reservation_id, amount, timestamp=timestamp)

    def tcc_try(self, dedup_id: Any, txn_id: Any, specs: Iterable[tuple[Any, int, str]], *,
                timestamp: int = 0, expires_ms: int = 0) -> Any:
        return self._call("tcc_try", dedup_id, txn_id, [list(s) for s in specs], timestamp=timestamp,
                          expires_ms=expires_ms)

    def tcc_confirm(self, dedup_id: Any, txn_id: Any, *, timestamp: int = 0) -> Any:
        return self._call("tcc_confirm", dedup_id, txn_id, timestamp=timestamp)

    def tcc_cancel(self, dedup_id: Any, txn_id: Any, *, timestamp: int = 0) -> Any:
        return self._call("tcc_cancel", dedup_id, txn_id, timestamp=timestamp)

    def compensate(self, dedup_id: Any, original_dedup_id: Any, *, timestamp: int = 0) -> Any:
        return self._call("compensate", dedup_id, original_dedup_id, timestamp=timestamp)

    def apply_batch(self, ops: Any, want_events: bool = False) -> Any:
        """One shard's batch of op records (every account it names on one shard)."""
        return self._call("apply_batch", ops, want_events)

    # ------------------------------------------------------------------------------ reads
    def get_account(self, account_id: Any, consistency: str = "linearizable") -> Any:
        return self._call("get_account", account_id, consistency)

    def get_accounts(self, account_ids: Iterable[Any], consistency: str = "linearizable") -> Any:
        return self._call("get_accounts", list(account_ids), consistency)

    def result_of(self, dedup_id: Any) -> Any:
        return self._call("result_of", dedup_id)

    def results_of(self, dedup_ids: Iterable[Any]) -> Any:
        return self._call("results_of", list(dedup_ids))

    def totals(self, currency: str, consistency: str = "linearizable") -> Any:
        """The sums of ``currency`` over every shard."""
        return self._call("totals", currency, consistency)

    def events(self, first_seq: int, last_seq: int, shard: int | None = None) -> Any:
        """Shard ``shard``'s events (per shard: each shard numbers its own stream)."""
        return self._call("events", first_seq, last_seq, shard)

    def shard_of(self, account_id: Any) -> Any:
        return self._call("shard_of", account_id)

    # ------------------------------------------------------------------------------ business
    def pay(self, request_id: int, payer: Any, merchant: Any, amount: int, currency: str, fee: int = 0,
            fee_account: Any = None) -> Any:
        """payer -> merchant ``amount`` and payer -> fee_account ``fee``, atomically."""
        return self._call("pay", request_id, payer, merchant, amount, currency, fee, fee_account)

    def refund(self, request_id: int, original_request_id: int, payer: Any, merchant: Any, amount: int,
               currency: str, fee: int = 0, fee_account: Any = None) -> Any:
        """Give back an earlier successful payment (at most once per payment)."""
        return self._call("refund", request_id, original_request_id, payer, merchant, amount, currency, fee,
                          fee_account)

    def split(self, request_id: int, payer: Any, shares: Sequence[tuple[Any, int]], currency: str) -> Any:
        """payer -> each (account, amount) of ``shares``, atomically."""
        return self._call("split", request_id, payer, [list(s) for s in shares], currency)

    def topup_hold(self, request_id: int, account: Any, funding_account: Any, amount: int, currency: str,
                   expires_ms: int = 0) -> Any:
        return self._call("topup_hold", request_id, account, funding_account, amount, currency, expires_ms)

    def topup_settle(self, request_id: int, account: Any, funding_account: Any, amount: int, currency: str) -> Any:
        return self._call("topup_settle", request_id, account, funding_account, amount, currency)

    def topup_release(self, request_id: int, account: Any, funding_account: Any, amount: int,
                      currency: str) -> Any:
        return self._call("topup_release", request_id, account, funding_account, amount, currency)

    def withdraw_hold(self, request_id: int, account: Any, payout_account: Any, amount: int, currency: str,
                      expires_ms: int = 0) -> Any:
        return self._call("withdraw_hold", request_id, account, payout_account, amount, currency, expires_ms)

    def withdraw_settle(self, request_id: int, account: Any, payout_account: Any, amount: int,
                        currency: str) -> Any:
        return self._call("withdraw_settle", request_id, account, payout_account, amount, currency)

    def withdraw_release(self, request_id: int, account: Any, payout_account: Any, amount: int,
                         currency: str) -> Any:
        return self._call("withdraw_release", request_id, account, payout_account, amount, currency)

    def run_template(self, name: str, request_id: int, **params: Any) -> Any:
        """An operator's template (docs/gateway.md, "Templates") with its parameters."""
        return self._call("run_template", name, request_id, params)

    def templates(self) -> Any:
        return self._call("templates")


class Client(_Api):
    """Blocking; thread-safe (concurrent calls share batches to the shards and SUBMITs to the Marker)."""

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._t.submit(name, args, kwargs).result()

    def status(self, node: int | None = None) -> dict[str, Any]:
        st: dict[str, Any] = self._t.status(node).result()
        return st

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Api):
    """asyncio: the same methods, each returning an awaitable. Concurrent calls share batches."""

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            fut = self._t.submit(name, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - raised at the await, as a coroutine would
            fut = LightFuture()
            fut.set_exception(exc)
        return aio_future(fut)

    async def status(self, node: int | None = None) -> dict[str, Any]:
        st: dict[str, Any] = await aio_future(self._t.status(node))
        return st

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)


__all__ = ["AsyncClient", "Client", "RemoteError", "RequestRefused", "Unavailable", "WorkflowPending",
           "WorkflowRefused"]
