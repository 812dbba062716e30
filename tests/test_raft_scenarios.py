"""Scripted Raft scenarios on the deterministic simulator (engine/raft/sim.py)."""
import pytest

from engine.raft.core import NotLeader, Role
from engine.raft.sim import Cluster, quiet_faults


def cluster(n, seed=7, **faults):
    return Cluster(n, seed, faults=quiet_faults(**faults))


def commit_some(c, count=5, prefix="x"):
    for k in range(count):
        c.run_until_applied(f"{prefix}{k}".encode(), bound=2000)


def isolate(c, node_id, *, only_from=None):
    others = [i for i in c.ids if i != node_id]
    targets = others if only_from is None else only_from
    c.blocked |= {(node_id, o) for o in targets} | {(o, node_id) for o in targets}


def test_partial_partition_prevote_and_check_quorum_keep_the_leader():
    # 5 nodes; one follower loses its link to the leader only. It keeps timing out, but its pre-votes are
    # refused by peers that still hear the leader, so it never bumps the term and never disrupts.
    c = cluster(5)
    leader = c.wait_leader()
    commit_some(c, 3)
    term = leader.core.term
    victim = next(i for i in c.ids if i != leader.id)
    isolate(c, victim, only_from=[leader.id])
    c.run(600)
    assert c.leader() is leader and leader.core.term == term
    assert all(n.core.term == term for n in c.nodes.values())
    assert c.propose(b"after-partition")
    c.run(100)
    assert b"after-partition" in c.acked          # the majority side keeps committing


def test_deposed_leader_cannot_serve_a_stale_read():
    c = cluster(5)
    old = c.wait_leader()
    commit_some(c, 2)
    isolate(c, old.id)
    old.core.read_index(b"stale?")
    c.run(400)                                    # the others elect a new leader and write
    new = c.leader()
    assert new is not None and new is not old and new.core.term > old.core.term
    assert c.propose(b"written-by-new-leader")
    c.run(100)
    assert b"written-by-new-leader" in c.acked
    assert b"stale?" not in [ctx for ctx, _ in c.read_states.get(old.id, [])]   # never confirmed by a quorum
    assert old.core.role is not Role.LEADER       # CheckQuorum made it step down
    with pytest.raises(NotLeader):
        old.core.propose(b"x")


def test_read_index_on_leader_and_forwarded_from_follower():
    c = cluster(3)
    leader = c.wait_leader()
    commit_some(c, 2)
    committed = leader.core.commit
    follower = next(n for n in c.nodes.values() if n is not leader)
    leader.core.read_index(b"L")
    follower.core.read_index(b"F")
    c.run(50)
    assert [ctx for ctx, _ in c.read_states[leader.id]] == [b"L"]
    assert [ctx for ctx, _ in c.read_states[follower.id]] == [b"F"]
    assert all(index >= committed for _, index in c.read_states[leader.id] + c.read_states[follower.id])


def test_crash_between_append_and_fsync_loses_nothing_acknowledged():
    c = cluster(3)
    leader = c.wait_leader()
    commit_some(c, 3)
    followers = [i for i in c.ids if i != leader.id]
    isolate(c, followers[0])                       # only one follower can acknowledge
    c.crash_on_persist.add(followers[1])           # ... and it crashes before its fsync of the next append
    before = leader.core.commit
    c.propose(b"needs-two-durable-copies")
    c.run(100)
    assert not c.nodes[followers[1]].alive
    assert leader.core.commit == before            # the crashed follower never acknowledged: not committed
    assert b"needs-two-durable-copies" not in c.acked
    c.heal()
    c.run_until_applied(b"after-recovery", bound=3000)
    c.check_final()


def test_figure8_scenario_through_elections():
    # the Figure 8 sequence with real elections: an old-term entry on a majority is only committed
    # together with an entry of the new leader's term
    c = cluster(5, seed=3)
    s1 = c.wait_leader()
    commit_some(c, 1)
    others = [i for i in c.ids if i != s1.id]
    # others[0] plays S2 of Figure 8: the only follower that hears S1's next entry
    for o in others[1:]:
        isolate(c, o, only_from=[s1.id])          # S1's next entry reaches S2 only
    c.propose(b"term-a-entry")
    c.run(10)
    entry_index = s1.core.last_index
    c.crash(s1.id)
    c.blocked = set()
    c.run(300)                                     # S3..S5 elect a leader in a later term
    c.restart(s1.id)
    c.run_until_applied(b"new-term-entry", bound=3000)
    c.check_final()
    # whatever happened to the old entry, every replica agrees and nothing acknowledged was lost
    index_of_new = c.acked[b"new-term-entry"]
    assert all(n.sm.applied >= index_of_new for n in c.nodes.values())
    assert entry_index >= 2


def test_add_and_remove_members_under_load_including_the_leader():
    c = cluster(3, seed=11)
    leader = c.wait_leader()
    commit_some(c, 3)
    c.add_node(4)
    leader.core.propose_config([1, 2, 3, 4])
    for k in range(30):
        c.propose(f"load-a{k}".encode())
        c.step(faults=False)
    c.run_until_applied(b"after-add", bound=3000)
    assert c.nodes[4].sm.applied >= c.acked[b"after-add"]
    leader = c.wait_leader()
    leader.core.propose_config([i for i in leader.core.voters if i != leader.id])   # remove the leader
    for k in range(30):
        c.propose(f"load-b{k}".encode())
        c.step(faults=False)
    c.run(200)
    new = c.wait_leader()
    assert new.id != leader.id and leader.id not in new.core.voters and len(new.core.voters) == 3
    c.run_until_applied(b"after-remove", bound=3000)
    for node in c.nodes.values():
        if node.id in new.core.voters:
            assert node.sm.applied >= c.acked[b"after-remove"]
    c.check_final()


def test_lagging_follower_is_brought_back_by_install_snapshot():
    c = cluster(3, seed=5, snapshot_every=20)
    leader = c.wait_leader()
    commit_some(c, 3)
    lagging = next(i for i in c.ids if i != leader.id)
    c.crash(lagging)
    for k in range(150):
        c.propose(f"while-down-{k}".encode())
        c.step(faults=False)
    c.run(50)
    assert leader.core.snap_index > 100            # the log it missed is compacted away
    c.restart(lagging)
    c.run_until_applied(b"caught-up", bound=3000)
    node = c.nodes[lagging]
    assert node.core.snap_index > 0 and node.sm.applied == c.nodes[leader.id].sm.applied
    assert node.sm.digest == c.nodes[leader.id].sm.digest
    c.check_final()


def test_leadership_transfer():
    c = cluster(3, seed=9)
    leader = c.wait_leader()
    commit_some(c, 2)
    target = next(i for i in c.ids if i != leader.id)
    leader.core.transfer_leadership(target)
    with pytest.raises(NotLeader):
        leader.core.propose(b"during transfer")
    for _ in range(200):
        c.step(faults=False)
        if c.leader() is not None and c.leader().id == target:
            break
    assert c.leader().id == target
    c.run_until_applied(b"after-transfer", bound=2000)


@pytest.mark.parametrize("keep, snapshots_expected", [(30, False), (0, True)])
def test_follower_a_few_entries_behind_catches_up_from_entries_kept_below_the_snapshot(keep, snapshots_expected):
    # snapshot_keep entries stay below each snapshot: a follower that missed fewer than that is sent the log,
    # not the whole state (with keep=0, the control, the same follower needs an InstallSnapshot)
    c = cluster(3, seed=5, snapshot_every=20, snapshot_keep=keep)
    leader = c.wait_leader()
    commit_some(c, 3)
    lagging = next(i for i in c.ids if i != leader.id)
    c.crash(lagging)
    behind = c.nodes[lagging].core.last_index
    k = 0
    while leader.core.snap_index <= behind:          # until the leader's snapshot covers what it missed
        c.propose(f"while-down-{k}".encode())
        c.step(faults=False)
        k += 1
    assert leader.core.snap_index - behind <= 20 and k < 40
    c.restart(lagging)
    c.run_until_applied(b"caught-up", bound=3000)
    node = c.nodes[lagging]
    assert node.sm.applied == c.nodes[leader.id].sm.applied and node.sm.digest == c.nodes[leader.id].sm.digest
    assert (c.snapshots_sent > 0) is snapshots_expected
    if not snapshots_expected:
        assert node.core.snapshots_installed == 0
        assert leader.core.log_start < behind < leader.core.snap_index
    c.check_final()


def test_kept_entries_survive_a_restart_of_the_replica_that_kept_them():
    c = cluster(3, seed=6, snapshot_every=20, snapshot_keep=10)
    leader = c.wait_leader()
    commit_some(c, 30)
    node = next(n for n in c.nodes.values() if n is not leader)
    core = node.core
    assert core.snap_index > 0 and core.log_start == core.snap_index - 10
    kept = [(i, core.term_at(i)) for i in range(core.log_start, core.snap_index + 1)]
    c.crash(node.id)
    c.restart(node.id)
    again = c.nodes[node.id].core
    # the store kept the same entries, the base of the log (its term known) included
    assert again.log_start == kept[0][0] and again.snap_index == kept[-1][0]
    assert [(i, again.term_at(i)) for i in range(again.log_start, again.snap_index + 1)] == kept
    c.run_until_applied(b"after-restart", bound=3000)
    c.check_final()
