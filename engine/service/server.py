"""The replicated-service machinery: an app's state machine behind a ZeroMQ ROUTER, replicated by our Raft,
publishing a seq-numbered event stream. The shard (``engine.node.Node``) and the Marker are apps on it:
each subclasses ``ReplicatedServer`` and fills in its hooks (docs/service.md).

Threads. The **main thread** (``serve``) owns every client-facing socket and every socket an app registers:
it receives requests on the ROUTER, checks them, groups the write requests that arrive while earlier log
entries are in flight into one entry (group commit: the app's ``make_entry``), proposes it, sends replies
and runs the app's main-thread hooks (``entry_applied``, ``serve_read``, ``on_role_change``, ``tick``, the
registered sockets' callbacks, the completions of ``propose``). The **Raft driver thread**
(``engine/raft/driver.py``) owns the core, the LMDB log and the peer transport, and applies committed
entries through the app's ``apply_entries`` (under ``self.lock``), whose events go to the event store
(``emit_events``) and out on PUB at the end of the driver's ready round. The two meet in three places only:
the completions queue (``call_soon``: a callable queued from any thread runs on the main thread, which an
eventfd wakes), the state lock (the main thread reads the app's state under it), and the PUB queue.

Request handling (the header: ``engine/service/protocol.py``):
- Intake (``_receive``/``_handle``): frame count, header, payload size against the op's ``OpSpec``, then the
  pending bounds (requests and bytes, all clients and per connection), all before anything is decoded; a
  refusal echoes the req_id when it can be read and is counted by reason (STATUS "refusals"). Frames over
  ``frame_bytes_max`` never reach us (ZMQ_MAXMSGSIZE drops the connection), and the connection guard
  (`engine/conn_guard.py`) cuts a connection that holds too many bytes inside ZeroMQ either way.
- Writes (``OpSpec.kind == WRITE``): the app's ``accept_write`` checks the payload and weighs it; only the
  leader accepts (a follower replies NOT_LEADER with the leader's id and client address). Requests are
  grouped, up to ``entry_weight_max`` weight and ``entry_requests_max`` requests an entry, while
  ``inflight_entries_max`` entries are in flight (full groups wait, sealed); the app's ``entry_applied``
  answers each request of an entry once it is committed and applied here.
- Reads (``READ``): LINEARIZABLE by default (one ReadIndex round shared by every read that arrived in the
  same loop iteration, on any replica); FOLLOWER reads are served locally once this replica has applied
  ``min_seq`` (``last_seq``). Then the app's ``serve_read``. OP_EVENTS reads the event store (the golden copy).
- ``LOCAL`` ops are answered at once by the app's ``serve_local``; OP_STATUS by ``status()``.
"""
from __future__ import annotations

import collections
import functools
import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields
from time import perf_counter
from typing import Any

import msgspec
import numpy as np
import zmq

from engine import fileio
from engine.conn_guard import ConnectionGuard, curve_frame_overhead
from engine.raft.driver import NotLeader, OutcomeUnknown, Overloaded, ProposalDropped, RaftDriver
from engine.service import protocol as P
from engine.service.config import ServiceConfig
from engine.service.event_store import WRITEBACK_INTERVAL_S, EventStore, EventsUnavailable
from engine.service.metrics import (Families, MetricsHTTPServer, RequestMetrics, disk_metrics,
                                    replica_status_metrics, start_metrics)
from engine.service.protocol import ErrorCode, Status
from engine.service import security as S
from engine.service.security import (CLIENT_DOMAIN, EVENTS_DOMAIN, FULL_RIGHTS, Rights, ServerSecurity,
                                     stop_authenticator, warn_insecure)
from engine.service.snapshot import ForkedSnapshot
from engine.stalls import SchedulerProbe, StallLog
from engine.zmq_io import Waker

log = logging.getLogger("zwallet.service")

_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_OP_EVENTS = P.OP_EVENTS
_OP_STATUS = P.OP_STATUS

CLIENT_RCVHWM = 1_000                 # messages queued per client connection before TCP holds the sender back
CLIENT_SNDHWM = 100_000               # replies queued per client connection (ROUTER drops beyond; bytes: the guard)
RECV_PER_ITERATION_MAX = 4096         # client messages drained per loop iteration (bounds reply latency)
RECV_PASS_S = 0.005                   # ... and for at most this long: a request read early in a pass is
                                      # proposed (or its ReadIndex round started) only after the pass, and
                                      # 4096 junk messages of a flood take ~100 ms to refuse
RECEIVE_DEFER_MS = 2                  # with entries in flight, requests are taken at most this late (see serve)
IDLE_POLL_MS = 100                    # the main loop's longest sleep with nothing to do (tick_interval_ms caps it)
BUSY_POLL_MS = 5                      # ... with follower reads parked or a group open

WRITE, READ, LOCAL = "write", "read", "local"     # OpSpec.kind


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One of the app's request ops, as the intake checks it before decoding anything: the payload is
    a whole number of ``unit_bytes`` units, ``min_bytes..max_bytes`` long (``max_bytes`` 0: an empty payload).
    ``size_error(size)`` (optional) words the refusal of a payload that is not: (code, reason, message)."""
    name: str
    kind: str                             # WRITE (proposed, group commit), READ (ReadIndex/follower), LOCAL
    unit_bytes: int = 1
    min_bytes: int = 0
    max_bytes: int = 0
    size_error: Callable[[int], tuple[ErrorCode, str, str]] | None = None
    right: str = ""                       # the least right a key needs (security.READ/OPERATE/ADMIN; "":
                                          # OPERATE for a WRITE, READ otherwise)
    scoped: bool = False                  # a key restricted to account ranges or shards may use it: the
                                          # app checks the accounts it names (``Pending.rights``)

    def needs(self) -> str:
        return self.right or (S.OPERATE if self.kind == WRITE else S.READ)

    def refusal(self, size: int) -> tuple[ErrorCode, str, str]:
        if self.size_error is not None:
            return self.size_error(size)
        if self.max_bytes == 0:
            return ErrorCode.BAD_REQUEST, "payload", f"{self.name} takes an empty payload frame, not {size} bytes"
        if size > self.max_bytes:
            return (ErrorCode.BATCH_TOO_LARGE, "batch_too_large",
                    f"{self.name} payload of {size} bytes exceeds {self.max_bytes}; nothing was applied")
        return (ErrorCode.BAD_REQUEST, "payload", (f"{self.name} payload of {size} bytes is not "
                f"{self.min_bytes}..{self.max_bytes} bytes of whole {self.unit_bytes}-byte units"))


@dataclass(slots=True)
class Pending:
    """A request accepted and not yet answered (it counts against the pending bounds until ``finish``)."""
    ident: bytes
    req: P.Request
    payload: Any = None            # writes: what accept_write kept (bytes-like); reads: decoded arguments
    records: int = 0               # writes: the weight accept_write gave it (the shard: its op records)
    nbytes: int = 0                # the request's bytes as received (header + payload), for the byte bounds
    t0: float = 0.0                # perf_counter() when it was accepted (the latency metrics)
    rights: Rights = FULL_RIGHTS   # the client key's (checked by the intake; scoped ops: by the app too)


class RequestError(Exception):
    """Raised by an app's accept/serve hooks: the request is refused with ``code`` (counted by ``reason``)."""

    def __init__(self, code: ErrorCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason              # one of refusal_reasons ("": "bad_batch" for writes, else "bad_argument")


# Why the server refused a request or cut a connection: STATUS "refusals" counts each (docs/protocol.md).
# An app may add its own reasons (``ReplicatedServer.APP_REFUSAL_REASONS``).
REFUSAL_REASONS = (
    "frames",                    # not exactly two frames                              BAD_REQUEST
    "header",                    # the header does not decode (or exceeds HEADER_BYTES_MAX)  BAD_REQUEST
    "version",                   # a well-formed header of another protocol version     BAD_REQUEST
    "unknown_op",                #                                                      UNKNOWN_OP
    "payload",                   # payload not whole records / empty write / one where none is taken
    "batch_too_large",           # more records or ids than allowed                     BATCH_TOO_LARGE
    "bad_batch",                 # a write payload the app refuses                      BAD_REQUEST
    "bad_argument",              # event range, argument, consistency                   BAD_REQUEST
    "pending_requests",          # pending_requests_max reached                         OVERLOADED
    "pending_per_client",        # pending_per_client_max reached                       OVERLOADED
    "pending_bytes",             # pending_bytes_max reached                            OVERLOADED
    "pending_bytes_per_client",  # pending_bytes_per_client_max reached                 OVERLOADED
    "read_waiting",              # read_waiting_max parked follower reads               OVERLOADED
    "rate_limited",              # expensive_read_ms_per_s spent                        RATE_LIMITED
    "unauthorized",              # the client key lacks the rights (or was removed)     UNAUTHORIZED
)
CUT_REASONS = ("connection_held_in", "connection_held_out", "held_total")   # the guard's (no reply)


class ReadBudget:
    """Lock time for O(state) reads: refills at ``ms_per_s``, holds at most one second's worth; a read is
    admitted while the budget is positive and then charged what it took (so one slow read defers the next
    ones by as long as it ran, in proportion)."""

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
class Counters:
    requests: int = 0
    applied_batches: int = 0
    bad_requests: int = 0
    not_leader: int = 0
    overloaded: int = 0
    entries_proposed: int = 0
    entries_batches: int = 0


INT_ENCODER = msgspec.msgpack.Encoder()


def ok_reply_parts(last_seq: int, node_id: int) -> tuple[bytes, bytes]:
    """``encode(Reply(req_id, Status.OK, last_seq=last_seq, node_id=node_id))`` is
    ``prefix + msgpack(req_id) + suffix`` (an array_like Struct is a msgpack array of its fields, req_id
    first): the replies of one entry encode their header with one small int encode each."""
    whole = P.encode(P.Reply(0, Status.OK, last_seq=last_seq, node_id=node_id))
    prefix, zero = whole[:1], INT_ENCODER.encode(0)
    assert whole[1:1 + len(zero)] == zero and 0x90 <= whole[0] <= 0x9F, "Reply is no longer a small msgpack array"
    return prefix, whole[1 + len(zero):]


class ReplicatedServer:
    """The machinery; an app subclasses it. What the app provides (docs/service.md has the whole contract):

    class attributes: ``EVENT_DTYPE`` (its event records: engine/service/event_store.py says what the store
    assumes), ``APP_REFUSAL_REASONS``; in ``__init__``, after ``super().__init__(config)``: its state
    machine, ``self.ops`` ({op: OpSpec}), and optionally ``entry_weight_max``, ``entry_requests_max``,
    ``tick_interval_ms``.

    Raft driver thread, ``self.lock`` held: ``apply_entries(entries) -> list`` (its events through
    ``emit_events``), ``restore_state(data)``; under the lock or in a forked child: ``snapshot_state() -> bytes``.

    Main thread: ``last_seq()``, ``accept_write(p, payload) -> weight``, ``make_entry(payloads, ts_ms) ->
    bytes``, ``entry_applied(group, outcome)``, ``accept_read(p, payload)``, ``serve_read(p)``,
    ``serve_local(p)``, ``status_fields() -> dict`` (lock held), ``on_role_change(is_leader, term)``,
    ``tick(now_ms)``, ``on_stop()``.

    What the machinery offers the app on the main thread: ``propose(entry, on_done)``,
    ``read_barrier(on_done)``, ``register_socket(sock, on_readable)``, ``unregister_socket(sock)``,
    ``call_soon(fn)`` (any thread), ``reply``/``error``/``not_leader``/``send_reply``/``finish``,
    ``ok_reply_parts()``, ``is_leader``, ``emit_events(chunks)`` (in ``apply_entries``)."""

    EVENT_DTYPE: np.dtype
    APP_REFUSAL_REASONS: tuple[str, ...] = ()
    LOGGER_NAMES: tuple[str, ...] = ("zwallet",)

    def __init__(self, config: ServiceConfig) -> None:
        config.validate()
        self.config = config
        self.node_id = config.node_id
        os.makedirs(config.data_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(config.data_dir, "snapshot-*.tmp*")):
            fileio.unlink_quietly(stale)       # left by a snapshot child when the node died mid-snapshot
        self.events = self.open_event_store(os.path.join(config.data_dir, "events"))
        self.stalls = StallLog()
        self._probe = SchedulerProbe(self.stalls, config.stall_probe_ms / 1000) if config.stall_probe_ms else None
        self.lock = threading.Lock()           # the app's state: applied by the driver thread, read by the main one
        self.security = self.load_security(config)   # None: insecure (logged loudly)
        self._auth: Any = None
        self._completions: collections.deque[Callable[[], None]] = collections.deque()
        self._pub_queue: collections.deque[np.ndarray] = collections.deque()
        self._waker = Waker()
        self.driver = RaftDriver(config.node_id, {i: a["raft"] for i, a in config.replicas.items()},
                                 os.path.join(config.data_dir, "raft"), apply=self._apply,
                                 snapshot=self._snapshot, restore=self._restore, config=config.driver_config(),
                                 after_ready=self._after_ready, stalls=self.stalls,
                                 on_role_change=self._role_changed, security=self.security)
        self._wake_wanted = False
        self._driver_thread_ident: int | None = None       # set once the driver thread runs
        self.ops: dict[int, OpSpec] = {}
        self.entry_weight_max = 1 << 30        # a group's weight (sum of accept_write's) before it is sealed
        self.entry_requests_max = 1 << 30      # ... and its requests
        self.tick_interval_ms = IDLE_POLL_MS   # tick(now_ms) runs every pass, and passes are at most this apart
        self.shard_epoch = 0                   # an app serving a shard map: its epoch, in every ERROR reply
        self._group: list[Pending] = []
        self._group_records = 0
        self._sealed: collections.deque[list[Pending]] = collections.deque()   # full groups, not yet proposed
        self._last_ts = 0
        self._inflight = 0
        self._pending_total = 0
        self._pending_by_client: collections.Counter[bytes] = collections.Counter()
        self._pending_bytes = 0
        self._pending_bytes_by_client: collections.Counter[bytes] = collections.Counter()
        self.refusals: dict[str, int] = dict.fromkeys(REFUSAL_REASONS + self.APP_REFUSAL_REASONS, 0)
        self.guard = ConnectionGuard(config.replicas[config.node_id]["client"], config.connection_held_bytes_max,
                                     config.held_bytes_max, config.connection_check_ms / 1000)
        self._reads_linearizable: list[Pending] = []
        self._reads_follower: list[tuple[float, Pending]] = []
        self._sockets: dict[Any, Callable[[Any], None]] = {}     # app sockets -> on_readable
        self._pollers: list[zmq.Poller] = []
        self.counters = Counters()
        self.request_metrics = RequestMetrics({})      # the op names are the app's: filled in at start
        self._metrics_http: MetricsHTTPServer | None = None
        self._stopping = threading.Event()
        self.exit_code = 0
        self.ctx: zmq.Context | None = None

    def load_security(self, config: ServiceConfig) -> ServerSecurity | None:
        name = f"{type(self).__name__} replica {config.node_id}"
        if config.insecure:
            warn_insecure(name)
            return None
        peer_keys = {rid: a["key"].encode() for rid, a in config.replicas.items()}
        sec = ServerSecurity.load(config.keys_dir, peer_keys=peer_keys, own_peer_file=config.peer_key)
        assert sec.own_peer is not None
        if sec.own_peer.public != peer_keys[config.node_id]:
            raise ValueError(f"{config.peer_key} is not the key [[replica]] {config.node_id} lists")
        log.info("%s: CURVE on, %d allowed client keys", name, len(sec.keyring))
        return sec

    def reload_keys(self) -> None:
        # re-read the allowed client keys now (SIGHUP); they are also re-read when the directory changes
        if self.security is not None:
            self.security.keyring.reload()

    # ------------------------------------------------------------------------------------ app hooks
    def open_event_store(self, path: str) -> EventStore:
        return EventStore(path, dtype=self.EVENT_DTYPE, retention_seqs=self.config.event_retention_seqs)

    def last_seq(self) -> int:
        """The app's last applied event seq (what Reply.last_seq and FOLLOWER reads' min_seq compare with)."""
        raise NotImplementedError

    def apply_entries(self, entries: Sequence[Any]) -> list[Any]:
        """Raft thread, ``self.lock`` held: apply committed entries (``.data``, ``.index``, ``.term``) in order;
        one outcome each (the value the proposal's future resolves to). Events go to ``emit_events``."""
        raise NotImplementedError

    def snapshot_state(self) -> bytes:
        """The app's state as bytes: under ``self.lock`` on the Raft thread, or in a forked child."""
        raise NotImplementedError

    def restore_state(self, data: bytes) -> None:
        """Raft thread, ``self.lock`` held: replace the app's state by a snapshot's."""
        raise NotImplementedError

    def accept_write(self, p: Pending, payload: Any) -> int:
        """Main thread: check a write's payload (a zero-copy buffer; raise RequestError to refuse), keep what
        ``make_entry`` needs in ``p.payload`` and return its weight (``entry_weight_max`` bounds a group)."""
        p.payload = bytes(payload)
        return 1

    def make_entry(self, payloads: list[Any], timestamp_ms: int) -> bytes:
        """Main thread: one Raft entry of a group's payloads (the leader's time travels in it)."""
        raise NotImplementedError

    def entry_applied(self, group: list[Pending], outcome: Any) -> None:
        """Main thread: the entry of ``group`` was applied here with ``outcome`` (``apply_entries``'s):
        answer every request of the group (``reply``/``error``/``send_reply`` + ``finish``)."""
        raise NotImplementedError

    def accept_read(self, p: Pending, payload: Any) -> None:
        """Main thread: decode a read's arguments into ``p.payload`` (raise RequestError to refuse)."""
        p.payload = bytes(payload)

    def serve_read(self, p: Pending) -> None:
        """Main thread, once the read may be served here (after a ReadIndex round, or min_seq reached)."""
        raise AssertionError(f"no read op {p.req.op}")

    def serve_local(self, p: Pending) -> None:
        """Main thread: a LOCAL op, answered at once."""
        raise AssertionError(f"no local op {p.req.op}")

    def status_fields(self) -> dict[str, Any]:
        """Under ``self.lock``: the app's STATUS fields (``sm_applied`` and ``last_seq`` at least)."""
        return {"last_seq": self.last_seq()}

    def on_role_change(self, is_leader: bool, term: int) -> None:
        """Main thread: this replica gained (True) or lost (False) the leadership of ``term``. Edges come
        in order; by the time it runs the role may have moved on (check ``is_leader``). On a gain the app's
        state may not yet hold every entry of earlier terms: ``read_barrier`` first, then act."""

    def tick(self, now_ms: int) -> None:
        """Main thread: every pass of the loop, and at least every ``tick_interval_ms``."""

    def on_stop(self) -> None:
        """Main thread, shutting down, before the sockets close: close the app's own sockets."""

    # ------------------------------------------------------------------ what the app may call (main thread)
    @property
    def is_leader(self) -> bool:
        return self.driver.is_leader

    def propose(self, entry: bytes, on_done: Callable[[Future], None]) -> Future:
        """Propose ``entry`` (app background work: not counted in inflight_entries_max); ``on_done(future)``
        runs on the main thread once it is applied here (result: ``apply_entries``'s outcome) or failed
        (NotLeader, ProposalDropped, OutcomeUnknown, Overloaded)."""
        fut = self.driver.propose(entry)
        fut.add_done_callback(lambda f: self._complete(lambda: on_done(f)))
        return fut

    def read_barrier(self, on_done: Callable[[Future], None]) -> Future:
        """A ReadIndex round: ``on_done(future)`` on the main thread once this replica has applied everything
        committed when it was asked (future's exception: NotLeader, ...)."""
        fut = self.driver.read_index()
        fut.add_done_callback(lambda f: self._complete(lambda: on_done(f)))
        return fut

    def register_socket(self, sock: Any, on_readable: Callable[[Any], None]) -> None:
        """Poll ``sock`` (a zmq socket or an fd) in the main loop; ``on_readable(sock)`` when it is readable
        (drain it without blocking). The app closes it (``on_stop``)."""
        self._sockets[sock] = on_readable
        for poller in self._pollers:
            poller.register(sock, zmq.POLLIN)

    def unregister_socket(self, sock: Any) -> None:
        if self._sockets.pop(sock, None) is not None:
            for poller in self._pollers:
                poller.unregister(sock)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the main thread (from any thread)."""
        self._complete(fn)

    def emit_events(self, chunks: list[np.ndarray]) -> None:
        """In ``apply_entries`` (Raft thread, lock held): event records, whole seqs in order, continuing the
        stream. Stored first (the golden copy); published on PUB at the end of the driver's ready round.
        The main thread is woken only if follower reads wait for a newer seq (otherwise a follower's main
        thread would wake for every entry just to publish; it polls at most 5 ms apart while reads are
        parked)."""
        self.events.append(chunks)
        self._pub_queue.extend(chunks)
        if self._reads_follower:
            self._wake_soon()

    # ------------------------------------------------------------------------ driver-thread callbacks
    def _apply(self, entries: Any) -> list[Any]:
        with self.lock:
            return self.apply_entries(entries)

    def _snapshot(self) -> bytes | ForkedSnapshot:
        # every event below the snapshot is durable before the snapshot is (the log below it may go)
        with self.lock:
            if self.config.snapshot_in_child:
                self.events.flush()                # in LMDB's file before the fork: the child fsyncs that
                made: bytes | ForkedSnapshot = ForkedSnapshot(self.snapshot_state, self.config.data_dir,
                                                              fsync_first=[self.events.data_file])
            else:
                self.events.sync()
                made = self.snapshot_state()
        self.events.prune()
        return made

    def _restore(self, data: bytes) -> None:
        with self.lock:
            self.restore_state(data)
            self.events.note_restored(self.last_seq())

    def _role_changed(self, is_leader: bool, term: int) -> None:
        self._complete(lambda: self.on_role_change(is_leader, term))

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
        sec = self.security
        if sec is not None:
            self._auth = sec.start_authenticator(self.ctx)      # before any bind: no window without ZAP
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, cfg.frame_bytes_max)
        self.router.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
        self.router.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, cfg.pub_queue_messages_max)
        if sec is not None:
            sec.configure_server(self.router, CLIENT_DOMAIN)
            sec.configure_server(self.pub, EVENTS_DOMAIN)
        self.router.bind(me["client"])
        self.pub.bind(me["pub"])
        self.driver.start()
        self._driver_thread_ident = self.driver.thread_ident
        self._writeback = threading.Thread(target=self._writeback_loop, name="event-writeback", daemon=True)
        self._writeback.start()
        if self._probe is not None:
            self._probe.start()
        self.guard.start(self.router)
        self.request_metrics.op_names.update({op: spec.name for op, spec in self.ops.items()})
        self.request_metrics.op_names.update({_OP_STATUS: "STATUS", _OP_EVENTS: "EVENTS"})
        self._metrics_http = start_metrics(cfg.metrics, self.render_metrics)
        log.info("node %d started: client %s pub %s", cfg.node_id, me["client"], me["pub"])

    def stop(self) -> None:
        self._stopping.set()
        self._wake()

    def serve(self) -> None:
        # Two pollers: while the leader has as many entries in flight as it may (group commit), requests
        # only wait for the next entry, so the loop does not wake for each one: it waits for the entry's
        # completion (the waker) or RECEIVE_DEFER_MS, then takes every request queued meanwhile in one
        # pass. Woken per request instead, at 10K requests/s, the main thread spent most of its time
        # waking up (measured: 63% of a core). The app's sockets are in both.
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        poller_busy = zmq.Poller()
        poller_busy.register(self._waker.fd, zmq.POLLIN)
        self._pollers = [poller, poller_busy]
        for sock in self._sockets:
            poller.register(sock, zmq.POLLIN)
            poller_busy.register(sock, zmq.POLLIN)
        stalls = self.stalls
        waker_fd = self._waker.fd
        inflight_max = self.config.inflight_entries_max
        idle_ms = min(IDLE_POLL_MS, self.tick_interval_ms)
        busy_ms = min(BUSY_POLL_MS, idle_ms)
        sockets = self._sockets
        tick = self.tick
        try:
            while not self._stopping.is_set():
                if self._inflight >= inflight_max:
                    events = dict(poller_busy.poll(RECEIVE_DEFER_MS))
                else:
                    events = dict(poller.poll(busy_ms if (self._reads_follower or self._group) else idle_ms))
                t_pass = time.monotonic()
                if waker_fd in events:
                    self._waker.drain()
                self._run_completions()
                if sockets:
                    for sock, on_readable in list(sockets.items()):
                        if sock in events:
                            on_readable(sock)
                self._receive()
                self._flush_group()
                self._start_linearizable_reads()
                self._serve_follower_reads()
                tick(int(time.time() * 1000))
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
        if self._metrics_http is not None:
            self._metrics_http.close()
        self.driver.stop()
        self._run_completions()
        for group in (*self._sealed, self._group):
            for p in group:
                self.error(p, ErrorCode.SHUTTING_DOWN, "the node is shutting down; nothing was applied")
        self._sealed.clear()
        self._group.clear()
        try:
            self.on_stop()
        except Exception:
            log.exception("node %d: the app's on_stop failed", self.node_id)
        self.router.close(0)
        self.pub.close(0)
        stop_authenticator(self._auth)
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
        handle = self._handle
        monotonic = time.monotonic
        sec = self.security
        rights: Rights | None = FULL_RIGHTS
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
                if sec is None:
                    for fr in frames:
                        n = len(fr)
                        taken += n + (2 if n <= 255 else 9)
                else:
                    for fr in frames:
                        n = len(fr)
                        taken += n + curve_frame_overhead(n)
                guard.note_in(guard.key_of(ident, first), taken)
            if frames:
                if sec is not None:
                    # the key the connection authenticated with (ZAP User-Id) -> its rights, now (a key
                    # removed from the allowed keys is refused from its next request on)
                    rights = sec.rights_of(frames[0].get("User-Id"))
                frames[0] = frames[0].bytes
            handle(ident, frames, rights)

    def _handle(self, ident: bytes, frames: list[Any], rights: Rights | None = FULL_RIGHTS) -> None:
        # Every check that needs no decoding comes first (frame count, sizes), then the header, then the
        # payload's size against the op, then the pending bounds; only then is anything decoded or queued.
        # A refusal echoes the req_id whenever it can be read (salvage_req_id: docs/protocol.md, Errors).
        if len(frames) != 2:
            self._refuse(ident, P.salvage_req_id(frames[0]) if frames else 0, ErrorCode.BAD_REQUEST, "frames",
                         f"a request is exactly two frames [header, payload]: got {len(frames)}")
            return
        head = frames[0]
        try:
            req = P.decode_request(head)
        except P.UnsupportedVersion as exc:
            self._refuse(ident, P.salvage_req_id(head), ErrorCode.BAD_REQUEST, "version", str(exc))
            return
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            self._refuse(ident, P.salvage_req_id(head), ErrorCode.BAD_REQUEST, "header", f"bad request header: {exc}")
            return
        body = frames[1]
        size = len(body)
        op = req.op
        spec = self.ops.get(op)
        if spec is not None:
            if size % spec.unit_bytes or size < spec.min_bytes or size > spec.max_bytes:
                code, reason, message = spec.refusal(size)
                self._refuse(ident, req.req_id, code, reason, message)
                return
        elif op == _OP_STATUS or op == _OP_EVENTS:
            if size:
                self._refuse(ident, req.req_id, ErrorCode.BAD_REQUEST, "payload",
                             f"{'STATUS' if op == _OP_STATUS else 'EVENTS'} takes an empty payload frame, "
                             f"not {size} bytes")
                return
        else:
            self._refuse(ident, req.req_id, ErrorCode.UNKNOWN_OP, "unknown_op", f"unknown op {req.op}")
            return
        # rights before anything is queued, proposed or read (an EVENTS range sees every account)
        if rights is None:
            self._refuse(ident, req.req_id, ErrorCode.UNAUTHORIZED, "unauthorized",
                         "this client key is not (or no longer) allowed here")
            return
        if spec is not None:
            need, scoped = spec.needs(), spec.scoped
        else:
            need, scoped = S.READ, op == _OP_STATUS
        if not rights.has(need) or (rights.restricted and not scoped):
            self._refuse(ident, req.req_id, ErrorCode.UNAUTHORIZED, "unauthorized",
                         f"{rights.describe()} may not use {spec.name if spec is not None else 'EVENTS'} "
                         f"(needs {need}{'' if scoped else ', unrestricted'}); nothing was applied")
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
        p = Pending(ident, req, nbytes=nbytes, rights=rights, t0=perf_counter())
        self._pending_total += 1
        self._pending_by_client[ident] = of_client + 1
        self._pending_bytes += nbytes
        self._pending_bytes_by_client[ident] += nbytes
        kind = spec.kind if spec is not None else ""
        try:
            if kind == WRITE:
                self._accept_write(p, body.buffer)
            elif op == _OP_STATUS:
                st = self.status()
                if not rights.is_admin:
                    st.pop("digest", None)          # the state digest is the admin's (docs/security.md)
                self.reply(p, payload=msgspec.msgpack.encode(st))
            elif kind == LOCAL:
                self.serve_local(p)
            else:
                if op == _OP_EVENTS:
                    if not 1 <= req.first_seq <= req.last_seq:
                        raise RequestError(ErrorCode.BAD_REQUEST, f"bad event range {req.first_seq}..{req.last_seq}")
                else:
                    self.accept_read(p, body.buffer)
                self._park_read(p)
        except RequestError as exc:
            self.count_refusal(exc.reason or ("bad_batch" if kind == WRITE else "bad_argument"), exc.code)
            self.error(p, exc.code, str(exc))

    def count_refusal(self, reason: str, code: ErrorCode) -> None:
        self.refusals[reason] += 1
        if code is ErrorCode.OVERLOADED or code is ErrorCode.RATE_LIMITED:
            self.counters.overloaded += 1
        else:
            self.counters.bad_requests += 1

    def _refuse(self, ident: bytes, req_id: int, code: ErrorCode, reason: str, message: str) -> None:
        """An ERROR reply to a request that was never accepted (nothing pending to finish)."""
        self.count_refusal(reason, code)
        self._reply_raw(ident, P.Reply(req_id, Status.ERROR, code, message, last_seq=self.last_seq(),
                                       node_id=self.node_id, shard_epoch=self.shard_epoch))

    def _accept_write(self, p: Pending, payload: Any) -> None:
        n = self.accept_write(p, payload)
        if not self.driver.is_leader:
            self.not_leader(p)
            return
        p.records = n
        if self._group and (self._group_records + n > self.entry_weight_max
                            or len(self._group) >= self.entry_requests_max):
            # the group is full: it waits, sealed, for a free entry slot (inflight_entries_max is a real
            # limit; what waits is bounded by the pending-request limits)
            self._sealed.append(self._group)
            self._group, self._group_records = [], 0
            self._flush_group()
        self._group.append(p)
        self._group_records += n

    def _park_read(self, p: Pending) -> None:
        consistency = p.req.consistency
        if consistency == P.Consistency.FOLLOWER:
            if len(self._reads_follower) >= self.config.read_waiting_max:
                raise RequestError(ErrorCode.OVERLOADED, "too many parked follower reads (read_waiting_max)",
                                   reason="read_waiting")
            self._reads_follower.append((time.monotonic() + self.config.follower_read_wait_ms / 1000, p))
        elif consistency == P.Consistency.LINEARIZABLE:
            self._reads_linearizable.append(p)
        else:
            raise RequestError(ErrorCode.BAD_REQUEST, f"unknown consistency {consistency}")

    # ------------------------------------------------------------------------------ group commit
    def _flush_group(self) -> None:
        """Propose the sealed groups, then the open one, while fewer than inflight_entries_max entries are
        in flight. The entry's time is the leader's wall clock, never below one it proposed before; after
        a failover it may be behind the old leader's, and the app's apply takes the newest time it has
        applied instead (entries' times as applied never go back)."""
        while self._inflight < self.config.inflight_entries_max:
            if self._sealed:
                group = self._sealed.popleft()
            elif self._group:
                group, self._group, self._group_records = self._group, [], 0
            else:
                return
            self._last_ts = max(self._last_ts, int(time.time() * 1000))
            entry = self.make_entry([p.payload for p in group], self._last_ts)
            self._inflight += 1
            self.counters.entries_proposed += 1
            self.counters.entries_batches += len(group)
            fut = self.driver.propose(entry)
            fut.add_done_callback(functools.partial(self._entry_completed, group))

    def _entry_completed(self, group: list[Pending], fut: Any) -> None:
        self._complete(lambda: self._entry_done(group, fut))

    def _entry_done(self, group: list[Pending], fut: Any) -> None:
        self._inflight -= 1
        exc = fut.exception()
        if exc is not None:
            for p in group:
                self._proposal_failed(p, exc)
            return
        self.entry_applied(group, fut.result())

    def _proposal_failed(self, p: Pending, exc: BaseException) -> None:
        if isinstance(exc, (NotLeader, ProposalDropped)):
            self.not_leader(p)           # nothing was applied: safe to retry at the new leader
        elif isinstance(exc, Overloaded):
            self.error(p, ErrorCode.OVERLOADED, str(exc))
        elif isinstance(exc, OutcomeUnknown):
            self.error(p, ErrorCode.OUTCOME_UNKNOWN, f"{exc}; retry with the same dedup ids")
        else:
            log.error("proposal failed: %r", exc)
            self.error(p, ErrorCode.OUTCOME_UNKNOWN, f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------------------------------ reads
    def _start_linearizable_reads(self) -> None:
        if not self._reads_linearizable:
            return
        batch, self._reads_linearizable = self._reads_linearizable, []
        fut = self.driver.read_index()           # one ReadIndex round for every read of this iteration
        fut.add_done_callback(lambda f: self._complete(lambda: self._read_index_done(batch, f)))

    def _read_index_done(self, batch: list[Pending], fut: Any) -> None:
        exc = fut.exception()
        if exc is not None:
            for p in batch:
                if isinstance(exc, NotLeader):
                    self.not_leader(p)
                else:
                    self.error(p, ErrorCode.TIMEOUT if not isinstance(exc, Overloaded) else ErrorCode.OVERLOADED,
                               f"linearizable read failed: {type(exc).__name__}: {exc}; retry")
            return
        for p in batch:
            self._serve_read(p)

    def _serve_follower_reads(self) -> None:
        if not self._reads_follower:
            return
        last_seq = self.last_seq()
        now = time.monotonic()
        still = []
        for deadline, p in self._reads_follower:
            if last_seq >= p.req.min_seq:
                self._serve_read(p)
            elif now > deadline:
                self.error(p, ErrorCode.TIMEOUT, f"this replica has applied seq {last_seq}, not yet "
                           f"min_seq={p.req.min_seq}, after follower_read_wait_ms; read elsewhere or retry")
            else:
                still.append((deadline, p))
        self._reads_follower = still

    def _serve_read(self, p: Pending) -> None:
        try:
            if p.req.op == _OP_EVENTS:
                self._serve_events(p)
            else:
                self.serve_read(p)
        except RequestError as exc:
            self.count_refusal(exc.reason or "bad_argument", exc.code)
            self.error(p, exc.code, str(exc))

    def _serve_events(self, p: Pending) -> None:
        req = p.req
        try:
            evs = self.events.read(req.first_seq, req.last_seq, P.EVENTS_PER_REPLY_MAX)
        except EventsUnavailable as exc:
            self.error(p, ErrorCode.EVENTS_UNAVAILABLE, str(exc))
            return
        self.reply(p, payload=evs.tobytes())

    # ---------------------------------------------------------------------------------------- replies
    def not_leader(self, p: Pending) -> None:
        self.counters.not_leader += 1
        leader = self.driver.leader_id
        addr = self.config.replicas.get(leader, {}).get("client") if leader is not None else None
        if leader == self.node_id:
            leader, addr = None, None            # we were leader when it failed; the next one is unknown
        self.finish(p)
        self._reply_raw(p.ident, P.Reply(p.req.req_id, Status.NOT_LEADER, 0, "writes go to the leader",
                                         leader, addr, self.last_seq(), self.node_id))

    def error(self, p: Pending, code: ErrorCode, message: str) -> None:
        self.finish(p)
        self.request_metrics.error(p.req.op, code.name)
        self._reply_raw(p.ident, P.Reply(p.req.req_id, Status.ERROR, code, message,
                                         last_seq=self.last_seq(), node_id=self.node_id,
                                         shard_epoch=self.shard_epoch))

    def reply(self, p: Pending, payload: bytes = b"", extra: bytes | None = None,
              complete_since_ms: int = 0) -> None:
        self.finish(p)
        self._reply_raw(p.ident, P.Reply(p.req.req_id, Status.OK, last_seq=self.last_seq(),
                                         node_id=self.node_id, results_complete_since_ms=complete_since_ms),
                        payload, extra)

    def ok_reply_parts(self) -> tuple[bytes, bytes]:
        """The OK reply header of this moment as (prefix, suffix) around msgpack(req_id): see ok_reply_parts."""
        return ok_reply_parts(self.last_seq(), self.node_id)

    def finish(self, p: Pending) -> None:
        """``p`` is answered (or about to be, by ``send_reply``): release its share of the pending bounds."""
        self.request_metrics.observe(p.req.op, perf_counter() - p.t0)
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

    def _reply_raw(self, ident: bytes, reply: P.Reply, payload: bytes = b"", extra: bytes | None = None) -> None:
        self.send_reply(ident, P.encode(reply), payload, extra)

    def send_reply(self, ident: bytes, header: bytes, payload: bytes, extra: bytes | None) -> None:
        """Send a reply of an encoded header, a payload and optionally a third frame (no pending bookkeeping)."""
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
            header = P.encode(P.EventsHeader(int(evs["seq_num"][0]), int(evs["seq_num"][-1]), self.node_id))
            try:
                self.pub.send(P.EVENTS_TOPIC, zmq.SNDMORE)
                self.pub.send(header, zmq.SNDMORE)
                self.pub.send(evs.data, 0, copy=evs.nbytes < 65536)
            except zmq.ZMQError:
                pass

    def status(self, with_digest: bool = False) -> dict[str, Any]:
        st = self.driver.status()
        st.pop("transport", None)
        with self.lock:
            st.update(self.status_fields())
            st.update(pid=os.getpid(), events_last_seq=self.events.last_seq,
                      events_first_seq=self.events.first_available())
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
        if self._metrics_http is not None:
            st["metrics_address"] = self._metrics_http.address
        return st

    SERVICE_NAME = "service"            # the ``service`` label of this app's metrics

    def metric_labels(self) -> dict[str, Any]:
        """The labels on every metric of this replica (an app adds its group: the shard id, the Marker group)."""
        return {"service": self.SERVICE_NAME, "node": self.node_id}

    def app_metrics(self, fam: Families, status: dict[str, Any]) -> None:
        """The app's own metric families, from its STATUS (HTTP thread)."""

    def render_metrics(self) -> bytes:
        """``GET /metrics`` (the metrics HTTP thread): the replica's STATUS and request metrics as
        Prometheus text (engine/service/metrics.py; docs/metrics.md)."""
        fam = Families(**self.metric_labels())
        st = self.status()
        replica_status_metrics(fam, st)
        disk_metrics(fam, self.config.data_dir)
        self.request_metrics.add_to(fam)
        self.app_metrics(fam, st)
        return fam.render()


def run_until_signalled(server: ReplicatedServer) -> int:
    """A replica process's last step: SIGTERM/SIGINT stop ``server``; start it, print READY (what the
    local launchers wait for), serve until stopped; the exit code (3: fail-stop)."""
    import signal

    def on_signal(_sig: int, _frm: Any) -> None:
        server.stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda _s, _f: server.call_soon(server.reload_keys))   # key rotation
    server.start()
    print("READY", flush=True)
    server.serve()
    return server.exit_code
