"""End to end on a LocalSystem (engine/devtools/up.py): two shards, the query service it starts, and
query.Client.from_system: balances, history, a hierarchy over accounts of both shards, read-your-writes,
NOT_AVAILABLE, the HTTP API, a kill -9 of the query service and its restart."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

import query
from engine.client import Client as ShardClient
from engine.devtools.up import LocalSystem
from engine.system import System

MERCHANT = 1 << 90


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    s = LocalSystem(str(tmp_path_factory.mktemp("sys")), shards=2, replicas=1, marker=False, gateways=0, sync=False)
    try:
        s.start()
        yield s
    finally:
        s.close()


def _accounts(smap, sid, n, start=1000):
    out = []
    a = start
    while len(out) < n:
        if smap.shard_of(a) == sid:
            out.append(a)
        a += 1
    return out


def test_end_to_end(system):
    doc = System.load(system.system_path)
    assert doc.extra["query"]["clients"] == [system.query_address]
    assert doc.extra["query"]["http"] == f"http://{system.query_http}"
    smap = system.shard_map
    accts = {sid: _accounts(smap, sid, 3) for sid in (1, 2)}
    seqs: dict[int, int] = {}
    did = 1
    for sid in (1, 2):
        with ShardClient(system.shards[sid].client_addresses, keys=system.client_keys) as c:
            for a in accts[sid]:
                assert c.create_account(did, a, "USD", lower_limit=None).ok
                did += 1
            for k in range(20):
                r = c.transfer(did, accts[sid][k % 3], accts[sid][(k + 1) % 3], 10 + k, "USD")
                assert r.ok
                did += 1
                seqs[sid] = r.seq_num
            r = c.reserve(did, accts[sid][0], 77, 5)
            did += 1
            seqs[sid] = r.seq_num
            truth = {a: c.get_account(a) for a in accts[sid]}
            with query.Client.from_system(system.system_path) as q:
                for a in accts[sid]:
                    b = q.balance(a, min_seqs={sid: seqs[sid]}, wait_ms=5000)     # read-your-writes
                    assert b is not None
                    for f in ("account_id", "currency", "available", "reserved", "version"):
                        want = truth[a][f]
                        assert b[f] == want, (f, b[f], want)
                    assert b["state"] == truth[a]["state"].name
    with query.Client.from_system(system.system_path) as q:
        a0 = accts[1][0]
        h = q.history(a0)
        assert [v["seq"] for v in h["versions"]] == sorted((v["seq"] for v in h["versions"]), reverse=True)
        assert h["versions"][0]["kind"] == "RESERVE" and h["versions"][-1]["kind"] == "CREATE_ACCOUNT"
        first = h["versions"][-1]["seq"]
        assert q.balance(a0, at_seq=first)["available"] == 0
        # the hierarchy: a merchant group over one account of each shard
        before = q.hierarchy_balance(MERCHANT, "USD")
        assert before["found"] is False
        assert q.set_parent(accts[1][1], MERCHANT)["leaf"] is True
        q.set_parent(accts[2][1], MERCHANT)
        hb = q.hierarchy_balance(MERCHANT, "USD")
        want = q.balance(accts[1][1])["available"] + q.balance(accts[2][1])["available"]
        assert hb["available"] == want and hb["seqs"][1] >= seqs[1] and hb["seqs"][2] >= seqs[2]
        with pytest.raises(query.QueryRefused):
            q.set_parent(MERCHANT, accts[1][0])                   # an account is never a parent
        with pytest.raises(query.NotAvailable, match="has not reached"):
            q.balance(a0, min_seqs={1: seqs[1] + 10_000}, wait_ms=100)
        # a shard's event records by seq and by time range, as the shard's event stores hold them
        with ShardClient(system.shards[2].client_addresses, keys=system.client_keys) as c:
            want_evs = c.events(1, seqs[2])
        got_evs = q.events(2, last_seq=seqs[2])
        assert (got_evs["records"] == want_evs).all() and got_evs["next_seq"] is None
        t_mid = int(want_evs["timestamp"][len(want_evs) // 2])
        timed = q.events(2, since_ms=t_mid, until_ms=t_mid)["records"]
        assert len(timed) and (timed["timestamp"] == t_mid).all()
        assert (timed == want_evs[want_evs["timestamp"] == t_mid]).all()
        st = q.status()
        assert st["applied"][1] >= seqs[1] and st["error"] is None
        # the HTTP API
        base = doc.extra["query"]["http"]
        got = json.load(urllib.request.urlopen(f"{base}/v1/accounts/{accts[1][1]}", timeout=5))
        assert got["available"] == q.balance(accts[1][1])["available"]
        hist = json.load(urllib.request.urlopen(f"{base}/v1/accounts/{a0}/history?limit=2", timeout=5))
        assert len(hist["versions"]) == 2 and hist["next_last_seq"] is not None
        hh = json.load(urllib.request.urlopen(f"{base}/v1/hierarchy/{MERCHANT}?currency=USD", timeout=5))
        assert hh["available"] == want
        for url, code in ((f"{base}/v1/accounts/424242", 404), (f"{base}/v1/accounts/x", 400),
                          (f"{base}/v1/accounts/{a0}?at_seq=-1", 400), (f"{base}/v1/nowhere", 404),
                          (f"{base}/v1/hierarchy/{MERCHANT}", 400)):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(url, timeout=5)
            assert err.value.code == code, url
            assert "error" in json.load(err.value)
        spec = json.load(urllib.request.urlopen(f"{base}/openapi.json", timeout=5))
        assert "/v1/accounts/{account_id}/history" in spec["paths"]
    # kill -9 of the query service: it resumes from its checkpoint with the same answers
    system.kill_query()
    system.start_query()
    with query.Client.from_system(system.system_path) as q:
        assert q.hierarchy_balance(MERCHANT, "USD", min_seqs=seqs)["available"] == want

    async def aio() -> dict:
        async with query.AsyncClient.from_system(system.system_path) as aq:
            return await aq.balance(accts[2][2], min_seqs={2: seqs[2]})
    assert asyncio.run(aio())["account_id"] == accts[2][2]


def test_kill_9_of_the_query_service_while_a_shard_takes_writes(system):
    import threading
    import time
    smap = system.shard_map
    accts = _accounts(smap, 1, 4, start=50_000)
    last = {"seq": 0}
    with ShardClient(system.shards[1].client_addresses, keys=system.client_keys) as c:
        did = 9_000_000
        for a in accts:
            assert c.create_account(did, a, "EUR", lower_limit=None).ok
            did += 1
        stop = threading.Event()

        def writer() -> None:
            k = did
            while not stop.is_set():
                r = c.transfer(k, accts[k % 4], accts[(k + 1) % 4], 1 + k % 7, "EUR")
                assert r.ok
                last["seq"] = r.seq_num
                k += 1
        th = threading.Thread(target=writer)
        th.start()
        try:
            time.sleep(0.5)
            system.kill_query()                              # kill -9 mid-stream
            at_kill = last["seq"]
            time.sleep(0.3)
            system.start_query()
            time.sleep(0.5)
        finally:
            stop.set()
            th.join(30)
        truth = {a: c.get_account(a) for a in accts}
        evs = c.events(1, last["seq"])
        assert 0 < at_kill < last["seq"]                     # writes before and after the kill
    with query.Client.from_system(system.system_path) as q:
        for a in accts:
            b = q.balance(a, min_seqs={1: last["seq"]}, wait_ms=5000)
            assert (b["available"], b["version"]) == (truth[a]["available"], truth[a]["version"])
            h = q.history(a, limit=10_000)["versions"]
            mine = evs[(evs["account_id"][:, 0] == a) & (evs["account_id"][:, 1] == 0)]
            assert [v["seq"] for v in h] == sorted(set(mine["seq_num"].tolist()), reverse=True)   # once each
