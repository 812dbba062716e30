"""Point-in-time balances and history from the view equal a replay of the ledger (its accounts right after
each seq, recorded while the workload ran) and its events."""
from __future__ import annotations

import random

import numpy as np
import pytest

from query.hierarchy import Hierarchy
from query.projector import Projector
from query.queries import Queries, QueryError
from tests.query_helpers import chunks_of, random_ledger


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    trace: dict = {}
    led, ids = random_ledger(31, accounts=12, commands=2500, trace=trace)
    p = Projector(str(tmp_path_factory.mktemp("view")), sync=False)
    for c in chunks_of(led.events(1, led.last_seq), random.Random(3), max_seqs=60):
        p.offer(1, c)
    q = Queries(p, Hierarchy(p))
    yield led, ids, trace, q
    p.close()


def _acct_seqs(evs, a):
    m = (evs["account_id"][:, 0] == a) & (evs["account_id"][:, 1] == 0)
    return evs[m]


def _same(b, g):
    assert b is not None
    assert (b["available"], b["reserved"], b["pending_in"], b["pending_out"], b["version"], b["state"],
            b["currency"]) == (g["available"], g["reserved"], sum(g["pending_in"].values()),
                               sum(g["pending_out"].values()), g["version"], g["state"].name, g["currency"])


def test_balance_now_and_at_every_seq_equal_the_replay(world):
    led, ids, trace, q = world
    evs = led.events(1, led.last_seq)
    for a in ids:
        _same(q.balance(a), led.get_account(a))
    checked = 0
    rnd = random.Random(1)
    for a in ids:
        seqs = np.unique(_acct_seqs(evs, a)["seq_num"])
        for s in sorted(rnd.sample(range(1, led.last_seq + 1), 60)):
            before = seqs[seqs <= s]
            b = q.balance(a, at_seq=s)
            if not len(before):
                assert b is None
                continue
            v = int(before[-1])
            assert b["seq"] == v
            if a in trace.get(v, {}):
                _same(b, trace[v][a])
                checked += 1
    assert checked > 300


def test_balance_at_a_time_is_the_last_version_at_or_before_it(world):
    led, ids, trace, q = world
    evs = led.events(1, led.last_seq)
    ts = evs["timestamp"]
    rnd = random.Random(2)
    for a in ids[:6]:
        mine = _acct_seqs(evs, a)
        for t in rnd.sample(range(int(ts[0]) - 2, int(ts[-1]) + 3), 40):
            b = q.balance(a, at_ms=t)
            upto = mine[mine["timestamp"] <= t]
            if not len(upto):
                assert b is None
            else:
                assert b["seq"] == int(upto["seq_num"][-1]) and b["timestamp_ms"] <= t


def test_history_is_the_accounts_events(world):
    led, ids, _trace, q = world
    evs = led.events(1, led.last_seq)
    for a in ids:
        mine = _acct_seqs(evs, a)
        seqs = np.unique(mine["seq_num"])
        h = q.history(a, limit=10_000)
        got = [v["seq"] for v in h["versions"]]
        assert got == sorted(seqs.tolist(), reverse=True) and h["next_last_seq"] is None
        for v in h["versions"][:50]:
            recs = mine[mine["seq_num"] == v["seq"]]
            assert v["amount"] == sum(int(x[0]) - (int(x[1] != 0) << 64) for x in recs["amount"])
            assert v["kind"] == __import__("engine").records.Kind(int(recs["kind"][-1])).name
            assert v["counterparty"] == int(recs["other_id"][-1][0]) | (int(recs["other_id"][-1][1]) << 64)
        # seq and time ranges, and pages that add up to the whole
        lo, hi = int(seqs[len(seqs) // 4]), int(seqs[3 * len(seqs) // 4])
        part = q.history(a, first_seq=lo, last_seq=hi)["versions"]
        assert [v["seq"] for v in part] == [s for s in got if lo <= s <= hi]
        t0, t1 = int(mine["timestamp"][len(mine) // 3]), int(mine["timestamp"][2 * len(mine) // 3])
        timed = q.history(a, since_ms=t0, until_ms=t1)["versions"]
        assert [v["seq"] for v in timed] == [int(s) for s in seqs[::-1]
                                            if t0 <= int(mine["timestamp"][mine["seq_num"] == s][0]) <= t1]
        pages, last = [], None
        while True:
            pg = q.history(a, last_seq=last, limit=7)
            pages += [v["seq"] for v in pg["versions"]]
            if pg["next_last_seq"] is None:
                break
            last = pg["next_last_seq"]
        assert pages == got


def test_many_accounts_at_one_seq_and_refusals(world):
    led, ids, _trace, q = world
    out = q.balances(ids + [999_999])
    assert out["seqs"] == {1: led.last_seq} and out["accounts"][-1] is None
    assert [x["available"] for x in out["accounts"][:-1]] == [led.get_account(a)["available"] for a in ids]
    assert q.balance(424242) is None
    for bad in (dict(account_id=-1), dict(account_id="x"), dict(account_id=1, at_seq=1, at_ms=1),
                dict(account_id=1 << 128)):
        with pytest.raises(QueryError):
            q.balance(**bad)
    with pytest.raises(QueryError):
        q.history(1, limit=10**9)
