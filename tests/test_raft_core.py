"""Unit tests of the pure Raft core and its wire codec."""
import random

import pytest

from engine.raft import messages as m
from engine.raft.core import ConfigChangeRefused, NotLeader, RaftConfig, RaftCore, Role
from engine.raft.messages import Entry, EntryKind, HardState


def core(node_id=1, members=(1, 2, 3), **kw):
    return RaftCore(node_id, RaftConfig(election_ticks=10, heartbeat_ticks=2), members=list(members),
                    rng=random.Random(node_id), **kw)


def drain(c):
    """Act as a driver: persist everything (in memory) and collect what the core sends."""
    sent = []
    for _ in range(10):
        rd = c.ready()
        if not rd:
            break
        if rd.entries or rd.hard_state is not None or rd.snapshot is not None:
            c.persisted(c.last_index, c.last_term)
        sent.extend(rd.messages)
    return sent


def make_leader(c):
    for _ in range(30):
        c.tick()
    drain(c)
    assert c.role in (Role.PRE_CANDIDATE, Role.CANDIDATE)
    for peer in (2, 3):
        if c.role is Role.PRE_CANDIDATE:
            c.step(m.RequestVoteResponse(peer, c.id, c.term + 1, True, True))
    drain(c)
    for peer in (2, 3):
        if c.role is Role.CANDIDATE:
            c.step(m.RequestVoteResponse(peer, c.id, c.term, True, False))
    assert c.role is Role.LEADER
    return drain(c)


def test_codec_round_trip_with_raw_payload_frames():
    entries = [Entry(3, 10, EntryKind.NORMAL, b"a" * 1000), Entry(3, 11, EntryKind.CONFIG, m.encode_config([1, 2]))]
    msg = m.AppendEntries(1, 2, 3, 9, 2, 8, entries, 5)
    frames = m.encode_frames(msg)
    assert len(frames) == 3 and frames[1] is entries[0].data           # payloads are not copied
    back = m.decode_frames([bytes(f) for f in frames])
    assert [bytes(e.data) for e in back.entries] == [e.data for e in entries]
    assert (back.prev_index, back.commit, back.read_seq) == (9, 8, 5)
    snap = m.InstallSnapshot(1, 2, 3, m.SnapshotMeta(5, 2, [1, 2, 3]), 0, True, b"xyz")
    assert bytes(m.decode_frames(m.encode_frames(snap)).data) == b"xyz"
    for other in (m.RequestVote(1, 2, 5, 4, 3, True), m.TimeoutNow(1, 2, 3), m.ReadIndexRequest(1, 2, 3, b"c")):
        assert m.decode_frames(m.encode_frames(other)) == other


@pytest.mark.parametrize("frames", [
    [], [b"\xff\x00garbage"], [b""],
    None,  # filled below: header announcing 2 entries with 1 frame
])
def test_codec_rejects_malformed_input(frames):
    if frames is None:
        good = m.encode_frames(m.AppendEntries(1, 2, 3, 0, 0, 0, [Entry(1, 1, 0, b"a"), Entry(1, 2, 0, b"b")]))
        frames = good[:2]
    with pytest.raises(ValueError):
        m.decode_frames(frames)


def test_codec_rejects_wrong_payload_size():
    good = m.encode_frames(m.AppendEntries(1, 2, 3, 0, 0, 0, [Entry(1, 1, 0, b"abc")]))
    with pytest.raises(ValueError):
        m.decode_frames([good[0], b"ab"])
    with pytest.raises(ValueError):
        m.decode_frames(m.encode_frames(m.TimeoutNow(1, 2, 3)) + [b"extra"])


def test_core_needs_caller_randomness():
    with pytest.raises(ValueError):
        RaftCore(1, RaftConfig(), members=[1, 2, 3])


def test_config_is_validated():
    with pytest.raises(ValueError):
        RaftConfig(election_ticks=2, heartbeat_ticks=2)
    with pytest.raises(ValueError):
        RaftConfig(max_inflight_appends=0)


def test_vote_is_released_only_after_it_is_persisted():
    c = core(2)
    c.step(m.RequestVote(1, 2, 5, 0, 0, False))
    rd = c.ready()
    assert rd.hard_state == HardState(5, 1, 0)
    assert rd.messages == []                            # not yet durable: the grant is held back
    c.persisted(c.last_index, c.last_term)
    rd = c.ready()
    assert [type(x).__name__ for x in rd.messages] == ["RequestVoteResponse"] and rd.messages[0].granted


def test_follower_ack_waits_for_persistence_and_truncates_conflicts():
    c = core(2, entries=[Entry(1, 1, 0, b"x"), Entry(1, 2, 0, b"old")], hard_state=HardState(1, 0, 1))
    c.step(m.AppendEntries(1, 2, 2, 1, 1, 1, [Entry(2, 2, 0, b"new"), Entry(2, 3, 0, b"n3")]))
    rd = c.ready()
    assert [e.index for e in rd.entries] == [2, 3] and bytes(c.entry(2).data) == b"new"
    assert rd.messages == []
    c.persisted(3, 2)
    msgs = c.ready().messages
    assert msgs[0].success and msgs[0].match_index == 3


def test_fast_backtracking_hint_skips_a_conflicting_term():
    c = core(2, entries=[Entry(1, 1, 0, b""), Entry(2, 2, 0, b""), Entry(2, 3, 0, b""), Entry(2, 4, 0, b"")],
             hard_state=HardState(2, 0, 1))
    c.step(m.AppendEntries(1, 2, 3, 4, 3, 1, []))
    c.persisted(c.last_index, c.last_term)
    resp = next(x for x in drain(c) if isinstance(x, m.AppendEntriesResponse))
    assert not resp.success and resp.hint_index == 2


def test_figure8_only_current_term_entries_commit_by_counting():
    # a leader of term 4 holding an entry of term 2 that a majority now stores must not commit it
    c = core(1, entries=[Entry(1, 1, 0, b"a"), Entry(2, 2, 0, b"b")], hard_state=HardState(3, 0, 1))
    make_leader(c)
    assert c.term == 4 and c.last_index == 3 and c.entry(3).kind == EntryKind.NOOP
    c.step(m.AppendEntriesResponse(2, 1, c.term, True, 2))
    c.step(m.AppendEntriesResponse(3, 1, c.term, True, 2))
    assert c.commit == 1                                # index 2 is on 3 of 3 replicas, still not committed
    c.step(m.AppendEntriesResponse(2, 1, c.term, True, 3))
    assert c.commit == 3                                # committing the NOOP of term 4 commits 2 with it


def test_propose_on_follower_raises_not_leader():
    c = core(2)
    c.step(m.AppendEntries(1, 2, 1, 0, 0, 0, []))
    with pytest.raises(NotLeader) as err:
        c.propose(b"x")
    assert err.value.leader_id == 1


def test_one_config_change_at_a_time():
    c = core(1)
    make_leader(c)
    with pytest.raises(ConfigChangeRefused):
        c.propose_config([1, 2, 3, 4])                  # the NOOP of this term is not committed yet
    c.step(m.AppendEntriesResponse(2, 1, c.term, True, c.last_index))
    c.propose_config([1, 2, 3, 4])
    assert c.voters == [1, 2, 3, 4]
    with pytest.raises(ConfigChangeRefused):
        c.propose_config([1, 2, 3, 4, 5])               # the previous change is not committed
    with pytest.raises(ConfigChangeRefused):
        c.propose_config([1, 2])


def test_stale_term_messages_are_answered_with_the_new_term():
    c = core(2, hard_state=HardState(5, 0, 0))
    c.step(m.AppendEntries(1, 2, 3, 0, 0, 0, []))
    c.persisted(c.last_index, c.last_term)
    out = drain(c)
    assert out and out[0].term == 5 and not out[0].success
