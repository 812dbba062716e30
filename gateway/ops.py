"""Every operation the gateway offers, by name, as a Future: what ``gateway.Client`` calls in-process and
what the gateway service (``gateway/server.py``) runs for a CALL. One table, so the in-process client and
the service cannot drift apart.
"""
from __future__ import annotations

import concurrent.futures
import contextvars
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from engine.service.futures import LightFuture
from gateway import business as B
from gateway.router import Router, _failed

BLOCKING_WORKERS = 16          # threads for the operations that wait on several steps (refund, holds)

# the Router's own methods (each returns a Future)
ROUTER_METHODS = ("create_account", "delete_account", "lock_account", "unlock_account", "update_account_config",
                  "transfer", "batch_balance_operation", "reserve", "release", "tcc_try", "tcc_confirm",
                  "tcc_cancel", "compensate", "get_account", "get_accounts", "result_of", "results_of", "totals",
                  "apply_batch", "move")
BUSINESS_METHODS = ("pay", "refund", "split", "topup_hold", "topup_settle", "topup_release", "withdraw_hold",
                    "withdraw_settle", "withdraw_release", "run_template", "templates")
OTHER_METHODS = ("events", "shard_of", "shard_map_epoch")


class Gateway:
    """The router plus the business API and the operator's templates; ``call(name, args, kwargs)`` runs any
    operation and returns a Future."""

    def __init__(self, router: Router, templates: dict[str, B.Template] | None = None) -> None:
        self.router = router
        self.templates = dict(templates or {})
        self._pool = concurrent.futures.ThreadPoolExecutor(BLOCKING_WORKERS, thread_name_prefix="zwallet-gateway")
        self.ops: dict[str, Callable[..., Future]] = {name: getattr(router, name) for name in ROUTER_METHODS}
        self.ops.update({
            "pay": lambda *a, **k: B.pay(router, *a, **k),
            "split": lambda *a, **k: B.split(router, *a, **k),
            "refund": self._blocking(B.refund),
            "topup_hold": self._blocking(lambda r, q, account, funding_account, amount, currency, expires_ms=0:
                                         B.hold(r, q, funding_account, account, amount, currency, expires_ms)),
            "topup_settle": self._blocking(lambda r, q, account, funding_account, amount, currency:
                                           B.settle(r, q, funding_account, account, amount, currency)),
            "topup_release": self._blocking(lambda r, q, account, funding_account, amount, currency:
                                            B.release(r, q, funding_account, account, amount, currency)),
            "withdraw_hold": self._blocking(lambda r, q, account, payout_account, amount, currency, expires_ms=0:
                                            B.hold(r, q, account, payout_account, amount, currency, expires_ms)),
            "withdraw_settle": self._blocking(lambda r, q, account, payout_account, amount, currency:
                                              B.settle(r, q, account, payout_account, amount, currency)),
            "withdraw_release": self._blocking(lambda r, q, account, payout_account, amount, currency:
                                               B.release(r, q, account, payout_account, amount, currency)),
            "run_template": self._run_template,
            "templates": lambda: _now(sorted(self.templates)),
            "events": self._blocking(lambda r, first_seq, last_seq, shard=None: r.events(first_seq, last_seq, shard)),
            "shard_of": lambda account_id: _now(router.shard_of(account_id)),
            "shard_map_epoch": lambda: _now(router.shard_map.epoch),
        })

    def _blocking(self, fn: Callable[..., Any]) -> Callable[..., Future]:
        def run(*args: Any, **kwargs: Any) -> Future:
            # in the caller's context: its rights (gateway/router.py CALLER) go with the work
            return self._pool.submit(contextvars.copy_context().run, fn, self.router, *args, **kwargs)
        return run

    def _run_template(self, name: str, request_id: int, params: dict[str, Any] | None = None,
                      **kw: Any) -> Future:
        t = self.templates.get(name)
        if t is None:
            return _failed(B.TemplateError(f"no template {name!r} (templates: {sorted(self.templates)})"))
        timestamp = int(kw.pop("timestamp", 0) or 0)
        return B.run_template(self.router, t, request_id, {**(params or {}), **kw}, timestamp=timestamp)

    def call(self, name: str, args: Any, kwargs: dict[str, Any]) -> Future:
        op = self.ops.get(name)
        if op is None:
            return _failed(ValueError(f"no gateway operation {name!r}"))
        try:
            return op(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a bad call (TypeError, ValueError) is the caller's exception
            return _failed(exc)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.router.close()


def _now(v: Any) -> Future:
    f: Future = LightFuture()
    f.set_result(v)
    return f
