"""The Raft driver: one thread that owns the pure core, the log store and the ZeroMQ transport, and gives
them a real clock.

Loop (one iteration; everything below runs on the driver thread only):
1. wait on a zmq.Poller for peer messages (the transport's ROUTER) or a wake-up (an eventfd written by
   other threads after they queue a command), at most until the next tick is due;
2. feed the core: peer messages (``step``), queued commands (``propose``, ``read_index``, ...) and due ticks;
3. drain ``ready()`` until it is empty, each time in this order:
   a. send the messages the core released: the core holds back every message that depends on state not
      yet durable (persist-before-acknowledge), so these never depend on what this ready persists;
   b. persist: incoming snapshot + entries + hard state with ONE store save (one fdatasync), then tell
      the core (``persisted``) -- messages that depend on this state are released by the core after it;
   c. install an incoming snapshot into the app (``restore``), apply committed entries (``apply``), resolve
      proposal futures by (index, term), and serve ReadIndex requests whose index is now applied;
   d. take an app snapshot and compact log + core when the log grew past ``snapshot_threshold_entries``,
      keeping ``snapshot_keep_entries`` entries (at most ``snapshot_keep_bytes``) below it in both, so a
      follower that far behind catches up from the log rather than by InstallSnapshot.

Peer messages that break the protocol are dropped by the transport's decoder or by the core and counted by
reason; ``status()['rejected']`` sums both, and they are logged at a bounded rate (transport.RejectLog).

Other threads use ``propose`` / ``read_index`` / ``transfer_leadership`` / ``status``: they enqueue a
command in a bounded deque and write the eventfd; results come back as ``concurrent.futures.Future``.
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import mmap
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from engine.raft import messages as _msg
from engine.raft.log_store import (
    MAP_SIZE_BYTES_DEFAULT,
    SNAPSHOT_SIZE_BYTES_MAX,
    LogStore,
    SnapshotFile,
)
from engine.raft.transport import RejectLog, Transport
from engine.stalls import StallLog
from engine.zmq_io import Waker

log = logging.getLogger(__name__)

# --- named limits -----------------------------------------------------------------------------------
PENDING_PROPOSALS_MAX = 200_000      # proposals accepted but not yet applied
PENDING_READS_MAX = 10_000
COMMANDS_PER_ITERATION_MAX = 20_000  # commands moved into the core per loop iteration (bounds latency)
READY_ROUNDS_PER_ITERATION_MAX = 64
READY_TIME_BUDGET_S = 0.05           # Ready rounds of one loop iteration stop starting after this long
LOOP_HELD_WARN_S = 0.15              # a longer _process_ready is logged: it delays heartbeats
TICKS_REPLAYED_MAX = 3               # ticks run at once after the loop was held up (see _run)


class RaftDriverError(Exception):
    pass


class NotLeader(RaftDriverError):
    """This replica is not the leader; retry at ``leader_id`` (``address`` is its Raft address) if known."""

    def __init__(self, leader_id: int | None, address: str | None) -> None:
        super().__init__(f"not the leader; leader is {leader_id} at {address}")
        self.leader_id = leader_id
        self.address = address


class ProposalDropped(RaftDriverError):
    """The proposal's log slot was taken by another leader's entry: it was NOT applied (safe to retry)."""


class OutcomeUnknown(RaftDriverError):
    """The replica lost track of the proposal (a snapshot replaced the log, or the driver stopped): it may
    or may not have been applied. Retry with the same dedup id."""


class Overloaded(RaftDriverError):
    pass


@dataclass
class DriverConfig:
    tick_interval_ms: int = 10
    election_ticks: int = 30             # 300 ms: randomized by the core in [election, 2*election)
    heartbeat_ticks: int = 3
    snapshot_threshold_entries: int = 50_000   # applied entries past the last snapshot before a new one
    snapshot_threshold_bytes: int = 256 << 20  # ... or applied payload bytes: the core keeps the log since
                                               # the last snapshot in memory, so this bounds its memory
    snapshot_keep_entries: int = 5_000         # entries kept below the snapshot for slow followers (in the
                                               # core's memory and in the log store), which then catch up
                                               # from the log instead of by InstallSnapshot
    snapshot_keep_bytes: int = 64 << 20        # ... but at most this many payload bytes of them
    snapshot_bytes_max: int = 4 << 30          # an incoming snapshot larger than this is refused (the core
                                               # holds it in memory as it arrives): set it above the largest
                                               # snapshot the group makes (RaftConfig.snapshot_bytes_max)
    leader_snapshot_defer: int = 4             # a leader takes its entry-count snapshots this many times
                                               # further apart (see _snapshot_due); the bytes bound stays
    read_timeout_ms: int = 2_000
    sync: bool = True
    map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT
    seed: int | None = None              # the core's randomness (election timeouts); None -> from os.urandom
    core_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not 1 <= self.tick_interval_ms <= 1000:
            raise ValueError(f"tick_interval_ms={self.tick_interval_ms} outside 1..1000")
        if self.heartbeat_ticks < 1 or self.election_ticks <= 2 * self.heartbeat_ticks:
            raise ValueError("election_ticks must exceed 2 * heartbeat_ticks >= 2")
        if not 0 <= self.snapshot_keep_entries < self.snapshot_threshold_entries:
            raise ValueError("snapshot_keep_entries must be in 0..snapshot_threshold_entries - 1")
        if self.snapshot_keep_bytes < 0:
            raise ValueError("snapshot_keep_bytes must be >= 0")
        if not 1 << 20 <= self.snapshot_bytes_max <= SNAPSHOT_SIZE_BYTES_MAX:
            raise ValueError(f"snapshot_bytes_max must be in 1 MiB..{SNAPSHOT_SIZE_BYTES_MAX} (the log store's limit)")
        if self.leader_snapshot_defer < 1:
            raise ValueError("leader_snapshot_defer must be >= 1 (1: like any replica)")
        if self.snapshot_threshold_bytes < 1 << 20:
            raise ValueError("snapshot_threshold_bytes must be at least 1 MiB")


class PendingSnapshot(Protocol):
    """A snapshot being made elsewhere (another process or thread) of the state as of the moment the
    driver asked for it; the driver keeps serving Raft meanwhile and polls it from its loop."""

    def poll(self) -> bytes | SnapshotFile | None:
        """The snapshot once ready (its bytes, or a durable file of them), else None; raises if making it
        failed."""

    def cancel(self) -> None:
        """Abandon it (a newer snapshot arrived from the leader, or the driver stops)."""


ApplyFn = Callable[[Sequence[Any]], Sequence[Any]]
SnapshotFn = Callable[[], "bytes | PendingSnapshot"]
RestoreFn = Callable[[bytes], None]


class RaftDriver:
    """One Raft replica with a real clock. ``peers`` maps every member id (this one included) to its Raft
    address (``tcp://host:port``); this replica binds its own entry."""

    def __init__(self, node_id: int, peers: dict[int, str], data_dir: str, *, apply: ApplyFn,
                 snapshot: SnapshotFn, restore: RestoreFn, config: DriverConfig | None = None,
                 after_ready: Callable[[], None] | None = None, stalls: StallLog | None = None,
                 on_role_change: Callable[[bool, int], None] | None = None, security: Any = None) -> None:
        """``after_ready`` (optional) runs on the driver thread at the end of every ready round, after the
        round's applies: an app that must wake another thread for what ``apply`` produced does it there,
        once, instead of in the middle of applying (where the woken thread takes the GIL from this one).
        ``on_role_change(is_leader, term)`` (optional) runs on the driver thread on every leadership edge:
        ``(True, term)`` when this replica becomes leader of ``term``, ``(False, term)`` when it stops being
        leader (a newer term, a step-down, the driver stopping); edges alternate, starting with a gain. It
        must not block (a service hands it to its main thread: engine/service/server.py).
        ``stalls`` (optional) receives the loop's long phases: raft-persist, raft-apply, raft-snapshot.
        ``security`` (an engine.service.security.ServerSecurity, or None: insecure): CURVE on the peer
        transport, a peer's identity being the key it authenticated with."""
        if node_id not in peers:
            raise ValueError(f"peers must include this replica's own address (id {node_id})")
        self.config = config or DriverConfig()
        self.config.validate()
        self.node_id = node_id
        self._peers = dict(peers)
        self._security = security
        self._data_dir = data_dir
        self._apply_fn = apply
        self._snapshot_fn = snapshot
        self._restore_fn = restore
        self._after_ready_fn = after_ready
        self.stalls = stalls if stalls is not None else StallLog()
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._waker = Waker()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._pending_count = 0          # proposals queued or in flight (approximate across threads)
        self._pending_lock = threading.Lock()
        # (role, term, leader, commit, applied, last_index, snapshot_index, pending proposals): written by
        # the driver thread as one tuple, so a reader on another thread sees one consistent state
        self._status_state: tuple[Any, ...] = ("starting", 0, None, 0, 0, 0, 0, 0)
        self._transport_stats: dict[str, int] | None = None
        self._reject_log = RejectLog(f"raft {node_id}", log)
        self._core_rejected_seen: dict[str, int] = {}
        self._core_rejections_seen = 0
        self.is_leader = False               # read by other threads on their hot path (no dict, no lock)
        self.leader_id: int | None = None
        self._role_change_fn = on_role_change
        self._leader_term = 0                # the term this replica leads (0: not leader), for the edges
        self._read_ids = itertools.count(1)

    # --- public API (any thread) --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RaftDriverError("already started")
        self._thread = threading.Thread(target=self._run, name=f"raft-{self.node_id}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise RaftDriverError(f"raft replica {self.node_id} failed to start") from self._start_error

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._waker.close()

    def propose(self, data: bytes) -> Future:
        """Future resolving to the app's apply result once the entry is committed and applied here; fails
        with NotLeader, ProposalDropped, OutcomeUnknown or Overloaded."""
        return self.propose_many([data])[0]

    def propose_many(self, datas: Sequence[bytes]) -> list[Future]:
        futures: list[Future] = [Future() for _ in datas]
        with self._pending_lock:
            if self._pending_count + len(datas) > PENDING_PROPOSALS_MAX:
                for f in futures:
                    f.set_exception(Overloaded(f"PENDING_PROPOSALS_MAX={PENDING_PROPOSALS_MAX} reached"))
                return futures
            self._pending_count += len(datas)
        self._commands.append(("propose", list(datas), futures))
        self._wake()
        return futures

    def read_index(self) -> Future:
        """Future resolving (to the read index) once this replica has applied everything committed at the
        time of the request, as confirmed by a quorum: a linearizable read may then use the local state."""
        fut: Future = Future()
        self._commands.append(("read", fut))
        self._wake()
        return fut

    def transfer_leadership(self, target: int) -> Future:
        fut: Future = Future()
        self._commands.append(("transfer", target, fut))
        self._wake()
        return fut

    @property
    def thread_ident(self) -> int | None:
        """The driver thread's ``threading.get_ident()`` once started (callbacks of its futures run there)."""
        return self._thread.ident if self._thread is not None else None

    def status(self) -> dict[str, Any]:
        role, term, leader, commit, applied, last_index, snapshot_index, pending = self._status_state
        st = {"node_id": self.node_id, "role": role, "term": term, "leader": leader, "commit": commit,
              "applied": applied, "last_index": last_index}
        if self._transport_stats is not None:
            st.update(snapshot_index=snapshot_index, pending_proposals=pending,
                      snapshot_in_progress=self._pending_snapshot is not None,
                      transport=dict(self._transport_stats))
            store = self._store            # counters only (plain ints): safe to read from another thread
            st["log_store"] = {"segments": store.segment_count, "segments_removed": store.segments_removed,
                               "segments_without_spare": store.segments_fallocated,
                               "bytes_written": store.bytes_written, "first_index": store.first_index}
            # peer messages refused, by reason: the transport's decoder and the core's state checks (fixed
            # keys, plain ints: a copy from another thread is consistent enough for a counter)
            rejected = dict(self._transport.rejected)
            for reason, n in list(self._core.rejected.items()):
                rejected[reason] = rejected.get(reason, 0) + n
            st["rejected"] = rejected
            st["snapshots_installed"] = self._core.snapshots_installed
        return st

    @property
    def failed(self) -> bool:
        """The driver thread ended on an error (a storage failure, a broken invariant): this replica can
        no longer take part in Raft and its process should stop (fail-stop) so it can be restarted."""
        return self._thread is not None and not self._thread.is_alive() and not self._stop.is_set()

    # --- driver thread -------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._waker.wake()

    def _setup(self) -> None:
        cfg = self.config
        self._store = LogStore(self._data_dir, sync=cfg.sync, map_size_bytes=cfg.map_size_bytes)
        hard_state, snapshot_meta, entries = self._store.initial_state()
        self._applied = 0
        snapshot_data = None
        if snapshot_meta is not None:
            snap = self._store.snapshot()
            assert snap is not None
            snapshot_data = snap[1]
            self._restore_fn(snapshot_data)
            self._applied = snapshot_meta.index
        seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._core = _make_core(self.node_id, list(self._peers), cfg, seed, hard_state, snapshot_meta, entries,
                                snapshot_data)
        self._ctx = zmq.Context()
        others = {pid: addr for pid, addr in self._peers.items() if pid != self.node_id}
        self._transport = Transport(self.node_id, self._peers[self.node_id], others, context=self._ctx,
                                    security=self._security)
        self._transport_stats = self._transport.stats
        self._poller = zmq.Poller()
        self._poller.register(self._transport.socket, zmq.POLLIN)
        self._poller.register(self._waker.fd, zmq.POLLIN)
        self._proposals: dict[int, tuple[int, Future]] = {}   # index -> (term, future)
        self._reads_waiting_quorum: dict[bytes, tuple[float, Future]] = {}
        self._reads_waiting_apply: list[tuple[int, Future]] = []
        self._snapshot_index = snapshot_meta.index if snapshot_meta is not None else 0
        members = sorted(self._peers)
        self._snapshot_phase = members.index(self.node_id) * cfg.snapshot_threshold_entries // len(members)
        self._bytes_since_snapshot = 0          # payload bytes applied since the last snapshot
        self._pending_snapshot: tuple[int, PendingSnapshot] | None = None
        self._ready_left = False                # the last _process_ready stopped on its time budget
        self._spent_s: dict[str, float] = {}    # the last _process_ready's time per phase

    def _run(self) -> None:
        try:
            self._setup()
        except BaseException as exc:  # noqa: BLE001 -- reported to start(); the thread ends
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        tick_s = self.config.tick_interval_ms / 1000.0
        next_tick = time.monotonic() + tick_s
        transport_socket = self._transport.socket
        try:
            while not self._stop.is_set():
                # whole milliseconds, rounded UP: zmq.Poller truncates a float timeout, and a timeout
                # truncated to 0 in the last millisecond before every tick made this loop spin (poll,
                # ready, status) for up to 1 ms in 10 on every replica, taking CPU and the GIL from the
                # node's main thread; a tick may now run up to 1 ms late, which Raft does not notice
                timeout_ms = 0 if self._ready_left else max(0, math.ceil((next_tick - time.monotonic()) * 1000.0))
                events = dict(self._poller.poll(timeout_ms))
                if self._waker.fd in events:
                    self._waker.drain()
                if transport_socket in events:         # (level-triggered: what is left is reported again)
                    for msg in self._transport.recv_batch():
                        self._core.step(msg)
                self._drain_commands()
                now = time.monotonic()
                ticks = 0
                while now >= next_tick and ticks < TICKS_REPLAYED_MAX:
                    self._core.tick()
                    next_tick += tick_s
                    ticks += 1
                if now >= next_tick:
                    # this thread was held up (a long apply, a snapshot, a paused process): time it did not
                    # see is dropped rather than replayed at once, which would run several CheckQuorum
                    # rounds with no chance to hear from peers in between and depose a healthy leader
                    next_tick = now + tick_s
                if ticks:
                    self._expire_reads(now)
                    self._report_rejections(now)
                t_ready = time.monotonic()
                self._process_ready()
                held_s = time.monotonic() - t_ready
                sp = self._spent_s
                if held_s >= self.stalls.threshold_s:
                    for phase in ("persist", "apply", "snapshot"):
                        self.stalls.add("raft-" + phase, sp[phase])
                if held_s > LOOP_HELD_WARN_S:
                    log.warning("raft %d: persist/send/apply/snapshot held the loop for %.0f ms (persist %.0f, "
                                "apply %.0f, snapshot %.0f); heartbeats wait meanwhile", self.node_id,
                                held_s * 1000, sp["persist"] * 1000, sp["apply"] * 1000, sp["snapshot"] * 1000)
        except BaseException:
            log.exception("raft driver %d crashed", self.node_id)
            raise
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._cancel_pending_snapshot()
        err = OutcomeUnknown("raft driver stopped")
        for _, fut in self._proposals.values():
            _fail(fut, err)
        self._proposals.clear()
        while self._commands:
            cmd = self._commands.popleft()
            for fut in (cmd[2] if cmd[0] == "propose" else [cmd[-1]]):
                _fail(fut, err)
        for _, fut in self._reads_waiting_quorum.values():
            _fail(fut, err)
        for _, fut in self._reads_waiting_apply:
            _fail(fut, err)
        self._transport.close()
        self._ctx.term()
        self._store.close()
        self.is_leader = False
        self._status_state = ("stopped",) + self._status_state[1:]
        self._note_role(False, self._status_state[1])

    def _leader_error(self) -> NotLeader:
        leader = _core_leader(self._core)
        return NotLeader(leader, self._peers.get(leader) if leader is not None else None)

    def _drain_commands(self) -> None:
        core = self._core
        moved = 0
        while self._commands and moved < COMMANDS_PER_ITERATION_MAX:
            cmd = self._commands.popleft()
            kind = cmd[0]
            if kind == "propose":
                datas, futures = cmd[1], cmd[2]
                moved += len(datas)
                if not _core_is_leader(core):
                    err = self._leader_error()
                    self._release(len(datas))
                    for fut in futures:
                        _fail(fut, err)
                    continue
                for data, fut in zip(datas, futures):
                    try:
                        index, term = _core_propose(core, data)
                    except Exception as exc:  # noqa: BLE001 -- the caller's future gets it
                        self._release(1)
                        _fail(fut, exc if isinstance(exc, RaftDriverError) else self._leader_error()
                              if _is_not_leader(exc) else exc)
                        continue
                    self._proposals[index] = (term, fut)
            elif kind == "read":
                fut = cmd[1]
                moved += 1
                if len(self._reads_waiting_quorum) + len(self._reads_waiting_apply) >= PENDING_READS_MAX:
                    _fail(fut, Overloaded(f"PENDING_READS_MAX={PENDING_READS_MAX} reached"))
                    continue
                ctx = next(self._read_ids).to_bytes(8, "big")
                try:
                    core.read_index(ctx)
                except Exception as exc:  # noqa: BLE001 -- the caller's future gets it
                    _fail(fut, self._leader_error() if _is_not_leader(exc) else exc)
                    continue
                self._reads_waiting_quorum[ctx] = (time.monotonic(), fut)
            elif kind == "transfer":
                target, fut = cmd[1], cmd[2]
                moved += 1
                try:
                    core.transfer_leadership(target)
                    fut.set_result(None)
                except Exception as exc:  # noqa: BLE001 -- the caller's future gets it
                    _fail(fut, exc)

    def _release(self, n: int) -> None:
        with self._pending_lock:
            self._pending_count -= n

    def _report_rejections(self, now: float) -> None:
        """Log what the core refused since the last report (the core reads no clock, so the rate limit is
        here); one int compare per tick when nothing was."""
        core = self._core
        if core.rejections != self._core_rejections_seen:
            self._core_rejections_seen = core.rejections
            seen = self._core_rejected_seen
            last = core.last_rejection
            detail = f"from {last[1]}: {last[2]}" if last is not None else ""
            for reason, n in core.rejected.items():
                if n != seen.get(reason, 0):
                    self._reject_log.add(reason, detail, now, n - seen.get(reason, 0))
                    seen[reason] = n
        self._reject_log.flush(now)
        self._transport.reject_log.flush(now)

    def _expire_reads(self, now: float) -> None:
        limit = self.config.read_timeout_ms / 1000.0
        expired = [ctx for ctx, (t0, _) in self._reads_waiting_quorum.items() if now - t0 > limit]
        for ctx in expired:
            _, fut = self._reads_waiting_quorum.pop(ctx)
            _fail(fut, self._leader_error())

    def _process_ready(self) -> None:
        core = self._core
        store = self._store
        transport = self._transport
        started = time.monotonic()
        self._ready_left = False
        spent = self._spent_s = {"persist": 0.0, "apply": 0.0, "snapshot": 0.0}
        carried = None                       # a ready taken early whose messages were already sent
        rounds = 0
        while True:
            if carried is not None:          # always handled, whatever the budget: it was handed out
                rd, carried, sent = carried, None, True
            else:
                if rounds >= READY_ROUNDS_PER_ITERATION_MAX:
                    break
                if time.monotonic() - started > READY_TIME_BUDGET_S:
                    self._ready_left = True  # go back to the poller: peers' messages and ticks come first
                    break
                rd, sent = core.ready(), False
            rounds += 1
            snapshot = getattr(rd, "snapshot", None)
            entries = rd.entries or ()
            hard_state = rd.hard_state
            messages = rd.messages or ()
            committed = rd.committed_entries or ()
            read_states = getattr(rd, "read_states", None) or ()
            if not (snapshot or entries or hard_state or messages or committed or read_states):
                break
            # (a) the messages the core released: they never depend on what this ready asks to persist
            # (those wait in the core until persisted()), so they go out before the fsync below; this is
            # how a leader's appends reach followers while it persists the same entries itself
            if not sent:
                for msg in messages:
                    transport.send(msg)
            # (b) persist: one save, one fdatasync
            t_phase = time.monotonic()
            snap_arg = _snapshot_pair(snapshot)
            if snap_arg is not None or entries or hard_state is not None:
                durable = store.hard_state
                if snap_arg is None and not entries and hard_state is not None \
                        and hard_state.term == durable.term and hard_state.vote == durable.vote:
                    store.defer_commit(hard_state)      # commit index only: no fsync of its own
                else:
                    store.save(hard_state=hard_state, entries=entries, snapshot=snap_arg)
                core.persisted(store.last_index, store.last_term)
                if committed and snapshot is None:
                    # what persisted() released (a follower's acknowledgement of these entries) goes out now,
                    # before the committed entries are applied (~0.5 ms for a group of small batches, more
                    # under load): the next ready is taken early, its messages sent, and the rest of it is
                    # handled as the next round (no step runs in between, so it asks for nothing this round
                    # has not settled, and its committed entries follow this round's in order)
                    carried = core.ready()
                    for msg in carried.messages or ():
                        transport.send(msg)
            spent["persist"] += time.monotonic() - t_phase
            # (c) state machine
            t_phase = time.monotonic()
            if snap_arg is not None:
                meta, data = snap_arg
                self._restore_fn(data)
                self._applied = meta.index
                self._snapshot_index = meta.index
                self._bytes_since_snapshot = 0
                self._cancel_pending_snapshot()
                self._fail_proposals_upto(meta.index, OutcomeUnknown("a snapshot replaced the log"))
            if committed:
                self._apply(committed)
            spent["apply"] += time.monotonic() - t_phase
            for rs in read_states:
                ctx, index = _read_state(rs)
                waiting = self._reads_waiting_quorum.pop(ctx, None)
                if waiting is not None:
                    self._reads_waiting_apply.append((index, waiting[1]))
            if self._reads_waiting_apply:
                still = []
                for index, fut in self._reads_waiting_apply:
                    if index <= self._applied:
                        if not fut.done():
                            fut.set_result(index)
                    else:
                        still.append((index, fut))
                self._reads_waiting_apply = still
        t_phase = time.monotonic()
        self._maybe_snapshot()
        spent["snapshot"] += time.monotonic() - t_phase
        self._update_status()
        if self._after_ready_fn is not None:
            self._after_ready_fn()

    def _apply(self, committed: Sequence[Any]) -> None:
        normal = [e for e in committed if _is_normal(e)]
        self._bytes_since_snapshot += sum(len(e.data) for e in normal)
        results = self._apply_fn(normal) if normal else ()
        if len(results) != len(normal):
            raise RaftDriverError(f"apply returned {len(results)} results for {len(normal)} entries")
        by_index = dict(zip((e.index for e in normal), results))
        proposals = self._proposals
        resolved = 0
        for e in committed:
            assert e.index == self._applied + 1, f"apply gap: applied {self._applied}, next {e.index}"
            self._applied = e.index
            waiting = proposals.pop(e.index, None)
            if waiting is None:
                continue
            resolved += 1
            term, fut = waiting
            if e.term == term:
                fut.set_result(by_index.get(e.index))
            else:
                _fail(fut, ProposalDropped(f"entry {e.index} was replaced by term {e.term}"))
        if resolved:
            self._release(resolved)

    def _fail_proposals_upto(self, index: int, err: Exception) -> None:
        gone = [i for i in self._proposals if i <= index]
        for i in gone:
            _fail(self._proposals.pop(i)[1], err)
        if gone:
            self._release(len(gone))

    def _maybe_snapshot(self) -> None:
        if self._pending_snapshot is not None:
            index, pending = self._pending_snapshot
            try:
                data = pending.poll()
            except Exception:
                log.exception("raft %d: making the snapshot at %d failed; the next one will retry",
                              self.node_id, index)
                self._pending_snapshot = None
                return
            if data is None:
                return
            self._pending_snapshot = None
            if index > self._snapshot_index:      # else a newer snapshot was installed meanwhile
                self._save_snapshot(index, data)
            return
        if not self._snapshot_due():
            return
        if self._applied <= self._snapshot_index:
            return
        index = self._applied
        self._bytes_since_snapshot = 0
        made = self._snapshot_fn()
        if isinstance(made, (bytes, bytearray, memoryview)):
            self._save_snapshot(index, bytes(made))
        elif isinstance(made, SnapshotFile):
            self._save_snapshot(index, made)
        else:
            self._pending_snapshot = (index, made)   # made elsewhere; Raft goes on meanwhile

    def _snapshot_due(self) -> bool:
        """Past ``snapshot_threshold_bytes``, or at this replica's next snapshot point: the indexes congruent
        to its phase modulo ``snapshot_threshold_entries`` (phase = its rank among the members times
        threshold / members), so snapshots stay at most the threshold apart and the replicas of a group take
        theirs a fraction of it apart from each other instead of all at the same index (a snapshot costs a
        fork, ~1-2 s of CPU and a file write for a large ledger: three at once on a small machine made the
        latency's tail). After a restart or an installed snapshot the next one waits for at least half the
        threshold.

        A leader counts ``leader_snapshot_defer`` times the entries before its next one: the fork of a
        snapshot stops the whole process for tens of milliseconds on a large ledger (the stall log's
        raft-snapshot), and on the leader every client request waits meanwhile, while a follower's pause
        delays nothing as long as the other follower acknowledges. The bytes threshold is not deferred, so
        the log held in memory stays bounded."""
        cfg = self.config
        if self._bytes_since_snapshot >= cfg.snapshot_threshold_bytes:
            return True
        every = cfg.snapshot_threshold_entries
        since = self._applied - self._snapshot_index
        if self.is_leader and cfg.leader_snapshot_defer > 1:
            return since >= every * cfg.leader_snapshot_defer
        if since >= every:
            return True
        if since < every // 2:
            return False
        phase = self._snapshot_phase
        return (self._applied - phase) // every > (self._snapshot_index - phase) // every

    def _save_snapshot(self, index: int, data: bytes | SnapshotFile) -> None:
        cfg = self.config
        term = self._store.term(index)
        meta = _snapshot_meta(self._core, index, term)
        size = data.size if isinstance(data, SnapshotFile) else len(data)
        if size > cfg.snapshot_bytes_max:
            log.error("raft %d: the snapshot at %d has %d bytes, above snapshot_bytes_max=%d: a follower that "
                      "needs it will refuse it (raise snapshot_bytes_max on every replica)", self.node_id, index,
                      size, cfg.snapshot_bytes_max)
        # the same entries stay below the snapshot in the core and in the store (a restart keeps them)
        keep_from = _core_keep_floor(self._core, index, cfg.snapshot_keep_entries, cfg.snapshot_keep_bytes)
        self._store.save_snapshot(meta, data, keep_from=keep_from)
        held: bytes | mmap.mmap
        if isinstance(data, SnapshotFile):
            # the core only slices its snapshot (to send it in chunks): a read-only mapping of the file
            # costs nothing now, where reading it back would cost ~1 ms per MB on this thread
            path = self._store.snapshot_file_path
            assert path is not None
            with open(path, "rb") as f:
                held = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            held = data
        _core_compact(self._core, meta, held, keep_from)
        self._snapshot_index = index

    def _cancel_pending_snapshot(self) -> None:
        if self._pending_snapshot is not None:
            try:
                self._pending_snapshot[1].cancel()
            except Exception:
                log.exception("raft %d: cancelling a pending snapshot failed", self.node_id)
            self._pending_snapshot = None

    def _update_status(self) -> None:
        # runs after every loop iteration (thousands a second under load): only a tuple compare unless
        # something changed; status() builds the dict a caller asks for, and is_leader / leader_id are the
        # plain attributes a hot path reads (the node checks is_leader on every APPLY)
        core = self._core
        state = (_core_role(core), _core_term(core), _core_leader(core), _core_commit(core), self._applied,
                 self._store.last_index, self._snapshot_index, len(self._proposals))
        if state == self._status_state:
            return
        prev = self._status_state
        if state[:3] != prev[:3]:
            log.info("raft %d: role=%s term=%d leader=%s commit=%d", self.node_id, state[0], state[1], state[2],
                     state[3])
        self._status_state = state
        self.leader_id = state[2]
        self.is_leader = state[0] == "leader"
        if self._role_change_fn is not None:
            self._note_role(self.is_leader, state[1])

    def _note_role(self, is_leader: bool, term: int) -> None:
        """Report the leadership edges (a lost one before a gained one, in order) to ``on_role_change``."""
        fn = self._role_change_fn
        if fn is None:
            return
        leading = self._leader_term
        if leading and (not is_leader or term != leading):
            self._leader_term = 0
            fn(False, term)
        if is_leader and not self._leader_term:
            self._leader_term = term
            fn(True, term)


def _fail(fut: Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


# --- adapter to the pure core (engine/raft/core.py) -------------------------------------------------
# Everything the driver needs from the core goes through these functions, so an interface change in the
# core is absorbed here.

def _make_core(node_id: int, members: list[int], cfg: DriverConfig, seed: int, hard_state: Any,
               snapshot_meta: Any, entries: list[Any], snapshot_data: bytes | None = None) -> Any:
    from engine.raft import core as core_mod
    config_type = getattr(core_mod, "RaftConfig", None) or core_mod.Config
    options: dict[str, Any] = {"election_ticks": cfg.election_ticks, "heartbeat_ticks": cfg.heartbeat_ticks,
                               "snapshot_bytes_max": cfg.snapshot_bytes_max}
    options.update(cfg.core_options)
    config = config_type(**options)
    return core_mod.RaftCore(node_id, config, hard_state=hard_state, snapshot_meta=snapshot_meta,
                             entries=entries, members=members, rng=random.Random(seed),
                             snapshot_data=snapshot_data)


def _core_is_leader(core: Any) -> bool:
    return _core_role(core) == "leader"


_ROLE_NAMES: dict[Any, str] = {}


def _core_role(core: Any) -> str:
    role = core.role
    name = _ROLE_NAMES.get(role)          # an Enum's name is a slow property: read once per role
    if name is None:
        name = _ROLE_NAMES[role] = getattr(role, "name", str(role)).lower()
    return name


def _core_term(core: Any) -> int:
    return core.term


def _core_leader(core: Any) -> int | None:
    return core.leader_id


def _core_commit(core: Any) -> int:
    return core.commit_index


def _core_propose(core: Any, data: bytes) -> tuple[int, int]:
    index = core.propose(data)
    return index, core.term


def _is_not_leader(exc: Exception) -> bool:
    return type(exc).__name__ in ("NotLeader", "NotLeaderError")


def _core_keep_floor(core: Any, index: int, keep_entries: int, keep_bytes_max: int) -> int:
    return core.keep_floor(index, keep_entries, keep_bytes_max)


def _core_compact(core: Any, meta: Any, data: Any, keep_from: int) -> None:
    core.compact(meta, data, keep_from)


def _snapshot_meta(core: Any, index: int, term: int) -> Any:
    return _msg.SnapshotMeta(index=index, term=term, config=core.config_at(index))


def _snapshot_pair(snapshot: Any) -> tuple[Any, bytes] | None:
    if snapshot is None:
        return None
    if isinstance(snapshot, tuple):
        return snapshot
    return snapshot.meta, snapshot.data


def _read_state(rs: Any) -> tuple[bytes, int]:
    if isinstance(rs, tuple):
        return rs[0], rs[1]
    return rs.ctx, rs.index


def _is_normal(entry: Any) -> bool:
    kind_type = getattr(_msg, "EntryKind", None)
    normal = getattr(kind_type, "NORMAL", 0) if kind_type is not None else 0
    return entry.kind == normal and len(entry.data) > 0
