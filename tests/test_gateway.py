"""The access layer on a whole local system (2 shards, the Marker, 2 gateway replicas): the Ledger's
methods through ``gateway.Client`` (the service) and ``gateway.Client.direct`` (in-process routing), the
business API's legs and failure cases (each rejected as a whole), routing (a stale map, a gateway replica
killed, a shard down while the other keeps serving). Multi-process, on loopback."""
from __future__ import annotations

import asyncio
import itertools
import shutil
import threading
import time

import pytest

import gateway
from engine import Code, State
from engine.client import RequestRefused, Unavailable
from engine.devtools.up import LocalSystem
from engine.shard_map import ShardMap
from engine.system import System
from gateway.business import TemplateError
from gateway.router import Router, derive_id

CUR = "USD"
FUNDS = 1_000_000
_ids = itertools.count(1_000)


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    base = tmp_path_factory.mktemp("gw")
    with LocalSystem(str(base), shards=2, replicas=1, gateways=2) as s:
        s.start()
        yield s


@pytest.fixture(scope="module")
def svc(ls):
    """Through the gateway service (system.toml lists it)."""
    c = gateway.Client.from_system(ls.system_path)
    yield c
    c.close()


@pytest.fixture(scope="module")
def direct(ls):
    c = gateway.Client.from_system(ls.system_path, direct=True)
    yield c
    c.close()


@pytest.fixture(params=["service", "direct"])
def client(request, svc, direct):
    return svc if request.param == "service" else direct


def new_id() -> int:
    return next(_ids) * 7919


def account_on(ls, shard: int) -> int:
    smap = System.load(ls.system_path).shard_map
    while True:
        a = new_id()
        if smap.shard_of(a) == shard:
            return a


def funded(client, ls, shard: int, amount: int = FUNDS, **kw) -> int:
    """A new account on ``shard`` holding ``amount`` (from a per-test source that may go negative)."""
    a = account_on(ls, shard)
    assert client.create_account(new_id(), a, CUR, **kw).code == Code.OK
    if amount:
        src = account_on(ls, shard)
        assert client.create_account(new_id(), src, CUR, lower_limit=None).code == Code.OK
        assert client.transfer(new_id(), src, a, amount, CUR).code == Code.OK
    return a


def money(client, ids):
    """What a rejected request must leave unchanged (pending entries summed)."""
    keys = ("available", "reserved", "pending_in", "pending_out")
    return {a: {k: sum(acc[k].values()) if isinstance(acc[k], dict) else acc[k] for k in keys}
            for a, acc in zip(ids, client.get_accounts(ids))}


def test_system_toml_lists_the_gateways(ls, svc):
    system = System.load(ls.system_path)
    assert system.extra["gateway"]["clients"] == ls.gateway_addresses and len(ls.gateway_addresses) == 2
    assert isinstance(svc._t, gateway.client._ServiceTransport)
    assert svc.status()["role"] == "gateway"


def test_the_ledgers_method_and_argument_names(svc):
    import inspect
    from engine import Ledger
    for name in ("create_account", "delete_account", "lock_account", "unlock_account", "update_account_config",
                 "transfer", "batch_balance_operation", "reserve", "release", "tcc_try", "tcc_confirm",
                 "tcc_cancel", "compensate", "get_account", "result_of", "totals", "events"):
        ours = list(inspect.signature(getattr(gateway.Client, name)).parameters)
        theirs = list(inspect.signature(getattr(Ledger, name)).parameters)
        assert ours[:len(theirs)] == theirs, name
    assert list(inspect.signature(gateway.Client.pay).parameters) == [
        "self", "request_id", "payer", "merchant", "amount", "currency", "fee", "fee_account"]


def test_transfer_is_the_same_call_on_one_shard_or_two(client, ls):
    a, b, c = funded(client, ls, 1), funded(client, ls, 1, 0), funded(client, ls, 2, 0)
    d1, d2 = new_id(), new_id()
    r1 = client.transfer(d1, a, b, 100, CUR)
    r2 = client.transfer(d2, a, c, 200, CUR)
    assert r1.ok and r1.shard == 1 and r1.seq_num > 0 and r1.workflow_state is None
    assert r2.ok and r2.workflow_state == "SUCCEEDED" and r2.dedup_id == d2
    again = client.transfer(d2, a, c, 200, CUR)
    assert again.ok and again.duplicate
    assert [x["available"] for x in client.get_accounts([a, b, c])] == [FUNDS - 300, 100, 200]
    assert client.result_of(d1).ok and client.result_of(d2).ok and client.result_of(new_id()) is None
    # a business failure across shards is a result, and nothing moved
    r3 = client.transfer(new_id(), b, c, 10_000, CUR)
    assert r3.code == Code.BALANCE_LIMIT_EXCEEDED and r3.workflow_state == "FAILED"
    assert client.transfer(new_id(), a, c, 0, CUR).code == Code.INVALID_AMOUNT
    assert client.transfer(new_id(), a, c, -5, CUR).code == Code.INVALID_AMOUNT
    assert [x["available"] for x in client.get_accounts([a, b, c])] == [FUNDS - 300, 100, 200]
    with pytest.raises(ValueError):
        client.transfer(new_id(), a, c, 5, "not a currency")


def test_cross_shard_transfer_with_expected_balances_is_a_saga(client, ls):
    a, c = funded(client, ls, 1, 1000), funded(client, ls, 2, 0)
    assert client.transfer(new_id(), a, c, 100, CUR, expected_from_balance=999).code == Code.PRECONDITION_FAILED
    r = client.transfer(new_id(), a, c, 100, CUR, expected_from_balance=1000, expected_to_balance=0)
    assert r.ok, r
    assert [x["available"] for x in client.get_accounts([a, c])] == [900, 100]


def test_account_management_reserve_release_through_the_gateway(client, ls):
    a = funded(client, ls, 2, 500)
    assert client.create_account(new_id(), a, CUR).code == Code.ACCOUNT_ALREADY_EXISTS
    assert client.lock_account(new_id(), a).ok and client.get_account(a)["state"] == State.LOCKED
    assert client.unlock_account(new_id(), a).ok
    assert client.update_account_config(new_id(), a, upper_limit=10_000).ok
    assert client.get_account(a)["upper_limit"] == 10_000 and client.get_account(a)["lower_limit"] == 0
    rid = new_id()
    r = client.reserve(new_id(), a, rid, 200)
    assert r.ok and r.accounts[a]["available"] == 300
    assert client.get_account(a)["reservations"] == {rid: 200}
    assert client.release(new_id(), a, rid).ok
    assert client.get_account(a)["available"] == 500
    assert client.delete_account(new_id(), a).code == Code.BALANCE_NOT_ZERO


def test_batch_balance_operation_across_shards(client, ls):
    a, b = funded(client, ls, 1, 1000), funded(client, ls, 2, 1000)
    # zero-sum: a TCC workflow
    r = client.batch_balance_operation(new_id(), [(a, -300, CUR), (b, 300, CUR)])
    assert r.ok and r.workflow_state == "SUCCEEDED"
    # not zero-sum, with preconditions: a saga; a failed precondition on the second shard undoes the first
    before = money(client, [a, b])
    r = client.batch_balance_operation(new_id(), [(a, -100, CUR), (b, -100, CUR)], [(b, 1)])
    assert r.code == Code.PRECONDITION_FAILED and r.workflow_state == "FAILED"
    assert money(client, [a, b]) == before
    r = client.batch_balance_operation(new_id(), [(a, 50, CUR), (b, 50, CUR)], [(a, 700)])
    assert r.ok and [x["available"] for x in client.get_accounts([a, b])] == [750, 1350]
    # one shard: that shard's batch
    r = client.batch_balance_operation(new_id(), [(a, -50, CUR)])
    assert r.ok and r.shard == 1


def test_tcc_on_one_shard_and_its_confirm_from_anywhere(client, svc, direct, ls):
    a, b = funded(client, ls, 2, 1000), funded(client, ls, 2, 0)
    txn = new_id()
    assert client.tcc_try(new_id(), txn, [(a, -100, CUR), (b, 100, CUR)]).ok
    # the confirm comes from the other client (it never saw the try): it finds the txn's shard
    other = direct if client is svc else svc
    r = other.tcc_confirm(new_id(), txn)
    assert r.ok and r.shard == 2
    assert [x["available"] for x in client.get_accounts([a, b])] == [900, 100]
    c = funded(client, ls, 1, 0)
    with pytest.raises(ValueError, match="one shard"):
        client.tcc_try(new_id(), new_id(), [(a, -1, CUR), (c, 1, CUR)])
    # a cancel of a txn nobody tried: a null cancel
    assert client.tcc_cancel(new_id(), new_id()).code == Code.NULL_CANCELLED


def test_compensate_finds_the_shard_of_the_original(client, ls):
    a, b = funded(client, ls, 1, 1000), funded(client, ls, 1, 0)
    d = new_id()
    assert client.transfer(d, a, b, 100, CUR).ok
    r = client.compensate(new_id(), d)
    assert r.ok and r.shard == 1
    assert [x["available"] for x in client.get_accounts([a, b])] == [1000, 0]
    assert client.compensate(new_id(), new_id()).code == Code.NULL_COMPENSATED


def test_totals_are_summed_and_events_are_per_shard(client, ls):
    from engine.client import Client as ShardClient
    system = System.load(ls.system_path)
    per_shard = []
    for g in system.shards.values():
        with ShardClient(list(g.clients), keys=ls.client_keys) as sc:
            per_shard.append(sc.totals(CUR))
    t = client.totals(CUR)
    assert t == {k: sum(p[k] for p in per_shard) for k in per_shard[0]}
    evs = client.events(1, 3, shard=1)
    assert len(evs) and int(evs["seq_num"][0]) == 1
    with pytest.raises(ValueError, match="per shard"):
        client.events(1, 3)


# ------------------------------------------------------------------------------------ business
@pytest.mark.parametrize("shards", [(1, 1, 1), (1, 2, 2), (2, 1, 2)])
def test_pay_with_a_fee_moves_every_leg_or_none(client, ls, shards):
    payer, merchant, fee_acct = (funded(client, ls, shards[0], 1000), funded(client, ls, shards[1], 0),
                                 funded(client, ls, shards[2], 0))
    req = new_id()
    r = client.pay(req, payer, merchant, 300, CUR, fee=7, fee_account=fee_acct)
    assert r.ok, r
    assert r.dedup_id == derive_id(req, b"pay")
    assert (r.workflow_state is None) == (len(set(shards)) == 1)
    assert [x["available"] for x in client.get_accounts([payer, merchant, fee_acct])] == [693, 300, 7]
    again = client.pay(req, payer, merchant, 300, CUR, fee=7, fee_account=fee_acct)
    assert again.ok and again.duplicate
    before = money(client, [payer, merchant, fee_acct])
    # too much: rejected as a whole (neither the merchant nor the fee account gets anything)
    assert client.pay(new_id(), payer, merchant, 690, CUR, fee=7, fee_account=fee_acct).code == \
        Code.BALANCE_LIMIT_EXCEEDED
    assert client.pay(new_id(), payer, merchant, 0, CUR).code == Code.INVALID_AMOUNT
    assert client.pay(new_id(), payer, merchant, 5, CUR, fee=-1, fee_account=fee_acct).code == Code.INVALID_AMOUNT
    assert client.pay(new_id(), payer, payer, 5, CUR).code == Code.SAME_ACCOUNT
    assert client.pay(new_id(), payer, new_id(), 5, CUR, fee=1, fee_account=fee_acct).code == \
        Code.ACCOUNT_NOT_FOUND
    with pytest.raises(ValueError, match="fee_account"):
        client.pay(new_id(), payer, merchant, 5, CUR, fee=1)
    assert money(client, [payer, merchant, fee_acct]) == before


def test_refund_of_a_payment_once(client, ls):
    payer, merchant, fee_acct = funded(client, ls, 1, 1000), funded(client, ls, 2, 0), funded(client, ls, 1, 0)
    req = new_id()
    assert client.pay(req, payer, merchant, 400, CUR, fee=10, fee_account=fee_acct).ok
    assert client.refund(new_id(), new_id(), payer, merchant, 400, CUR).code == Code.TXN_NOT_FOUND
    r = client.refund(new_id(), req, payer, merchant, 400, CUR, fee=10, fee_account=fee_acct)
    assert r.ok, r
    assert [x["available"] for x in client.get_accounts([payer, merchant, fee_acct])] == [1000, 0, 0]
    again = client.refund(new_id(), req, payer, merchant, 400, CUR, fee=10, fee_account=fee_acct)
    assert again.ok and again.duplicate
    assert [x["available"] for x in client.get_accounts([payer, merchant, fee_acct])] == [1000, 0, 0]


def test_split_between_parties_on_both_shards(client, ls):
    payer = funded(client, ls, 1, 1000)
    parties = [funded(client, ls, 1, 0), funded(client, ls, 2, 0), funded(client, ls, 2, 0)]
    r = client.split(new_id(), payer, [(parties[0], 100), (parties[1], 200), (parties[2], 300)], CUR)
    assert r.ok, r
    assert [x["available"] for x in client.get_accounts([payer, *parties])] == [400, 100, 200, 300]
    before = money(client, [payer, *parties])
    assert client.split(new_id(), payer, [(parties[0], 100), (new_id(), 1)], CUR).code == Code.ACCOUNT_NOT_FOUND
    assert client.split(new_id(), payer, [(parties[0], 300), (parties[1], 200)], CUR).code == \
        Code.BALANCE_LIMIT_EXCEEDED
    assert client.split(new_id(), payer, [(parties[0], 0)], CUR).code == Code.INVALID_AMOUNT
    assert money(client, [payer, *parties]) == before


@pytest.mark.parametrize("cross", [False, True])
def test_withdrawal_with_a_hold_then_settle(client, ls, cross):
    user, payout = funded(client, ls, 1, 1000), funded(client, ls, 2 if cross else 1, 0)
    req = new_id()
    r = client.withdraw_hold(req, user, payout, 300, CUR)
    assert r.ok, r
    u = client.get_account(user)
    assert u["available"] == 700 and sum(u["pending_out"].values()) == 300
    assert client.get_account(payout)["available"] == 0
    assert client.withdraw_hold(req, user, payout, 300, CUR).ok                     # a retry: nothing more held
    assert client.get_account(user)["available"] == 700
    assert client.withdraw_settle(req, user, payout, 300, CUR).ok
    assert [x["available"] for x in client.get_accounts([user, payout])] == [700, 300]
    assert money(client, [user])[user]["pending_out"] == 0
    # settled: a release now is refused and changes nothing; a second settle is a duplicate
    assert client.withdraw_release(req, user, payout, 300, CUR).code == Code.TXN_ALREADY_CONFIRMED
    assert client.withdraw_settle(req, user, payout, 300, CUR).ok
    assert [x["available"] for x in client.get_accounts([user, payout])] == [700, 300]


@pytest.mark.parametrize("cross", [False, True])
def test_topup_with_a_hold_then_release(client, ls, cross):
    user, funding = funded(client, ls, 1, 0), funded(client, ls, 2 if cross else 1, 1000)
    req = new_id()
    assert client.topup_hold(req, user, funding, 250, CUR).ok
    assert client.get_account(funding)["available"] == 750
    assert sum(client.get_account(user)["pending_in"].values()) == 250
    assert client.get_account(user)["available"] == 0                      # not spendable until settled
    assert client.topup_release(req, user, funding, 250, CUR).ok
    assert client.topup_settle(req, user, funding, 250, CUR).code == Code.TXN_ALREADY_CANCELLED
    assert money(client, [user, funding]) == {user: dict(available=0, reserved=0, pending_in=0, pending_out=0),
                                              funding: dict(available=1000, reserved=0, pending_in=0,
                                                            pending_out=0)}


def test_a_hold_that_cannot_hold_leaves_nothing_held(client, ls):
    user, payout = funded(client, ls, 1, 100), funded(client, ls, 2, 0)
    before = money(client, [user, payout])
    req = new_id()
    assert client.withdraw_hold(req, user, payout, 300, CUR).code == Code.BALANCE_LIMIT_EXCEEDED
    assert money(client, [user, payout]) == before
    assert client.withdraw_settle(req, user, payout, 300, CUR).code == Code.BALANCE_LIMIT_EXCEEDED
    assert money(client, [user, payout]) == before
    with pytest.raises(ValueError, match="expire"):
        client.withdraw_hold(new_id(), user, payout, 1, CUR, expires_ms=int(time.time() * 1000) + 60_000)


def test_concurrent_settle_and_release_of_one_hold_agree(direct, ls):
    user, payout = funded(direct, ls, 1, 1000), funded(direct, ls, 2, 0)
    for _ in range(5):
        req = new_id()
        assert direct.withdraw_hold(req, user, payout, 10, CUR).ok
        out: dict[str, object] = {}

        def run(k, f, req=req, out=out):
            out[k] = f(req, user, payout, 10, CUR)
        ts = [threading.Thread(target=run, args=(k, f))
              for k, f in (("settle", direct.withdraw_settle), ("release", direct.withdraw_release))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert out["settle"].ok != out["release"].ok, out                 # exactly one of them won
        acc = money(direct, [user, payout])
        assert acc[user]["pending_out"] == 0 and acc[payout]["pending_in"] == 0
    total = sum(x["available"] for x in direct.get_accounts([user, payout]))
    assert total == 1000


TEMPLATES = """
[template.marketplace_sale]
params = { buyer = "account", seller = "account", platform = "account", amount = "amount", bps = "int", \
currency = "currency" }
checks = [["amount > 0", "amount must be positive"], ["0 <= bps and bps <= 10000", "bps is 0..10000"]]
legs = [
  { account = "buyer", amount = "-amount", currency = "currency" },
  { account = "seller", amount = "amount - amount * bps // 10000", currency = "currency" },
  { account = "platform", amount = "amount * bps // 10000", currency = "currency" },
]
"""


def test_an_operators_template_runs_without_code(ls, tmp_path):
    path = tmp_path / "templates.toml"
    path.write_text(TEMPLATES)
    with gateway.Client.direct(ls.system_path, templates=str(path)) as c:
        assert c.templates() == ["marketplace_sale"]
        buyer, seller, platform = funded(c, ls, 1, 10_000), funded(c, ls, 2, 0), funded(c, ls, 1, 0)
        req = new_id()
        r = c.run_template("marketplace_sale", req, buyer=buyer, seller=seller, platform=platform, amount=1000,
                           bps=250, currency=CUR)
        assert r.ok and r.workflow_state == "SUCCEEDED"
        assert [x["available"] for x in c.get_accounts([buyer, seller, platform])] == [9000, 975, 25]
        with pytest.raises(TemplateError, match="bps is 0..10000"):
            c.run_template("marketplace_sale", new_id(), buyer=buyer, seller=seller, platform=platform,
                           amount=1000, bps=20_000, currency=CUR)
        with pytest.raises(TemplateError, match="missing"):
            c.run_template("marketplace_sale", new_id(), buyer=buyer, amount=1, bps=1, currency=CUR)
        with pytest.raises(TemplateError, match="no template"):
            c.run_template("nope", new_id())
        assert [x["available"] for x in c.get_accounts([buyer, seller, platform])] == [9000, 975, 25]


def test_async_client_through_the_gateway(ls):
    async def go():
        async with gateway.AsyncClient(ls.gateway_addresses, keys=ls.client_keys) as c:
            a, b = account_on(ls, 1), account_on(ls, 2)
            for x in (a, b):
                assert (await c.create_account(new_id(), x, CUR, lower_limit=None)).ok
            rs = await asyncio.gather(*(c.transfer(new_id(), a, b, 1, CUR) for _ in range(50)))
            assert all(r.ok for r in rs)
            assert (await c.get_account(b))["available"] == 50
    asyncio.run(go())


# ------------------------------------------------------------------------------------ routing
def test_a_stale_map_is_reloaded_once_for_many_refusals(ls, tmp_path):
    """The router starts from a map that gives every slot to the wrong shard; the system file is then
    put right: every command is refused WRONG_SHARD (nothing applied), the map is reloaded once, and every
    command goes through with its own ids."""
    real = System.load(ls.system_path)
    swapped = ShardMap.uniform([2, 1], epoch=real.shard_map.epoch)
    path = tmp_path / "system.toml"
    System(swapped, real.shards, real.markers, real.extra).write(str(path))
    r = Router(str(path))
    try:
        shutil.copy(ls.system_path, path)
        futs = [r.create_account(new_id(), new_id(), CUR) for _ in range(40)]
        results = [f.result() for f in futs]
        assert all(x.code == Code.OK for x in results), results
        # one reload for the refusals of the first attempts; at most one more: the shard refuses a whole
        # batch, and a re-routed command can share one with a first attempt still routed by the old map
        assert 1 <= r.reloads <= 2
        assert r.shard_map == real.shard_map
    finally:
        r.close()


def test_a_stale_epoch_is_reloaded_and_the_batch_re_sent(ls, tmp_path):
    """apply_batch carries the map's epoch: a replica serving another refuses it STALE_EPOCH (nothing
    applied); the router reloads and re-sends the same records."""
    from engine._ledger import OpEncoder
    real = System.load(ls.system_path)
    newer = ShardMap.from_dict({**real.shard_map.to_dict(), "epoch": real.shard_map.epoch + 1})
    path = tmp_path / "system.toml"
    System(newer, real.shards, real.markers, real.extra).write(str(path))
    with Router(str(path)) as r:
        a, b = account_on(ls, 1), account_on(ls, 1)
        for x in (a, b):
            assert r.create_account(new_id(), x, CUR, None).result().ok
        ops = OpEncoder().transfer(new_id(), a, b, 5, CUR)
        shutil.copy(ls.system_path, path)
        res = r.apply_batch(ops).result()
        assert int(res["code"][0]) == Code.OK and r.reloads == 1 and r.shard_map.epoch == real.shard_map.epoch
        assert r.get_account(b).result()["available"] == 5


def test_workflow_errors_are_the_markers_classes_either_way(svc, direct, ls):
    import marker.client
    a, b = funded(svc, ls, 1, 10), funded(svc, ls, 2, 0)
    for c in (svc, direct):
        with pytest.raises(marker.client.WorkflowRefused) as e:
            # a workflow whose first issue is an hour before the Marker's clock: refused, nothing ran
            c.batch_balance_operation(new_id(), [(a, -1, CUR), (b, 1, CUR)], timestamp=int(time.time() * 1000)
                                      - 7_200_000)
        assert e.value.workflow_id and e.value.reason


def test_a_map_that_stays_wrong_is_a_clear_error(ls, tmp_path):
    real = System.load(ls.system_path)
    path = tmp_path / "system.toml"
    System(ShardMap.uniform([2, 1], epoch=real.shard_map.epoch), real.shards, real.markers, real.extra).write(str(path))
    with Router(str(path)) as r:
        with pytest.raises(RequestRefused) as e:
            r.create_account(new_id(), new_id(), CUR).result()
        assert e.value.code.name == "WRONG_SHARD"
        assert 1 <= r.reloads <= 3


def test_a_killed_gateway_replica_loses_nothing(ls):
    with gateway.Client(ls.gateway_addresses, keys=ls.client_keys) as c:   # the default timeouts
        a, b = funded(c, ls, 1, 1000), funded(c, ls, 2, 0)
        served_by = c._t.io.leader
        gid = served_by + 1
        ls.kill_gateway(gid)
        try:
            d = new_id()
            assert c.transfer(d, a, b, 100, CUR).ok                      # re-sent to the other replica
            assert c.transfer(d, a, b, 100, CUR).duplicate
            assert [x["available"] for x in c.get_accounts([a, b])] == [900, 100]
        finally:
            ls.start_gateway(gid)


def test_a_shard_down_does_not_stop_the_other(ls):
    with Router(ls.system_path, timeout_s=2.0, attempt_timeout_s=0.3) as r:
        c1 = account_on(ls, 1)
        assert r.create_account(new_id(), c1, CUR, None).result().ok
        shard2 = ls.shards[2]
        for i in shard2.ids:
            shard2.kill(i)
        try:
            down = r.create_account(new_id(), account_on(ls, 2), CUR)
            t0 = time.monotonic()
            for _ in range(20):
                assert r.transfer(new_id(), c1, account_on(ls, 1), 1, CUR).result().code == Code.ACCOUNT_NOT_FOUND
            assert time.monotonic() - t0 < 2.0          # shard 1 keeps answering while shard 2's call waits
            with pytest.raises(Unavailable):
                down.result()
        finally:
            for i in shard2.ids:
                shard2.start_replica(i, wait=False)
            for i in shard2.ids:
                shard2._wait_ready(i)
            ls.wait_leaders()


# ------------------------------------------------------------------------------------ the Ledger's scenarios
def _scenario_accounts(led, n, d):
    x, y, z, eur = n["x"], n["y"], n["z"], n["eur"]
    out = [led.create_account(d(), x, CUR, lower_limit=-100, upper_limit=1000).code,
           led.create_account(d(), y, CUR).code, led.create_account(d(), z, CUR).code,
           led.create_account(d(), eur, "EUR").code, led.create_account(d(), x, CUR).code,
           led.create_account(d(), n["new"], CUR, lower_limit=5).code]
    for a, b, amt, cur in [(x, y, 50, CUR), (x, y, 100, CUR), (y, x, 2000, CUR), (x, eur, 1, CUR),
                           (x, x, 1, CUR), (x, y, 0, CUR), (x, n["missing"], 1, CUR), (y, z, 20, CUR),
                           (z, x, 20, CUR)]:
        out.append(led.transfer(d(), a, b, amt, cur).code)
    out.append(led.lock_account(d(), y).code)
    out.append(led.transfer(d(), x, y, 1, CUR).code)
    out.append(led.unlock_account(d(), y).code)
    out.append(led.delete_account(d(), y).code)
    out.append(led.update_account_config(d(), x, upper_limit=10).code)
    out.append(led.update_account_config(d(), x, lower_limit=None).code)
    dup = d()
    out += [led.transfer(dup, y, x, 5, CUR).code, led.transfer(dup, y, x, 5, CUR).duplicate]
    return out, [led.get_account(a)["available"] for a in (x, y, z)]


def _scenario_reserve_tcc_compensate(led, n, d):
    x, z = n["x"], n["z"]
    out = [led.create_account(d(), x, CUR, lower_limit=None).code, led.create_account(d(), z, CUR).code]
    rid = n["rid"]
    out += [led.batch_balance_operation(d(), [(z, 100, CUR), (x, -100, CUR)]).code,
            led.reserve(d(), z, rid, 30).code, led.reserve(d(), z, rid, 100).code,
            led.release(d(), z, n["rid2"]).code, led.release(d(), z, rid, 40).code, led.release(d(), z, rid).code]
    txn, txn2 = n["txn"], n["txn2"]
    out += [led.tcc_try(d(), txn, [(z, -60, CUR), (x, 60, CUR)]).code, led.tcc_try(d(), txn, [(z, -1, CUR)]).code,
            led.tcc_confirm(d(), txn).code, led.tcc_cancel(d(), txn).code,
            led.tcc_cancel(d(), txn2).code, led.tcc_try(d(), txn2, [(z, -1, CUR)]).code]
    orig = d()
    out += [led.transfer(orig, z, x, 10, CUR).code, led.compensate(d(), orig).code, led.compensate(d(), orig).code]
    late = d()
    out += [led.compensate(d(), late).code, led.transfer(late, z, x, 1, CUR).code]
    out.append(led.batch_balance_operation(d(), [(z, -5, CUR)], [(z, 39)]).code)
    return out, [led.get_account(a)["available"] for a in (x, z)]


@pytest.mark.parametrize("scenario", [_scenario_accounts, _scenario_reserve_tcc_compensate])
def test_the_ledgers_scenarios_give_the_same_codes_on_two_shards(client, ls, scenario):
    """The same code against the embedded Ledger and against the whole system (x and y on two shards: their
    transfers are Marker workflows there): the same result codes, the same balances."""
    from engine import Ledger
    embedded_ids = {k: 10 + i for i, k in enumerate(("x", "y", "z", "eur", "new", "missing", "rid", "rid2",
                                                     "txn", "txn2"))}
    system_ids = {"x": account_on(ls, 1), "y": account_on(ls, 2), "z": account_on(ls, 1),
                  "eur": account_on(ls, 2), "new": account_on(ls, 2), "missing": account_on(ls, 2),
                  **{k: new_id() for k in ("rid", "rid2", "txn", "txn2")}}
    counter = itertools.count(1)
    base = new_id() * 1_000_000
    embedded = scenario(Ledger(), embedded_ids, lambda: next(counter))
    on_system = scenario(client, system_ids, lambda: base + next(counter))
    assert [int(c) for c in on_system[0]] == [int(c) for c in embedded[0]]
    assert on_system[1] == embedded[1]


def test_workflows_go_to_their_marker_group_when_there_are_several(tmp_path):
    """Two Marker groups: the router batches each SUBMIT by the workflows' group (rendezvous hashing, the
    Marker client's own), so none is refused WRONG_GROUP."""
    with LocalSystem(str(tmp_path), shards=2, replicas=1, marker_groups=2, gateways=1) as s:
        s.start()
        with gateway.Client.from_system(s.system_path) as c:
            a, b = account_on(s, 1), account_on(s, 2)
            for x in (a, b):
                assert c.create_account(new_id(), x, CUR, lower_limit=None).ok
            results = []
            threads = [threading.Thread(target=lambda: results.append(c.transfer(new_id(), a, b, 1, CUR)))
                       for _ in range(40)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(results) == 40 and all(r.ok for r in results), results
            assert c.get_account(b)["available"] == 40
