"""Hierarchy sums, maintained incrementally, equal brute-force sums over the tree under random tree edits
(add, move, detach) interleaved with the two shards' transfers; as-of-time answers use the tree as it was."""
from __future__ import annotations

import random

import pytest

from query.hierarchy import Hierarchy, HierarchyError
from query.projector import Projector
from query.queries import Queries
from tests.query_helpers import chunks_of, random_ledger

GROUP0 = 1 << 100


def brute(q: Queries, tree_parent: dict[int, int], leaves: set[int], node: int, currency: str) -> list[int]:
    tot = [0, 0, 0, 0]
    for leaf in leaves:
        n = leaf
        while n in tree_parent and n != node:
            n = tree_parent[n]
        if n == node and leaf != node:
            b = q.balance(leaf)
            if b is not None and b["currency"] == currency:
                for i, f in enumerate(("available", "reserved", "pending_in", "pending_out")):
                    tot[i] += b[f]
    return tot


def test_sums_equal_brute_force_under_random_edits_and_transfers(tmp_path):
    led1, ids1 = random_ledger(41, accounts=10, commands=800)
    led2, ids2 = random_ledger(42, accounts=10, commands=800, first_account=101)
    rnd = random.Random(7)
    p = Projector(str(tmp_path / "v"), sync=False)
    h = Hierarchy(p)
    q = Queries(p, h)
    feeds = {1: chunks_of(led1.events(1, led1.last_seq), rnd, 30), 2: chunks_of(led2.events(1, led2.last_seq), rnd, 30)}
    # the accounts must exist in the view before they can be leaves: the creations come first in each stream
    p.offer(1, feeds[1].pop(0))
    p.offer(2, feeds[2].pop(0))
    groups = [GROUP0 + k for k in range(8)]
    accounts = [a for a in ids1 + ids2 if p.table.get(a) is not None]
    parent: dict[int, int] = {}
    leaves: set[int] = set()
    edits = 0
    ts = 10
    snaps: list = []                      # (seqs, sums, tree) at points of the run
    while feeds[1] or feeds[2]:
        for _ in range(rnd.randint(0, 4)):
            ts += 1
            node = rnd.choice(accounts + groups)
            target = rnd.choice(groups + [None])
            try:
                h.set_parent(node, target, ts_ms=ts)
            except HierarchyError:
                continue                                    # a cycle or a self-parent: refused, nothing changed
            edits += 1
            if target is None:
                parent.pop(node, None)
            else:
                parent[node] = target
            if node in accounts:
                leaves.add(node)
        s = rnd.choice([k for k in feeds if feeds[k]])
        p.offer(s, feeds[s].pop(0))
        if rnd.random() < 0.15:
            snaps.append((dict(p.applied), {(g, c): q.hierarchy_balance(g, c) for g in groups for c in ("USD", "EUR")},
                          {n: parent.get(n) for n in accounts + groups}))
        for g in rnd.sample(groups, 3):
            for cur in ("USD", "EUR"):
                got = q.hierarchy_balance(g, cur)
                assert [got[f] for f in ("available", "reserved", "pending_in", "pending_out")] == \
                    brute(q, parent, leaves, g, cur), (g, cur)
                assert got["seqs"] == p.applied
    assert edits > 50
    # the end state against the ledgers themselves
    for g in groups:
        want = sum(led.get_account(a)["available"] for led, ids in ((led1, ids1), (led2, ids2)) for a in ids
                   if a in leaves and led.get_account(a)["currency"] == "USD"
                   and _under(parent, a, g))
        assert q.hierarchy_balance(g, "USD")["available"] == want
    # at given seqs per shard: the balances then over the tree as it is now (brute force from point-in-time)
    assert snaps
    for seqs, _sums, _tree in snaps[:4]:
        for g in groups[:4]:
            got = q.hierarchy_balance(g, "USD", at_seqs=seqs)
            want = [0, 0, 0, 0]
            for a in leaves:
                if _under(parent, a, g):
                    b = q.balance(a, at_seq=seqs.get(1 if a in ids1 else 2, 0))
                    if b is not None and b["currency"] == "USD":
                        for i, f in enumerate(("available", "reserved", "pending_in", "pending_out")):
                            want[i] += b[f]
            assert [got[f] for f in ("available", "reserved", "pending_in", "pending_out")] == want
            assert got["seqs"] == seqs
    for g in groups[:2]:
        now_b = q.hierarchy_balance(g, "EUR")
        assert q.hierarchy_balance(g, "EUR", at_seqs=p.applied)["available"] == now_b["available"]
    # a restart rebuilds the tree from its edit log and the sums from the view
    now = {(g, c): q.hierarchy_balance(g, c) for g in groups for c in ("USD", "EUR")}
    p.close()
    p2 = Projector(str(tmp_path / "v"), sync=False)
    q2 = Queries(p2, Hierarchy(p2))
    assert {(g, c): q2.hierarchy_balance(g, c) for g in groups for c in ("USD", "EUR")} == now
    # as of a time after every edit and event: the same as now (the slow path: the tree and leaves then)
    for g in groups[:3]:
        a = q2.hierarchy_balance(g, "USD", at_ms=10**12)
        assert a["available"] == now[(g, "USD")]["available"]
    p2.close()


def _under(parent: dict[int, int], leaf: int, g: int) -> bool:
    n = leaf
    while n in parent:
        n = parent[n]
        if n == g:
            return True
    return False


def test_tree_as_of_a_time_and_refusals(tmp_path):
    led, ids = random_ledger(43, accounts=4, commands=50)
    p = Projector(str(tmp_path / "v"), sync=False)
    p.offer(1, led.events(1, led.last_seq))
    h = Hierarchy(p)
    q = Queries(p, h)
    merchant, other = GROUP0 + 1, GROUP0 + 2
    h.set_parent(ids[0], merchant, ts_ms=100)
    h.set_parent(ids[1], merchant, ts_ms=200)
    h.set_parent(ids[1], other, ts_ms=300)
    cur = led.get_account(ids[0])["currency"]
    assert h.tree_as_of(150).leaves_under(merchant) == [ids[0]]
    assert sorted(h.tree_as_of(250).leaves_under(merchant)) == sorted(ids[:2])
    assert h.tree_as_of(350).leaves_under(merchant) == [ids[0]]
    assert q.hierarchy_balance(merchant, cur)["available"] == led.get_account(ids[0])["available"]
    with pytest.raises(HierarchyError, match="account"):
        h.set_parent(other, ids[2])                        # an account is never a parent
    h.set_parent(other, other + 10)
    with pytest.raises(HierarchyError, match="cycle"):
        h.set_parent(other + 10, other)
    with pytest.raises(HierarchyError, match="own parent"):
        h.set_parent(merchant, merchant)
    assert q.hierarchy_balance(123, cur)["found"] is False
    p.close()
