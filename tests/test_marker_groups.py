"""Several Marker groups: rendezvous ownership (marker/groups.py), a group refusing a workflow that is not
its own, draining, and removing a group without any workflow running twice."""
from __future__ import annotations

import dataclasses
import time

import pytest

from engine import Code
from engine.client import Client
from engine.devtools.up import LocalSystem
from engine.system import Group, System
import marker
from marker.client import WorkflowRefused
from marker.groups import GroupMap
from tests.system_helpers import accounts_by_shard

CUR = "USD"


def _groups(*ids, removed=None):
    removed = removed or {}
    return [Group(g, (f"tcp://127.0.0.1:{9000 + g}",), removed_ms=removed.get(g, 0)) for g in ids]


def test_rendezvous_moves_only_the_removed_groups_workflows():
    before = GroupMap(_groups(1, 2, 3))
    after = GroupMap(_groups(1, 2, 3, removed={3: 1_000}))
    owners = {w: before.owner(w) for w in range(1, 3001)}
    assert all(800 < list(owners.values()).count(g) < 1200 for g in (1, 2, 3))
    for w, g in owners.items():
        if g != 3:
            assert after.owner(w) == g                      # untouched by the removal
        else:
            assert after.owner(w) in (1, 2)
            # issued before the removal: may have run in group 3, refused everywhere
            assert "removed" in after.refusal(w, 999, after.owner(w))
            assert after.refusal(w, 1_001, after.owner(w)) is None      # a new one runs
    w1 = next(w for w, g in owners.items() if g == 1)
    assert "belongs to Marker group 1" in before.refusal(w1, 5, 2)
    assert before.refusal(w1, 5, 1) is None
    assert GroupMap(_groups(1)).refusal(w1, 5, 1) is None
    with pytest.raises(ValueError, match="every Marker group is removed"):
        GroupMap(_groups(1, removed={1: 5}))
    with pytest.raises(ValueError, match="distinct"):
        GroupMap(_groups(1, 1))


def test_two_groups_drain_and_remove(tmp_path):
    with LocalSystem(str(tmp_path / "sys"), shards=2, replicas=1, marker_groups=2) as ls:
        ls.start()
        system = System.load(ls.system_path)
        assert [g.id for g in system.markers] == [1, 2]
        accts = accounts_by_shard(system, 1)
        a, b = accts[1][0], accts[2][0]
        with Client(list(system.shards[1].clients), keys=ls.client_keys) as c1, \
                Client(list(system.shards[2].clients), keys=ls.client_keys) as c2:
            assert c1.create_account(1, account_id=a, currency=CUR, lower_limit=None).code == Code.OK
            assert c2.create_account(2, account_id=b, currency=CUR).code == Code.OK
        gmap = GroupMap(system.markers)
        ids = {g: [w for w in range(5_000, 5_400) if gmap.owner(w) == g][:5] for g in (1, 2)}
        with marker.Client.from_system(ls.system_path, timeout_s=15) as m:
            for g in (1, 2):
                for w in ids[g]:
                    assert m.transfer(w, a, b, 1, CUR).code == Code.OK
            for g, idx in ((1, 0), (2, 1)):
                st = m.status(group=idx)
                assert st["marker"]["finished_retained"] == 5, (g, st["marker"])
        # a client that only knows group 2 sends group 1's workflow there: refused, nothing created
        w1 = next(w for w in range(6_000, 6_400) if gmap.owner(w) == 1)
        with marker.Client(list(system.markers[1].clients), timeout_s=10, keys=ls.client_keys) as only2:
            with pytest.raises(WorkflowRefused) as info:
                only2.transfer(w1, a, b, 1, CUR)
            assert info.value.reason == "WRONG_GROUP"
            assert only2.get_workflow(w1) is None
            only2.drain(True)
            w2 = next(w for w in range(6_000, 6_400) if gmap.owner(w) == 2)
            with pytest.raises(WorkflowRefused) as info:
                only2.transfer(w2, a, b, 1, CUR)
            assert info.value.reason == "DRAINING"
            assert only2.status()["marker"]["in_flight"] == 0          # drained: nothing left to finish
        removed_at = int(time.time() * 1000)
        # remove group 2: stop it, mark it removed in system.toml, restart group 1 on the new file
        ls.markers[2].close()
        ls.markers[1].close()
        markers = (system.markers[0], dataclasses.replace(system.markers[1], removed_ms=removed_at))
        dataclasses.replace(system, markers=markers).write(ls.system_path)
        for i in ls.markers[1].ids:
            ls.markers[1].start_replica(i)
        del ls.markers[2]
        ls.wait_leaders()
        time.sleep(0.01)
        with marker.Client.from_system(ls.system_path, timeout_s=15) as m:
            old = ids[2][0]                      # ran in group 2: its retry must not run it again
            with pytest.raises(WorkflowRefused) as info:
                m.transfer(old, a, b, 1, CUR, timestamp=removed_at - 10)
            assert info.value.reason == "EXPIRED"
            fresh = next(w for w in range(7_000, 7_400) if gmap.owner(w) == 2)
            r = m.transfer(fresh, a, b, 1, CUR)          # issued after the removal: runs in group 1
            assert r.code == Code.OK
            assert m.get_workflow(fresh)["state"] == "SUCCEEDED"
        with Client(list(system.shards[2].clients), keys=ls.client_keys) as c2:
            assert c2.get_account(b)["available"] == 11        # 10 transfers before, 1 after, none twice
