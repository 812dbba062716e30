"""Forged and inconsistent peer messages against the real Raft core, its codec and a running driver: none of
them may crash or corrupt a replica. Each is refused, counted by reason (``RaftCore.rejected``,
``Transport.rejected``, ``RaftDriver.status()['rejected']``), and the replica keeps serving its real leader.

The reproduced attack: a DEALER announcing a peer's routing id sent a follower one AppendEntries of the
current term with prev = commit, one entry repeating index ``commit`` and commit = commit + 1; the follower
died on an assertion in ``_set_commit``. A forged higher-term message forced an election at will."""
from __future__ import annotations

import random
import time

import pytest
import zmq

from engine.raft import core as core_mod
from engine.raft import messages as m
from engine.raft.core import RaftConfig, RaftCore, Role
from engine.raft.messages import Entry, EntryKind, HardState, SnapshotMeta
from tests import test_raft_cluster
from tests.test_raft_core import drain

members = test_raft_cluster.members      # the fixture: three in-process drivers on loopback

pytestmark = pytest.mark.timeout(60)

ELECTION_TICKS = 10


def follower(node_id=2, members=(1, 2, 3), **cfg):
    """A follower of leader 1 in term 2 that holds and has committed entries 1..5."""
    entries = [Entry(1, 1, EntryKind.NOOP, b"")] + [Entry(2, i, EntryKind.NORMAL, b"e%d" % i) for i in range(2, 6)]
    c = RaftCore(node_id, RaftConfig(election_ticks=ELECTION_TICKS, heartbeat_ticks=2, **cfg), members=list(members),
                 rng=random.Random(node_id), hard_state=HardState(2, 0, 3), entries=entries)
    c.step(m.AppendEntries(1, node_id, 2, 5, 2, 5, []))          # leader 1 of term 2 says: commit 5
    drain(c)
    assert (c.role, c.leader_id, c.term, c.commit, c.last_index) == (Role.FOLLOWER, 1, 2, 5, 5)
    return c


def rejected(c):
    return {k: v for k, v in c.rejected.items() if v}


def still_serves(c, leader=1, term=2):
    """The real leader's next append is accepted, acknowledged and committed."""
    before = c.last_index
    c.step(m.AppendEntries(leader, c.id, term, before, c.term_at(before), before + 1,
                           [Entry(term, before + 1, EntryKind.NORMAL, b"real")]))
    acks = [x for x in drain(c) if isinstance(x, m.AppendEntriesResponse)]
    assert acks and acks[-1].success and acks[-1].match_index == before + 1
    assert c.commit == before + 1 and bytes(c.entry(before + 1).data) == b"real"


# --- AppendEntries -----------------------------------------------------------------------------------
def test_the_reproduced_attack_entry_repeating_the_commit_index():
    c = follower()
    forged = m.AppendEntries(1, 2, 2, c.commit, c.term_at(c.commit), c.commit + 1,
                             [Entry(2, c.commit, EntryKind.NORMAL, b"forged")])
    c.step(forged)                                   # used to die on `assert n <= self.last_index`
    assert drain(c) == [] and c.commit == 5 and c.last_index == 5
    assert rejected(c) == {m.ENTRIES_NOT_CONTIGUOUS: 1}
    assert c.last_rejection[0] == m.ENTRIES_NOT_CONTIGUOUS and c.last_rejection[1] == 1
    still_serves(c)
    # and the codec refuses the same message before it reaches a core
    with pytest.raises(m.MessageRejected) as err:
        m.decode_frames(m.encode_frames(forged))
    assert err.value.reason == m.ENTRIES_NOT_CONTIGUOUS


@pytest.mark.parametrize("entries, reason", [
    ([Entry(2, 6, 0, b"a"), Entry(2, 8, 0, b"gap")], m.ENTRIES_NOT_CONTIGUOUS),
    ([Entry(2, 6, 0, b"a"), Entry(2, 6, 0, b"again")], m.ENTRIES_NOT_CONTIGUOUS),
    ([Entry(2, 7, 0, b"skips 6")], m.ENTRIES_NOT_CONTIGUOUS),
    ([Entry(3, 6, 0, b"term above the message's")], m.ENTRY_TERM_INVALID),
    ([Entry(2, 6, 0, b"a"), Entry(1, 7, 0, b"term goes back")], m.ENTRY_TERM_INVALID),
    ([Entry(1, 6, 0, b"below prev_term")], m.ENTRY_TERM_INVALID),
    ([Entry(2, 6, 9, b"unknown kind")], m.ENTRY_KIND_INVALID),
    ([Entry(2, 6, EntryKind.CONFIG, b"\xc1 not a voter list")], m.ENTRY_KIND_INVALID),
    ([Entry(2, 6, EntryKind.CONFIG, m.encode_config([]))], m.ENTRY_KIND_INVALID),
])
def test_bad_entry_runs_are_refused_whole(entries, reason):
    c = follower()
    c.step(m.AppendEntries(1, 2, 2, 5, 2, 7, entries))
    assert drain(c) == [] and c.last_index == 5 and c.commit == 5
    assert rejected(c) == {reason: 1}
    still_serves(c)
    with pytest.raises(m.MessageRejected) as err:
        m.decode_frames(m.encode_frames(m.AppendEntries(1, 2, 2, 5, 2, 7, entries)))
    assert err.value.reason == reason


@pytest.mark.parametrize("fields", [
    {"prev_term": 3},                                      # prev_term above the message term
    {"prev_index": -1}, {"commit": -5}, {"read_seq": -1}, {"prev_index": 1 << 63}, {"src": 0},
])
def test_fields_out_of_range_are_refused(fields):
    c = follower()
    args = {"src": 1, "dst": 2, "term": 2, "prev_index": 5, "prev_term": 2, "commit": 5, "entries": [],
            "read_seq": 0}
    args.update(fields)
    c.step(m.AppendEntries(**args))
    assert drain(c) == [] and sum(c.rejected.values()) == 1
    still_serves(c)


def test_commit_beyond_the_entries_is_clamped_not_asserted():
    c = follower()
    c.step(m.AppendEntries(1, 2, 2, 5, 2, 10**6, [Entry(2, 6, 0, b"a"), Entry(2, 7, 0, b"b")]))
    assert c.commit == 7 and c.last_index == 7 and rejected(c) == {}
    # a heartbeat whose prev is below our commit and whose commit is far ahead: clamped to what we hold
    c.step(m.AppendEntries(1, 2, 2, 3, 2, 10**6, []))
    assert c.commit == 7
    still_serves(c)


def test_two_leaders_in_one_term_are_refused():
    c = follower()
    c.step(m.AppendEntries(3, 2, 2, 5, 2, 6, [Entry(2, 6, 0, b"from a second leader")]))
    c.step(m.InstallSnapshot(3, 2, 2, SnapshotMeta(9, 2, [1, 2, 3]), 0, True, b"snap"))
    assert drain(c) == [] and c.leader_id == 1 and c.last_index == 5 and c.snap_index == 0
    assert rejected(c) == {core_mod.TWO_LEADERS: 2}
    still_serves(c)


def test_a_leader_refuses_another_leader_of_its_own_term():
    c = RaftCore(1, RaftConfig(election_ticks=ELECTION_TICKS, heartbeat_ticks=2), members=[1],
                 rng=random.Random(1))
    for _ in range(3 * ELECTION_TICKS):
        c.tick()
    drain(c)
    assert c.role is Role.LEADER
    c.step(m.AppendEntries(2, 1, c.term, c.last_index, c.last_term, c.last_index, []))
    assert c.role is Role.LEADER and rejected(c) == {core_mod.TWO_LEADERS: 1}


# --- disruptive higher-term messages (leader lease, thesis §4.2.3) -----------------------------------
@pytest.mark.parametrize("force", [False, True])
def test_forged_request_vote_cannot_force_an_election_while_the_leader_is_alive(force):
    c = follower()
    for pre_vote in (True, False):
        c.step(m.RequestVote(3, 2, 9, 100, 8, pre_vote, force))
    assert drain(c) == [] and (c.term, c.vote, c.leader_id) == (2, 0, 1)
    assert rejected(c) == {core_mod.VOTE_IN_LEASE: 2}
    still_serves(c)
    # once the leader has been silent for the minimum election timeout, votes are heard again
    for _ in range(ELECTION_TICKS):
        c.tick()
    c.step(m.RequestVote(3, 2, 9, 100, 8, False, force))
    out = drain(c)
    assert c.term == 9 and c.vote == 3 and any(isinstance(x, m.RequestVoteResponse) and x.granted for x in out)


def test_forged_higher_term_append_cannot_depose_the_leader():
    c = follower()
    c.step(m.AppendEntries(3, 2, 7, 5, 2, 5, []))                     # would adopt 3 as leader of term 7
    c.step(m.InstallSnapshot(3, 2, 7, SnapshotMeta(20, 7, [1, 2, 3]), 0, True, b"x"))
    assert drain(c) == [] and (c.term, c.leader_id) == (2, 1)
    assert rejected(c) == {core_mod.LEADER_IN_LEASE: 2}
    still_serves(c)


def test_timeout_now_only_from_the_leader_of_the_term():
    c = follower()
    c.step(m.TimeoutNow(3, 2, 2))                  # not the leader
    c.step(m.TimeoutNow(1, 2, 5))                  # the leader's id, a term it does not lead
    c.step(m.TimeoutNow(3, 2, 5))
    assert drain(c) == [] and (c.role, c.term) == (Role.FOLLOWER, 2)
    assert rejected(c) == {core_mod.TIMEOUT_NOW_NOT_LEADER: 3}
    c.step(m.TimeoutNow(1, 2, 2))                  # the real one: campaign at once
    assert c.role is Role.CANDIDATE and c.term == 3


def _leader_with_followers(n=3):
    members = list(range(1, n + 1))
    c = RaftCore(1, RaftConfig(election_ticks=ELECTION_TICKS, heartbeat_ticks=2), members=members,
                 rng=random.Random(1))
    for _ in range(3 * ELECTION_TICKS):
        c.tick()
    drain(c)
    for p in members[1:]:
        c.step(m.RequestVoteResponse(p, 1, c.term + 1, True, True))
    drain(c)
    for p in members[1:]:
        c.step(m.RequestVoteResponse(p, 1, c.term, True, False))
    drain(c)
    assert c.role is Role.LEADER
    for p in members[1:]:
        c.step(m.AppendEntriesResponse(p, 1, c.term, True, c.last_index))
    drain(c)
    return c


def test_transfer_is_announced_so_only_the_transferee_may_break_the_lease():
    # follower 2 of leader 1; the leader announces a transfer to 3: 3's forced vote is heard, 4's is not
    c = follower(members=(1, 2, 3, 4, 5))
    c.step(m.AppendEntries(1, 2, 2, 5, 2, 5, [], 0, 3))
    drain(c)
    c.step(m.RequestVote(4, 2, 3, 5, 2, False, True))
    assert c.term == 2 and rejected(c) == {core_mod.VOTE_IN_LEASE: 1}
    c.step(m.RequestVote(3, 2, 3, 5, 2, False, True))
    out = drain(c)
    assert c.term == 3 and c.vote == 3 and any(isinstance(x, m.RequestVoteResponse) and x.granted for x in out)


def test_leader_sends_timeout_now_only_after_a_quorum_heard_of_the_transfer():
    c = _leader_with_followers(5)
    c.transfer_leadership(3)
    out = drain(c)
    announced = [x for x in out if isinstance(x, m.AppendEntries)]
    assert {x.dst for x in announced} == {2, 3, 4, 5} and all(x.transferee == 3 for x in announced)
    assert not any(isinstance(x, m.TimeoutNow) for x in out)
    seq = announced[0].read_seq
    c.step(m.AppendEntriesResponse(3, 1, c.term, True, c.last_index, 0, seq))
    assert not any(isinstance(x, m.TimeoutNow) for x in drain(c))     # 2 of 5 know: not yet
    c.step(m.AppendEntriesResponse(2, 1, c.term, True, c.last_index, 0, seq))
    assert [x.dst for x in drain(c) if isinstance(x, m.TimeoutNow)] == [3]


# --- forged acknowledgements at the leader ---------------------------------------------------------
def test_leader_refuses_acknowledgements_of_what_it_never_sent():
    c = _leader_with_followers()
    commit, last = c.commit, c.last_index
    c.step(m.AppendEntriesResponse(2, 1, c.term, True, last + 1000))
    c.step(m.AppendEntriesResponse(3, 1, c.term, True, last + 1000))
    c.step(m.AppendEntriesResponse(2, 1, c.term, True, last, 0, 99))      # a read round never started
    c.step(m.InstallSnapshotResponse(2, 1, c.term, 500, 0, True))
    assert drain(c) is not None and c.commit == commit and c.role is Role.LEADER
    assert rejected(c) == {core_mod.ACK_BEYOND_LOG: 3, core_mod.READ_SEQ_AHEAD: 1}
    assert c.progress[2].match <= last and c.progress[2].next <= last + 1
    # a rejection naming a longer log never sends probes past the leader's own log
    c.step(m.AppendEntriesResponse(2, 1, c.term, False, last + 50, last + 40))
    for x in drain(c):
        if isinstance(x, m.AppendEntries):
            assert x.prev_index <= last and x.prev_term is not None
    index = c.propose(b"after")
    c.step(m.AppendEntriesResponse(3, 1, c.term, True, index))
    drain(c)
    assert c.commit == index


def test_read_index_response_for_no_forwarded_read_is_refused():
    c = follower()
    c.step(m.ReadIndexResponse(1, 2, 2, b"never asked", 3, True))
    assert c.ready().read_states == [] and rejected(c) == {core_mod.READ_UNKNOWN: 1}
    c.read_index(b"asked")
    drain(c)
    c.step(m.ReadIndexResponse(3, 2, 2, b"asked", 1, True))          # not the leader it went to
    c.step(m.ReadIndexResponse(1, 2, 2, b"asked", 5, True))
    assert c.ready().read_states == [(b"asked", 5)] and rejected(c) == {core_mod.READ_UNKNOWN: 2}


# --- InstallSnapshot ---------------------------------------------------------------------------------
META = SnapshotMeta(50, 2, [1, 2, 3])


def test_oversized_snapshot_is_refused_before_it_is_held():
    c = follower(snapshot_bytes_max=1 << 20)
    c.step(m.InstallSnapshot(1, 2, 2, META, (1 << 20) - 10, False, b"x" * 11))   # claims an offset near the end
    c.step(m.InstallSnapshot(1, 2, 2, META, 0, False, b"a" * 1000))
    c.step(m.InstallSnapshot(1, 2, 2, META, 1000, False, b"b" * (1 << 20)))       # passes the bound
    assert c._incoming_snapshot is None
    assert rejected(c) == {core_mod.SNAPSHOT_TOO_LARGE: 2}
    assert c.snap_index == 0 and c.commit == 5
    still_serves(c)


def test_inconsistent_snapshot_chunks_are_refused_and_restart_the_transfer():
    c = follower()
    c.step(m.InstallSnapshot(1, 2, 2, META, 0, False, b"abc"))
    c.step(m.InstallSnapshot(1, 2, 2, META, 10, False, b"gap"))                   # a hole after byte 3
    c.step(m.InstallSnapshot(1, 2, 2, META, 0, False, b"abc"))
    c.step(m.InstallSnapshot(1, 2, 2, SnapshotMeta(60, 2, [1, 2, 3]), 3, True, b"other snapshot"))
    out = drain(c)
    assert rejected(c) == {core_mod.SNAPSHOT_CHUNK_OUT_OF_ORDER: 2}
    assert [x.next_offset for x in out if isinstance(x, m.InstallSnapshotResponse)] == [3, 0, 3, 0]
    assert c.snap_index == 0 and c.snapshots_installed == 0
    # bad metadata: a snapshot newer than its message's term, or without voters
    c.step(m.InstallSnapshot(1, 2, 2, SnapshotMeta(60, 3, [1, 2, 3]), 0, True, b"x"))
    c.step(m.InstallSnapshot(1, 2, 2, SnapshotMeta(60, 2, []), 0, True, b"x"))
    c.step(m.InstallSnapshot(1, 2, 2, SnapshotMeta(60, 2, [1, 1, 2]), 0, True, b"x"))
    c.step(m.InstallSnapshot(1, 2, 2, META, -3, True, b"x"))
    assert rejected(c)[m.SNAPSHOT_META_INVALID] == 3 and rejected(c)[m.BAD_FIELD] == 1
    # the real transfer still completes
    c.step(m.InstallSnapshot(1, 2, 2, META, 0, False, b"abc"))
    c.step(m.InstallSnapshot(1, 2, 2, META, 3, True, b"def"))
    drain(c)
    assert (c.snap_index, c.commit, bytes(c.snap_data), c.snapshots_installed) == (50, 50, b"abcdef", 1)
    still_serves(c)


# --- the codec: counts and sizes before decoding ------------------------------------------------------
def test_codec_checks_sizes_before_decoding():
    head = m.encode_frames(m.TimeoutNow(1, 2, 3))[0]
    with pytest.raises(m.MessageRejected) as err:
        m.decode_frames([b"\x90" * (m.HEADER_BYTES_MAX + 1)])
    assert err.value.reason == m.OVERSIZED
    with pytest.raises(m.MessageRejected) as err:
        m.decode_frames([head] * (m.FRAMES_MAX + 1))
    assert err.value.reason == m.OVERSIZED
    ae = m.encode_frames(m.AppendEntries(1, 2, 3, 0, 0, 0, [Entry(3, 1, 0, b"x" * 1000)]))
    with pytest.raises(m.MessageRejected) as err:
        m.decode_frames(ae, message_bytes_max=500)
    assert err.value.reason == m.OVERSIZED
    with pytest.raises(m.MessageRejected) as err:
        m.decode_frames([b"\xff\xfe garbage"])
    assert err.value.reason == m.MALFORMED


def test_codec_round_trips_the_transfer_announcement_and_old_peers_default_it():
    msg = m.AppendEntries(1, 2, 3, 0, 0, 0, [], 4, 3)
    assert m.decode_frames(m.encode_frames(msg)).transferee == 3
    # a peer without the field sends one element less: it decodes as "no transfer"
    old = m.msgspec.msgpack.encode(["ae", 1, 2, 3, 0, 0, 0, [], 4])
    assert m.decode_frames([old]).transferee == m.NODE_ID_NONE


# --- over real ZeroMQ: a DEALER that takes a peer's routing id, against running drivers ---------------
def test_forged_messages_over_zeromq_leave_the_follower_serving(members):
    from engine.devtools.counter_app import counter_entry
    from engine.raft.transport import peer_identity
    from tests.test_raft_cluster import WAIT_S, _wait_converged, _wait_leader

    ms = members(sync=False)
    leader = _wait_leader(ms)
    for _k in range(5):
        leader.driver.propose(counter_entry([1])).result(timeout=WAIT_S)
    _wait_converged(ms)
    victim = next(x for x in ms if x is not leader)
    st = victim.driver.status()
    term, commit, lid, vid = st["term"], st["commit"], leader.node_id, victim.node_id
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.setsockopt(zmq.ROUTING_ID, peer_identity(lid))         # ROUTER_HANDOVER: it takes over the leader's
    rogue.connect(victim.peers[vid])
    try:
        forged = [
            # the reproduced attack: one entry repeating index `commit`, commit = commit + 1
            m.AppendEntries(lid, vid, term, commit, term, commit + 1, [Entry(term, commit, 0, b"forged")]),
            m.AppendEntries(lid, vid, term, commit, term, commit + 5,
                            [Entry(term, commit + 1, 0, b"a"), Entry(term, commit + 3, 0, b"gap")]),
            m.RequestVote(lid, vid, term + 5, 10**6, term + 4, False, True),    # force an election
            m.AppendEntries(lid, vid, term + 5, commit, term, commit, []),       # a higher-term heartbeat
            m.TimeoutNow(lid, vid, term + 1),
        ]
        for msg in forged:
            rogue.send_multipart([bytes(f) for f in m.encode_frames(msg)])
        rogue.send_multipart([b"\xff\xfe garbage"])
        want = {m.ENTRIES_NOT_CONTIGUOUS: 2, "vote_in_lease": 1, "leader_in_lease": 1,
                "timeout_now_not_leader": 1, m.MALFORMED: 1}
        deadline = time.monotonic() + WAIT_S
        while True:
            got = victim.driver.status()["rejected"]
            if all(got[k] >= n for k, n in want.items()):
                break
            assert time.monotonic() < deadline, f"rejections not counted: {got}"
            time.sleep(0.02)
    finally:
        rogue.close(linger=0)
        ctx.term()
    assert not victim.driver.failed
    st = victim.driver.status()
    assert st["term"] == term and st["leader"] == lid and st["role"] == "follower"
    assert leader.driver.status()["role"] == "leader"
    # the real leader's connection is back (its DEALER reconnects) and the follower keeps replicating
    for _k in range(5):
        leader.driver.propose(counter_entry([1])).result(timeout=WAIT_S)
    _wait_converged(ms)
    assert victim.sm.counter == leader.sm.counter == 10
    assert victim.driver.status()["term"] == term


