"""A cross-shard bank on the whole local system while the Marker leader and the shard leaders are killed
with kill -9 and restarted.

Writers move money between accounts on different shards through the Marker (TCC workflows, some of which
must fail for balance), each workflow id used once and retried with the same id when a call gives up.
When the nemesis is done, every workflow must reach exactly one outcome, and then:
- the total over both shards is what it was (money conserved),
- every account's balance is its start plus exactly the legs of the SUCCEEDED workflows (none lost, none
  applied twice, no failed one half-applied), every acknowledged OK is among them,
- nothing is left pending on any account, nothing in flight in the Marker,
- every replica group converges to one digest.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from engine import Code
from engine.client import Client, ClientError
from engine.devtools.up import LocalSystem
from engine.service.security import client_keys_of_system
from engine.system import System
import marker
from marker.client import WorkflowPending, WorkflowRefused
from tests.node_helpers import find_leader, status_client, wait_converged
from tests.system_helpers import accounts_by_shard

CUR = "USD"
FUNDING = 2_000
PER_SHARD = 8


def _setup(system: System) -> dict[int, list[int]]:
    accts = accounts_by_shard(system, PER_SHARD)
    d = 50_000
    for s, ids in accts.items():
        with Client(list(system.shards[s].clients), keys=client_keys_of_system(system)) as c:
            src = next(x for x in range(700_000, 800_000) if system.shard_map.shard_of(x) == s)
            assert c.create_account(d, account_id=src, currency=CUR, lower_limit=None).code == Code.OK
            for a in ids:
                d += 2
                assert c.create_account(d, account_id=a, currency=CUR).code == Code.OK
                assert c.transfer(d + 1, src, a, FUNDING, CUR).code == Code.OK
    return accts


class _Run:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.attempts: dict[int, tuple[int, int, int]] = {}     # workflow id -> (from, to, amount)
        self.acked: dict[int, Code] = {}                        # workflow id -> code the call returned
        self.pending: set[int] = set()                          # calls that gave up (outcome unknown)
        self.errors: list[str] = []
        self.faults: list[str] = []


def _writer(run: _Run, system_path: str, accts: dict[int, list[int]], k: int) -> None:
    rng = random.Random(1000 + k)
    shards = sorted(accts)
    wid = 10_000_000 * (k + 1)
    with marker.Client.from_system(system_path, timeout_s=8.0) as m:
        while not run.stop.is_set():
            wid += 1
            s1, s2 = rng.sample(shards, 2)
            a, b = rng.choice(accts[s1]), rng.choice(accts[s2])
            amount = rng.randint(1, FUNDING // 3)
            with run.lock:
                run.attempts[wid] = (a, b, amount)
            try:
                r = m.transfer(wid, a, b, amount, CUR)
            except (WorkflowPending, ClientError) as exc:
                if isinstance(exc, WorkflowRefused) and exc.reason == "OVERLOADED":
                    continue
                with run.lock:
                    run.pending.add(wid)
                continue
            except Exception as exc:  # noqa: BLE001 - reported, fails the test
                run.errors.append(f"writer {k}: {type(exc).__name__}: {exc}")
                return
            with run.lock:
                run.acked[wid] = r.code


def _nemesis(run: _Run, ls: LocalSystem) -> None:
    groups = [("marker", ls.marker), ("shard 1", ls.shards[1]), ("shard 2", ls.shards[2]), ("marker", ls.marker)]
    try:
        for name, cluster in groups:
            if run.stop.wait(1.5):
                return
            sc = status_client(cluster)
            try:
                k = find_leader(sc, cluster, timeout_s=20.0)
            finally:
                sc.close()
            node = cluster.ids[k]
            cluster.kill(node)
            run.faults.append(f"kill -9 {name} leader {node}")
            run.stop.wait(1.0)
            cluster.start_replica(node)
    except Exception as exc:  # noqa: BLE001
        run.errors.append(f"nemesis: {type(exc).__name__}: {exc}")


def _outcome(m: Any, wid: int, timeout_s: float = 60.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            wf = m.get_workflow(wid)
        except ClientError:
            wf = {"state": "UNREACHABLE"}
        if wf is None or wf["state"] in ("SUCCEEDED", "FAILED", "STUCK"):
            return wf
        if time.monotonic() > deadline:
            raise AssertionError(f"workflow {wid} did not finish: {wf}")
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_cross_shard_bank_under_leader_kills(tmp_path):
    with LocalSystem(str(tmp_path / "sys"), shards=2, replicas=3) as ls:
        ls.start()
        system = System.load(ls.system_path)
        accts = _setup(system)
        every = [a for ids in accts.values() for a in ids]
        run = _Run()
        writers = [threading.Thread(target=_writer, args=(run, ls.system_path, accts, k), daemon=True)
                   for k in range(4)]
        for t in writers:
            t.start()
        _nemesis(run, ls)
        time.sleep(1.0)
        run.stop.set()
        for t in writers:
            t.join(60)
        assert not run.errors, run.errors
        assert not ls.alive(), ls.alive()

        with marker.Client.from_system(ls.system_path, timeout_s=20.0) as m:
            outcomes = {wid: _outcome(m, wid) for wid in sorted(run.attempts)}
            st = m.status()
        expected = dict.fromkeys(every, FUNDING)
        succeeded = 0
        for wid, wf in outcomes.items():
            acked = run.acked.get(wid)
            if wf is None:
                # never created: only possible for a call that gave up before its SUBMIT was committed
                assert acked is None, (wid, acked)
                continue
            assert wf["state"] in ("SUCCEEDED", "FAILED"), wf
            if acked is not None:
                assert (acked == Code.OK) == (wf["state"] == "SUCCEEDED"), (wid, acked, wf["state"])
            if wf["state"] == "SUCCEEDED":
                a, b, amount = run.attempts[wid]
                expected[a] -= amount
                expected[b] += amount
                succeeded += 1
        assert succeeded >= 10, f"too little work got through: {succeeded} of {len(outcomes)} ({run.faults})"
        assert st["marker"]["in_flight"] == 0 and st["marker"]["stuck"] == 0, st["marker"]
        for s, ids in accts.items():
            cluster = ls.shards[s]
            sc = status_client(cluster)
            try:
                wait_converged(sc, cluster, timeout_s=60)
            finally:
                sc.close()
            with Client(list(system.shards[s].clients), keys=client_keys_of_system(system)) as c:
                for a in ids:
                    acc = c.get_account(a)
                    assert acc is not None
                    assert not acc["pending_in"] and not acc["pending_out"], acc
                    assert acc["available"] == expected[a], (a, acc["available"], expected[a], run.faults)
        assert sum(expected.values()) == FUNDING * len(every)
        sc = status_client(ls.marker)
        try:
            wait_converged(sc, ls.marker, timeout_s=60)
        finally:
            sc.close()
        assert len(run.faults) == 4, run.faults
        print(f"\n{len(outcomes)} workflows: {succeeded} succeeded, {len(run.pending)} calls gave up, "
              f"faults {run.faults}")
