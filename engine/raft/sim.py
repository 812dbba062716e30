"""Seeded deterministic simulation of Raft groups: the proof harness of engine/raft/core.py.

A ``Cluster`` runs N ``RaftCore`` replicas over a simulated network that delays, drops, duplicates and
reorders messages and makes symmetric and one-way partitions, with crashes that lose what was not
persisted (including a crash between append and fsync), restarts, pauses and clock drift. Everything comes
from one ``random.Random(seed)``: a seed replays exactly.

After every step it checks: at most one leader per term; commit index never goes back; state machine
safety (no two replicas apply different entries at one index); leader completeness (a new leader holds
every applied entry); log matching (periodically, and at the end); no acknowledged proposal lost. After the
faults heal, the group must commit a new proposal within a bound.

    python -m engine.raft.sim --seeds 10000 --jobs 0      # many seeds on all cores
    python -m engine.raft.sim --seed 1234 -v              # replay one seed
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import os
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from engine.raft.core import NotLeader, RaftConfig, RaftCore, Role
from engine.raft.messages import Entry, EntryKind, HardState, SnapshotMeta


class SafetyViolation(AssertionError):
    pass


class DurableStore:
    """What survives a crash: hard state, the log after the snapshot (and the entries kept below it), the
    snapshot."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.entries: list[Entry] = []
        self.snapshot: tuple[SnapshotMeta, bytes] | None = None

    @property
    def snap_index(self) -> int:
        return self.snapshot[0].index if self.snapshot else 0

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snap_index

    @property
    def last_term(self) -> int:
        if self.entries:
            return self.entries[-1].term
        return self.snapshot[0].term if self.snapshot else 0

    def save(self, hard_state, entries, snapshot, keep_from: int | None = None) -> None:
        if snapshot is not None:
            meta, data = snapshot
            lo = meta.index + 1 if keep_from is None else keep_from     # as the log store's keep_from
            keep = [e for e in self.entries if e.index >= lo]
            match = any(e.index == meta.index and e.term == meta.term for e in self.entries)
            self.entries = keep if match else []
            self.snapshot = (meta, bytes(data))
        if entries:
            lo = entries[0].index
            assert lo <= self.last_index + 1, "gap in the durable log"
            copies = [Entry(e.term, e.index, e.kind, bytes(e.data)) for e in entries]
            if lo == self.last_index + 1:
                self.entries.extend(copies)            # the usual append: no copy of the whole log
            else:
                self.entries = [e for e in self.entries if e.index < lo] + copies
        if hard_state is not None:
            assert hard_state.term >= self.hard_state.term, "durable term went back"
            self.hard_state = hard_state


class StateMachine:
    def __init__(self) -> None:
        self.applied = 0
        self.digest = b""

    def apply(self, e: Entry) -> None:
        assert e.index == self.applied + 1, f"apply gap {self.applied} -> {e.index}"
        self.applied = e.index
        self.digest = hashlib.blake2b(self.digest + bytes(e.data), digest_size=16).digest()

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode([self.applied, self.digest])

    def restore(self, data: bytes) -> None:
        self.applied, self.digest = msgspec.msgpack.decode(data)


@dataclass
class Node:
    id: int
    core: RaftCore
    store: DurableStore
    sm: StateMachine
    tick_every: int
    alive: bool = True
    paused_until: int = 0
    last_commit: int = 0
    was_leader_term: int = -1


@dataclass
class Faults:
    drop: float = 0.02
    duplicate: float = 0.02
    delay_max: int = 8
    crash: float = 0.002
    crash_before_fsync: float = 0.002
    pause: float = 0.002
    partition: float = 0.004
    heal: float = 0.01
    snapshot_every: int = 0       # applied entries between snapshots (0: never)
    snapshot_keep: int = 0        # entries each snapshot keeps below it (driver's snapshot_keep_entries)


class Cluster:
    def __init__(self, n: int, seed: int, *, faults: Faults | None = None, config: RaftConfig | None = None,
                 verbose: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.cfg = config or RaftConfig(election_ticks=10, heartbeat_ticks=2, max_inflight_appends=8,
                                        max_entries_per_append=16, snapshot_chunk_bytes=64,
                                        max_committed_bytes_per_ready=48)
        self.verbose = verbose
        self.now = 0
        self.ids = list(range(1, n + 1))
        self.nodes: dict[int, Node] = {}
        for i in self.ids:
            self.nodes[i] = self._boot(i, DurableStore(), self.ids)
        self.net: list[tuple[int, int, Any]] = []
        self._net_seq = 0
        self.blocked: set[tuple[int, int]] = set()
        self.leaders: dict[int, int] = {}           # term -> leader id
        self.applied_at: dict[int, tuple[int, bytes]] = {}   # index -> (term, data) of the applied entry
        # index -> (term of the leader that committed it, entry term, data)
        self.committed: dict[int, tuple[int, int, bytes]] = {}
        self.proposed: dict[bytes, tuple[int, int]] = {}     # data -> (index, term) at the proposing leader
        self.acked: dict[bytes, int] = {}                    # data -> index: applied at its leader, acknowledged
        self.proposals = 0
        self.steps = 0
        self.events: list[str] = []
        self.crash_on_persist: set[int] = set()     # scripted: crash these at their next persist
        self.read_states: dict[int, list[tuple[bytes, int]]] = {}
        self.snapshots_sent = 0                     # InstallSnapshot messages delivered

    # ------------------------------------------------------------------------------------ nodes
    def _boot(self, i: int, store: DurableStore, members) -> Node:
        meta, data = store.snapshot if store.snapshot else (None, None)
        core = RaftCore(i, self.cfg, hard_state=store.hard_state, snapshot_meta=meta, entries=list(store.entries),
                        members=members, rng=random.Random(self.rng.random()), snapshot_data=data)
        sm = StateMachine()
        if data is not None:
            sm.restore(data)
        return Node(i, core, store, sm, tick_every=self.rng.choice([1, 1, 1, 2]), last_commit=core.commit)

    def log(self, text: str) -> None:
        self.events.append(f"[{self.now}] {text}")
        if self.verbose:
            print(self.events[-1])

    def crash(self, i: int) -> None:
        node = self.nodes[i]
        if node.alive:
            node.alive = False
            self.log(f"crash {i}")

    def restart(self, i: int) -> None:
        old = self.nodes[i]
        if not old.alive:
            self.nodes[i] = self._boot(i, old.store, old.core.voters)
            self.log(f"restart {i}")

    def add_node(self, i: int) -> None:
        """A new, empty server (not yet a voter) that the leader will bring in."""
        self.ids.append(i)
        self.nodes[i] = self._boot(i, DurableStore(), [i])
        self.nodes[i].core._configs = [(0, [])]    # learns its configuration from the leader's log

    def leader(self) -> Node | None:
        best = None
        for node in self.nodes.values():
            if node.alive and node.core.role is Role.LEADER and (best is None or node.core.term > best.core.term):
                best = node
        return best

    # ------------------------------------------------------------------------------------ network
    def _send(self, msg: Any) -> None:
        f = self.faults
        if self.rng.random() < f.drop:
            return
        copies = 2 if self.rng.random() < f.duplicate else 1
        for _ in range(copies):
            self._net_seq += 1
            heapq.heappush(self.net, (self.now + 1 + self.rng.randrange(f.delay_max + 1), self._net_seq, msg))

    def _deliver(self) -> None:
        while self.net and self.net[0][0] <= self.now:
            _, _, msg = heapq.heappop(self.net)
            node = self.nodes.get(msg.dst)
            if node is None or not node.alive or (msg.src, msg.dst) in self.blocked:
                continue
            if node.paused_until > self.now:
                self._net_seq += 1
                heapq.heappush(self.net, (node.paused_until, self._net_seq, msg))
                continue
            if type(msg).__name__ == "InstallSnapshot":
                self.snapshots_sent += 1
            node.core.step(msg)
            self._process(node)

    # ---------------------------------------------------------------------------------- the driver
    def _process(self, node: Node) -> None:
        core = node.core
        for _ in range(100):
            rd = core.ready()
            if not rd:
                break
            # as the real driver does: the released messages first (they never depend on this ready's
            # state, so they go out while it is being persisted), then the persist, which may crash
            for msg in rd.messages:
                self._send(msg)
            if (rd.entries or rd.hard_state is not None) and (
                    node.id in self.crash_on_persist or self.rng.random() < self.faults.crash_before_fsync):
                self.crash_on_persist.discard(node.id)
                self.log(f"crash {node.id} between append and fsync (loses {len(rd.entries)} entries)")
                node.alive = False
                return
            if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
                node.store.save(rd.hard_state, rd.entries, rd.snapshot)
                core.persisted(node.store.last_index, node.store.last_term)
            if rd.snapshot is not None:
                node.sm.restore(rd.snapshot[1])
                assert node.sm.applied == rd.snapshot[0].index
            for e in rd.committed_entries:
                self._apply(node, e)
            for ctx, index in rd.read_states:
                # a linearizable read point must cover every entry committed before the read was asked
                self.read_states.setdefault(node.id, []).append((ctx, index))
        self._check_node(node)
        f = self.faults
        if f.snapshot_every and node.sm.applied - core.snap_index >= f.snapshot_every:
            idx = node.sm.applied
            term = core.term_at(idx)
            assert term is not None
            meta = SnapshotMeta(idx, term, core.config_at(idx))
            data = node.sm.snapshot()
            keep_from = core.keep_floor(idx, f.snapshot_keep) if f.snapshot_keep else None
            node.store.save(None, [], (meta, data), keep_from)
            core.compact(meta, data, keep_from)

    def _apply(self, node: Node, e: Entry) -> None:
        seen = self.applied_at.get(e.index)
        data = bytes(e.data)
        if seen is None:
            self.applied_at[e.index] = (e.term, data)
        elif seen != (e.term, data):
            raise SafetyViolation(f"seed {self.seed}: state machine safety: node {node.id} applied "
                                  f"{(e.term, data)} at {e.index}, another applied {seen}")
        node.sm.apply(e)
        if (e.kind == EntryKind.NORMAL and data in self.proposed and node.core.role is Role.LEADER
                and self.proposed[data] == (e.index, e.term)):
            self.acked[data] = e.index

    def _check_node(self, node: Node) -> None:
        core = node.core
        if core.commit < node.last_commit:
            raise SafetyViolation(f"seed {self.seed}: node {node.id} commit went back "
                                  f"{node.last_commit} -> {core.commit}")
        if core.role is Role.LEADER:
            for i in range(max(node.last_commit, core.snap_index) + 1, core.commit + 1):
                if i not in self.committed:
                    e = core.entry(i)
                    self.committed[i] = (core.term, e.term, bytes(e.data))
        node.last_commit = core.commit
        if core.role is Role.LEADER:
            holder = self.leaders.setdefault(core.term, node.id)
            if holder != node.id:
                raise SafetyViolation(f"seed {self.seed}: two leaders in term {core.term}: {holder} and {node.id}")
            if node.was_leader_term != core.term:
                node.was_leader_term = core.term
                self._check_leader_completeness(node)

    def _check_leader_completeness(self, node: Node) -> None:
        """A leader of term T holds every entry committed by a leader of an earlier term."""
        core = node.core
        for index, (commit_term, term, data) in self.committed.items():
            if index <= core.snap_index or commit_term >= core.term:
                continue
            if index > core.last_index or core.term_at(index) != term or bytes(core.entry(index).data) != data:
                raise SafetyViolation(f"seed {self.seed}: leader completeness: new leader {node.id} (term "
                                      f"{core.term}) lacks applied entry {index}")

    def check_log_matching(self) -> None:
        alive = [n for n in self.nodes.values() if n.alive]
        for a in range(len(alive)):
            for b in range(a + 1, len(alive)):
                x, y = alive[a].core, alive[b].core
                lo = max(x.snap_index, y.snap_index) + 1
                hi = min(x.last_index, y.last_index)
                matched = False
                for i in range(hi, lo - 1, -1):
                    same = x.term_at(i) == y.term_at(i)
                    if matched and not same:
                        raise SafetyViolation(f"seed {self.seed}: log matching broken at {i} between "
                                              f"{alive[a].id} and {alive[b].id}")
                    if same:
                        matched = True
                        if bytes(x.entry(i).data) != bytes(y.entry(i).data):
                            raise SafetyViolation(f"seed {self.seed}: same term, different data at {i}")

    # ------------------------------------------------------------------------------------ steps
    def propose(self, data: bytes | None = None) -> bool:
        node = self.leader()
        if node is None:
            return False
        self.proposals += 1
        data = data or f"p{self.seed}-{self.proposals}".encode()
        try:
            index = node.core.propose(data)
        except NotLeader:
            return False
        self.proposed[data] = (index, node.core.term)
        self._process(node)
        return True

    def step(self, faults: bool = True) -> None:
        self.now += 1
        self.steps += 1
        if faults:
            self._random_fault()
        for node in list(self.nodes.values()):
            if node.alive and node.paused_until <= self.now and self.now % node.tick_every == 0:
                node.core.tick()
                self._process(node)
        self._deliver()
        if self.now % 50 == 0:
            self.check_log_matching()

    def _random_fault(self) -> None:
        f, r = self.faults, self.rng
        down = [i for i, n in self.nodes.items() if not n.alive]
        if r.random() < f.crash and len(down) < (len(self.ids) - 1) // 2:
            self.crash(r.choice(self.ids))
        if down and r.random() < 0.02:
            self.restart(r.choice(down))
        if r.random() < f.pause:
            i = r.choice(self.ids)
            self.nodes[i].paused_until = self.now + r.randrange(5, 60)
            self.log(f"pause {i}")
        if r.random() < f.partition:
            if r.random() < 0.5:
                side = set(r.sample(self.ids, r.randrange(1, len(self.ids))))
                self.blocked = {(a, b) for a in self.ids for b in self.ids if (a in side) != (b in side)}
                self.log(f"partition {sorted(side)} | rest")
            else:
                a, b = r.sample(self.ids, 2)
                self.blocked.add((a, b))
                self.log(f"one-way partition {a} -> {b}")
        if self.blocked and r.random() < f.heal:
            self.blocked = set()
            self.log("heal")

    def heal(self) -> None:
        self.blocked = set()
        for i, node in self.nodes.items():
            if not node.alive:
                self.restart(i)
            node.paused_until = 0

    def run(self, steps: int, faults: bool = False) -> None:
        for _ in range(steps):
            self.step(faults=faults)

    def wait_leader(self, bound: int = 2000) -> Node:
        for _ in range(bound):
            node = self.leader()
            if node is not None and all(n.core.term <= node.core.term for n in self.nodes.values() if n.alive):
                return node
            self.step(faults=False)
        raise SafetyViolation(f"seed {self.seed}: no leader within {bound} steps")

    def run_until_applied(self, data: bytes, bound: int) -> int:
        """Propose ``data`` and step without faults until every live replica applied it; returns steps."""
        start = self.now
        proposed_at = None
        while self.now - start < bound:
            if (proposed_at is None or (data not in self.acked and self.now - proposed_at > 200)) \
                    and self.propose(data):
                proposed_at = self.now
            self.step(faults=False)
            if data in self.acked:
                index = self.acked[data]
                if all(n.sm.applied >= index for n in self.nodes.values() if n.alive and n.id in n.core.voters):
                    return self.now - start
        raise SafetyViolation(f"seed {self.seed}: no progress within {bound} steps after healing")

    def check_final(self) -> None:
        self.check_log_matching()
        for data, index in self.acked.items():
            term_data = self.applied_at.get(index)
            if term_data is None or term_data[1] != data:
                raise SafetyViolation(f"seed {self.seed}: acknowledged proposal {data!r} at {index} lost")
        digests = {n.sm.digest for n in self.nodes.values() if n.alive and n.sm.applied == max(
            x.sm.applied for x in self.nodes.values() if x.alive)}
        if len(digests) != 1:
            raise SafetyViolation(f"seed {self.seed}: replicas at the same applied index differ")


def quiet_faults(**overrides: Any) -> Faults:
    """No random faults (scripted scenarios set them by hand)."""
    base: dict[str, Any] = {"drop": 0.0, "duplicate": 0.0, "delay_max": 2, "crash": 0.0, "crash_before_fsync": 0.0,
                            "pause": 0.0, "partition": 0.0, "heal": 0.0, "snapshot_every": 0}
    base.update(overrides)
    return Faults(**base)


def run_seed(seed: int, *, steps: int = 1500, verbose: bool = False) -> dict:
    """One randomized run: 3 or 5 replicas, faults, then heal and demand progress."""
    rng = random.Random(seed ^ 0x5EED)
    n = rng.choice([3, 3, 5])
    faults = Faults(drop=rng.choice([0.0, 0.02, 0.1]), duplicate=rng.choice([0.0, 0.05]),
                    delay_max=rng.choice([2, 8, 20]), crash=rng.choice([0.0, 0.002, 0.01]),
                    crash_before_fsync=rng.choice([0.0, 0.001]), pause=rng.choice([0.0, 0.003]),
                    partition=rng.choice([0.0, 0.005, 0.02]), heal=rng.choice([0.005, 0.03]),
                    snapshot_every=rng.choice([0, 0, 20, 50]),
                    snapshot_keep=rng.choice([0, 0, 5, 15]))     # drawn last: earlier seeds keep their faults
    c = Cluster(n, seed, faults=faults, verbose=verbose)
    for _ in range(steps):
        if c.rng.random() < 0.3:
            c.propose()
        c.step()
    c.heal()
    c.faults = Faults(drop=0.0, duplicate=0.0, delay_max=2, crash=0, crash_before_fsync=0, pause=0, partition=0,
                      snapshot_every=faults.snapshot_every, snapshot_keep=faults.snapshot_keep)
    took = c.run_until_applied(f"final-{seed}".encode(), bound=3000)
    c.check_final()
    return {"seed": seed, "nodes": n, "steps": c.steps, "acked": len(c.acked), "heal_steps": took}


def leader_cpu_per_entry_us(entries: int = 20000, batch: int = 64, payload_bytes: int = 128) -> float:
    """CPU microseconds the leader's core spends per committed entry in a 3-node group (no faults)."""
    # the simulator's usual limits, but committed entries handed out as a real driver gets them (the
    # simulations' tiny max_committed_bytes_per_ready exists to exercise splitting, not to be measured)
    cfg = RaftConfig(election_ticks=10, heartbeat_ticks=2, max_inflight_appends=8, max_entries_per_append=16,
                     snapshot_chunk_bytes=64)
    c = Cluster(3, 1, faults=Faults(drop=0, duplicate=0, delay_max=1, crash=0, crash_before_fsync=0, pause=0,
                                    partition=0), config=cfg)
    while c.leader() is None:
        c.step(faults=False)
    leader = c.leader()
    assert leader is not None
    payload = b"x" * payload_bytes
    spent = 0.0
    committed0 = leader.core.commit
    while leader.core.commit - committed0 < entries:
        t0 = time.process_time()
        for _ in range(batch):
            leader.core.propose(payload)
        c._process(leader)
        spent += time.process_time() - t0
        for _ in range(2):
            c.now += 1
            while c.net and c.net[0][0] <= c.now:
                _, _, msg = heapq.heappop(c.net)
                node = c.nodes[msg.dst]
                if node is leader:
                    t0 = time.process_time()
                    node.core.step(msg)
                    c._process(node)
                    spent += time.process_time() - t0
                else:
                    node.core.step(msg)
                    c._process(node)
    return spent / (leader.core.commit - committed0) * 1e6


def _run_range(args: tuple[int, int, int]) -> tuple[int, list[str]]:
    lo, hi, steps = args
    failures = []
    for seed in range(lo, hi):
        try:
            run_seed(seed, steps=steps)
        except AssertionError as exc:
            failures.append(f"SEED={seed}: {exc}")
    return hi - lo, failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run seeded Raft simulations.")
    p.add_argument("--seeds", type=int, default=1000)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--seed", type=int, help="replay one seed")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--jobs", type=int, default=1, help="processes (0 = all cores)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.seed is not None:
        print(run_seed(a.seed, steps=a.steps, verbose=a.verbose))
        return 0
    jobs = a.jobs or os.cpu_count() or 1
    chunk = max(1, a.seeds // (jobs * 8))
    ranges = [(s, min(s + chunk, a.first + a.seeds), a.steps) for s in range(a.first, a.first + a.seeds, chunk)]
    t0 = time.time()
    done, failures = 0, []
    results: Iterable[tuple[int, list[str]]]
    if jobs == 1:
        results = map(_run_range, ranges)
    else:
        import multiprocessing
        pool = multiprocessing.Pool(jobs)
        results = pool.imap_unordered(_run_range, ranges)
    for n, fails in results:
        done += n
        failures.extend(fails)
        for f in fails:
            print(f, flush=True)
    print(f"{done} seeds in {time.time() - t0:.1f}s, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())


def leader_cpu_cost_per_entry() -> dict:
    """For bench/bench_raft.py: the leader core's CPU cost per committed entry (batched proposals)."""
    return {"us_per_entry": leader_cpu_per_entry_us(), "group": "3 replicas, 64 proposals per round, 128 B"}
