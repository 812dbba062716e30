"""One replica of a shard: the ledger behind a ZeroMQ ROUTER, replicated by our Raft, publishing events.

    zwallet node --config node.toml [--id 1] [--data-dir DIR] [--verbose]

Threads. The **main thread** owns every client-facing socket: it receives requests on the ROUTER, checks
them, groups the APPLY batches that arrive while earlier log entries are in flight into one entry (group
commit), proposes it, and sends replies and PUB messages. The **Raft driver thread** (`engine/raft/driver.py`)
owns the core, the LMDB log and the peer transport, and applies committed entries to the ledger
(`engine/ledger_machine.py`), writing their events to the event store (`engine/event_store.py`). The two
meet in three places only: the driver's futures (their callbacks queue completions and wake the main
thread through an eventfd), the ledger lock (the main thread reads the ledger under it), and the PUB queue.

Request handling (protocol: `engine/wire.py`, docs/protocol.md):
- Intake (``_receive``/``_handle``): frame count, header, payload size against the op, then the pending
  bounds (requests and bytes, all clients and per connection), all before anything is decoded; a refusal
  echoes the req_id when it can be read and is counted by reason (STATUS "refusals"). Frames over
  ``frame_bytes_max`` never reach us (ZMQ_MAXMSGSIZE drops the connection), and the connection guard
  (`engine/conn_guard.py`) cuts a connection that holds too many bytes inside ZeroMQ either way.
- APPLY: the payload must be whole op records, at most ``batch_records_max``, well formed (``check_batch``);
  anything else is an ERROR reply and never reaches the log. Only the leader accepts; a follower replies
  NOT_LEADER with the leader's id and client address. The reply carries one result record per op record
  once the entry holding the batch is committed and applied here.
- Reads (GET_ACCOUNTS, EVENTS, RESULT_OF, TOTALS): LINEARIZABLE by default (one ReadIndex round shared by
  every read that arrived in the same loop iteration, on any replica); FOLLOWER reads are served locally
  once this replica's ledger has applied ``min_seq``. EVENTS come from the event store (the golden copy).
- STATUS: role, term, leader, commit and applied index, ledger last_seq, optionally the state digest.
  TOTALS and the digest are O(accounts) under the ledger lock: they share a time budget
  (``expensive_read_ms_per_s``) and are refused RATE_LIMITED over it.
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import logging
import os
import signal
import sys
import threading
import struct
import time
import tomllib
import zlib
from dataclasses import dataclass, fields
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import numpy as np
import zmq

from engine import fileio
from engine import records as R
from engine._ledger import ACCOUNT_CAPACITY_MAX, ACCOUNTS_MAX_DEFAULT, DEDUP_RETENTION_DEFAULT, check_batch
from engine.event_store import EVENT_RETENTION_SEQS_DEFAULT, WRITEBACK_INTERVAL_S, EventStore, EventsUnavailable
from engine.ledger_machine import (ENTRY_BATCHES_MAX, ENTRY_RECORDS_MAX, EntryOutcomes, LedgerMachine, events_between,
                                   ledger_entry)
from engine.raft.log_store import SnapshotFile
from engine.raft.driver import (DriverConfig, NotLeader, OutcomeUnknown, Overloaded, ProposalDropped,
                                RaftDriver)
from engine import wire as W
from engine.stalls import SchedulerProbe, StallLog
from engine.conn_guard import ConnectionGuard
from engine.zmq_io import Waker
from engine.wire import ErrorCode, Op, Status

log = logging.getLogger("zwallet.node")

_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_OP_APPLY = int(Op.APPLY)
_OP_DTYPE = R.OP_DTYPE
_OP_BYTES = R.OP_DTYPE.itemsize
_RESULT_BYTES = R.RESULT_DTYPE.itemsize

CLIENT_FRAME_BYTES_MAX = W.FRAME_BYTES_MAX_DEFAULT   # default ZMQ_MAXMSGSIZE on the client ROUTER: a full
                                      # APPLY batch plus a header's worth; a larger frame drops the peer
CLIENT_RCVHWM = 1_000                 # messages queued per client connection before TCP holds the sender back
CLIENT_SNDHWM = 100_000               # replies queued per client connection (ROUTER drops beyond; bytes: the guard)
SNAPSHOT_CHILD_NICE = 10             # the snapshot child's niceness: the replicas' threads preempt it
SNAPSHOT_CHILD_BOOST_S = 10.0         # ... until it has run this long; then it gets normal priority back
SNAPSHOT_WRITE_CHUNK_BYTES = 1 << 20  # the child writes its file back this much at a time ...
SNAPSHOT_WRITE_PAUSE_S = 0.002        # ... pausing this long in between (~300 MB/s at most)
RECV_PER_ITERATION_MAX = 4096         # client messages drained per loop iteration (bounds reply latency)
RECV_PASS_S = 0.005                   # ... and for at most this long: a request read early in a pass is
                                      # proposed (or its ReadIndex round started) only after the pass, and
                                      # 4096 junk messages of a flood take ~100 ms to refuse
DEDUP_RETENTION_MAX = 1 << 30        # 64 GiB of dedup ring per replica at most
# A window smaller than the commands issued in the same millisecond would refuse some of them (the horizon
# passes their issue time when the first of them is evicted): at least 4 full entries.
NODE_DEDUP_RETENTION_MIN = 4 * ENTRY_RECORDS_MAX
RECEIVE_DEFER_MS = 2                  # with entries in flight, requests are taken at most this late (see serve)


@dataclass
class NodeConfig:
    """Everything one replica needs. ``replicas`` maps every member id to its three addresses."""
    node_id: int
    replicas: dict[int, dict[str, str]]          # id -> {"raft": ..., "client": ..., "pub": ...}
    data_dir: str
    # limits
    batch_records_max: int = R.BATCH_SIZE_MAX     # op records in one APPLY request
    frame_bytes_max: int = CLIENT_FRAME_BYTES_MAX  # a client frame larger than this drops the connection
    entry_records_max: int = ENTRY_RECORDS_MAX    # op records grouped into one log entry
    inflight_entries_max: int = 1                 # proposed but not yet applied log entries (1: measured
                                                  # best at 1K and 10K single-transfer requests/s on 2 cores)
    pending_requests_max: int = 100_000           # requests accepted and not yet answered, all clients
    pending_per_client_max: int = 8_192           # ... per client connection
    pending_bytes_max: int = 256 << 20            # bytes (header + payload) of those requests, all clients
    pending_bytes_per_client_max: int = 32 << 20  # ... per client connection
    connection_held_bytes_max: int = 64 << 20     # bytes one connection may hold inside ZeroMQ either way
                                                  # (received, not yet taken; replies not yet acknowledged)
                                                  # before the node cuts it (engine/conn_guard.py)
    held_bytes_max: int = 512 << 20               # ... all connections together (the largest are cut first)
    connection_check_ms: int = 20                 # how often the guard looks (0: no guard)
    expensive_read_ms_per_s: int = 50             # ledger-lock time per second for O(accounts) reads
                                                  # (TOTALS, STATUS with digest); over it: RATE_LIMITED
    follower_read_wait_ms: int = 2_000            # FOLLOWER read waiting for min_seq, then TIMEOUT
    read_waiting_max: int = 10_000                # parked follower reads
    event_retention_seqs: int = EVENT_RETENTION_SEQS_DEFAULT
    pub_queue_messages_max: int = 100_000         # SNDHWM of the PUB socket (slow subscribers lose, then fetch)
    dedup_retention: int = DEDUP_RETENTION_DEFAULT  # commands remembered for exactly-once (~96 bytes each;
                                                  # every replica alike: it is part of the replicated state)
    accounts_max: int = ACCOUNTS_MAX_DEFAULT      # accounts the ledger can hold (address space reserved)
    # raft
    tick_ms: int = 10
    election_ticks: int = 30
    heartbeat_ticks: int = 3
    snapshot_threshold_entries: int = 200_000      # a snapshot forks and writes the ledger: not often (docs)
    snapshot_threshold_bytes: int = 256 << 20     # log payload since the last snapshot (held in memory)
    snapshot_keep_entries: int = 2_000
    snapshot_keep_bytes: int = 64 << 20           # ... but at most this many bytes of them (held in memory)
    snapshot_bytes_max: int = 4 << 30            # an incoming snapshot larger than this is refused
    leader_snapshot_defer: int = 4               # the leader snapshots this many times less often (by entries)
    snapshot_in_child: bool = True                # serialize snapshots in a forked child (no Raft stall)
    sync: bool = True
    map_size_gib: int = 64
    verbose: bool = False
    stall_probe_ms: int = 0                       # > 0: a thread measures scheduling delay (engine/stalls.py)

    def validate(self) -> None:
        if self.node_id not in self.replicas:
            raise ValueError(f"node id {self.node_id} is not one of the replicas {sorted(self.replicas)}")
        for rid, addrs in self.replicas.items():
            missing = {"raft", "client", "pub"} - set(addrs)
            if missing:
                raise ValueError(f"replica {rid} lacks address(es) {sorted(missing)}")
        if not 1 <= self.batch_records_max <= R.BATCH_SIZE_MAX:
            raise ValueError(f"batch_records_max must be 1..{R.BATCH_SIZE_MAX}")
        if self.frame_bytes_max < max(self.batch_records_max * R.OP_DTYPE.itemsize, W.HEADER_BYTES_MAX,
                                      W.IDS_PER_REQUEST_MAX * W.ID_BYTES):
            raise ValueError("frame_bytes_max must hold batch_records_max op records, a header and an id list")
        largest_request = self.frame_bytes_max + W.HEADER_BYTES_MAX
        if not largest_request <= self.pending_bytes_per_client_max <= self.pending_bytes_max:
            raise ValueError("need frame_bytes_max + HEADER_BYTES_MAX <= pending_bytes_per_client_max <= "
                             "pending_bytes_max (one largest request must fit)")
        if not 2 * largest_request <= self.connection_held_bytes_max <= self.held_bytes_max:
            raise ValueError("need 2 x (frame_bytes_max + HEADER_BYTES_MAX) <= connection_held_bytes_max <= "
                             "held_bytes_max")
        if self.connection_check_ms < 0:
            raise ValueError("connection_check_ms must be >= 0 (0: no connection guard)")
        if self.expensive_read_ms_per_s < 1:
            raise ValueError("expensive_read_ms_per_s must be >= 1")
        if not self.batch_records_max <= self.entry_records_max <= ENTRY_RECORDS_MAX:
            raise ValueError(f"entry_records_max must be batch_records_max..{ENTRY_RECORDS_MAX}")
        for name in ("inflight_entries_max", "pending_requests_max", "pending_per_client_max",
                     "follower_read_wait_ms", "read_waiting_max", "event_retention_seqs",
                     "pub_queue_messages_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not NODE_DEDUP_RETENTION_MIN <= self.dedup_retention <= DEDUP_RETENTION_MAX:
            raise ValueError(f"dedup_retention must be {NODE_DEDUP_RETENTION_MIN}..{DEDUP_RETENTION_MAX} "
                             "(rounded up to a power of two; at least 4 full log entries of commands, so "
                             "that commands issued together are never evicted before the last is applied)")
        if not 1 <= self.accounts_max <= ACCOUNT_CAPACITY_MAX:
            raise ValueError(f"accounts_max must be 1..{ACCOUNT_CAPACITY_MAX}")
        if self.stall_probe_ms < 0:
            raise ValueError("stall_probe_ms must be >= 0 (0: off)")
        if self.pending_per_client_max > self.pending_requests_max:
            raise ValueError("pending_per_client_max exceeds pending_requests_max")

    def driver_config(self) -> DriverConfig:
        return DriverConfig(tick_interval_ms=self.tick_ms, election_ticks=self.election_ticks,
                            heartbeat_ticks=self.heartbeat_ticks,
                            snapshot_threshold_entries=self.snapshot_threshold_entries,
                            snapshot_threshold_bytes=self.snapshot_threshold_bytes,
                            snapshot_keep_entries=self.snapshot_keep_entries,
                            snapshot_keep_bytes=self.snapshot_keep_bytes, snapshot_bytes_max=self.snapshot_bytes_max,
                            leader_snapshot_defer=self.leader_snapshot_defer, sync=self.sync,
                            map_size_bytes=self.map_size_gib << 30)

    @classmethod
    def from_toml(cls, path: str, **overrides: Any) -> NodeConfig:
        """Read a node config file (format: docs/operations.md); keyword overrides win over the file."""
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        return cls.from_dict(doc, **overrides)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], **overrides: Any) -> NodeConfig:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        node = dict(doc.get("node", {}))
        if "id" in node:
            values["node_id"] = node.pop("id")
        for section in ("node", "limits", "raft"):
            for k, v in (node if section == "node" else doc.get(section, {})).items():
                if k not in known:
                    raise ValueError(f"unknown setting [{section}] {k}")
                values[k] = v
        replicas = {}
        for r in doc.get("replica", []):
            rid = int(r["id"])
            replicas[rid] = {k: str(r[k]) for k in ("raft", "client", "pub") if k in r}
        values["replicas"] = replicas
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(doc) - {"node", "limits", "raft", "replica"}
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_toml(self) -> str:
        lines = ["[node]", f"id = {self.node_id}", f'data_dir = "{self.data_dir}"',
                 f"verbose = {str(self.verbose).lower()}",
                 f"stall_probe_ms = {self.stall_probe_ms}", "", "[limits]"]
        for name in ("batch_records_max", "frame_bytes_max", "entry_records_max", "inflight_entries_max",
                     "pending_requests_max", "pending_per_client_max", "follower_read_wait_ms", "read_waiting_max",
                     "event_retention_seqs", "pub_queue_messages_max", "dedup_retention", "accounts_max"):
            lines.append(f"{name} = {getattr(self, name)}")
        for name in _INTAKE_LIMITS:
            lines.append(f"{name} = {getattr(self, name)}")
        lines += ["", "[raft]"]
        for name in ("tick_ms", "election_ticks", "heartbeat_ticks", "snapshot_threshold_entries",
                     "snapshot_threshold_bytes", "snapshot_keep_entries", "snapshot_keep_bytes", "snapshot_bytes_max",
                     "leader_snapshot_defer", "map_size_gib"):
            lines.append(f"{name} = {getattr(self, name)}")
        lines.append(f"sync = {str(self.sync).lower()}")
        lines.append(f"snapshot_in_child = {str(self.snapshot_in_child).lower()}")
        for rid, a in sorted(self.replicas.items()):
            lines += ["", "[[replica]]", f"id = {rid}", f'raft = "{a["raft"]}"', f'client = "{a["client"]}"',
                      f'pub = "{a["pub"]}"']
        return "\n".join(lines) + "\n"


# the [limits] of the client intake (written by to_toml after the others)
_INTAKE_LIMITS = ("pending_bytes_max", "pending_bytes_per_client_max", "connection_held_bytes_max",
                  "held_bytes_max", "connection_check_ms", "expensive_read_ms_per_s")


@dataclass(slots=True)
class _Pending:
    ident: bytes
    req: W.Request
    payload: Any = None            # APPLY: the op records (bytes-like); reads: decoded arguments
    records: int = 0
    nbytes: int = 0                # the request's bytes as received (header + payload), for the byte bounds


# Why the node refused a request or cut a connection: STATUS "refusals" counts each (docs/protocol.md).
REFUSAL_REASONS = (
    "frames",                    # not exactly two frames                              BAD_REQUEST
    "header",                    # the header does not decode (or exceeds HEADER_BYTES_MAX)  BAD_REQUEST
    "version",                   # a well-formed header of another protocol version     BAD_REQUEST
    "unknown_op",                #                                                      UNKNOWN_OP
    "payload",                   # payload not whole records / empty APPLY / one where none is taken
    "batch_too_large",           # more records or ids than allowed                     BATCH_TOO_LARGE
    "bad_batch",                 # op records that check_batch refuses                  BAD_REQUEST
    "bad_argument",              # event range, currency, consistency                   BAD_REQUEST
    "pending_requests",          # pending_requests_max reached                         OVERLOADED
    "pending_per_client",        # pending_per_client_max reached                       OVERLOADED
    "pending_bytes",             # pending_bytes_max reached                            OVERLOADED
    "pending_bytes_per_client",  # pending_bytes_per_client_max reached                 OVERLOADED
    "read_waiting",              # read_waiting_max parked follower reads               OVERLOADED
    "rate_limited",              # expensive_read_ms_per_s spent                        RATE_LIMITED
)
CUT_REASONS = ("connection_held_in", "connection_held_out", "held_total")   # the guard's (no reply)


class _ReadBudget:
    """Ledger-lock time for O(accounts) reads: refills at ``ms_per_s``, holds at most one second's worth;
    a read is admitted while the budget is positive and then charged what it took (so one slow read
    defers the next ones by as long as it ran, in proportion)."""

    def __init__(self, ms_per_s: int) -> None:
        self.rate = ms_per_s / 1000.0
        self.level = self.rate
        self.at = time.monotonic()

    def admit(self) -> bool:
        now = time.monotonic()
        self.level = min(self.rate, self.level + (now - self.at) * self.rate)
        self.at = now
        return self.level > 0

    def charge(self, seconds: float) -> None:
        self.level -= seconds

    @property
    def retry_after_ms(self) -> int:
        return max(1, int(-self.level / self.rate * 1000) + 1) if self.level <= 0 else 0


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    applied_batches: int = 0
    bad_requests: int = 0
    not_leader: int = 0
    overloaded: int = 0
    entries_proposed: int = 0
    entries_batches: int = 0


class Node:
    def __init__(self, config: NodeConfig) -> None:
        config.validate()
        self.config = config
        self.node_id = config.node_id
        os.makedirs(config.data_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(config.data_dir, "snapshot-*.tmp*")):
            fileio.unlink_quietly(stale)       # left by a snapshot child when the node died mid-snapshot
        self.events = EventStore(os.path.join(config.data_dir, "events"),
                                 retention_seqs=config.event_retention_seqs)
        self.machine = LedgerMachine(event_sink=self._on_events, dedup_retention=config.dedup_retention,
                                     accounts_max=config.accounts_max)
        self.stalls = StallLog()
        self._probe = SchedulerProbe(self.stalls, config.stall_probe_ms / 1000) if config.stall_probe_ms else None
        self.lock = threading.Lock()           # the ledger: applied by the driver thread, read by the main one
        self._completions: collections.deque[Callable[[], None]] = collections.deque()
        self._pub_queue: collections.deque[np.ndarray] = collections.deque()
        self._waker = Waker()
        self.driver = RaftDriver(config.node_id, {i: a["raft"] for i, a in config.replicas.items()},
                                 os.path.join(config.data_dir, "raft"), apply=self._apply,
                                 snapshot=self._snapshot, restore=self._restore, config=config.driver_config(),
                                 after_ready=self._after_ready, stalls=self.stalls)
        self._wake_wanted = False
        self._driver_thread_ident: int | None = None       # set once the driver thread runs
        self._group: list[_Pending] = []
        self._group_records = 0
        self._sealed: collections.deque[list[_Pending]] = collections.deque()   # full groups, not yet proposed
        self._complete_cache: tuple[Any, int] = (None, 0)
        self._last_ts = 0
        self._inflight = 0
        self._pending_total = 0
        self._pending_by_client: collections.Counter[bytes] = collections.Counter()
        self._pending_bytes = 0
        self._pending_bytes_by_client: collections.Counter[bytes] = collections.Counter()
        self.refusals: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self._read_budget = _ReadBudget(config.expensive_read_ms_per_s)
        self._apply_bytes_max = config.batch_records_max * _OP_BYTES
        self.guard = ConnectionGuard(config.replicas[config.node_id]["client"], config.connection_held_bytes_max,
                                     config.held_bytes_max, config.connection_check_ms / 1000)
        self._reads_linearizable: list[_Pending] = []
        self._reads_follower: list[tuple[float, _Pending]] = []
        self.counters = _Counters()
        self._stopping = threading.Event()
        self.exit_code = 0
        self.ctx: zmq.Context | None = None

    # ------------------------------------------------------------------------ driver-thread callbacks
    def _apply(self, entries: Any) -> list[Any]:
        with self.lock:
            return self.machine.apply(entries)

    def _on_events(self, chunks: list[np.ndarray]) -> None:
        # runs inside machine.apply, under the lock: store first (the golden copy); the Raft thread
        # publishes them at the end of its ready round (_after_ready). The main thread is woken only if
        # follower reads wait for a newer seq (otherwise a follower's main thread would wake for every
        # entry just to publish; it polls at most 5 ms apart while reads are parked)
        self.events.append(chunks)
        self._pub_queue.extend(chunks)
        if self._reads_follower:
            self._wake_soon()

    def _snapshot(self) -> bytes | ForkedSnapshot:
        # every event below the snapshot is durable before the snapshot is (the log below it may go)
        with self.lock:
            if self.config.snapshot_in_child:
                self.events.flush()                # in LMDB's file before the fork: the child fsyncs that
                made: bytes | ForkedSnapshot = ForkedSnapshot(self.machine.snapshot, self.config.data_dir,
                                                              fsync_first=[self.events.data_file])
            else:
                self.events.sync()
                made = self.machine.snapshot()
        self.events.prune()
        return made

    def _restore(self, data: bytes) -> None:
        with self.lock:
            self.machine.restore(data)
            self.events.note_restored(self.machine.ledger.last_seq)

    def _wake(self) -> None:
        self._waker.wake()

    def _wake_soon(self) -> None:
        """Wake the main thread: at once from any thread but the Raft driver's; from the driver thread, at
        the end of its ready round (``_after_ready``). Woken in the middle of applying, the main thread took
        the GIL for its replies or PUB sends while the driver thread waited for it back (measured on a
        follower at 10K requests/s: ~85 us of the driver thread per entry, the eventfd write the largest
        item of its profile after the fsync)."""
        if threading.get_ident() == self._driver_thread_ident:
            self._wake_wanted = True
        else:
            self._waker.wake()

    def _after_ready(self) -> None:
        # the Raft thread, at the end of each ready round: wake the main thread for the completions, then
        # publish what was applied (the PUB socket is this thread's)
        if self._wake_wanted:
            self._wake_wanted = False
            self._waker.wake()
        if self._pub_queue:
            self._publish()

    def _complete(self, fn: Callable[[], None]) -> None:
        self._completions.append(fn)
        self._wake_soon()

    # ------------------------------------------------------------------------------------ main loop
    def start(self) -> None:
        cfg = self.config
        me = cfg.replicas[cfg.node_id]
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, cfg.frame_bytes_max)
        self.router.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
        self.router.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.router.bind(me["client"])
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, cfg.pub_queue_messages_max)
        self.pub.bind(me["pub"])
        self.driver.start()
        self._driver_thread_ident = self.driver.thread_ident
        self._writeback = threading.Thread(target=self._writeback_loop, name="event-writeback", daemon=True)
        self._writeback.start()
        if self._probe is not None:
            self._probe.start()
        self.guard.start(self.router)
        log.info("node %d started: client %s pub %s", cfg.node_id, me["client"], me["pub"])

    def stop(self) -> None:
        self._stopping.set()
        self._wake()

    def serve(self) -> None:
        # Two pollers: while the leader has as many entries in flight as it may (group commit), requests
        # only wait for the next entry, so the loop does not wake for each one: it waits for the entry's
        # completion (the waker) or RECEIVE_DEFER_MS, then takes every request queued meanwhile in one
        # pass. Woken per request instead, at 10K requests/s, the main thread spent most of its time
        # waking up (measured: 63% of a core).
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        poller_busy = zmq.Poller()
        poller_busy.register(self._waker.fd, zmq.POLLIN)
        stalls = self.stalls
        waker_fd = self._waker.fd
        inflight_max = self.config.inflight_entries_max
        try:
            while not self._stopping.is_set():
                if self._inflight >= inflight_max:
                    events = dict(poller_busy.poll(RECEIVE_DEFER_MS))
                else:
                    events = dict(poller.poll(5 if (self._reads_follower or self._group) else 100))
                t_pass = time.monotonic()
                if waker_fd in events:
                    self._waker.drain()
                self._run_completions()
                self._receive()
                self._flush_group()
                self._start_linearizable_reads()
                self._serve_follower_reads()
                stalls.add("main-pass", time.monotonic() - t_pass)
                if self.driver.failed:
                    # fail-stop: a replica whose Raft thread died (disk full, I/O error, a broken
                    # invariant) must not linger half-alive; exit so it is seen and restarted
                    log.critical("node %d: the Raft driver thread failed; stopping (see its traceback above)",
                                 self.node_id)
                    self.exit_code = 3
                    break
        finally:
            self._shutdown()

    def _writeback_loop(self) -> None:
        # the events appended meanwhile go into LMDB in one transaction (EventStore.flush), and the store's
        # pages to the disk a little at a time (EventStore.start_writeback); its own thread, so the syscalls
        # (GIL released) never delay the Raft or the main thread
        while not self._stopping.wait(WRITEBACK_INTERVAL_S):
            try:
                self.events.flush()
                self.events.start_writeback()
            except Exception:
                # the store is closed only after this thread is joined: this is a real failure (a full
                # disk or map); the Raft thread's next flush meets it too and stops the replica
                log.exception("node %d: the event store's flush or writeback failed", self.node_id)
                return

    def _shutdown(self) -> None:
        self._stopping.set()
        if getattr(self, "_writeback", None) is not None:
            self._writeback.join()
        if self._probe is not None:
            self._probe.stop()
        self.guard.stop()
        self.driver.stop()
        self._run_completions()
        for group in (*self._sealed, self._group):
            for p in group:
                self._error(p, ErrorCode.SHUTTING_DOWN, "the node is shutting down; nothing was applied")
        self._sealed.clear()
        self._group.clear()
        self.router.close(0)
        self.pub.close(0)
        if self.ctx is not None:
            self.ctx.term()
        self.events.close()
        self._waker.close()

    def _run_completions(self) -> None:
        while self._completions:
            self._completions.popleft()()

    # -------------------------------------------------------------------------------------- receive
    def _receive(self) -> None:
        # the hot loop of the leader's main thread (one pass per request): plain ints for the zmq flags
        # and the op; the identity and the header as bytes, the payload a zero-copy Frame. The guard is
        # told the bytes taken from each connection (its framing included: see engine/conn_guard.py)
        sock = self.router
        recv = sock.recv
        counters = self.counters
        guard = self.guard if self.guard.enabled else None
        monotonic = time.monotonic
        pass_end = monotonic() + RECV_PASS_S
        for k in range(RECV_PER_ITERATION_MAX):
            if not k & 31 and k and monotonic() > pass_end:
                return                      # the rest waits for the next pass (poll returns at once)
            try:
                f = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident = f.bytes
            first = f
            frames: list[Any] = []
            while f.more:
                f = recv(copy=False)
                frames.append(f)
            counters.requests += 1
            if guard is not None:
                taken = 0
                for fr in frames:
                    n = len(fr)
                    taken += n + (2 if n <= 255 else 9)
                guard.note_in(guard.key_of(ident, first), taken)
            if frames:
                frames[0] = frames[0].bytes
            self._handle(ident, frames)

    def _handle(self, ident: bytes, frames: list[Any]) -> None:
        # Every check that needs no decoding comes first (frame count, sizes), then the header, then the
        # payload's size against the op, then the pending bounds; only then is anything decoded or queued.
        # A refusal echoes the req_id whenever it can be read (W.salvage_req_id: docs/protocol.md, Errors).
        if len(frames) != 2:
            self._refuse(ident, W.salvage_req_id(frames[0]) if frames else 0, ErrorCode.BAD_REQUEST, "frames",
                         f"a request is exactly two frames [header, payload]: got {len(frames)}")
            return
        head = frames[0]
        try:
            req = W.decode_request(head)
        except W.UnsupportedVersion as exc:
            self._refuse(ident, W.salvage_req_id(head), ErrorCode.BAD_REQUEST, "version", str(exc))
            return
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            self._refuse(ident, W.salvage_req_id(head), ErrorCode.BAD_REQUEST, "header", f"bad request header: {exc}")
            return
        body = frames[1]
        size = len(body)
        op = req.op
        if op == _OP_APPLY:                # the hot path: no Op() lookup
            if size % _OP_BYTES or not size:
                self._refuse(ident, req.req_id, ErrorCode.BAD_REQUEST, "payload",
                             f"APPLY payload of {size} bytes is not 1 or more whole {_OP_BYTES}-byte op records")
                return
            if size > self._apply_bytes_max:
                self._refuse(ident, req.req_id, ErrorCode.BATCH_TOO_LARGE, "batch_too_large",
                             f"batch of {size // _OP_BYTES} records exceeds batch_records_max="
                             f"{self.config.batch_records_max}; nothing was applied")
                return
        else:
            try:
                op = Op(op)
            except ValueError:
                self._refuse(ident, req.req_id, ErrorCode.UNKNOWN_OP, "unknown_op", f"unknown op {req.op}")
                return
            if op is Op.GET_ACCOUNTS or op is Op.RESULT_OF:
                if size % W.ID_BYTES:
                    self._refuse(ident, req.req_id, ErrorCode.BAD_REQUEST, "payload", f"an id list of {size} "
                                 f"bytes is not a whole number of {W.ID_BYTES}-byte little-endian u128 ids")
                    return
                if size > W.IDS_PER_REQUEST_MAX * W.ID_BYTES:
                    self._refuse(ident, req.req_id, ErrorCode.BATCH_TOO_LARGE, "batch_too_large",
                                 f"{size // W.ID_BYTES} ids exceed IDS_PER_REQUEST_MAX={W.IDS_PER_REQUEST_MAX}")
                    return
            elif size:
                self._refuse(ident, req.req_id, ErrorCode.BAD_REQUEST, "payload",
                             f"{op.name} takes an empty payload frame, not {size} bytes")
                return
        cfg = self.config
        nbytes = len(head) + size
        of_client = self._pending_by_client.get(ident, 0)
        if self._pending_total >= cfg.pending_requests_max:
            reason = "pending_requests"
        elif of_client >= cfg.pending_per_client_max:
            reason = "pending_per_client"
        elif self._pending_bytes + nbytes > cfg.pending_bytes_max:
            reason = "pending_bytes"
        elif self._pending_bytes_by_client.get(ident, 0) + nbytes > cfg.pending_bytes_per_client_max:
            reason = "pending_bytes_per_client"
        else:
            reason = ""
        if reason:
            self._refuse(ident, req.req_id, ErrorCode.OVERLOADED, reason,
                         f"too many pending requests or bytes ({reason}); retry later with the same dedup ids")
            return
        p = _Pending(ident, req, nbytes=nbytes)
        self._pending_total += 1
        self._pending_by_client[ident] = of_client + 1
        self._pending_bytes += nbytes
        self._pending_bytes_by_client[ident] += nbytes
        try:
            if op == _OP_APPLY:
                self._accept_apply(p, body.buffer)
            elif op is Op.STATUS:
                self._serve_status(p)
            else:
                self._accept_read(p, Op(op), body.buffer)
        except _RequestError as exc:
            self._count_refusal(exc.reason or ("bad_batch" if op == _OP_APPLY else "bad_argument"), exc.code)
            self._error(p, exc.code, str(exc))

    def _count_refusal(self, reason: str, code: ErrorCode) -> None:
        self.refusals[reason] += 1
        if code is ErrorCode.OVERLOADED or code is ErrorCode.RATE_LIMITED:
            self.counters.overloaded += 1
        else:
            self.counters.bad_requests += 1

    def _refuse(self, ident: bytes, req_id: int, code: ErrorCode, reason: str, message: str) -> None:
        """An ERROR reply to a request that was never accepted (nothing pending to finish)."""
        self._count_refusal(reason, code)
        self._reply_raw(ident, W.Reply(req_id, Status.ERROR, code, message, last_seq=self.machine.ledger.last_seq,
                                       node_id=self.node_id))

    def _serve_status(self, p: _Pending) -> None:
        # O(1) whatever the ledger's size (the digest is the ledger's running chain digest)
        self._reply(p, payload=msgspec.msgpack.encode(self.status()))

    def _accept_apply(self, p: _Pending, payload: Any) -> None:
        size = len(payload)
        if size % _OP_BYTES:
            raise _RequestError(ErrorCode.BAD_REQUEST, f"APPLY payload of {size} bytes is not a whole number "
                                f"of {_OP_BYTES}-byte op records")
        n = size // _OP_BYTES
        if n == 0:
            raise _RequestError(ErrorCode.BAD_REQUEST, "APPLY of an empty batch")
        if n > self.config.batch_records_max:
            raise _RequestError(ErrorCode.BATCH_TOO_LARGE, f"batch of {n} records exceeds batch_records_max="
                                f"{self.config.batch_records_max}; nothing was applied")
        try:                                      # every replica says what is wrong with a bad batch
            check_batch(np.frombuffer(payload, dtype=_OP_DTYPE))
        except (TypeError, ValueError) as exc:
            raise _RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if not self.driver.is_leader:
            self._not_leader(p)
            return
        p.payload = payload
        p.records = n
        if self._group and (self._group_records + n > self.config.entry_records_max
                            or len(self._group) >= ENTRY_BATCHES_MAX):
            # the group is full: it waits, sealed, for a free entry slot (inflight_entries_max is a real
            # limit; what waits is bounded by the pending-request limits)
            self._sealed.append(self._group)
            self._group, self._group_records = [], 0
            self._flush_group()
        self._group.append(p)
        self._group_records += n

    def _accept_read(self, p: _Pending, op: Op, payload: Any) -> None:
        req = p.req
        if op in (Op.GET_ACCOUNTS, Op.RESULT_OF):
            try:                          # its size was checked in _handle, before this decode
                ids = W.decode_ids(payload)
            except ValueError as exc:
                raise _RequestError(ErrorCode.BAD_REQUEST, str(exc), reason="payload") from None
            p.payload = ids
        elif op is Op.EVENTS:
            if not 1 <= req.first_seq <= req.last_seq:
                raise _RequestError(ErrorCode.BAD_REQUEST, f"bad event range {req.first_seq}..{req.last_seq}")
        elif op is Op.TOTALS:
            try:
                R.encode_currency(req.currency)
            except ValueError as exc:
                raise _RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if req.consistency == W.Consistency.FOLLOWER:
            if len(self._reads_follower) >= self.config.read_waiting_max:
                raise _RequestError(ErrorCode.OVERLOADED, "too many parked follower reads (read_waiting_max)",
                                    reason="read_waiting")
            self._reads_follower.append((time.monotonic() + self.config.follower_read_wait_ms / 1000, p))
        elif req.consistency == W.Consistency.LINEARIZABLE:
            self._reads_linearizable.append(p)
        else:
            raise _RequestError(ErrorCode.BAD_REQUEST, f"unknown consistency {req.consistency}")

    # ------------------------------------------------------------------------------ group commit
    def _flush_group(self) -> None:
        """Propose the sealed groups, then the open one, while fewer than inflight_entries_max entries are
        in flight. The entry's time is the leader's wall clock, never below one it proposed before; after
        a failover it may be behind the old leader's, and the ledger takes the newest time it has applied
        instead (entries' times as applied never go back)."""
        while self._inflight < self.config.inflight_entries_max:
            if self._sealed:
                group = self._sealed.popleft()
            elif self._group:
                group, self._group, self._group_records = self._group, [], 0
            else:
                return
            self._last_ts = max(self._last_ts, int(time.time() * 1000))
            entry = ledger_entry([p.payload for p in group], self._last_ts)
            self._inflight += 1
            self.counters.entries_proposed += 1
            self.counters.entries_batches += len(group)
            fut = self.driver.propose(entry)
            fut.add_done_callback(functools.partial(self._entry_completed, group))

    def _entry_completed(self, group: list[_Pending], fut: Any) -> None:
        self._complete(lambda: self._entry_done(group, fut))

    def _entry_done(self, group: list[_Pending], fut: Any) -> None:
        self._inflight -= 1
        exc = fut.exception()
        if exc is not None:
            for p in group:
                self._proposal_failed(p, exc)
            return
        outcomes = fut.result()
        if outcomes is None or len(outcomes) != len(group):    # cannot happen: the leader built the entry
            for p in group:
                self._error(p, ErrorCode.OUTCOME_UNKNOWN, "the entry was refused by the ledger as malformed")
            return
        # one reply header per entry: the replies of its batches differ only in req_id
        prefix, suffix = _ok_reply_parts(self.machine.ledger.last_seq, self.node_id)
        encode_int = _INT_ENCODER.encode
        counters = self.counters
        if isinstance(outcomes, EntryOutcomes):
            # applied in one call (every batch accepted): each batch's results are its slice of the entry's,
            # cut from one bytes copy, with no per-batch array or outcome object unless it asked for events
            # (this runs between an entry's commit and the next proposal, for tens of one-transfer batches)
            raw = outcomes.results.tobytes()
            bodies: Iterable[bytes | None] = (raw[a * _RESULT_BYTES:(a + n) * _RESULT_BYTES]
                      for a, n in zip(outcomes.starts, outcomes.counts))
        else:
            bodies = (None if o.results is None else o.results.tobytes() for o in outcomes)
        for i, (p, body) in enumerate(zip(group, bodies)):
            if body is None:
                self._error(p, ErrorCode.BAD_REQUEST, outcomes[i].error)
                continue
            counters.applied_batches += 1
            extra = self._events_of(outcomes[i], outcomes.events) if p.req.want_events else None
            self._finish(p)
            self._send_reply(p.ident, prefix + encode_int(p.req.req_id) + suffix, body, extra)

    def _events_of(self, o: Any, entry_events: np.ndarray | None) -> bytes:
        """The events of every command in a batch: its new ones (one range, cut from the entry's events by
        seq) and those of duplicates (their original events, read from the store one seq at a time). A seq
        no longer held is left out."""
        parts = []
        new = events_between(entry_events, o.first_seq, o.last_seq)
        if new is not None:
            parts.append(new)
        seqs = o.results["seq_num"]
        old = np.unique(seqs[(seqs != 0) & (seqs < o.first_seq)])
        for seq in old.tolist():
            try:
                parts.append(self.events.read(seq, seq, 1 << 30))
            except EventsUnavailable:
                pass
        return b"".join(p.tobytes() for p in parts)

    def _proposal_failed(self, p: _Pending, exc: BaseException) -> None:
        if isinstance(exc, (NotLeader, ProposalDropped)):
            self._not_leader(p)          # nothing was applied: safe to retry at the new leader
        elif isinstance(exc, Overloaded):
            self._error(p, ErrorCode.OVERLOADED, str(exc))
        elif isinstance(exc, OutcomeUnknown):
            self._error(p, ErrorCode.OUTCOME_UNKNOWN, f"{exc}; retry with the same dedup ids")
        else:
            log.error("proposal failed: %r", exc)
            self._error(p, ErrorCode.OUTCOME_UNKNOWN, f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------------------------------ reads
    def _start_linearizable_reads(self) -> None:
        if not self._reads_linearizable:
            return
        batch, self._reads_linearizable = self._reads_linearizable, []
        fut = self.driver.read_index()           # one ReadIndex round for every read of this iteration
        fut.add_done_callback(lambda f: self._complete(lambda: self._read_index_done(batch, f)))

    def _read_index_done(self, batch: list[_Pending], fut: Any) -> None:
        exc = fut.exception()
        if exc is not None:
            for p in batch:
                if isinstance(exc, NotLeader):
                    self._not_leader(p)
                else:
                    self._error(p, ErrorCode.TIMEOUT if not isinstance(exc, Overloaded) else ErrorCode.OVERLOADED,
                                f"linearizable read failed: {type(exc).__name__}: {exc}; retry")
            return
        for p in batch:
            self._serve_read(p)

    def _serve_follower_reads(self) -> None:
        if not self._reads_follower:
            return
        last_seq = self.machine.ledger.last_seq      # an int read; the GIL makes it atomic
        now = time.monotonic()
        still = []
        for deadline, p in self._reads_follower:
            if last_seq >= p.req.min_seq:
                self._serve_read(p)
            elif now > deadline:
                self._error(p, ErrorCode.TIMEOUT, f"this replica has applied seq {last_seq}, not yet "
                            f"min_seq={p.req.min_seq}, after follower_read_wait_ms; read elsewhere or retry")
            else:
                still.append((deadline, p))
        self._reads_follower = still

    def _serve_read(self, p: _Pending) -> None:
        req = p.req
        op = Op(req.op)
        if op is Op.EVENTS:
            try:
                evs = self.events.read(req.first_seq, req.last_seq, W.EVENTS_PER_REPLY_MAX)
            except EventsUnavailable as exc:
                self._error(p, ErrorCode.EVENTS_UNAVAILABLE, str(exc))
                return
            self._reply(p, payload=evs.tobytes())
            return
        if op is Op.RESULT_OF:
            self._serve_result_of(p)
            return
        if op is Op.GET_ACCOUNTS:
            # under the lock only the lookups (one consistent view of every id: ~1.3 us an id, 11 ms for
            # 8190 ids at 1M accounts, measured); the JSON (3x that) is built after it is released
            with self.lock:
                ledger = self.machine.ledger
                accounts = [ledger.get_account(i) for i in p.payload]
            self._reply(p, payload=W.encode_accounts(accounts))
            return
        if op is Op.TOTALS:
            budget = self._read_budget              # O(accounts) under the lock: within the read budget
            if not budget.admit():
                self._count_refusal("rate_limited", ErrorCode.RATE_LIMITED)
                self._error(p, ErrorCode.RATE_LIMITED, f"TOTALS is over this replica's expensive_read_ms_per_s; "
                            f"retry in {budget.retry_after_ms} ms")
                return
            t0 = time.monotonic()
            with self.lock:
                totals = self.machine.ledger.totals(req.currency)
            budget.charge(time.monotonic() - t0)
            self._reply(p, payload=W.encode_totals(totals))
            return
        raise AssertionError(f"_serve_read of {op!r}")      # only reads are parked here

    def _serve_result_of(self, p: _Pending) -> None:
        """The outcome of each dedup id: from the ledger's window, or past it from the event store's
        durable index (an applied command's seq, kind and code come from its event), for as long as the
        store keeps the events. The reply says since when that answer is complete."""
        ids = p.payload
        res = np.zeros(len(ids), dtype=R.RESULT_DTYPE)
        if ids:
            R.put_u128(res["dedup_id"], ids)
        missing = []
        with self.lock:
            ledger = self.machine.ledger
            for k, d in enumerate(ids):
                r = ledger.result_of(d)
                if r is None:
                    res["code"][k] = W.RESULT_UNKNOWN
                    missing.append(k)
                else:
                    res["code"][k] = int(r.code)
                    res["seq_num"][k] = r.seq_num
                    res["kind"][k] = int(r.kind)
                    res["flags"][k] = R.ResultFlag.DUPLICATE
        since = max(0, p.req.issued_ms - R.ISSUED_AHEAD_MAX_MS) if p.req.issued_ms else 0
        stopped = 0
        for k in missing:                                   # outside the ledger lock
            ev = self.events.lookup_event(ids[k], since)
            if ev is None:
                stopped = max(stopped, self.events.lookup_stopped_at_ms)
                continue
            res["code"][k] = int(ev["code"])
            res["seq_num"][k] = int(ev["seq_num"])
            res["kind"][k] = int(ev["kind"])
            res["flags"][k] = R.ResultFlag.DUPLICATE
        self._reply(p, payload=res.tobytes(), complete_since_ms=max(stopped, self._results_complete_since_ms()))

    def _results_complete_since_ms(self) -> int:
        """The time since which every applied command is found by RESULT_OF here: 0 if the store's index
        holds every seq from 1, else the time of the first event from which it holds all (after pruning,
        and after the gap of a restore from a snapshot)."""
        first = self.events.index_complete_from()
        if first <= 1:
            return 0
        if first > self.events.last_seq:
            return self.machine.ledger.dedup_window()["last_timestamp_ms"]
        if self._complete_cache[0] != first:
            try:
                ts = int(self.events.read(first, first, 1 << 16)[0]["timestamp"])
            except EventsUnavailable:
                return self.machine.ledger.dedup_window()["last_timestamp_ms"]
            self._complete_cache = (first, ts)
        return self._complete_cache[1]

    # ---------------------------------------------------------------------------------------- replies
    def _not_leader(self, p: _Pending) -> None:
        self.counters.not_leader += 1
        leader = self.driver.leader_id
        addr = self.config.replicas.get(leader, {}).get("client") if leader is not None else None
        if leader == self.node_id:
            leader, addr = None, None            # we were leader when it failed; the next one is unknown
        self._finish(p)
        self._reply_raw(p.ident, W.Reply(p.req.req_id, Status.NOT_LEADER, 0, "writes go to the leader",
                                         leader, addr, self.machine.ledger.last_seq, self.node_id))

    def _error(self, p: _Pending, code: ErrorCode, message: str) -> None:
        self._finish(p)
        self._reply_raw(p.ident, W.Reply(p.req.req_id, Status.ERROR, code, message,
                                         last_seq=self.machine.ledger.last_seq, node_id=self.node_id))

    def _reply(self, p: _Pending, payload: bytes = b"", extra: bytes | None = None,
               complete_since_ms: int = 0) -> None:
        self._finish(p)
        self._reply_raw(p.ident, W.Reply(p.req.req_id, Status.OK, last_seq=self.machine.ledger.last_seq,
                                         node_id=self.node_id, results_complete_since_ms=complete_since_ms),
                        payload, extra)

    def _finish(self, p: _Pending) -> None:
        ident = p.ident
        self._pending_total -= 1
        left = self._pending_by_client[ident] - 1
        if left > 0:
            self._pending_by_client[ident] = left
        else:
            del self._pending_by_client[ident]
        self._pending_bytes -= p.nbytes
        left = self._pending_bytes_by_client[ident] - p.nbytes
        if left > 0:
            self._pending_bytes_by_client[ident] = left
        else:
            del self._pending_bytes_by_client[ident]

    def _reply_raw(self, ident: bytes, reply: W.Reply, payload: bytes = b"", extra: bytes | None = None) -> None:
        self._send_reply(ident, W.encode(reply), payload, extra)

    def _send_reply(self, ident: bytes, header: bytes, payload: bytes, extra: bytes | None) -> None:
        sock = self.router
        guard = self.guard
        if guard.enabled:
            n = len(header) + len(payload)
            guard.note_out(ident, n + (13 if extra is None else len(extra) + 22))    # + framing (at most)
        try:
            sock.send(ident, _SNDMORE | _NOBLOCK)
            sock.send(header, _SNDMORE)
            if extra is None:
                sock.send(payload, 0, copy=len(payload) < 65536)
            else:
                sock.send(payload, _SNDMORE, copy=len(payload) < 65536)
                sock.send(extra, 0, copy=len(extra) < 65536)
        except zmq.ZMQError:
            pass        # the client is gone or not reading: it will time out and retry

    def _publish(self) -> None:
        q = self._pub_queue
        while q:
            evs = q.popleft()
            if not len(evs):
                continue
            header = W.encode(W.EventsHeader(int(evs["seq_num"][0]), int(evs["seq_num"][-1]), self.node_id))
            try:
                self.pub.send(W.EVENTS_TOPIC, zmq.SNDMORE)
                self.pub.send(header, zmq.SNDMORE)
                self.pub.send(evs.data, 0, copy=evs.nbytes < 65536)
            except zmq.ZMQError:
                pass

    def status(self, with_digest: bool = False) -> dict[str, Any]:
        st = self.driver.status()
        st.pop("transport", None)
        with self.lock:
            m = self.machine
            st.update(sm_applied=m.applied, last_seq=m.ledger.last_seq, accounts=m.ledger.account_count,
                      ops=m.ops, rejected_batches=m.rejected_batches, pid=os.getpid(),
                      events_last_seq=self.events.last_seq, events_first_seq=self.events.first_available(),
                      dedup=m.ledger.dedup_window(), digest=m.ledger.chain_digest().hex())
            # ``digest``: the ledger's running hash of its history (O(1)); replicas at the same sm_applied
            # have the same one. ``with_digest`` is accepted for compatibility: it is always there now.
        st["addresses"] = self.config.replicas[self.node_id]
        st["counters"] = {f.name: getattr(self.counters, f.name) for f in fields(self.counters)}
        st["inflight_entries"] = self._inflight
        st["pending_requests"] = self._pending_total
        st["pending_bytes"] = self._pending_bytes
        guard = self.guard
        st["refusals"] = dict(self.refusals, **{r: guard.cuts[r] for r in CUT_REASONS})
        st["client_connections"] = {"connections": guard.connections, "held_in_bytes": guard.held_in,
                                    "held_out_bytes": guard.held_out}
        st["stalls"] = self.stalls.report()
        return st


class ForkedSnapshot:
    """The ledger's snapshot made by a forked child (copy-on-write: the child sees the state exactly as it
    was at the fork, while this process goes on applying). Serializing and hashing a large ledger takes
    hundreds of milliseconds, and writing it again into LMDB with an fsync as much; on the Raft driver
    thread either would stall heartbeats into elections. The child first fsyncs ``fsync_first`` (the event
    store: the page cache is shared, so the parent's writes made before the fork become durable), then
    writes the snapshot to a file in the data directory, fsyncs it, puts its size and crc32 beside it and
    exits; ``poll`` hands the file over (``SnapshotFile``) and the Raft log store moves it in: the driver
    never writes or reads the snapshot's bytes. The child touches nothing but the ledger's memory and its
    own files (no sockets, no LMDB) and leaves with ``os._exit``.

    The child stays out of the replicas' way (measured: a 90 MB snapshot is ~1-2 s of CPU, and written in
    one go it queues every Raft fsync behind ~90 MB of writeback; both made the 10K/s latency's tail): it
    runs at nice ``SNAPSHOT_CHILD_NICE`` (the replicas' threads preempt it; if it has not finished after
    ``SNAPSHOT_CHILD_BOOST_S`` the parent lifts it back to normal priority, so a saturated machine cannot
    starve it while the log since the last snapshot is held in memory), and writes the file in chunks of
    ``SNAPSHOT_WRITE_CHUNK_BYTES``, each written back (``sync_file_range``) before the next, with a pause
    between them: at most one chunk is ever queued ahead of a Raft fsync."""

    def __init__(self, produce: Callable[[], bytes], directory: str, fsync_first: Sequence[str] = ()) -> None:
        self.path = os.path.join(directory, f"snapshot-{os.getpid()}-{time.monotonic_ns()}.tmp")
        self.started = time.monotonic()
        self._boosted = False
        pid = os.fork()
        if pid == 0:                                   # the child
            code = 1
            try:
                _detach_from_parent()
                try:
                    os.nice(SNAPSHOT_CHILD_NICE)
                except OSError:
                    pass
                for path in fsync_first:               # the page cache is shared: this makes the parent's
                    fd = os.open(path, os.O_RDONLY)    # writes made before the fork durable
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                data = produce()
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    view = memoryview(data).cast("B")
                    fileio.write_paced(fd, len(view), lambda at, n: view[at:at + n], SNAPSHOT_WRITE_CHUNK_BYTES,
                                       SNAPSHOT_WRITE_PAUSE_S)
                    os.fsync(fd)                       # durable before the store refers to it
                finally:
                    os.close(fd)
                with open(self.path + ".meta", "wb") as f:
                    f.write(struct.pack("<QI", len(data), zlib.crc32(data)))
                code = 0
            finally:
                os._exit(code)
        self.pid = pid

    def poll(self) -> SnapshotFile | None:
        """The snapshot as a durable file once the child is done (the log store moves it in), else None."""
        if self.pid < 0:
            raise RuntimeError("snapshot already collected or cancelled")
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            if not self._boosted and time.monotonic() - self.started > SNAPSHOT_CHILD_BOOST_S:
                self._boosted = True           # starved (a saturated machine): let it finish at normal priority
                try:
                    os.setpriority(os.PRIO_PROCESS, self.pid, os.getpriority(os.PRIO_PROCESS, 0))
                except OSError:
                    pass                       # no permission to raise a priority: it finishes niced
            return None
        self.pid = -1
        try:
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                raise RuntimeError(f"the snapshot child failed (wait status {status})")
            with open(self.path + ".meta", "rb") as f:
                size, crc = struct.unpack("<QI", f.read())
        except BaseException:
            fileio.unlink_quietly(self.path)
            raise
        finally:
            fileio.unlink_quietly(self.path + ".meta")
        return SnapshotFile(self.path, size, crc)

    def cancel(self) -> None:
        if self.pid > 0:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = -1
        fileio.unlink_quietly(self.path)
        fileio.unlink_quietly(self.path + ".meta")


def _detach_from_parent() -> None:
    """In a snapshot child: close every inherited descriptor (the client ROUTER's and the PUB's listening
    sockets, the Raft transport's, LMDB's files: a child that outlived a killed parent kept the ports bound,
    and the restarted replica failed with "Address already in use"), and die with the parent (Linux
    PR_SET_PDEATHSIG: a snapshot nobody will collect is not worth finishing; its .tmp file is removed when
    the replica starts again). The child only reads the ledger's memory and opens its own files by path."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:                          # the parent died before the line above took effect
        os._exit(1)


_INT_ENCODER = msgspec.msgpack.Encoder()


def _ok_reply_parts(last_seq: int, node_id: int) -> tuple[bytes, bytes]:
    """``W.encode(W.Reply(req_id, Status.OK, last_seq=last_seq, node_id=node_id))`` is
    ``prefix + msgpack(req_id) + suffix`` (an array_like Struct is a msgpack array of its fields, req_id
    first): the replies of one entry encode their header with one small int encode each."""
    whole = W.encode(W.Reply(0, Status.OK, last_seq=last_seq, node_id=node_id))
    prefix, zero = whole[:1], _INT_ENCODER.encode(0)
    assert whole[1:1 + len(zero)] == zero and 0x90 <= whole[0] <= 0x9F, "Reply is no longer a small msgpack array"
    return prefix, whole[1 + len(zero):]


class _RequestError(Exception):
    def __init__(self, code: ErrorCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason              # one of REFUSAL_REASONS ("": by the op, see Node._handle)


# ---------------------------------------------------------------------------------------------- CLI
class _KeyValueFormatter(logging.Formatter):
    """Structured log lines: ``ts=... level=... node=... logger=... msg="..."``."""

    def __init__(self, node_id: int) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage().replace('"', "'")
        line = f'ts={ts} level={record.levelname.lower()} node={self.node_id} logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return line


def setup_logging(node_id: int, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter(node_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    if verbose:
        logging.getLogger("engine.raft").setLevel(logging.INFO)
        logging.getLogger("zwallet").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zwallet node", description="run one replica of a shard")
    p.add_argument("--config", required=True, help="TOML config file (see docs/operations.md)")
    p.add_argument("--id", type=int, help="this replica's id (overrides [node] id)")
    p.add_argument("--data-dir", help="overrides [node] data_dir")
    p.add_argument("--no-sync", action="store_true", help="skip fsync (NOT durable; experiments only)")
    p.add_argument("--verbose", action="store_true", help="log Raft events (elections, leader changes)")
    args = p.parse_args(argv)
    overrides: dict[str, Any] = {"node_id": args.id, "data_dir": args.data_dir}
    if args.no_sync:
        overrides["sync"] = False
    if args.verbose:
        overrides["verbose"] = True
    config = NodeConfig.from_toml(args.config, **overrides)
    setup_logging(config.node_id, config.verbose)
    node = Node(config)

    def on_signal(_sig: int, _frm: Any) -> None:
        node.stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    print("READY", flush=True)
    node.serve()
    return node.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
