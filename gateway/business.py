"""The business API: payments, refunds, splits, holds and operators' templates, as account operations.

Every business request carries a ``request_id`` (a u128 the caller chooses, unique per request); every
account-level id it produces (a dedup id, a workflow id, a txn id) is ``derive_id(request_id, tag, index)``
(blake2b, ``gateway.router.derive_id``), so a retry of the request, at this gateway replica or any other,
sends the same ids and nothing applies twice.

- ``pay(request_id, payer, merchant, amount, currency, fee=0, fee_account=None)``: legs payer -(amount+fee),
  merchant +amount, fee_account +fee; one ``batch_balance_operation`` if the accounts are on one shard, else
  one Marker TCC workflow (atomic either way).
- ``refund(request_id, original_request_id, payer, merchant, amount, currency, fee=0, fee_account=None)``:
  merchant -amount, fee_account -fee, payer +amount+fee; the same way; only after a payment
  ``original_request_id`` that succeeded, and at most once per payment.
- ``split(request_id, payer, shares, currency)``: payer -sum, each share's account +its amount; the same way.
- ``topup_hold`` / ``withdraw_hold``, then ``*_settle`` or ``*_release``: funding -> account / account ->
  payout; a hold is a TCC try on each shard involved (money leaves ``available`` into ``pending_out``);
  settle confirms, release cancels.
- ``run_template(name, request_id, **params)``: an operator's template's legs, as ``pay``.

Why holds are TCC tries and not ledger reservations: a reservation can only be released back to
``available``; settling it would be a release and then a move, two commands, and the move could fail after
the hold is gone. A try is a hold that a confirm settles atomically on its shard. Across two shards the hold
is a try on each with one txn id, and settle/release keep an order: the first shard (lowest id) decides. A
settle re-sends the tries (duplicates answer their original results), confirms the first shard, then the
others; a release cancels the first shard, then the others; a settle that finds the first shard cancelled
(or a release that finds it confirmed) finishes the other shards the same way and reports it. So concurrent
settle and release of one hold never leave it half-settled. A cross-shard hold has no expiry (an expiring try
on one shard could be gone when the other is confirmed); a single-shard hold may take ``expires_ms``.

Business outcomes are results (``gateway.Result``: ``code`` OK or the code that rejected the request as a
whole); malformed requests raise ValueError / TypeError and change nothing.
"""
from __future__ import annotations

import ast
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.client import ClientError, RequestRefused
from engine.records import Code, Kind
from gateway.result import Result
from gateway.router import Router, _check_currency, _id, derive_id, now_ms

PHASE2_TIMEOUT_S = 30.0           # a settle/release keeps re-sending a shard's confirm/cancel this long
SPLIT_SHARES_MAX = 1000


def _amount(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an int (minor units)")
    return v


def _reject(code: Code, dedup_id: int, kind: int = Kind.BATCH_BALANCE) -> Result:
    return Result(code, False, 0, dedup_id, kind)


# ------------------------------------------------------------------------------------ payments
def pay_legs(payer: int, merchant: int, amount: int, currency: str, fee: int,
             fee_account: int | None) -> list[tuple[int, int, str]]:
    legs = [(payer, -(amount + fee), currency), (merchant, amount, currency)]
    if fee:
        assert fee_account is not None
        legs.append((fee_account, fee, currency))
    return legs


def _pay_checks(payer: Any, merchant: Any, amount: Any, currency: str, fee: Any, fee_account: Any) -> Code | None:
    _amount(amount, "amount")
    _amount(fee, "fee")
    _check_currency(currency)
    if fee and fee_account is None:
        raise ValueError("a fee needs a fee_account")
    if amount <= 0 or fee < 0:
        return Code.INVALID_AMOUNT
    ids = [_id(payer), _id(merchant)] + ([_id(fee_account)] if fee else [])
    if len(set(ids)) != len(ids):
        return Code.SAME_ACCOUNT
    if 0 in ids:
        return Code.INVALID_ID
    return None


def pay(router: Router, request_id: int, payer: Any, merchant: Any, amount: int, currency: str, fee: int = 0,
        fee_account: Any = None, *, timestamp: int = 0) -> Any:
    """A Future of the payment's Result: payer -> merchant ``amount`` and payer -> fee_account ``fee``,
    atomically (all legs or none)."""
    from gateway.router import _done
    d = derive_id(request_id, b"pay")
    bad = _pay_checks(payer, merchant, amount, currency, fee, fee_account)
    if bad is not None:
        return _done(_reject(bad, d))
    legs = pay_legs(_id(payer), _id(merchant), amount, currency, fee,
                    _id(fee_account) if fee_account is not None else None)
    return router.move(d, legs, timestamp=timestamp)


def refund(router: Router, request_id: int, original_request_id: int, payer: Any, merchant: Any, amount: int,
           currency: str, fee: int = 0, fee_account: Any = None, *, timestamp: int = 0) -> Result:
    """Give back ``amount`` (merchant -> payer) and ``fee`` (fee_account -> payer) of an earlier payment
    ``original_request_id``, which must have succeeded (else ``Code.TXN_NOT_FOUND``). Its ids are derived from
    the original's request id: a payment is refunded at most once (a second refund, with any request id, is
    a duplicate of the first: its outcome, nothing moves again). ``request_id`` names the refund request
    (logs, replies); the amounts are the caller's: the gateway keeps no payment records (blocking)."""
    del request_id
    d = derive_id(original_request_id, b"refund")
    bad = _pay_checks(payer, merchant, amount, currency, fee, fee_account)
    if bad is not None:
        return _reject(bad, d)
    original = router.result_of(derive_id(original_request_id, b"pay")).result()
    if original is None or not original.ok:
        return _reject(Code.TXN_NOT_FOUND, d)
    legs = [(_id(merchant), -amount, currency), (_id(payer), amount + fee, currency)]
    if fee:
        legs.append((_id(fee_account), -fee, currency))
    result: Result = router.move(d, legs, timestamp=timestamp).result()
    return result


def split(router: Router, request_id: int, payer: Any, shares: Sequence[tuple[Any, int]], currency: str, *,
          timestamp: int = 0) -> Any:
    """A Future of the Result of one payment split between several parties: ``shares`` = [(account, amount),
    ...]; payer -> each, atomically."""
    from gateway.router import _done
    d = derive_id(request_id, b"split")
    _check_currency(currency)
    if not 1 <= len(shares) <= SPLIT_SHARES_MAX:
        raise ValueError(f"a split has 1..{SPLIT_SHARES_MAX} shares")
    total = 0
    accounts = {_id(payer)}
    for acct, amt in shares:
        _amount(amt, "a share's amount")
        if amt <= 0:
            return _done(_reject(Code.INVALID_AMOUNT, d))
        if _id(acct) in accounts:
            return _done(_reject(Code.SAME_ACCOUNT, d))
        accounts.add(_id(acct))
        total += amt
    legs = [(_id(payer), -total, currency)] + [(_id(a), m, currency) for a, m in shares]
    return router.move(d, legs, timestamp=timestamp)


# ------------------------------------------------------------------------------------ holds
class _Hold:
    def __init__(self, router: Router, request_id: int, from_account: Any, to_account: Any, amount: int,
                 currency: str) -> None:
        _amount(amount, "amount")
        _check_currency(currency)
        self.router = router
        self.request_id = int(request_id)
        self.a, self.b = _id(from_account), _id(to_account)
        self.amount, self.currency = amount, currency
        self.txn = derive_id(request_id, b"hold.txn")
        smap = router.shard_map
        by: dict[int, list[tuple[int, int, str]]] = {}
        by.setdefault(smap.shard_of(self.a), []).append((self.a, -amount, currency))
        by.setdefault(smap.shard_of(self.b), []).append((self.b, amount, currency))
        self.by_shard = dict(sorted(by.items()))
        self.shards = list(self.by_shard)

    def _send(self, shard: int, name: str, *args: Any, **kwargs: Any) -> Result:
        """One shard command, re-sent (same dedup id) while the shard cannot be reached, up to PHASE2_TIMEOUT_S."""
        end = time.monotonic() + PHASE2_TIMEOUT_S
        while True:
            try:
                r: Result = self.router._shard_command(shard, name, *args, **kwargs).result()
                return r
            except RequestRefused:
                raise                    # not a reachability problem (WRONG_SHARD: rerouted by the caller)
            except ClientError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def tries(self, expires_ms: int) -> list[Result]:
        futs = [self.router._shard_command(s, "tcc_try", derive_id(self.request_id, b"hold.try", s), self.txn,
                                           specs, timestamp=now_ms(), expires_ms=expires_ms)
                for s, specs in self.by_shard.items()]
        return [f.result() for f in futs]

    def finish(self, name: str, others: list[int]) -> None:
        for s in others:
            self._send(s, name, derive_id(self.request_id, b"hold." + name.encode(), s), self.txn,
                       timestamp=now_ms())

    def decide(self, name: str) -> Result:
        """Confirm (settle) or cancel (release) the first shard, then the others the way the first went."""
        first, rest = self.shards[0], self.shards[1:]
        r = self._send(first, name, derive_id(self.request_id, b"hold." + name.encode(), first), self.txn,
                       timestamp=now_ms())
        if r.ok:
            self.finish(name, rest)
            return r
        if name == "tcc_confirm" and r.code in (Code.TXN_ALREADY_CANCELLED, Code.TXN_EXPIRED, Code.TXN_NOT_FOUND):
            self.finish("tcc_cancel", rest)
        elif name == "tcc_cancel" and r.code == Code.TXN_ALREADY_CONFIRMED:
            self.finish("tcc_confirm", rest)
        return r


def _held(r: Result) -> bool:
    """A try's result says the hold is there: OK (now or, a duplicate, before), or TXN_ALREADY_EXISTS (the
    re-sent try left the dedup window, but its txn is there: held, or already settled)."""
    return r.ok or r.code == Code.TXN_ALREADY_EXISTS


def _rerouted(router: Router, fn: Callable[[], Result]) -> Result:
    """Run a hold step; a WRONG_SHARD / STALE_EPOCH refusal (nothing applied) reloads the map and runs it
    again (every step is idempotent by its derived ids)."""
    from gateway.router import REFUSED_REROUTE, ROUTE_ATTEMPTS_MAX
    for attempt in range(ROUTE_ATTEMPTS_MAX):
        smap = router.shard_map
        try:
            return fn()
        except RequestRefused as exc:
            if exc.code not in REFUSED_REROUTE or attempt + 1 == ROUTE_ATTEMPTS_MAX:
                raise
            router.refresh(smap).result()
    raise AssertionError("unreachable")


def hold(router: Router, request_id: int, from_account: Any, to_account: Any, amount: int, currency: str,
         expires_ms: int = 0) -> Result:
    """Hold ``amount`` moving from ``from_account`` to ``to_account`` (a TCC try per shard): OK, or the code
    of the try that refused it (then every shard's part is cancelled: nothing stays held). A retry after the
    shards' dedup window may answer TXN_ALREADY_EXISTS: the hold is there (or was settled)."""
    return _rerouted(router, lambda: _hold(router, request_id, from_account, to_account, amount, currency,
                                           expires_ms))


def settle(router: Router, request_id: int, from_account: Any, to_account: Any, amount: int,
           currency: str) -> Result:
    """Settle a hold (the same arguments as the hold): OK once every shard's part is confirmed; else the code
    that refused it (TXN_ALREADY_CANCELLED: it was released; a try's code: the hold never held)."""
    return _rerouted(router, lambda: _settle(router, request_id, from_account, to_account, amount, currency))


def release(router: Router, request_id: int, from_account: Any, to_account: Any, amount: int,
            currency: str) -> Result:
    """Release a hold: OK (or NULL_CANCELLED: it never held) once every shard's part is cancelled;
    TXN_ALREADY_CONFIRMED if it was settled first."""
    return _rerouted(router, lambda: _Hold(router, request_id, from_account, to_account, amount,
                                           currency).decide("tcc_cancel"))


def _hold(router: Router, request_id: int, from_account: Any, to_account: Any, amount: int, currency: str,
          expires_ms: int = 0) -> Result:
    h = _Hold(router, request_id, from_account, to_account, amount, currency)
    if amount <= 0:
        return _reject(Code.INVALID_AMOUNT, h.txn, Kind.TCC_TRY)
    if h.a == h.b:
        return _reject(Code.SAME_ACCOUNT, h.txn, Kind.TCC_TRY)
    if expires_ms and len(h.shards) > 1:
        raise ValueError("a hold across two shards cannot expire (one shard's part could expire while the other "
                         "is settled): release it explicitly")
    results = h.tries(expires_ms)
    bad = [r for r in results if not _held(r)]
    if bad:
        h.decide("tcc_cancel")
        return bad[0]
    return results[0]


def _settle(router: Router, request_id: int, from_account: Any, to_account: Any, amount: int,
            currency: str) -> Result:
    h = _Hold(router, request_id, from_account, to_account, amount, currency)
    bad = [r for r in h.tries(0) if not _held(r)]
    if bad:
        h.decide("tcc_cancel")
        return bad[0]
    return h.decide("tcc_confirm")


# ------------------------------------------------------------------------------------ templates
PARAM_TYPES = ("account", "amount", "int", "currency")
_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Name, ast.Load, ast.Constant,
            ast.Call, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Not, ast.And,
            ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_FUNCS: dict[str, Callable[..., int]] = {"min": min, "max": max, "abs": abs}
TEMPLATE_LEGS_MAX = 64


class TemplateError(ValueError):
    """A template file that does not hold, or a request a template refuses (a check failed, a parameter is
    missing or of the wrong type): nothing was applied."""


def _compile(expr: Any, names: set[str], where: str) -> Any:
    if isinstance(expr, bool) or not isinstance(expr, (str, int)):
        raise TemplateError(f"{where}: an expression is a string or an int, not {expr!r}")
    src = str(expr)
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as exc:
        raise TemplateError(f"{where}: {src!r} is not an expression: {exc.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise TemplateError(f"{where}: {src!r} uses {type(node).__name__}, which templates do not allow")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS):
            raise TemplateError(f"{where}: {src!r}: only min, max, abs may be called")
        if isinstance(node, ast.Name) and node.id not in names and node.id not in _FUNCS:
            raise TemplateError(f"{where}: {src!r} names {node.id!r}, which is not a parameter")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool)
                                               or not isinstance(node.value, (int, str))):
            raise TemplateError(f"{where}: {src!r}: constants are ints or strings")
    return compile(tree, f"<template {where}>", "eval")


@dataclass(frozen=True)
class Template:
    """A named operation: typed parameters, checks (expression, message), legs (account, amount, currency)."""
    name: str
    params: dict[str, str]
    checks: tuple[tuple[Any, str], ...]
    legs: tuple[tuple[Any, Any, Any], ...]

    @classmethod
    def from_dict(cls, name: str, doc: dict[str, Any]) -> Template:
        params = doc.get("params")
        if not isinstance(params, dict) or not params:
            raise TemplateError(f"template {name}: params = {{name = type, ...}} with types {PARAM_TYPES}")
        for p, t in params.items():
            if t not in PARAM_TYPES or not p.isidentifier() or p in _FUNCS:
                raise TemplateError(f"template {name}: parameter {p!r} of type {t!r} (types: {PARAM_TYPES})")
        names = set(params)
        checks = []
        for k, c in enumerate(doc.get("checks", [])):
            if isinstance(c, str):
                c = [c, f"check failed: {c}"]
            if not isinstance(c, list) or len(c) != 2:
                raise TemplateError(f"template {name}: check {k} is \"expr\" or [\"expr\", \"message\"]")
            checks.append((_compile(c[0], names, f"{name} check {k}"), str(c[1])))
        legs_doc = doc.get("legs")
        if not isinstance(legs_doc, list) or not 2 <= len(legs_doc) <= TEMPLATE_LEGS_MAX:
            raise TemplateError(f"template {name}: 2..{TEMPLATE_LEGS_MAX} legs")
        legs = []
        for k, leg in enumerate(legs_doc):
            if not isinstance(leg, dict) or set(leg) != {"account", "amount", "currency"}:
                raise TemplateError(f"template {name}: leg {k} is {{account, amount, currency}}")
            legs.append(tuple(_compile(leg[f], names, f"{name} leg {k} {f}")
                              for f in ("account", "amount", "currency")))
        return cls(name, dict(params), tuple(checks), tuple(legs))

    def legs_for(self, params: dict[str, Any]) -> list[tuple[int, int, str]]:
        missing = set(self.params) - set(params)
        extra = set(params) - set(self.params)
        if missing or extra:
            raise TemplateError(f"template {self.name}: missing {sorted(missing)}, unknown {sorted(extra)}")
        env: dict[str, Any] = {}
        for p, t in self.params.items():
            v = params[p]
            if t == "currency":
                if not isinstance(v, str):
                    raise TemplateError(f"template {self.name}: {p} must be a currency code")
                _check_currency(v)
            elif t == "account":
                v = _id(v)
            elif isinstance(v, bool) or not isinstance(v, int):
                raise TemplateError(f"template {self.name}: {p} must be an int")
            elif t == "amount" and v < 0:
                raise TemplateError(f"template {self.name}: {p} must be >= 0")
            env[p] = v
        scope = {"__builtins__": {}, **_FUNCS}
        for code, message in self.checks:
            if not eval(code, scope, env):       # compiled from a whitelisted AST (no attributes, no builtins)
                raise TemplateError(f"template {self.name}: {message}")
        out = []
        for a, m, c in self.legs:
            acct, amt, cur = eval(a, scope, env), eval(m, scope, env), eval(c, scope, env)
            if isinstance(amt, bool) or not isinstance(amt, int) or not isinstance(cur, str):
                raise TemplateError(f"template {self.name}: a leg's amount is an int and its currency a string")
            if amt:
                out.append((_id(acct), amt, cur))
        return out


def load_templates(path: str) -> dict[str, Template]:
    """``[template.<name>]`` tables of a TOML file (docs/gateway.md, "Templates")."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise TemplateError(f"cannot read the templates file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"{path}: not valid TOML: {exc}") from None
    tables = doc.get("template", {})
    if not isinstance(tables, dict):
        raise TemplateError(f"{path}: [template.<name>] tables")
    return {name: Template.from_dict(name, t) for name, t in tables.items()}


def run_template(router: Router, template: Template, request_id: int, params: dict[str, Any], *,
                 timestamp: int = 0) -> Any:
    """A Future of the Result: the template's legs as one atomic movement (ids derived from request_id and
    the template's name)."""
    legs = template.legs_for(params)
    return router.move(derive_id(request_id, b"tpl:" + template.name.encode()), legs, timestamp=timestamp)
