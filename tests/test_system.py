"""The whole local system (``zwallet up`` / ``engine.devtools.up.LocalSystem``): shards with an identity,
the Marker moving money across shards, its client. Multi-process, on loopback.

The bank test under kill -9 of the Marker leader and a shard leader is in tests/test_system_chaos.py."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine import Code
from engine import records as R
from engine.client import Client, RequestRefused
from engine.devtools.up import LocalSystem
from engine.system import System
from engine.wire import ErrorCode
import marker
from marker.commands import transfer_step
from marker.client import WorkflowRefused
from tests.system_helpers import accounts_by_shard

CUR = "USD"


@pytest.fixture(scope="module")
def local_system(tmp_path_factory):
    base = tmp_path_factory.mktemp("system")
    with LocalSystem(str(base), shards=2, replicas=3) as ls:
        ls.start()
        yield ls


@pytest.fixture(scope="module")
def bank(local_system):
    """Two funded accounts and one unfunded on each shard; shard clients; the Marker client."""
    system = System.load(local_system.system_path)
    shard_clients = {s: Client(list(g.clients), keys=local_system.client_keys) for s, g in system.shards.items()}
    accts = accounts_by_shard(system, 3)
    d = 10_000
    for s, ids in accts.items():
        # a per-shard source that may go negative
        src = next(x for x in range(900_000, 990_000) if system.shard_map.shard_of(x) == s)
        assert shard_clients[s].create_account(d, account_id=src, currency=CUR, lower_limit=None).code == Code.OK
        for k, a in enumerate(ids):
            d += 2
            assert shard_clients[s].create_account(d, account_id=a, currency=CUR).code == Code.OK
            if k < 2:
                assert shard_clients[s].transfer(d + 1, src, a, 1_000, CUR).code == Code.OK
    m = marker.Client.from_system(local_system.system_path)
    yield system, shard_clients, accts, m
    m.close()
    for c in shard_clients.values():
        c.close()


def balances(shard_clients, system, ids):
    return {a: shard_clients[system.shard_map.shard_of(a)].get_account(a) for a in ids}


def money(shard_clients, system, ids):
    """What a failed workflow must leave unchanged (versions move: a try and its cancel are changes)."""
    keys = ("available", "pending_in", "pending_out", "reserved")
    return {a: {k: acc.get(k) for k in keys} for a, acc in balances(shard_clients, system, ids).items()}


def test_system_file_lists_every_group(local_system):
    system = System.load(local_system.system_path)
    assert sorted(system.shards) == [1, 2] and len(system.markers) == 1
    assert all(len(g.clients) == 3 for g in system.shards.values())
    assert len(system.markers[0].clients) == 3
    assert set(system.shard_map.shards) == {1, 2}


def test_a_shard_refuses_accounts_the_map_gives_another(bank):
    system, sc, accts, _m = bank
    foreign = accts[2][0]
    with pytest.raises(RequestRefused) as info:
        sc[1].create_account(77_001, account_id=foreign, currency=CUR)
    assert info.value.code == ErrorCode.WRONG_SHARD and info.value.shard_epoch == system.shard_map.epoch
    with pytest.raises(RequestRefused) as info:
        sc[1].transfer(77_002, accts[1][0], foreign, 1, CUR)        # the counterparty is elsewhere
    assert info.value.code == ErrorCode.WRONG_SHARD
    assert sc[1].result_of(77_001) is None and sc[1].result_of(77_002) is None    # nothing applied
    ops = R.transfers([77_003], [accts[1][0]], [accts[1][1]], [1], CUR)
    with pytest.raises(RequestRefused) as info:
        sc[1].apply_batch(ops, shard_epoch=system.shard_map.epoch + 1)
    assert info.value.code == ErrorCode.STALE_EPOCH and info.value.shard_epoch == system.shard_map.epoch
    res = sc[1].apply_batch(ops, shard_epoch=system.shard_map.epoch)
    assert int(res["code"][0]) == Code.OK
    st = sc[1].status(0)
    assert st["shard_id"] == 1 and st["shard_epoch"] == 1


def test_cross_shard_transfer_moves_money_once(bank):
    system, sc, accts, m = bank
    a, b = accts[1][0], accts[2][0]
    before = balances(sc, system, [a, b])
    r = m.transfer(1_000_001, a, b, 300, CUR)
    assert r.code == Code.OK and r.ok and not r.duplicate
    again = m.transfer(1_000_001, a, b, 300, CUR)
    assert again.code == Code.OK and again.duplicate
    after = balances(sc, system, [a, b])
    assert after[a]["available"] == before[a]["available"] - 300
    assert after[b]["available"] == before[b]["available"] + 300
    assert not after[a]["pending_out"] and not after[b]["pending_in"]
    wf = m.get_workflow(1_000_001)
    assert wf["state"] == "SUCCEEDED" and wf["code"] == 0
    kinds = [(j["kind"], j["state"]) for j in wf["jobs"]]
    assert kinds.count(("TRY", "DONE")) == 2 and kinds.count(("CONFIRM", "DONE")) == 2
    assert m.get_workflow(999_999_999) is None


def test_a_failed_try_cancels_everything(bank):
    system, sc, accts, m = bank
    a, b = accts[1][1], accts[2][1]
    before = money(sc, system, [a, b])
    r = m.transfer(1_000_002, a, b, 10**9, CUR)                   # more than a holds
    assert r.code == Code.BALANCE_LIMIT_EXCEEDED and r.state == "FAILED"
    r = m.transfer(1_000_003, a, 424_242_424, 1, CUR)             # no such account
    assert r.code == Code.ACCOUNT_NOT_FOUND
    assert money(sc, system, [a, b]) == before


def test_multi_leg_and_saga(bank):
    system, sc, accts, m = bank
    a1, a2 = accts[1][0], accts[1][1]
    b1, b2 = accts[2][0], accts[2][1]
    before = balances(sc, system, [a1, a2, b1, b2])
    r = m.transfer_multi(1_000_010, [(a1, -50, CUR), (a2, -25, CUR), (b1, 40, CUR), (b2, 35, CUR)])
    assert r.code == Code.OK
    after = balances(sc, system, [a1, a2, b1, b2])
    assert [after[x]["available"] - before[x]["available"] for x in (a1, a2, b1, b2)] == [-50, -25, 40, 35]
    with pytest.raises(WorkflowRefused) as info:
        m.transfer_multi(1_000_011, [(a1, -5, CUR), (b1, 4, CUR)])          # not zero-sum
    assert info.value.reason == "INVALID_SPEC"
    # a saga whose second step fails: the first is compensated
    before = money(sc, system, [a1, a2, b1, b2])
    r = m.saga(1_000_012, [transfer_step(a1, a2, 10, CUR), transfer_step(b1, b2, 10**9, CUR)])
    assert r.code == Code.BALANCE_LIMIT_EXCEEDED
    wf = m.get_workflow(1_000_012)
    assert [j["kind"] for j in wf["jobs"] if j["state"] == "DONE"].count("COMPENSATE") == 1
    assert money(sc, system, [a1, a2, b1, b2]) == before


def test_async_client_and_draining(local_system, bank):
    system, sc, accts, m = bank

    async def go():
        async with marker.AsyncClient.from_system(local_system.system_path) as am:
            r = await am.transfer(1_000_020, accts[2][0], accts[1][0], 7, CUR)
            wf = await am.get_workflow(1_000_020)
            return r, wf
    r, wf = asyncio.run(go())
    assert r.code == Code.OK and wf["state"] == "SUCCEEDED"

    async def many():        # concurrent coroutines, no thread each: every one gets its own outcome
        async with marker.AsyncClient.from_system(local_system.system_path) as am:
            return await asyncio.gather(*(am.transfer(1_000_100 + k, accts[2][k % 2], accts[1][k % 2], 1, CUR)
                                          for k in range(40)))
    payers = [accts[2][0], accts[2][1]]
    before = [a["available"] for a in balances(sc, system, payers).values()]
    rs = asyncio.run(many())
    assert [x.code for x in rs] == [Code.OK] * 40 and not any(x.duplicate for x in rs)
    after = [a["available"] for a in balances(sc, system, payers).values()]
    assert [b - a for a, b in zip(after, before)] == [20, 20]
    m.drain(True)
    try:
        with pytest.raises(WorkflowRefused) as info:
            m.transfer(1_000_021, accts[2][0], accts[1][0], 7, CUR)
        assert info.value.reason == "DRAINING"

        async def refused():
            async with marker.AsyncClient.from_system(local_system.system_path) as am:
                await am.transfer(1_000_022, accts[2][0], accts[1][0], 7, CUR)
        with pytest.raises(WorkflowRefused) as info:
            asyncio.run(refused())
        assert info.value.reason == "DRAINING"
        assert m.transfer(1_000_020, accts[2][0], accts[1][0], 7, CUR).duplicate   # known ones still answer
    finally:
        m.drain(False)
    assert m.transfer(1_000_021, accts[2][0], accts[1][0], 7, CUR).code == Code.OK


def test_many_transfers_in_one_request(bank):
    system, sc, accts, m = bank
    a, b = accts[1][0], accts[2][0]
    before = balances(sc, system, [a, b])
    replies = m.transfer_many([(2_000_000 + k, a, b, 1, CUR) for k in range(200)])
    assert len(replies) == 200 and all(r.finished and r.code == 0 for r in replies)
    after = balances(sc, system, [a, b])
    assert after[a]["available"] == before[a]["available"] - 200
    assert after[b]["available"] == before[b]["available"] + 200
    st = m.status()
    assert st["marker"]["in_flight"] == 0 and st["role"] == "leader"


def test_zwallet_up_command(tmp_path):
    """The contract: ``zwallet up --shards S --replicas R --dir D`` writes D/system.toml, prints a line
    with ``ready``, and stops everything on SIGINT."""
    d = tmp_path / "up"
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "up", "--shards", "2", "--replicas", "1",
                             "--dir", str(d), "--base-port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "ready" in line:
                break
        assert any("ready" in ln for ln in lines), "".join(lines)
        system = System.load(str(d / "system.toml"))
        assert sorted(system.shards) == [1, 2] and len(system.markers) == 1
        with marker.Client.from_system(str(d / "system.toml"), timeout_s=10) as m:
            assert m.status()["role"] == "leader"
        assert len(system.extra["gateway"]["clients"]) == 1          # the contract: [gateway] clients = [...]
        import gateway
        with gateway.Client.from_system(str(d / "system.toml")) as g:
            assert g.status()["role"] == "gateway" and g.totals("USD")["available"] == 0
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", str(d)], capture_output=True,
                                               text=True).stdout.split()]
        assert len(pids) >= 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-f", str(d)], capture_output=True, text=True).stdout.split()
        assert not left, f"processes left running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_marker_events_are_gap_free_and_fetchable(local_system, bank):
    from marker.events import MARKER_EVENT_DTYPE, EventKind
    system, sc, accts, m = bank
    head = m.status()["last_seq"]
    with marker.Subscriber.from_system(local_system.system_path, from_seq=max(1, head - 5)) as sub:
        r = m.transfer(1_000_030, accts[1][0], accts[2][0], 3, CUR)
        assert r.code == Code.OK
        got = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            evs = sub.poll(200)
            if evs is not None:
                got.append(evs)
                mine = [e for e in np.concatenate(got) if R.get_u128(e["workflow_id"])[0] == 1_000_030]
                if any(int(e["kind"]) == EventKind.FINISHED for e in mine):
                    break
        evs = np.concatenate(got)
    assert evs.dtype == MARKER_EVENT_DTYPE
    assert evs["seq_num"].tolist() == list(range(max(1, head - 5), int(evs["seq_num"][-1]) + 1))
    kinds = [int(e["kind"]) for e in evs if R.get_u128(e["workflow_id"])[0] == 1_000_030]
    assert kinds[0] == EventKind.CREATED and EventKind.DECIDED in kinds and kinds[-1] == EventKind.FINISHED
    assert kinds.count(EventKind.JOB_DONE) == 4                       # 2 tries, 2 confirms
    fetched = m.events(1, int(evs["seq_num"][-1]))
    assert fetched["seq_num"].tolist() == list(range(1, int(evs["seq_num"][-1]) + 1))
    assert fetched[-len(evs):].tobytes() == evs.tobytes()


def test_a_shard_down_holds_only_its_workflows(local_system, bank):
    """Every replica of shard 2 frozen (SIGSTOP): a workflow touching it waits, one on shard 1 alone
    finishes; once shard 2 is back the waiting one finishes too, exactly once."""
    system, sc, accts, m = bank
    s2 = local_system.shards[2]
    a1, a2, b = accts[1][0], accts[1][1], accts[2][0]
    before = money(sc, system, [a1, a2])
    for i in s2.ids:
        s2.pause(i)
    try:
        import marker.commands as MC
        now = int(time.time() * 1000)
        waiting = m.submit_async([MC.transfer(1_000_040, a1, b, 5, CUR, issued_ms=now, deadline_ms=now + 60_000)],
                                 wait_ms=0).result()[0]
        assert waiting.status == "created"
        r = m.transfer(1_000_041, a1, a2, 4, CUR)                   # both accounts on shard 1
        assert r.code == Code.OK
        time.sleep(0.5)
        assert m.get_workflow(1_000_040)["state"] == "RUNNING"
    finally:
        for i in s2.ids:
            s2.resume(i)
    deadline = time.monotonic() + 30
    while m.get_workflow(1_000_040)["state"] != "SUCCEEDED":
        assert time.monotonic() < deadline, m.get_workflow(1_000_040)
        time.sleep(0.1)
    after = money(sc, system, [a1, a2])
    assert after[a1]["available"] == before[a1]["available"] - 9 and after[a2]["available"] == \
        before[a2]["available"] + 4
