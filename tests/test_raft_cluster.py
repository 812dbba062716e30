"""Three real replicas (separate processes, LMDB with fsync, ZeroMQ on 127.0.0.1) under client load: kill -9
the leader, a new one is elected and keeps committing, the old one restarts and catches up. At the end every
replica holds the same committed log (byte for byte) and applied the same state (same digest), and every
proposal the cluster acknowledged is in the log at the index it was acknowledged at."""
from __future__ import annotations

import time

import pytest

from engine.devtools.local_raft import ClusterClient, LocalCluster
from engine.raft.log_store import LogStore
from engine.devtools.counter_app import counter_entry

pytestmark = pytest.mark.timeout(120)

WAIT_S = 30.0


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(3, str(tmp_path), tick_ms=10, election_ticks=30, snapshot_threshold=1_000_000,
                     map_size_gib=1)
    try:
        c.start()
        yield c
    finally:
        c.close()          # SIGTERM, then SIGKILL: no process outlives the test


@pytest.fixture
def client(cluster):
    cl = ClusterClient(cluster.client_addr)
    yield cl
    cl.close()


def _tagged(seq: int) -> bytes:
    # one increment of 1, then a unique tag so every acknowledged entry can be found in the logs
    return counter_entry([1]) + b"seq=%08d" % seq


def _run_load(client, acked, seq, seconds, batch=8):
    """Propose batches at the leader for `seconds`; record acknowledged (index -> payload)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if client.leader is None:
            try:
                client.find_leader(timeout_s=5.0)
            except TimeoutError:
                continue
        payloads = [_tagged(seq + k) for k in range(batch)]
        seq += batch
        res = client.propose(payloads, timeout_s=1.0)
        if res is None:
            if client.leader is not None and client.status(client.leader, timeout_s=0.3) is None:
                client.leader = None
            continue
        for (index, _counter), payload in zip(res, payloads):
            assert index not in acked, f"index {index} acknowledged twice"
            acked[index] = payload
    return seq


def test_kill_leader_under_load_then_restart(cluster, client):
    acked: dict[int, bytes] = {}
    leader = client.find_leader(timeout_s=WAIT_S)
    seq = _run_load(client, acked, 0, 2.0)
    before_kill = len(acked)
    assert before_kill > 0

    cluster.kill(leader)                                   # kill -9 under load
    seq = _run_load(client, acked, seq, 3.0)
    new_leader = client.find_leader([n for n in cluster.ids if n != leader], timeout_s=WAIT_S)
    assert new_leader != leader
    assert len(acked) > before_kill, "no commit after the leader was killed"

    cluster.start_replica(leader)                          # the old leader comes back from its LMDB log
    seq = _run_load(client, acked, seq, 2.0)

    # everyone converges on the same applied state
    deadline = time.monotonic() + WAIT_S
    while True:
        sts = {n: client.status(n) for n in cluster.ids}
        if all(st is not None for st in sts.values()):
            commits = {st["commit"] for st in sts.values()}
            applied = {st["applied"] for st in sts.values()}
            digests = {st["digest"] for st in sts.values()}
            if len(commits) == 1 and applied == commits and len(digests) == 1 and max(acked) <= min(commits):
                break
        assert time.monotonic() < deadline, f"replicas did not converge: {sts}"
        time.sleep(0.1)
    final_commit = commits.pop()
    counter = {st["counter"] for st in sts.values()}
    assert len(counter) == 1

    for n in cluster.ids:
        cluster.stop(n)

    logs = {}
    for n in cluster.ids:
        with LogStore(cluster.raft_log_dir(n), map_size_bytes=1 << 30) as store:
            _hs, snap, entries = store.initial_state()
            assert snap is None
            assert store.last_index >= final_commit
            logs[n] = [(e.index, e.term, e.kind, bytes(e.data)) for e in entries[:final_commit]]
            assert len(logs[n]) == final_commit
    first = logs[cluster.ids[0]]
    for n in cluster.ids[1:]:
        assert logs[n] == first, f"replica {n}'s committed log differs"
    by_index = {index: data for index, _term, _kind, data in first}
    lost = [i for i, payload in acked.items() if by_index.get(i) != payload]
    assert not lost, f"acknowledged entries lost or changed at indexes {lost[:10]}"
    # the counter equals the number of committed counter entries (each adds 1)
    assert counter.pop() == sum(1 for d in by_index.values() if d.startswith(b"CTR1"))


# --- in-process drivers (threads): API behaviour that does not need separate processes ---------------------
from engine.raft.driver import DriverConfig, NotLeader, RaftDriver  # noqa: E402 - with the tests that use them
from engine.devtools.local_raft import free_ports  # noqa: E402
from engine.devtools.counter_app import CounterMachine  # noqa: E402


class _Member:
    def __init__(self, node_id, peers, data_dir, **cfg):
        self.sm = CounterMachine()
        self.node_id, self.peers, self.data_dir, self.cfg = node_id, peers, data_dir, cfg
        self.driver = None

    def start(self):
        self.sm = CounterMachine()
        self.driver = RaftDriver(self.node_id, self.peers, self.data_dir, apply=self.sm.apply,
                                 snapshot=self.sm.snapshot, restore=self.sm.restore,
                                 config=DriverConfig(**self.cfg))
        self.driver.start()

    def stop(self):
        if self.driver is not None:
            self.driver.stop()
            self.driver = None


@pytest.fixture
def members(tmp_path):
    ports = free_ports(3)
    peers = {i + 1: f"tcp://127.0.0.1:{p}" for i, p in enumerate(ports)}
    made = []

    def make(**cfg):
        cfg.setdefault("tick_interval_ms", 10)
        cfg.setdefault("election_ticks", 20)
        cfg.setdefault("map_size_bytes", 1 << 28)
        for i in peers:
            made.append(_Member(i, peers, str(tmp_path / f"m{i}"), **cfg))
        for m in made:
            m.start()
        return made
    yield make
    for m in made:
        m.stop()


def _wait_leader(members, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leaders = [m for m in members if m.driver is not None and m.driver.status()["role"] == "leader"]
        if len(leaders) == 1:
            return leaders[0]
        time.sleep(0.02)
    raise AssertionError("no single leader")


def _wait_converged(members, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sts = [m.driver.status() for m in members]
        if len({s["applied"] for s in sts}) == 1 and len({m.sm.digest for m in members}) == 1 \
                and sts[0]["applied"] == sts[0]["commit"]:
            return
        time.sleep(0.02)
    raise AssertionError(f"did not converge: {[m.driver.status() for m in members]}")


def test_driver_propose_read_and_redirect(members):
    ms = members()
    leader = _wait_leader(ms)
    futures = [leader.driver.propose(counter_entry([k])) for k in range(1, 201)]
    results = [f.result(timeout=WAIT_S) for f in futures]
    indexes = [r[0] for r in results]
    assert indexes == sorted(indexes) and len(set(indexes)) == 200
    assert results[-1][1] == sum(range(1, 201))                      # the counter after the last one
    follower = next(m for m in ms if m is not leader)
    with pytest.raises(NotLeader) as info:
        follower.driver.propose(counter_entry([1])).result(timeout=WAIT_S)
    assert info.value.leader_id == leader.node_id and info.value.address == leader.peers[leader.node_id]
    read_at = leader.driver.read_index().result(timeout=WAIT_S)
    assert read_at >= indexes[-1]
    assert leader.sm.applied >= read_at
    st = leader.driver.status()
    assert st["role"] == "leader" and st["leader"] == leader.node_id and st["commit"] >= indexes[-1]
    _wait_converged(ms)


def test_driver_snapshot_compaction_and_catch_up(members):
    ms = members(snapshot_threshold_entries=100, snapshot_keep_entries=10)
    leader = _wait_leader(ms)
    lagging = next(m for m in ms if m is not leader)
    lagging.stop()
    for _ in range(5):
        futures = [leader.driver.propose(counter_entry([1])) for _ in range(100)]
        for f in futures:
            f.result(timeout=WAIT_S)
    assert leader.driver.status()["snapshot_index"] >= 100
    lagging.start()                       # far behind the leader's compacted log: needs InstallSnapshot
    _wait_converged(ms)
    assert lagging.sm.counter == leader.sm.counter == 500
    # a restart recovers from the replica's own snapshot + log
    lagging.stop()
    lagging.start()
    _wait_converged(ms)
    assert lagging.sm.counter == 500


def test_driver_follower_a_few_entries_behind_catches_up_from_the_log(members):
    # snapshot_keep_entries=70 with snapshots 50-100 entries apart: a follower that missed 40 entries is
    # behind the leader's next snapshot, yet within what it keeps below it, so it is sent the log
    ms = members(snapshot_threshold_entries=100, snapshot_keep_entries=70, leader_snapshot_defer=1, sync=False)
    leader = _wait_leader(ms)
    lagging = next(m for m in ms if m is not leader)

    def propose_until_snapshot():
        first = leader.driver.status()["snapshot_index"]
        for _ in range(150):
            leader.driver.propose(counter_entry([1])).result(timeout=WAIT_S)
            if leader.driver.status()["snapshot_index"] != first:
                return leader.driver.status()["snapshot_index"]
        raise AssertionError("the leader took no snapshot")

    propose_until_snapshot()
    for _ in range(40):
        leader.driver.propose(counter_entry([1])).result(timeout=WAIT_S)
    _wait_converged(ms)
    missed_from = lagging.driver.status()["applied"]
    lagging.stop()
    snapshot_at = propose_until_snapshot()
    assert snapshot_at > missed_from                       # its snapshot covers entries the follower lacks
    assert leader.driver.status()["log_store"]["first_index"] <= missed_from
    lagging.start()
    _wait_converged(ms)
    assert lagging.sm.counter == leader.sm.counter
    assert lagging.driver.status()["snapshots_installed"] == 0


def test_driver_leadership_transfer(members):
    ms = members()
    leader = _wait_leader(ms)
    target = next(m for m in ms if m is not leader)
    leader.driver.propose(counter_entry([1])).result(timeout=WAIT_S)
    leader.driver.transfer_leadership(target.node_id).result(timeout=WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while target.driver.status()["role"] != "leader":
        assert time.monotonic() < deadline, "transfer did not happen"
        time.sleep(0.02)
    assert target.driver.propose(counter_entry([2])).result(timeout=WAIT_S)[1] == 3
