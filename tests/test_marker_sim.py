"""Seeded deterministic simulation of the Marker over real embedded shards, in one process.

What runs is the code that ships: MarkerMachine (replicated: the Raft log is the list of committed entries;
a reference replica applies every one of them), the leader's JobDriver, and 2 or 3 ``engine.Ledger`` shards
(accounts placed by ``ShardMap.uniform``). Between driver and shards a simulated network loses, delays,
reorders and duplicates requests and replies; the driver's sends time out. The leader crashes now and then:
its driver and every proposal not yet committed are lost, and the new leader's machine is the same state,
a snapshot restored plus the rest of the log, or the whole log replayed (its digest must equal the
reference's). Clients submit random TCC transfers (cross- and single-shard, some bound to fail for balance,
some with deadlines too short for the network) and sagas (TRANSFER steps, optimistic ones with expected
balances, BATCH_BALANCE steps), re-submit some, and re-submit unacknowledged ones; the Marker drains for a
while and is sometimes overloaded.

Checked: every created workflow finishes exactly once (one CREATED and one FINISHED event, the event seq
gap-free) and none is stuck; every job's recorded result is the shard's original result for its dedup id,
and no dedup id was applied twice by any shard; dedup ids are unique; no account has anything pending at
the end; every account's balance is its initial one plus exactly the legs/steps of the workflows that
SUCCEEDED (a failed one moved nothing), so every currency's total is conserved.

Run more seeds: ``MARKER_SIM_SEEDS=500 pytest tests/test_marker_sim.py``; replay one:
``MARKER_SIM_SEED=17 pytest tests/test_marker_sim.py -s``.
"""
from __future__ import annotations

import heapq
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest

from engine import Ledger
from engine.records import RESULT_DTYPE, Code, Kind, ResultFlag, get_u128
from engine.shard_map import ShardMap
from marker.commands import (
    BatchStep, Drain, Submit, TccSpec, TransferStep, WorkflowSpec, batch_step, bytes_i128, bytes_u128, encode_entry,
    saga_spec, tcc_spec, transfer_step,
)
from marker.events import MARKER_EVENT_DTYPE, EventKind
from marker.job_driver import NOT_REMEMBERED, JobDriver, Send, job_results_command
from marker.workflow import JobKind, JobState, MarkerMachine, WorkflowState

_env_seed = os.environ.get("MARKER_SIM_SEED")
SEEDS = [int(_env_seed)] if _env_seed else list(range(int(os.environ.get("MARKER_SIM_SEEDS", "20"))))
T0 = 1_700_000_000_000
SIM_TIME_MAX_MS = 900_000
WORKFLOWS = 150
CURRENCIES = ("USD", "EUR")
SEND_TIMEOUT_MS = 120
# refusals that apply nothing and are not remembered under the dedup id (ORIGINAL_COMPENSATED: a late original
# after a null compensation, refused every time it arrives)
_NON_REMEMBERED = (int(Code.DEDUP_EXPIRED), int(Code.ISSUED_IN_FUTURE), int(Code.ORIGINAL_COMPENSATED))


@dataclass
class ClientWf:
    spec: WorkflowSpec
    acked: bool = False          # a created / duplicate outcome was seen
    gave_up: str = ""            # refused for good (deadline passed while retrying)
    next_submit_ms: int = 0


@dataclass
class Sim:
    seed: int
    rng: random.Random
    shard_map: ShardMap
    ledgers: dict[int, Ledger]
    accounts: dict[int, tuple[int, str, bool]]                  # id -> (shard, currency, escrow)
    initial: dict[int, int]
    now: int = T0
    log: list[bytes] = field(default_factory=list)
    snapshots: list[tuple[int, bytes]] = field(default_factory=list)
    proposals: list = field(default_factory=list)
    net: list = field(default_factory=list)
    net_n: int = 0
    gen: int = 1
    applied_once: Counter = field(default_factory=Counter)      # dedup id -> non-duplicate, remembered results
    original: dict[int, tuple[int, int]] = field(default_factory=dict)   # dedup id -> (code, seq)
    ref_events: list = field(default_factory=list)
    clients: dict[int, ClientWf] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)


def _accounts_by(sim: Sim, shard: int | None, currency: str, escrow: bool) -> list[int]:
    return [a for a, (s, c, e) in sim.accounts.items()
            if c == currency and e == escrow and (shard is None or s == shard)]


def _setup(seed: int) -> Sim:
    rng = random.Random(seed)
    nshards = rng.choice([2, 3])
    sm = ShardMap.uniform(list(range(nshards)))
    ledgers = {s: Ledger(dedup_retention=1 << 14, event_retention=1 << 12, accounts_max=256) for s in range(nshards)}
    accounts: dict[int, tuple[int, str, bool]] = {}
    want = {(s, c, e): (4 if not e else 1) for s in range(nshards) for c in CURRENCIES for e in (False, True)}
    a = rng.randrange(1, 1 << 100)
    while any(want.values()):
        a += 1
        s = sm.shard_of(a)
        for (ws, c, e), n in want.items():
            if ws == s and n:
                accounts[a] = (s, c, e)
                want[(ws, c, e)] -= 1
                break
    initial: dict[int, int] = {}
    d = 1
    for acct, (s, c, e) in accounts.items():
        assert ledgers[s].create_account(d, acct, c, lower_limit=None if e else 0, timestamp=T0).ok
        amount = 0 if e else rng.randrange(200, 1500)
        if amount:
            assert ledgers[s].batch_balance_operation(d + 1, [(acct, amount, c)], timestamp=T0).ok
        initial[acct] = amount
        d += 2
    return Sim(seed, rng, sm, ledgers, accounts, initial)


def _random_spec(sim: Sim, wid: int) -> WorkflowSpec:
    rng, now = sim.rng, sim.now
    deadline = now + rng.choice([150, 1_500, 30_000, 30_000, 120_000])
    if rng.random() < 0.6:                                              # TCC
        cur = rng.choice(CURRENCIES)
        pool = _accounts_by(sim, None if rng.random() < 0.7 else rng.randrange(len(sim.ledgers)), cur, False)
        n = rng.randint(2, min(4, len(pool)))
        accts = rng.sample(pool, n)
        payers = rng.randint(1, n - 1)
        payees = n - payers
        outs = [rng.randint(1, 700) for _ in range(payers)]
        outs[0] += payees                                       # so every payee gets at least 1
        total = sum(outs)
        cuts = sorted(rng.sample(range(1, total), payees - 1))
        parts = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
        amounts = [-o for o in outs]
        legs = list(zip(accts, amounts + parts, [cur] * n))
        return tcc_spec(wid, legs, issued_ms=now, deadline_ms=deadline)
    steps: list[TransferStep | BatchStep] = []
    for _ in range(rng.randint(1, 3)):
        shard = rng.randrange(len(sim.ledgers))
        cur = rng.choice(CURRENCIES)
        src = rng.choice(_accounts_by(sim, shard, cur, False))
        dst = rng.choice(_accounts_by(sim, shard, cur, True))
        amount = rng.randint(1, 600)
        r = rng.random()
        if r < 0.5:
            steps.append(transfer_step(src, dst, amount, cur))
        elif r < 0.7:
            seen = sim.ledgers[shard].get_account(src)
            assert seen is not None
            steps.append(transfer_step(src, dst, amount, cur, expected_from=seen["available"]))   # optimistic
        else:
            steps.append(batch_step([(src, -amount, cur), (dst, amount, cur)]))
    return saga_spec(wid, steps, issued_ms=now, deadline_ms=deadline)


# ------------------------------------------------------------------------------------------- network
def _net_push(sim: Sim, delay: int, msg: tuple) -> None:
    sim.net_n += 1
    heapq.heappush(sim.net, (sim.now + delay, sim.net_n, msg))


def _delay(rng: random.Random) -> int:
    return rng.randint(1, 30) if rng.random() < 0.9 else rng.randint(100, 400)


def _send_lossy(sim: Sim, msg: tuple) -> None:
    rng = sim.rng
    copies = 0 if rng.random() < 0.1 else (2 if rng.random() < 0.08 else 1)
    for _ in range(copies):
        _net_push(sim, _delay(rng), msg)


def _shard_handle(sim: Sim, gen: int, send: Send) -> None:
    ledger = sim.ledgers[send.shard]
    if send.records is not None:
        res = ledger.apply_batch(send.records, timestamp=sim.now)
        sim.stats["shard_records"] += len(res)
        for r, op in zip(res, send.records):
            if int(op["kind"]) in (Kind.SPEC, Kind.PRECONDITION):
                continue
            d = get_u128(r["dedup_id"])[0]
            code = int(r["code"])
            if not int(r["flags"]) & ResultFlag.DUPLICATE and code not in _NON_REMEMBERED:
                sim.applied_once[d] += 1
                sim.original[d] = (code, int(r["seq_num"]))
            elif int(r["flags"]) & ResultFlag.DUPLICATE:
                sim.stats["shard_duplicates"] += 1
            else:
                sim.stats[f"shard_{Code(code).name}"] += 1
    else:
        assert send.dedup_ids is not None
        res = np.zeros(len(send.dedup_ids), dtype=RESULT_DTYPE)
        for k, d in enumerate(send.dedup_ids):
            got = ledger.result_of(d)
            res[k]["dedup_id"] = (d & (1 << 64) - 1, d >> 64)
            res[k]["code"] = NOT_REMEMBERED if got is None else int(got.code)
            res[k]["seq_num"] = 0 if got is None else got.seq_num
    _send_lossy(sim, ("rep", gen, send.send_id, res))


# ------------------------------------------------------------------------------------- the leader
class Leader:
    def __init__(self, sim: Sim, machine: MarkerMachine) -> None:
        self.machine = machine
        self.driver = JobDriver(machine, send_id_base=sim.gen * 1_000_000_000)


def _new_machine(sim: Sim, inflight_max: int, events: list | None = None) -> MarkerMachine:
    return MarkerMachine(sim.shard_map, event_sink=events.append if events is not None else None,
                         workflows_inflight_max=inflight_max)


def _crash(sim: Sim, leader: Leader, ref: MarkerMachine, inflight_max: int) -> Leader:
    sim.gen += 1
    sim.proposals.clear()
    sim.stats["crashes"] += 1
    leader.driver.close()                                       # the old leader's driver is gone
    mode = sim.rng.choice(["same", "snapshot", "replay"])
    if mode == "same":
        m = leader.machine
    elif mode == "snapshot" and sim.snapshots:
        at, snap = sim.rng.choice(sim.snapshots)
        m = _new_machine(sim, inflight_max)
        m.restore(snap)
        for e in sim.log[at:]:
            m.apply(e)
    else:
        m = _new_machine(sim, inflight_max)
        for e in sim.log:
            m.apply(e)
    assert m.digest() == ref.digest(), f"new leader ({mode}) differs from the reference replica"
    return Leader(sim, m)


def _commit(sim: Sim, leader: Leader, ref: MarkerMachine) -> None:
    entry = encode_entry(sim.proposals, sim.now)
    cmds = list(sim.proposals)
    sim.proposals.clear()
    sim.log.append(entry)
    outs = ref.apply(entry)
    outs_leader = leader.machine.apply(entry)
    assert outs == outs_leader
    assert len(outs) == len(cmds)
    for cmd, out in zip(cmds, outs):
        if not isinstance(cmd, Submit):
            continue
        c = sim.clients[bytes_u128(cmd.spec.workflow_id)]
        if out.status in ("created", "duplicate"):
            sim.stats[f"submit_{out.status}"] += 1
            assert out.workflow_id == bytes_u128(cmd.spec.workflow_id)
            c.acked = True
        else:
            assert out.status == "refused", out
            sim.stats[f"refused_{out.reason}"] += 1
            if out.reason == "INVALID_SPEC":
                assert "deadline" in out.message, out
                if not c.acked:
                    c.gave_up = out.message
            c.next_submit_ms = sim.now + sim.rng.randint(20, 200)
    if len(sim.log) % 25 == 0:
        sim.snapshots.append((len(sim.log), ref.snapshot()))


def run_sim(seed: int) -> Counter:
    sim = _setup(seed)
    rng = sim.rng
    inflight_max = rng.choice([8, 1000])
    ref = _new_machine(sim, inflight_max, sim.ref_events)
    leader = Leader(sim, _new_machine(sim, inflight_max))
    submitted = 0
    drain_until = 0
    last_commit = sim.now
    while True:
        sim.now += rng.randint(1, 8)
        assert sim.now - T0 < SIM_TIME_MAX_MS, f"did not converge: {ref.status()}"
        # clients
        if submitted < WORKFLOWS and rng.random() < 0.15:
            submitted += 1
            wid = rng.randrange(1, 1 << 128)
            c = sim.clients[wid] = ClientWf(_random_spec(sim, wid))
            sim.proposals.append(Submit(c.spec))
        for c in sim.clients.values():
            if not c.acked and not c.gave_up and c.next_submit_ms <= sim.now and rng.random() < 0.3:
                c.next_submit_ms = sim.now + 300                    # re-submit if no answer by then
                sim.proposals.append(Submit(c.spec))
        if sim.clients and rng.random() < 0.01:
            sim.proposals.append(Submit(sim.clients[rng.choice(list(sim.clients))].spec))    # a duplicate
        if not drain_until and submitted > WORKFLOWS // 3 and rng.random() < 0.01:
            sim.proposals.append(Drain(True))
            drain_until = sim.now + rng.randint(50, 500)
        if drain_until and drain_until < sim.now:
            sim.proposals.append(Drain(False))
            drain_until = -1
        # network
        while sim.net and sim.net[0][0] <= sim.now:
            _, _, msg = heapq.heappop(sim.net)
            if msg[0] == "req":
                _shard_handle(sim, msg[1], msg[2])
            elif msg[1] == sim.gen:                                 # a dead leader's replies go nowhere
                if msg[0] == "rep":
                    leader.driver.on_reply(msg[2], msg[3], None, sim.now)
                else:
                    leader.driver.on_reply(msg[2], None, "timeout", sim.now)
        # driver
        for s in leader.driver.poll(sim.now):
            sim.stats["sends"] += 1
            _send_lossy(sim, ("req", sim.gen, s))
            _net_push(sim, SEND_TIMEOUT_MS, ("timeout", sim.gen, s.send_id))
        results = leader.driver.take_results()
        if results:
            sim.proposals.append(job_results_command(results))
        # raft
        if (sim.proposals and rng.random() < 0.6) or sim.now - last_commit > 50:
            _commit(sim, leader, ref)
            last_commit = sim.now
        if rng.random() < 0.002:
            leader = _crash(sim, leader, ref, inflight_max)
        done_clients = all(c.acked or c.gave_up for c in sim.clients.values())
        if submitted == WORKFLOWS and done_clients and not sim.net and ref.status()["in_flight"] == 0:
            break
    _check(sim, ref, leader)
    return sim.stats


def _check(sim: Sim, ref: MarkerMachine, leader: Leader) -> None:
    st = ref.status()
    assert st["stuck"] == 0 and st["stuck_jobs"] == 0 and st["in_flight"] == 0, st
    assert leader.machine.digest() == ref.digest()
    # events: gap-free, one CREATED and one FINISHED per workflow
    evs = np.concatenate([c for chunk in sim.ref_events for c in chunk]) if sim.ref_events else \
        np.zeros(0, MARKER_EVENT_DTYPE)
    assert evs["seq_num"].tolist() == list(range(1, ref.last_seq + 1))
    wids = [lo | (hi << 64) for lo, hi in evs["workflow_id"].tolist()]
    created = Counter(w for w, k in zip(wids, evs["kind"].tolist()) if k == EventKind.CREATED)
    finished = Counter(w for w, k in zip(wids, evs["kind"].tolist()) if k == EventKind.FINISHED)
    assert set(created.values()) <= {1} and created == finished
    # no job applied twice; every job's recorded result is the shard's original one
    assert max(sim.applied_once.values(), default=0) <= 1
    all_dedup: list[int] = []
    expected = dict(sim.initial)
    for wid in created:
        wf = ref.get_workflow(wid)
        assert wf is not None and wf["state"] in ("SUCCEEDED", "FAILED"), wf
        c = sim.clients[wid]
        for j in wf["jobs"]:
            if j["kind"] == JobKind.DECIDE.name:
                continue
            all_dedup.append(j["dedup_id"])
            if j["state"] == JobState.DONE.name:
                assert sim.original.get(j["dedup_id"]) == (j["code"], j["seq"]), (wf, j)
            # a TCC try is abandoned only where the ledger's null cancel makes its late arrival harmless
            assert j["state"] != JobState.ABANDONED.name or c.spec.__class__ is not TccSpec or ref.null_cancel
        sim.stats[wf["state"]] += 1
        sim.stats[f'{wf["kind"]}_{wf["code"]}{"_overdue" if wf["overdue"] else ""}'] += 1
        if wf["state"] == WorkflowState.SUCCEEDED.name:
            spec = c.spec
            if isinstance(spec, TccSpec):
                for a, m, _ in spec.legs:
                    expected[bytes_u128(a)] += bytes_i128(m)
            else:
                for step in spec.steps:
                    if isinstance(step, TransferStep):
                        amt = bytes_i128(step.amount)
                        expected[bytes_u128(step.from_id)] -= amt
                        expected[bytes_u128(step.to_id)] += amt
                    else:
                        for a, m, _ in step.specs:
                            expected[bytes_u128(a)] += bytes_i128(m)
    assert len(all_dedup) == len(set(all_dedup)), "dedup id collision"
    for acct, (s, _cur, _e) in sim.accounts.items():
        got = sim.ledgers[s].get_account(acct)
        assert got is not None
        assert not got["pending_in"] and not got["pending_out"] and not got["reservations"], got
        assert got["available"] == expected[acct], (acct, got["available"], expected[acct])
    for cur in CURRENCIES:
        total = sum(sim.ledgers[s].totals(cur)["available"] for s in sim.ledgers)
        assert total == sum(v for a, v in sim.initial.items() if sim.accounts[a][1] == cur)
    for wid, c in sim.clients.items():
        assert (wid in created) == c.acked or c.gave_up, (wid, c)


@pytest.mark.parametrize("seed", SEEDS)
def test_marker_sim(seed: int) -> None:
    try:
        stats = run_sim(seed)
    except Exception as exc:
        raise AssertionError(f"marker sim failed, replay with MARKER_SIM_SEED={seed}: {exc!r}") from exc
    assert stats["SUCCEEDED"] > 0 and stats["FAILED"] > 0, stats
