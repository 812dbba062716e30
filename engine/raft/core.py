"""The Raft core: pure (no sockets, no disk, no clock, no randomness of its own).

One ``RaftCore`` per replica. Inputs: ``step(msg)``, ``tick()``, ``propose(data)``, ``propose_config(voters)``,
``transfer_leadership(target)``, ``read_index(ctx)``, ``persisted(index, term)`` and ``compact(meta, data)``.
Randomness arrives as an input too: the caller passes a ``random.Random`` it owns (seeded in tests).

Output: ``ready()`` returns a ``Ready`` of everything produced since the last call, to be handled in this
order (the driver and the simulator do exactly this):

1. persist ``snapshot`` (if any), ``entries`` and ``hard_state`` durably, in one write. ``entries`` may start
   at or below the last index handed out before: the store drops the conflicting suffix first;
2. call ``persisted(last_index, last_term)``;
3. send ``messages``. Only messages that are safe are included: anything generated while state it depends
   on (a vote, a term, appended entries) was not yet durable is held back and released by a later
   ``ready()`` once ``persisted`` confirmed it. This is persist-before-acknowledge;
4. install ``snapshot`` into the state machine, then apply ``committed_entries`` in order;
5. serve each ``read_states`` (ctx, index) once the state machine has applied ``index``.

Invariants are asserted where they are assumed: the commit index never decreases, appended logs are
contiguous, a committed entry is never truncated, one vote per term.

Peers are not trusted (the assertions guard only this replica's own state): ``step`` drops, and counts in
``rejected`` (one counter per reason; ``last_rejection`` holds the latest detail), every message that
breaks the protocol: the field checks of ``messages.message_fault`` and those that need this replica's
state (two leaders in one term, acknowledgements of entries never sent, snapshot chunks too large or out
of order, disruptive higher-term messages while a leader is alive). The core reads no clock, so it does
not log: the driver reports ``rejected`` at a bounded rate. Reasons and rules: docs/raft.md.

The log held in memory starts after ``log_start`` (whose term, ``log_start_term``, is kept): normally the
snapshot's index, lower when ``compact`` kept entries below the snapshot for followers a little behind,
which then catch up from the log instead of by InstallSnapshot.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.raft import messages as m
from engine.raft.messages import Entry, EntryKind, HardState, SnapshotMeta

NONE = m.NODE_ID_NONE

# --- named limits -----------------------------------------------------------------------------------
READS_PENDING_MAX = 1 << 16          # ReadIndex rounds a leader holds for its followers (each driver holds
                                     # at most driver.PENDING_READS_MAX of its own)
READS_FORWARDED_MAX = 1 << 16        # reads a follower forwarded and awaits an answer for (oldest forgotten)

# --- reasons a peer's message is rejected, besides messages.FAULT_REASONS ----------------------------
VOTE_IN_LEASE = "vote_in_lease"                    # a higher-term RequestVote/PreVote while a leader is alive
LEADER_IN_LEASE = "leader_in_lease"                # a higher-term AppendEntries/InstallSnapshot while this
                                                   # follower hears from the leader of its term
TIMEOUT_NOW_NOT_LEADER = "timeout_now_not_leader"  # TimeoutNow from anyone but the leader of this term
TWO_LEADERS = "two_leaders"                        # a second, different leader for one term
SNAPSHOT_TOO_LARGE = "snapshot_too_large"          # an incoming snapshot past cfg.snapshot_bytes_max
SNAPSHOT_CHUNK_OUT_OF_ORDER = "snapshot_chunk_out_of_order"   # a gap, or another snapshot's chunk mid-way
ACK_BEYOND_LOG = "ack_beyond_log"                  # a follower acknowledges entries or a snapshot never sent
READ_SEQ_AHEAD = "read_seq_ahead"                  # a follower confirms a ReadIndex round not yet started
READ_UNKNOWN = "read_unknown"                      # a ReadIndexResponse for no read this replica forwarded
READS_FULL = "reads_full"                          # READS_PENDING_MAX follower reads are waiting already
REJECT_REASONS = m.FAULT_REASONS + (
    VOTE_IN_LEASE, LEADER_IN_LEASE, TIMEOUT_NOW_NOT_LEADER, TWO_LEADERS, SNAPSHOT_TOO_LARGE,
    SNAPSHOT_CHUNK_OUT_OF_ORDER, ACK_BEYOND_LOG, READ_SEQ_AHEAD, READ_UNKNOWN, READS_FULL)


class Role(Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class NotLeader(Exception):
    def __init__(self, leader_id: int | None):
        super().__init__(f"not the leader (leader: {leader_id})")
        self.leader_id = leader_id


class ConfigChangeRefused(Exception):
    pass


@dataclass
class RaftConfig:
    election_ticks: int = 10            # randomized in [election_ticks, 2 * election_ticks)
    heartbeat_ticks: int = 2
    max_inflight_appends: int = 64      # un-acknowledged appends per follower (pipelining)
    max_entries_per_append: int = 256
    max_bytes_per_append: int = 4 << 20
    max_committed_per_ready: int = 4096
    max_committed_bytes_per_ready: int = 8 << 20   # at least one entry; bounds one apply call's work
    snapshot_chunk_bytes: int = 1 << 20
    snapshot_bytes_max: int = 4 << 30   # an incoming snapshot larger than this is refused (it is held in
                                        # memory while it arrives); must exceed every snapshot the group makes
    pre_vote: bool = True
    check_quorum: bool = True           # also the leader lease that makes followers ignore disruptive peers

    def __post_init__(self) -> None:
        if not (1 <= self.heartbeat_ticks < self.election_ticks):
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
        for name in ("max_inflight_appends", "max_entries_per_append", "max_bytes_per_append",
                     "max_committed_per_ready", "max_committed_bytes_per_ready", "snapshot_chunk_bytes",
                     "snapshot_bytes_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


Config = RaftConfig


@dataclass
class Ready:
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: tuple[SnapshotMeta, bytes] | None = None
    messages: list[Any] = field(default_factory=list)
    committed_entries: list[Entry] = field(default_factory=list)
    read_states: list[tuple[bytes, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.hard_state is not None or self.entries or self.snapshot is not None or self.messages
                    or self.committed_entries or self.read_states)


@dataclass
class _Progress:
    match: int = 0
    next: int = 1
    inflight: int = 0
    probing: bool = True          # waiting for a response before sending more
    active: bool = False          # heard from since the last CheckQuorum round
    snapshot_offset: int = -1     # >= 0 while an InstallSnapshot is in progress
    read_seq: int = 0             # highest ReadIndex round it acknowledged
    acked: bool = False           # an append was acknowledged since the last heartbeat
    stalled: int = 0              # heartbeats in a row with appends outstanding and no acknowledgement


@dataclass
class _Read:
    ctx: bytes
    index: int
    seq: int
    requester: int
    acks: set[int] = field(default_factory=set)


class RaftCore:
    def __init__(self, node_id: int, config: RaftConfig, *, hard_state: HardState | None = None,
                 snapshot_meta: SnapshotMeta | None = None, entries: Sequence[Entry] = (),
                 members: Sequence[int] = (), rng: random.Random | None = None,
                 snapshot_data: bytes | None = None) -> None:
        assert node_id != NONE
        if rng is None:
            raise ValueError("RaftCore needs the caller's random.Random (the core has no randomness of its own)")
        self.id = node_id
        self.cfg = config
        self.rng = rng
        hs = hard_state or HardState()
        self.term = hs.term
        self.vote = hs.vote if hs.vote is not None else NONE
        self.snap_index = snapshot_meta.index if snapshot_meta else 0
        self.snap_term = snapshot_meta.term if snapshot_meta else 0
        self.snap_data: bytes | None = snapshot_data
        log = list(entries)
        for a, b in itertools.pairwise(log):
            assert b.index == a.index + 1, "log not contiguous"
        self.log_start, self.log_start_term = self.snap_index, self.snap_term
        if log and log[0].index <= self.snap_index:
            # entries kept below the snapshot (compact's keep_from): the first one is the base
            at = self.snap_index - log[0].index
            assert at < len(log) and log[at].term == self.snap_term, "kept entries do not reach the snapshot"
            self.log_start, self.log_start_term = log[0].index, log[0].term
            log = log[1:]
        assert not log or log[0].index == self.log_start + 1, "log does not follow the snapshot"
        self.log: list[Entry] = log
        self.commit = max(hs.commit, self.snap_index)
        assert self.commit <= self.last_index
        self.handed = self.snap_index        # last index handed out in committed_entries
        # configuration: the latest CONFIG entry in the log wins, else the snapshot's, else `members`
        self._configs: list[tuple[int, list[int]]] = [
            (self.snap_index, sorted(snapshot_meta.config) if snapshot_meta and snapshot_meta.config
             else sorted(set(members) or {node_id}))]
        for e in self.log:
            if e.kind == EntryKind.CONFIG and e.index > self.snap_index:
                self._configs.append((e.index, m.decode_config(e.data)))
        self.role = Role.FOLLOWER
        self.leader_id: int | None = None
        self.elapsed = 0
        self.timeout = self._random_timeout()
        self.heartbeat_elapsed = 0
        self.votes: dict[int, bool] = {}
        self.progress: dict[int, _Progress] = {}
        self.transferee: int | None = None
        self.transfer_elapsed = 0
        self._transfer_seq = 0                        # the ReadIndex round that announced the transfer
        self._timeout_now_sent = False
        self._term_leader = NONE                      # the leader of self.term, once heard from (or self)
        self._transfer_hint: int | None = None        # the transferee the leader of self.term announced
        # peer messages refused (REJECT_REASONS; fixed keys, so another thread may copy it safely)
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.rejections = 0                           # their sum
        self.last_rejection: tuple[str, int, str] | None = None   # (reason, sender, detail) of the latest
        self.snapshots_installed = 0                  # snapshots received from a leader and installed
        # persistence bookkeeping
        self.durable_index = self.last_index          # what is on disk: everything we were built from
        self.unstable_from = self.last_index + 1      # first entry not yet handed out for persisting
        self._hs_handed = HardState(self.term, self.vote, self.commit)
        self._dirty_seq = 0                           # bumps whenever state that messages depend on changes
        self._handed_seq = 0                          # seq covered by the last ready() handout
        self._durable_seq = 0                         # seq confirmed by persisted()
        self._held: list[tuple[int, Any]] = []        # (seq it needs durable, message)
        self._awaiting_persist = False                # a ready() handed out state not yet persisted
        self._pending_snapshot: tuple[SnapshotMeta, bytes] | None = None
        self._incoming_snapshot: bytearray | None = None
        self._incoming_meta: SnapshotMeta | None = None
        self._read_states: list[tuple[bytes, int]] = []
        self._reads: list[_Read] = []
        self._read_seq = 0
        self._reads_before_commit: list[tuple[bytes, int]] = []
        self._forwarded_reads: dict[bytes, int] = {}  # ctx -> the leader it was forwarded to

    # ----------------------------------------------------------------------------------- log access
    @property
    def last_index(self) -> int:
        return self.log[-1].index if self.log else self.log_start

    @property
    def last_term(self) -> int:
        return self.log[-1].term if self.log else self.log_start_term

    @property
    def commit_index(self) -> int:
        return self.commit

    @property
    def voters(self) -> list[int]:
        return self._configs[-1][1]

    def config_at(self, index: int) -> list[int]:
        cfg = self._configs[0][1]
        for at, voters in self._configs:
            if at <= index:
                cfg = voters
        return list(cfg)

    def term_at(self, index: int) -> int | None:
        if index == self.log_start:
            return self.log_start_term
        if index < self.log_start or index > self.last_index:
            return None
        return self.log[index - self.log_start - 1].term

    def _term(self, index: int) -> int:
        """term_at for an index this replica holds (its own invariant)."""
        t = self.term_at(index)
        assert t is not None, f"no term at {index} (log ({self.log_start}, {self.last_index}])"
        return t

    def entry(self, index: int) -> Entry:
        return self.log[index - self.log_start - 1]

    def _quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def _random_timeout(self) -> int:
        return self.cfg.election_ticks + self.rng.randrange(self.cfg.election_ticks)

    def _reject(self, reason: str, src: int, detail: str) -> None:
        self.rejected[reason] += 1
        self.rejections += 1
        self.last_rejection = (reason, src, detail)

    def _in_lease(self) -> bool:
        """Heard from a live leader (or is one) within the minimum election timeout (thesis §4.2.3)."""
        return self.cfg.check_quorum and self.leader_id is not None and self.elapsed < self.cfg.election_ticks

    def _may_disrupt(self, msg: Any) -> bool:
        """A higher-term message that may break the lease: from the member the leader of this term is
        transferring leadership to (a forced RequestVote, or its first appends as the new leader)."""
        hint = self.transferee if self.role is Role.LEADER else self._transfer_hint
        if hint is None or msg.src != hint:
            return False
        return msg.force if isinstance(msg, m.RequestVote) else True

    def _new_term(self) -> None:
        """self.term just grew: what was known about the previous term's leader no longer holds."""
        self._term_leader = NONE
        self._transfer_hint = None
        self._forwarded_reads.clear()

    # ------------------------------------------------------------------------------------- outputs
    def _send(self, msg: Any) -> None:
        self._held.append((self._dirty_seq, msg))

    def _dirty(self) -> None:
        self._dirty_seq += 1

    def ready(self) -> Ready:
        rd = Ready()
        hs = HardState(self.term, self.vote, self.commit)
        if hs != self._hs_handed:
            rd.hard_state = hs
            self._hs_handed = hs
        if self._pending_snapshot is not None:
            rd.snapshot = self._pending_snapshot
            self._pending_snapshot = None
        if self.unstable_from <= self.last_index:
            rd.entries = self.log[self.unstable_from - self.log_start - 1:]
            self.unstable_from = self.last_index + 1
        if rd.hard_state is not None or rd.entries or rd.snapshot is not None:
            self._handed_seq = self._dirty_seq
            self._awaiting_persist = True
        elif not self._awaiting_persist:
            # nothing new to persist and nothing in flight: what was generated meanwhile depends on no
            # undurable state (the state it read was persisted by an earlier round)
            self._durable_seq = max(self._durable_seq, self._dirty_seq)
        keep = []
        for seq, msg in self._held:
            if seq <= self._durable_seq:
                rd.messages.append(msg)
            else:
                keep.append((seq, msg))
        self._held = keep
        upto = min(self.commit, self.handed + self.cfg.max_committed_per_ready)
        if upto > self.handed and self.handed >= self.log_start:
            committed = self.log[self.handed - self.log_start: upto - self.log_start]
            size, bytes_max = 0, self.cfg.max_committed_bytes_per_ready
            for k, e in enumerate(committed):
                size += len(e.data)
                if size > bytes_max and k > 0:
                    committed = committed[:k]          # the rest comes in the next ready
                    break
            rd.committed_entries = committed
            self.handed += len(committed)
        rd.read_states, self._read_states = self._read_states, []
        return rd

    def has_ready(self) -> bool:
        return bool(self._held or self._read_states or self._pending_snapshot or self.unstable_from <= self.last_index
                    or HardState(self.term, self.vote, self.commit) != self._hs_handed or self.commit > self.handed)

    def persisted(self, index: int, term: int) -> None:
        """Everything handed out by the last ready() is durable; the log is on disk up to ``index``."""
        self._durable_seq = max(self._durable_seq, self._handed_seq)
        self._awaiting_persist = False
        if self.term_at(index) == term:
            self.durable_index = min(index, self.last_index)
            if self.role is Role.LEADER:
                self._maybe_commit()

    # ---------------------------------------------------------------------------------- transitions
    def _become_follower(self, term: int, leader: int | None) -> None:
        if term > self.term:
            self.term = term
            self.vote = NONE
            self._new_term()
            self._dirty()
        self.role = Role.FOLLOWER
        self.leader_id = leader
        self.elapsed = 0
        self.timeout = self._random_timeout()
        self.transferee = None
        self._fail_reads()

    def _campaign(self, pre_vote: bool, force: bool = False) -> None:
        if self.id not in self.voters:
            return
        if pre_vote:
            self.role = Role.PRE_CANDIDATE
            term = self.term + 1
        else:
            self.role = Role.CANDIDATE
            self.term += 1
            self.vote = self.id
            self._new_term()
            self._dirty()
            term = self.term
        self.leader_id = None
        self.elapsed = 0
        self.timeout = self._random_timeout()
        self.votes = {self.id: True}
        if self._won():
            self._campaign(False) if pre_vote else self._become_leader()
            return
        for peer in self.voters:
            if peer != self.id:
                self._send(m.RequestVote(self.id, peer, term, self.last_index, self.last_term, pre_vote, force))

    def _won(self) -> bool:
        return sum(1 for v in self.votes.values() if v) >= self._quorum()

    def _become_leader(self) -> None:
        assert self.role is Role.CANDIDATE or len(self.voters) == 1
        self.role = Role.LEADER
        self.leader_id = self.id
        self._term_leader = self.id
        self.elapsed = 0
        self.heartbeat_elapsed = 0
        self.transferee = None
        self.progress = {p: _Progress(next=self.last_index + 1) for p in self.voters if p != self.id}
        for pr in self.progress.values():
            pr.active = True
        self._append([Entry(self.term, 0, EntryKind.NOOP, b"")])   # commit an entry of this term
        self._broadcast_append()

    # ----------------------------------------------------------------------------------------- tick
    def tick(self) -> None:
        self.elapsed += 1
        if self.role is Role.LEADER:
            self.heartbeat_elapsed += 1
            if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
                self.heartbeat_elapsed = 0
                self._heartbeat()
            if self.transferee is not None:
                self.transfer_elapsed += 1
                if self.transfer_elapsed >= self.cfg.election_ticks:
                    self.transferee = None         # given up: the next appends withdraw the announcement
            if self.elapsed >= self.cfg.election_ticks:
                self.elapsed = 0
                if self.cfg.check_quorum:
                    active = 1 + sum(1 for p, pr in self.progress.items() if pr.active and p in self.voters)
                    for pr in self.progress.values():
                        pr.active = False
                    if self.id in self.voters and active < self._quorum():
                        self._become_follower(self.term, None)   # lost contact with a majority
            return
        if self.elapsed >= self.timeout and self.id in self.voters:
            self._campaign(pre_vote=self.cfg.pre_vote)

    # -------------------------------------------------------------------------------------- proposals
    def propose(self, data: bytes) -> int:
        if self.role is not Role.LEADER or self.transferee is not None:
            raise NotLeader(self.leader_id if self.role is not Role.LEADER else None)
        index = self._append([Entry(self.term, 0, EntryKind.NORMAL, data)])
        self._broadcast_append()
        return index

    def propose_config(self, voters: Sequence[int]) -> int:
        """Change the voters by exactly one server (add or remove, the leader included)."""
        if self.role is not Role.LEADER or self.transferee is not None:
            raise NotLeader(self.leader_id if self.role is not Role.LEADER else None)
        new, old = set(voters), set(self.voters)
        if len(new ^ old) != 1:
            raise ConfigChangeRefused("a configuration change adds or removes exactly one server")
        if not new:
            raise ConfigChangeRefused("a configuration needs at least one voter")
        if self._configs[-1][0] > self.commit:
            raise ConfigChangeRefused("the previous configuration change is not committed yet")
        if self.term_at(self.commit) != self.term:
            raise ConfigChangeRefused("the leader has not committed an entry of its term yet")
        index = self._append([Entry(self.term, 0, EntryKind.CONFIG, m.encode_config(new))])
        self._broadcast_append()
        return index

    def _append(self, entries: list[Entry]) -> int:
        idx = self.last_index
        for e in entries:
            idx += 1
            e.index = idx
            self.log.append(e)
            if e.kind == EntryKind.CONFIG:
                self._apply_config(e.index, m.decode_config(e.data))
        if self.role is not Role.LEADER:
            self._dirty()
        # A leader's own new entries hold back no message: its appends may reach followers while it is
        # still persisting them (it counts itself toward a commit only up to durable_index), which takes
        # the leader's fsync off the commit path. Term and vote changes still hold messages back.
        return idx

    def _apply_config(self, index: int, voters: list[int]) -> None:
        self._configs.append((index, sorted(voters)))
        if self.role is Role.LEADER:
            for p in voters:
                if p != self.id and p not in self.progress:
                    self.progress[p] = _Progress(next=self.last_index + 1, active=True)
            for p in list(self.progress):
                if p not in voters:
                    del self.progress[p]

    def _truncate_configs(self, from_index: int) -> None:
        while len(self._configs) > 1 and self._configs[-1][0] >= from_index:
            self._configs.pop()

    # --------------------------------------------------------------------------------- replication
    def _broadcast_append(self) -> None:
        for peer in list(self.progress):
            self._send_append(peer)
        if not self.progress:
            self._maybe_commit()

    def _send_append(self, peer: int, empty_ok: bool = False) -> None:
        pr = self.progress[peer]
        if pr.snapshot_offset >= 0:
            return
        if pr.next <= self.log_start:
            self._send_snapshot(peer)
            return
        if pr.probing and pr.inflight > 0 and not empty_ok:
            return
        if pr.inflight >= self.cfg.max_inflight_appends and not empty_ok:
            return
        if pr.next > self.last_index and not empty_ok:
            return
        prev = pr.next - 1
        entries: list[Entry] = []
        size = 0
        i = pr.next
        while i <= self.last_index and len(entries) < self.cfg.max_entries_per_append:
            e = self.entry(i)
            if entries and size + len(e.data) > self.cfg.max_bytes_per_append:
                break
            entries.append(e)
            size += len(e.data)
            i += 1
        self._send(m.AppendEntries(self.id, peer, self.term, prev, self._term(prev), self.commit, entries,
                                   self._read_seq, self.transferee or NONE))
        pr.inflight += 1
        if entries and not pr.probing:
            pr.next = entries[-1].index + 1

    def _heartbeat(self, read_seq: int | None = None) -> None:
        for peer, pr in self.progress.items():
            if pr.snapshot_offset >= 0:
                self._send_snapshot(peer)
                continue
            if pr.match < self.log_start:
                self._send_snapshot(peer)
                continue
            self._send(m.AppendEntries(self.id, peer, self.term, pr.match, self._term(pr.match),
                                       min(self.commit, pr.match), [], self._read_seq, self.transferee or NONE))
            if pr.next > pr.match + 1 and not pr.acked:
                pr.stalled += 1
                if pr.stalled >= 2:                        # appends or acks were lost: probe again
                    pr.probing, pr.next, pr.stalled = True, pr.match + 1, 0
            else:
                pr.stalled = 0
            pr.acked = False
            if pr.probing:
                pr.inflight = 0
                self._send_append(peer)

    def _maybe_commit(self) -> None:
        matches = sorted([pr.match for p, pr in self.progress.items() if p in self.voters]
                         + ([self.durable_index] if self.id in self.voters else []), reverse=True)
        if len(matches) < self._quorum():
            return
        n = matches[self._quorum() - 1]
        # only an entry of the leader's own term is committed by counting replicas (Figure 8)
        if n > self.commit and self.term_at(n) == self.term:
            self._set_commit(n)
            self._on_leader_commit()

    def _set_commit(self, n: int) -> None:
        assert n >= self.commit, "commit index went back"
        assert n <= self.last_index
        self.commit = n

    def _on_leader_commit(self) -> None:
        for ctx, requester in self._reads_before_commit:
            self._start_read(ctx, requester)
        self._reads_before_commit = []
        # a leader removed by a committed configuration steps down
        if self.id not in self.config_at(self.commit) and self._configs[-1][0] <= self.commit:
            self._become_follower(self.term, None)
            return
        self._broadcast_append()

    # ------------------------------------------------------------------------------------ snapshots
    def keep_floor(self, index: int, keep_entries: int, keep_bytes_max: int | None = None) -> int:
        """The ``keep_from`` for ``compact`` at ``index`` that keeps the ``keep_entries`` entries up to
        ``index`` (fewer when their payloads pass ``keep_bytes_max``, or when the log holds fewer)."""
        assert keep_entries >= 0 and self.log_start <= index <= self.last_index
        floor = max(self.log_start, index - keep_entries)
        if keep_bytes_max is not None:
            size = 0
            for i in range(index, floor, -1):
                size += len(self.entry(i).data)
                if size > keep_bytes_max:
                    return i                  # entries i+1..index are kept
        return floor

    def compact(self, meta: SnapshotMeta, data: bytes, keep_from: int | None = None) -> None:
        """The state machine took a snapshot at ``meta.index`` (applied): drop the log up to it, or, with
        ``keep_from``, only up to ``keep_from``: the entry there stays as the log's base (its term known) and
        the ones after it stay sendable, so a follower that far behind catches up from the log."""
        if meta.index <= self.snap_index:
            return
        assert meta.index <= self.handed and meta.index <= self.commit, "snapshot of unapplied state"
        assert self.term_at(meta.index) == meta.term
        base = meta.index if keep_from is None else min(max(keep_from, self.log_start), meta.index)
        base_term = self._term(base)
        self.log = self.log[base - self.log_start:]
        self.log_start, self.log_start_term = base, base_term
        self.snap_index, self.snap_term = meta.index, meta.term
        # kept as given when immutable (bytes, or a read-only mapping of a snapshot file): only sliced
        self.snap_data = bytes(data) if isinstance(data, (bytearray, memoryview)) else data
        cfg_now = self.config_at(meta.index)
        self._configs = [(meta.index, cfg_now)] + [c for c in self._configs if c[0] > meta.index]

    def _send_snapshot(self, peer: int) -> None:
        pr = self.progress[peer]
        if self.snap_data is None:
            return           # no snapshot to send yet (the state machine has not taken one)
        pr.snapshot_offset = max(pr.snapshot_offset, 0)
        off = pr.snapshot_offset
        chunk = self.snap_data[off: off + self.cfg.snapshot_chunk_bytes]
        done = off + len(chunk) >= len(self.snap_data)
        meta = SnapshotMeta(self.snap_index, self.snap_term, self.config_at(self.snap_index))
        self._send(m.InstallSnapshot(self.id, peer, self.term, meta, off, done, chunk))

    # ---------------------------------------------------------------------------------------- reads
    def read_index(self, ctx: bytes) -> None:
        """Ask for a linearizable read point; a ReadState (ctx, index) comes out of ready() later."""
        if self.role is Role.LEADER:
            self._leader_read(ctx, self.id)
        elif self.leader_id is not None:
            forwarded = self._forwarded_reads
            if len(forwarded) >= READS_FORWARDED_MAX:
                del forwarded[next(iter(forwarded))]     # the oldest: its driver gave up on it long ago
            forwarded[ctx] = self.leader_id
            self._send(m.ReadIndexRequest(self.id, self.leader_id, self.term, ctx))
        else:
            raise NotLeader(None)

    def _leader_read(self, ctx: bytes, requester: int) -> None:
        if self.term_at(self.commit) != self.term:
            self._reads_before_commit.append((ctx, requester))   # wait for the NOOP of this term
            return
        self._start_read(ctx, requester)

    def _start_read(self, ctx: bytes, requester: int) -> None:
        self._read_seq += 1
        rd = _Read(ctx, self.commit, self._read_seq, requester, {self.id})
        self._reads.append(rd)
        self._settle_reads()
        if rd in self._reads:
            self._heartbeat()

    def _settle_reads(self) -> None:
        while self._reads:
            rd = self._reads[0]
            acks = 1 + sum(1 for p, pr in self.progress.items() if p in self.voters and pr.read_seq >= rd.seq)
            if self.id not in self.voters:
                acks -= 1
            if acks < self._quorum():
                break
            self._reads.pop(0)
            if rd.requester == self.id:
                self._read_states.append((rd.ctx, rd.index))
            else:
                self._send(m.ReadIndexResponse(self.id, rd.requester, self.term, rd.ctx, rd.index, True))

    def _fail_reads(self) -> None:
        for rd in self._reads:
            if rd.requester != self.id:
                self._send(m.ReadIndexResponse(self.id, rd.requester, self.term, rd.ctx, 0, False))
        self._reads = []
        self._reads_before_commit = []

    # ------------------------------------------------------------------------------------ transfer
    def transfer_leadership(self, target: int) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if target == self.id:
            return
        if target not in self.progress:
            raise ValueError(f"{target} is not a voter")
        # Announce the transfer first: the target's forced RequestVote may break the lease only at a
        # follower that knows of the transfer from this leader (a forged one must not), so TimeoutNow waits
        # until a quorum acknowledged a round that carried the announcement (a ReadIndex-style round).
        self.transferee = target
        self.transfer_elapsed = 0
        self._read_seq += 1
        self._transfer_seq = self._read_seq
        self._timeout_now_sent = False
        self._heartbeat()
        if self.progress[target].match != self.last_index:
            self._send_append(target)
        self._maybe_timeout_now(NONE)

    def _maybe_timeout_now(self, acked_by: int) -> None:
        target = self.transferee
        if target is None or (self._timeout_now_sent and acked_by != target):
            return
        pr = self.progress.get(target)
        if pr is None or pr.match != self.last_index:
            return
        voters = self.voters
        acks = (self.id in voters) + sum(1 for p, q in self.progress.items()
                                         if p in voters and q.read_seq >= self._transfer_seq)
        if acks < self._quorum():
            return
        self._timeout_now_sent = True
        self._send(m.TimeoutNow(self.id, target, self.term))

    # ----------------------------------------------------------------------------------------- step
    def step(self, msg: Any) -> None:
        if msg.dst != self.id:
            return
        fault = m.message_fault(msg)
        if fault is not None:
            self._reject(fault[0], msg.src, fault[1])
            return
        if msg.term > self.term:
            if isinstance(msg, m.RequestVote):
                if self._in_lease() and not self._may_disrupt(msg):
                    # a leader is alive: a disruptive (or forged) candidate cannot force an election
                    self._reject(VOTE_IN_LEASE, msg.src, f"{'pre-' if msg.pre_vote else ''}vote for term "
                                 f"{msg.term} while {self.leader_id} leads term {self.term}")
                    return
                if not msg.pre_vote:           # pre-votes never change our term
                    self._become_follower(msg.term, None)
            elif isinstance(msg, m.RequestVoteResponse) and msg.pre_vote and msg.granted:
                pass                           # a granted pre-vote carries the proposed term
            elif isinstance(msg, m.TimeoutNow):
                self._reject(TIMEOUT_NOW_NOT_LEADER, msg.src, f"TimeoutNow of term {msg.term} at term {self.term}")
                return
            elif isinstance(msg, (m.AppendEntries, m.InstallSnapshot)):
                if self.role is Role.FOLLOWER and self._in_lease() and not self._may_disrupt(msg):
                    self._reject(LEADER_IN_LEASE, msg.src, f"{type(msg).__name__} of term {msg.term} while "
                                 f"{self.leader_id} leads term {self.term}")
                    return
                self._become_follower(msg.term, msg.src)
            else:
                self._become_follower(msg.term, None)
        elif msg.term < self.term:
            if isinstance(msg, (m.AppendEntries, m.InstallSnapshot)):
                # a stale leader: tell it the new term so it steps down
                self._send(m.AppendEntriesResponse(self.id, msg.src, self.term, False, self.last_index, 0))
            elif isinstance(msg, m.RequestVote) and msg.pre_vote:
                self._send(m.RequestVoteResponse(self.id, msg.src, self.term, False, True))
            return
        handler = getattr(self, "_on_" + type(msg).__name__)
        handler(msg)

    def _accept_leader(self, msg: m.AppendEntries | m.InstallSnapshot) -> bool:
        """A message of this term from its leader: follow it. One leader per term: a second one (another
        id, or this replica leading) is refused."""
        if self._term_leader not in (NONE, msg.src):
            self._reject(TWO_LEADERS, msg.src, f"{type(msg).__name__} from {msg.src} in term {msg.term}, "
                         f"whose leader is {self._term_leader}")
            return False
        if self.role is not Role.FOLLOWER or self.leader_id != msg.src:
            self._become_follower(msg.term, msg.src)
        self._term_leader = msg.src
        self.elapsed = 0
        return True

    def _on_RequestVote(self, msg: m.RequestVote) -> None:
        up_to_date = (msg.last_term, msg.last_index) >= (self.last_term, self.last_index)
        if msg.pre_vote:
            granted = msg.term > self.term and up_to_date and not self._in_lease()
            self._send(m.RequestVoteResponse(self.id, msg.src, msg.term if granted else self.term, granted, True))
            return
        granted = up_to_date and self.vote in (NONE, msg.src) and self.role is not Role.LEADER
        if granted:
            self.vote = msg.src
            self.elapsed = 0
            self._dirty()
        self._send(m.RequestVoteResponse(self.id, msg.src, self.term, granted, False))

    def _on_RequestVoteResponse(self, msg: m.RequestVoteResponse) -> None:
        if msg.pre_vote and self.role is Role.PRE_CANDIDATE and msg.term == self.term + 1:
            self.votes[msg.src] = msg.granted
            if self._won():
                self._campaign(pre_vote=False)
            elif sum(1 for v in self.votes.values() if not v) >= self._quorum():
                self._become_follower(self.term, None)
        elif not msg.pre_vote and self.role is Role.CANDIDATE and msg.term == self.term:
            self.votes[msg.src] = msg.granted
            if self._won():
                self._become_leader()
            elif sum(1 for v in self.votes.values() if not v) >= self._quorum():
                self._become_follower(self.term, None)

    def _on_AppendEntries(self, msg: m.AppendEntries) -> None:
        if not self._accept_leader(msg):
            return
        self._transfer_hint = msg.transferee or None
        # message_fault checked the entries: numbered prev_index+1, prev_index+2, ..., terms in
        # [prev_term, term] and never decreasing, so the run below appends contiguously
        if msg.prev_index < self.commit:
            # already committed here: skip what we have, the committed prefix is never rewritten
            skip = self.commit - msg.prev_index
            entries = msg.entries[skip:]
            prev_index = self.commit
            prev_term = self._term(prev_index)
        else:
            entries, prev_index, prev_term = msg.entries, msg.prev_index, msg.prev_term
        local = self.term_at(prev_index)
        if local is None or local != prev_term:
            hint = min(prev_index, self.last_index + 1)
            if local is not None:       # skip the whole conflicting term
                t = local
                while hint - 1 > max(self.commit, self.snap_index) and self.term_at(hint - 1) == t:
                    hint -= 1
            self._send(m.AppendEntriesResponse(self.id, msg.src, self.term, False, self.last_index,
                                               max(hint, 1), msg.read_seq))
            return
        for k, e in enumerate(entries):
            have = self.term_at(e.index)
            if have == e.term:
                continue
            if have is not None:         # conflict: drop our suffix from here
                assert e.index > self.commit, "a committed entry would be truncated"
                del self.log[e.index - self.log_start - 1:]
                self._truncate_configs(e.index)
                self.unstable_from = min(self.unstable_from, e.index)
                self.durable_index = min(self.durable_index, e.index - 1)
            assert e.index == self.last_index + 1
            for new in entries[k:]:
                self.log.append(Entry(new.term, new.index, new.kind, bytes(new.data)))
                if new.kind == EntryKind.CONFIG:
                    self._configs.append((new.index, m.decode_config(new.data)))
            self.unstable_from = min(self.unstable_from, e.index)
            self._dirty()
            break
        last_new = prev_index + len(entries)
        # the leader's commit may run ahead of what this message carries: clamp, never trust it further
        commit = min(msg.commit, last_new, self.last_index)
        if commit > self.commit:
            self._set_commit(commit)
        self._send(m.AppendEntriesResponse(self.id, msg.src, self.term, True, last_new, 0, msg.read_seq))

    def _on_AppendEntriesResponse(self, msg: m.AppendEntriesResponse) -> None:
        if self.role is not Role.LEADER or msg.src not in self.progress:
            return
        if msg.success and msg.match_index > self.last_index:
            self._reject(ACK_BEYOND_LOG, msg.src, f"acknowledges {msg.match_index}, the log ends at {self.last_index}")
            return
        if msg.read_seq > self._read_seq:
            self._reject(READ_SEQ_AHEAD, msg.src, f"confirms read round {msg.read_seq}, the latest is {self._read_seq}")
            return
        pr = self.progress[msg.src]
        pr.active = True
        if msg.success and msg.match_index > pr.match:
            pr.inflight = max(0, pr.inflight - 1)
            pr.acked = True
        if msg.read_seq > pr.read_seq:
            pr.read_seq = msg.read_seq
            self._settle_reads()
        if msg.success:
            if msg.match_index > pr.match:
                pr.match = msg.match_index
                self._maybe_commit()
                if self.role is not Role.LEADER:
                    return
            pr.next = max(pr.next, pr.match + 1)
            if pr.probing:
                pr.probing = False
                pr.inflight = 0
        else:
            if msg.hint_index <= pr.match:
                return                     # stale rejection
            # (a follower's log may be longer than ours: never probe past our own last index + 1)
            pr.next = max(pr.match + 1, min(msg.hint_index, msg.match_index + 1, self.last_index + 1))
            pr.probing = True
            pr.inflight = 0
        if self.transferee is not None:
            self._maybe_timeout_now(msg.src)
        while pr.inflight < self.cfg.max_inflight_appends and pr.next <= self.last_index:
            before = (pr.next, pr.inflight)
            self._send_append(msg.src)
            if (pr.next, pr.inflight) == before or pr.probing or pr.snapshot_offset >= 0:
                break

    def _on_InstallSnapshot(self, msg: m.InstallSnapshot) -> None:
        if not self._accept_leader(msg):
            return
        meta = msg.meta
        if meta.index <= self.commit:
            self._send(m.InstallSnapshotResponse(self.id, msg.src, self.term, meta.index, 0, True))
            return
        incoming = self._incoming_snapshot
        if incoming is not None and self._incoming_meta == meta and msg.offset < len(incoming):
            # a duplicate chunk (the leader re-sends the chunk in flight on heartbeats): re-ack progress
            self._send(m.InstallSnapshotResponse(self.id, msg.src, self.term, meta.index, len(incoming), False))
            return
        end = msg.offset + len(msg.data)
        if end > self.cfg.snapshot_bytes_max:      # checked before a byte of it is held
            self._incoming_snapshot = None
            self._reject(SNAPSHOT_TOO_LARGE, msg.src, f"snapshot at {meta.index} reaches {end} bytes, "
                         f"snapshot_bytes_max={self.cfg.snapshot_bytes_max}")
            self._send(m.InstallSnapshotResponse(self.id, msg.src, self.term, meta.index, 0, False))
            return
        if msg.offset == 0:
            incoming = self._incoming_snapshot = bytearray()
            self._incoming_meta = meta
        if incoming is None or self._incoming_meta != meta or msg.offset != len(incoming):
            self._incoming_snapshot = None
            self._reject(SNAPSHOT_CHUNK_OUT_OF_ORDER, msg.src,
                         f"chunk at {msg.offset} of the snapshot at ({meta.index}, {meta.term}), have "
                         f"{len(incoming) if incoming is not None else 'none'}"
                         f"{'' if self._incoming_meta == meta else ' of another snapshot'}")
            self._send(m.InstallSnapshotResponse(self.id, msg.src, self.term, meta.index, 0, False))
            return
        incoming += msg.data
        if not msg.done:
            self._send(m.InstallSnapshotResponse(self.id, msg.src, self.term, meta.index, len(incoming), False))
            return
        data = bytes(incoming)
        self._incoming_snapshot = None
        if self.term_at(meta.index) == meta.term:
            self.log = self.log[meta.index - self.log_start:]      # keep the matching suffix
        else:
            self.log = []
            self.unstable_from = meta.index + 1
        self.log_start, self.log_start_term = meta.index, meta.term
        self.snap_index, self.snap_term, self.snap_data = meta.index, meta.term, data
        self._configs = [(meta.index, sorted(meta.config))] + [
            (i, v) for i, v in self._configs if i > meta.index and self.log]
        self._set_commit(meta.index)
        self.handed = meta.index
        self.unstable_from = max(self.unstable_from, meta.index + 1)
        self.durable_index = min(self.durable_index, self.last_index)
        self._pending_snapshot = (meta, data)
        self.snapshots_installed += 1
        self._dirty()
        self._send(m.InstallSnapshotResponse(self.id, msg.src, self.term, meta.index, len(data), True))

    def _on_InstallSnapshotResponse(self, msg: m.InstallSnapshotResponse) -> None:
        if self.role is not Role.LEADER or msg.src not in self.progress:
            return
        if msg.index > self.snap_index or (msg.index == self.snap_index and self.snap_data is not None
                                           and msg.next_offset > len(self.snap_data)):
            self._reject(ACK_BEYOND_LOG, msg.src, f"acknowledges {msg.next_offset} bytes of a snapshot at "
                         f"{msg.index}; ours is at {self.snap_index}")
            return
        pr = self.progress[msg.src]
        pr.active = True
        if msg.done:
            pr.snapshot_offset = -1
            pr.match = max(pr.match, msg.index)
            pr.next = max(pr.next, pr.match + 1)
            pr.probing = True
            pr.inflight = 0
            self._send_append(msg.src, empty_ok=True)
        elif msg.index == self.snap_index:
            pr.snapshot_offset = msg.next_offset
            self._send_snapshot(msg.src)
        else:
            pr.snapshot_offset = -1      # our snapshot changed meanwhile: start over

    def _on_TimeoutNow(self, msg: m.TimeoutNow) -> None:
        if msg.src != self._term_leader or self.role is not Role.FOLLOWER:
            self._reject(TIMEOUT_NOW_NOT_LEADER, msg.src, f"TimeoutNow in term {msg.term}, whose leader is "
                         f"{self._term_leader}")
            return
        if self.id in self.voters:
            self._campaign(pre_vote=False, force=True)

    def _on_ReadIndexRequest(self, msg: m.ReadIndexRequest) -> None:
        if self.role is not Role.LEADER:
            self._send(m.ReadIndexResponse(self.id, msg.src, self.term, msg.ctx, 0, False))
        elif len(self._reads) + len(self._reads_before_commit) >= READS_PENDING_MAX:
            self._reject(READS_FULL, msg.src, f"READS_PENDING_MAX={READS_PENDING_MAX} reads wait already")
            self._send(m.ReadIndexResponse(self.id, msg.src, self.term, msg.ctx, 0, False))
        else:
            self._leader_read(msg.ctx, msg.src)

    def _on_ReadIndexResponse(self, msg: m.ReadIndexResponse) -> None:
        if self._forwarded_reads.get(msg.ctx) != msg.src:
            self._reject(READ_UNKNOWN, msg.src, f"answer to a read {bytes(msg.ctx)!r:.40} not forwarded to it")
            return
        del self._forwarded_reads[msg.ctx]
        if msg.ok:
            self._read_states.append((msg.ctx, msg.index))
