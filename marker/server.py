"""The Marker: the workflow state machine (``marker.workflow.MarkerMachine``) on the replicated-service
machinery (``engine/service/server.py``), with the leader's job driver (``marker.job_driver.JobDriver``)
talking to the shards.

    zwallet marker --config marker-1.toml        # python -m marker.server --config ...

Every replica applies the Marker's Raft log: SUBMITs (client workflows, grouped into one entry per round),
JOB_RESULTS (definite shard results gathered by the leader's driver) and ticks (empty entries that move
the machine's time so deadlines pass without traffic). Only the leader drives: when this replica becomes
leader it waits for a ReadIndex barrier (its state then holds every committed entry of earlier terms),
builds a fresh JobDriver over the machine and sends every READY job again (the same records: the shards
dedup them); when it loses leadership the driver is dropped and waiting submitters are told NOT_LEADER
(they re-submit to the new leader, which answers the duplicate once the workflow finishes).

Main thread, each pass (``tick``): the driver's sends go to the shards through one shard client each
(``engine.client.Client``: its own I/O thread, leader tracking, same-bytes retries); their replies come
back through ``call_soon``; the definite results are proposed as one JOB_RESULTS entry (at most
``results_entries_inflight_max`` in flight). Nothing the driver learns changes a workflow until that
entry is committed and applied: a decision is always in the log before a phase-2 job is sent.

Config: the service's sections plus ``[marker]`` (``MarkerConfig``): ``system`` (the system.toml that
lists every shard and the shard map), the machine's and the driver's limits.
"""
from __future__ import annotations

import argparse
import collections
import functools
import heapq
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
import numpy as np

from engine import records as R
from engine import wire as W
from engine.client import Client as ShardClient
from engine.service.config import DriverConfig, ServiceConfig
from engine.service.logs import setup_logging
from engine.service.metrics import Families
from engine.service.process import tune_malloc
from engine.service.protocol import ErrorCode
from engine.service.security import ADMIN
from engine.service.server import run_until_signalled, READ, WRITE, OpSpec, Pending, ReplicatedServer, RequestError
from engine.system import Group, System
from marker import wire as MW
from marker.commands import Drain, Submit, encode_entry, u128_bytes, workflow_refusal
from marker.groups import GroupMap
from marker.events import MARKER_EVENT_DTYPE, EventKind
from marker.job_driver import (INFLIGHT_JOBS_PER_SHARD_MAX, JOB_RESULTS_ENTRY_MAX, NOT_REMEMBERED, RETRY_BASE_MS,
                               RETRY_MAX_MS, JobDriver, Send, job_results_command)
from marker.workflow import FINISHED_RETAINED_MAX, WORKFLOWS_INFLIGHT_MAX, MarkerMachine, Outcome

log = logging.getLogger("zwallet.marker")

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STUCK"})
# Specs in one SUBMIT entry (the group-commit weight). Every replica's Raft thread applies an entry in one go
# and sends no heartbeat meanwhile: ~80-115 us a spec on one replica (bench/bench_marker_machine.py), ~2x
# that in wall time while the leader's main thread shares the GIL, so 256 specs are ~20-60 ms. (One SUBMIT
# request is never split: a request of more specs than this is an entry of its own, up to
# marker.wire.SUBMIT_SPECS_MAX.) Throughput comes from pipelining instead: ``inflight_entries_max``.
SUBMIT_ENTRY_SPECS_MAX = 256
SUBMIT_ENTRIES_INFLIGHT = 4                            # the Marker's default for the service's inflight_entries_max
# Committed entries the Raft core hands to one apply call (its max_committed_per_ready; the core's default,
# 4096 entries or 8 MiB, suits the shard's fast C apply). Bounding each entry is not enough: a replica that
# fell behind (a busy machine, a new leader's followers) would get hundreds of entries in one round and hold
# its Raft thread for seconds (bench_marker: raft-apply stalls up to 2.4 s, elections). With a few entries a
# round, the Raft driver goes back to its ticks and peers (heartbeats) after its 50 ms round budget.
APPLY_ENTRIES_PER_ROUND_MAX = 2
STATUS_DIGEST_WORKFLOWS_MAX = 20_000                   # STATUS gives the digest of a state this small ("" beyond)
_FINISH_KINDS = (int(EventKind.FINISHED), int(EventKind.STUCK))


@dataclass
class MarkerConfig(ServiceConfig):
    inflight_entries_max: int = SUBMIT_ENTRIES_INFLIGHT  # SUBMIT entries proposed and not yet applied
    system: str = ""                                   # system.toml: the shards' addresses and the shard map
    group_id: int = 1                                  # this Marker group's id in system.toml (marker/groups.py)
    workflows_inflight_max: int = WORKFLOWS_INFLIGHT_MAX
    finished_retained_max: int = FINISHED_RETAINED_MAX
    inflight_jobs_per_shard_max: int = INFLIGHT_JOBS_PER_SHARD_MAX
    retry_base_ms: int = RETRY_BASE_MS
    retry_max_ms: int = RETRY_MAX_MS
    shard_timeout_ms: int = 5_000                      # one send to a shard: no answer by then = unknown outcome
    shard_attempt_timeout_ms: int = 500                # ... re-sent (same bytes) this often meanwhile
    results_entries_inflight_max: int = 4              # JOB_RESULTS entries proposed and not yet applied
    tick_entry_ms: int = 500                           # with workflows in flight, an entry at least this often
    waiters_max: int = 100_000                         # SUBMITs held for their outcome
    apply_entries_per_round_max: int = APPLY_ENTRIES_PER_ROUND_MAX   # committed entries per Raft apply call
    try_expiry_ms: int = 0                             # TCC tries expire this long after creation (0: never;
                                                       # a safety net for a lost Marker: docs/marker.md)

    TOML_APP_SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "marker": ("system", "group_id", "workflows_inflight_max", "finished_retained_max",
                   "inflight_jobs_per_shard_max", "retry_base_ms", "retry_max_ms", "shard_timeout_ms",
                   "shard_attempt_timeout_ms", "results_entries_inflight_max", "tick_entry_ms", "waiters_max",
                   "apply_entries_per_round_max", "try_expiry_ms"),
    }

    def driver_config(self) -> DriverConfig:
        cfg = super().driver_config()
        cfg.core_options = {**cfg.core_options, "max_committed_per_ready": self.apply_entries_per_round_max}
        return cfg

    def validate(self) -> None:
        super().validate()
        if not self.system:
            raise ValueError("[marker] system: the path of the system.toml listing the shards is required")
        for name in ("workflows_inflight_max", "finished_retained_max", "inflight_jobs_per_shard_max",
                     "retry_base_ms", "shard_timeout_ms", "shard_attempt_timeout_ms",
                     "results_entries_inflight_max", "tick_entry_ms", "waiters_max", "apply_entries_per_round_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"[marker] {name} must be >= 1")
        if self.retry_max_ms < self.retry_base_ms:
            raise ValueError("[marker] retry_max_ms must be >= retry_base_ms")
        if self.shard_attempt_timeout_ms > self.shard_timeout_ms:
            raise ValueError("[marker] shard_attempt_timeout_ms must be <= shard_timeout_ms")


class _Waiter:
    """A SUBMIT held until its workflows finish (or ``deadline``)."""
    __slots__ = ("p", "replies", "open", "deadline", "at")

    def __init__(self, p: Pending, replies: list[MW.SubmitReply], deadline: float) -> None:
        self.p: Pending | None = p
        self.replies = replies
        self.at: dict[int, list[int]] = {}       # workflow id -> the indexes of its open replies
        for k, r in enumerate(replies):
            if not r.finished and r.status in ("created", "duplicate"):
                self.at.setdefault(int.from_bytes(r.workflow_id, "little"), []).append(k)
        self.open = sum(len(v) for v in self.at.values())
        self.deadline = deadline


class MarkerServer(ReplicatedServer):
    EVENT_DTYPE = MARKER_EVENT_DTYPE
    APP_REFUSAL_REASONS = ("waiters", "wrong_group")
    LOGGER_NAMES = ("zwallet",)
    config: MarkerConfig

    def __init__(self, config: MarkerConfig) -> None:
        super().__init__(config)
        self.system = System.load(config.system)
        self.groups = GroupMap(self.system.markers or (Group(config.group_id, ("",)),))
        if config.group_id not in {g.id for g in self.groups.groups}:
            raise ValueError(f"{config.system}: lists no Marker group {config.group_id} (this replica's group_id)")
        if config.group_id in self.groups.removed:
            raise ValueError(f"{config.system}: Marker group {config.group_id} is marked removed; it does not serve")
        self.machine = MarkerMachine(self.system.shard_map, event_sink=self._on_events,
                                     workflows_inflight_max=config.workflows_inflight_max,
                                     finished_retained_max=config.finished_retained_max,
                                     try_expiry_ms=config.try_expiry_ms)
        self.ops = {
            MW.OP_SUBMIT: OpSpec("SUBMIT", WRITE, 1, 1, MW.SUBMIT_BYTES_MAX, scoped=True),
            MW.OP_GET_WORKFLOW: OpSpec("GET_WORKFLOW", READ, 16, 16, 16 * MW.WORKFLOW_IDS_MAX),
            MW.OP_DRAIN: OpSpec("DRAIN", WRITE, 1, 1, 16, right=ADMIN),
        }
        self.entry_weight_max = SUBMIT_ENTRY_SPECS_MAX  # specs in one entry
        self.tick_interval_ms = 20
        self._finished_q: collections.deque[int] = collections.deque()   # Raft thread -> main thread
        self._waiters: dict[int, list[_Waiter]] = {}
        self._waiter_deadlines: list[tuple[float, int, _Waiter]] = []
        self._waiter_seq = 0
        self._nwaiters = 0
        self._driver: JobDriver | None = None
        self._driver_term = -1
        self._shards: dict[int, ShardClient] = {}
        self._shard_keys: Any = False
        self._results_inflight = 0
        self._last_entry_ts = 0
        self._last_entry_at = 0.0
        self.counters_marker = collections.Counter[str]()
        self._digest_cache: tuple[tuple[int, ...], str] | None = None

    # ------------------------------------------------------------- the Raft thread (lock held)
    def apply_entries(self, entries: Sequence[Any]) -> list[Any]:
        return [self.machine.apply(e.data) for e in entries]

    def _on_events(self, chunks: list[np.ndarray]) -> None:
        for evs in chunks:
            done = evs[np.isin(evs["kind"], _FINISH_KINDS)]
            if len(done):
                wid = done["workflow_id"]
                for lo, hi in wid.tolist():
                    self._finished_q.append(int(lo) | (int(hi) << 64))
        self.emit_events(chunks)
        if self._finished_q:
            self._wake_soon()

    def snapshot_state(self) -> bytes:
        return self.machine.snapshot()

    def restore_state(self, data: bytes) -> None:
        self.machine.restore(data)

    def last_seq(self) -> int:
        return self.machine.last_seq

    # ------------------------------------------------------------------------------ main thread: writes
    def accept_write(self, p: Pending, payload: Any) -> int:
        op = p.req.op
        if op == MW.OP_SUBMIT:
            try:
                req = MW.decode_submit(payload)
            except ValueError as exc:
                raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
            if self.groups.several:
                me = self.config.group_id
                for spec in req.specs:
                    why = self.groups.refusal(int.from_bytes(spec.workflow_id, "little"), spec.issued_ms, me)
                    if why is not None:
                        raise RequestError(ErrorCode.WRONG_GROUP, why + "; nothing was created",
                                           reason="wrong_group")
            if p.rights.restricted:
                why = workflow_refusal(p.rights, req.specs, self.system.shard_map)
                if why:
                    raise RequestError(ErrorCode.UNAUTHORIZED, why + "; nothing was created", reason="unauthorized")
            if req.wait_ms and self._nwaiters >= self.config.waiters_max:
                raise RequestError(ErrorCode.OVERLOADED, "too many SUBMITs are waiting for their outcome "
                                   "(waiters_max); submit without waiting or retry later", reason="waiters")
            p.payload = req
            return len(req.specs)
        try:
            on = msgspec.msgpack.decode(bytes(payload), type=bool)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, f"DRAIN takes a msgpack bool: {exc}") from None
        p.payload = on
        return 1

    def make_entry(self, payloads: list[Any], timestamp_ms: int) -> bytes:
        commands: list[Any] = []
        for pl in payloads:
            if isinstance(pl, MW.SubmitRequest):
                commands.extend(Submit(s) for s in pl.specs)
            else:
                commands.append(Drain(bool(pl)))
        self._note_entry(timestamp_ms)
        return encode_entry(commands, timestamp_ms)

    def entry_applied(self, group: list[Pending], outcome: Any) -> None:
        outcomes: list[Outcome] = outcome
        if len(outcomes) == 1 and outcomes[0].status == "error":
            for p in group:                     # cannot happen: this leader built the entry
                self.error(p, ErrorCode.OUTCOME_UNKNOWN, f"the Marker refused its own entry: {outcomes[0].message}")
            return
        at = 0
        for p in group:
            pl = p.payload
            if not isinstance(pl, MW.SubmitRequest):
                o = outcomes[at]
                at += 1
                self.reply(p, MW.encode([_reply_of(o, None)]))
                continue
            mine = outcomes[at:at + len(pl.specs)]
            at += len(pl.specs)
            with self.lock:
                replies = [_reply_of(o, self._brief(o.workflow_id) if o.workflow_id else None) for o in mine]
            w = _Waiter(p, replies, time.monotonic() + pl.wait_ms / 1000)
            if not pl.wait_ms or not w.open:
                self.reply(p, MW.encode(replies))
                continue
            self._park(w)
        self._kick()

    def _brief(self, wid: int) -> tuple[str, int | None] | None:
        return self.machine.workflow_brief(wid)

    def _park(self, w: _Waiter) -> None:
        for wid in w.at:
            self._waiters.setdefault(wid, []).append(w)
        self._waiter_seq += 1
        self._nwaiters += 1
        heapq.heappush(self._waiter_deadlines, (w.deadline, self._waiter_seq, w))

    def _settle_finished(self) -> None:
        q = self._finished_q
        while q:
            wid = q.popleft()
            ws = self._waiters.pop(wid, None)
            if not ws:
                continue
            with self.lock:
                brief = self._brief(wid)
            if brief is None:
                continue
            for w in ws:
                if w.p is None:
                    continue
                for k in w.at.pop(wid, ()):
                    w.replies[k] = _finished_reply(w.replies[k], brief)
                    w.open -= 1
                if w.open <= 0:
                    self._answer(w)

    def _answer(self, w: _Waiter) -> None:
        p, w.p = w.p, None
        if p is not None:
            self._nwaiters -= 1
            self.reply(p, MW.encode(w.replies))

    def _expire_waiters(self, now: float) -> None:
        dl = self._waiter_deadlines
        while dl and (dl[0][0] <= now or dl[0][2].p is None):
            _, _, w = heapq.heappop(dl)
            if w.p is not None:
                self._answer(w)                 # the states they have now; the workflows go on

    def _drop_waiters(self) -> None:
        for _, _, w in self._waiter_deadlines:
            if w.p is not None:
                p, w.p = w.p, None
                self._nwaiters -= 1
                self.not_leader(p)              # re-submit at the new leader: a duplicate that waits again
        self._waiter_deadlines.clear()
        self._waiters.clear()

    # ------------------------------------------------------------------------------ main thread: reads
    def accept_read(self, p: Pending, payload: Any) -> None:
        raw = bytes(payload)
        p.payload = [int.from_bytes(raw[k:k + 16], "little") for k in range(0, len(raw), 16)]

    def serve_read(self, p: Pending) -> None:
        with self.lock:
            found = [self.machine.get_workflow(wid) for wid in p.payload]
        self.reply(p, MW.encode([_wire_workflow(w) for w in found]))

    SERVICE_NAME = "marker"

    def metric_labels(self) -> dict[str, Any]:
        return {**super().metric_labels(), "group": self.config.group_id}

    def app_metrics(self, fam: Families, status: dict[str, Any]) -> None:
        m = status.get("marker") or {}
        g, c = fam.gauge, fam.counter
        g("zwallet_marker_workflows_in_flight", "workflows not yet finished", m.get("in_flight"))
        g("zwallet_marker_workflows_inflight_max", "the limit on workflows in flight (OVERLOADED past it)",
          m.get("workflows_inflight_max"))
        g("zwallet_marker_workflows_retained", "finished workflows kept for duplicate submits and queries",
          m.get("finished_retained"))
        g("zwallet_marker_workflows_overdue", "workflows in flight past their deadline", m.get("overdue"))
        g("zwallet_marker_workflows_stuck", "workflows stuck (an operator must look)", m.get("stuck"))
        g("zwallet_marker_ready_jobs", "jobs ready to be sent to shards", m.get("ready_jobs"))
        g("zwallet_marker_draining", "1 while this group refuses new work", m.get("draining"))
        c("zwallet_marker_phase2_retries_total", "confirm/cancel/compensation jobs re-sent", m.get("phase2_retries"))
        c("zwallet_marker_stuck_jobs_total", "jobs that exhausted their attempts", m.get("stuck_jobs"))
        c("zwallet_marker_rejected_entries_total", "log entries the state machine refused", m.get("rejected_entries"))
        g("zwallet_marker_waiting_submits", "SUBMIT requests held until their workflows finish",
          status.get("waiting_submits"))
        d = status.get("driver") or {}
        g("zwallet_marker_sends_in_flight", "job batches sent to shards, not yet answered (leader)",
          d.get("sends_in_flight"))
        c("zwallet_marker_unknown_outcomes_total", "job sends whose outcome was unknown (re-sent)",
          d.get("unknown_outcomes"))
        c("zwallet_marker_sent_jobs_total", "jobs sent to shards (leader)", d.get("sent_jobs"))

    def status_fields(self) -> dict[str, Any]:
        st = self.machine.status()
        out: dict[str, Any] = {"last_seq": self.machine.last_seq, "sm_applied": self.machine.applied_entries,
                               "marker": st, "digest": self._digest(st), "waiting_submits": self._nwaiters}
        if self._driver is not None:
            out["driver"] = self._driver.status()
        return out

    def _digest(self, st: dict[str, Any]) -> str:
        """The machine's digest (lock held): O(every workflow kept), ~5 us each, and the Raft thread waits
        for the lock meanwhile (its heartbeats too), so it is computed only for a state of at most
        ``STATUS_DIGEST_WORKFLOWS_MAX`` workflows ("" beyond), and once per state (STATUS polled in a loop
        costs nothing more)."""
        if st["in_flight"] + st["finished_retained"] > STATUS_DIGEST_WORKFLOWS_MAX:
            return ""
        m = self.machine
        key = (m.applied_entries, m.rejected_entries, m.last_seq, m.create_seq, m.now_ms)
        if self._digest_cache is None or self._digest_cache[0] != key:
            self._digest_cache = (key, m.digest().hex())
        return self._digest_cache[1]

    # --------------------------------------------------------------------------- the leader's driver
    def on_role_change(self, is_leader: bool, term: int) -> None:
        if is_leader:
            self.read_barrier(functools.partial(self._start_driving, term=term))
        else:
            self._stop_driving()

    def _start_driving(self, fut: Future, *, term: int) -> None:
        if fut.exception() is not None or not self.is_leader or self._driver is not None:
            return
        with self.lock:
            self._driver = JobDriver(self.machine, inflight_jobs_per_shard_max=self.config.inflight_jobs_per_shard_max,
                                     retry_base_ms=self.config.retry_base_ms, retry_max_ms=self.config.retry_max_ms,
                                     send_id_base=1)
        self._driver_term = term
        self._results_inflight = 0
        log.info("marker %d leads term %d: driving %d workflows in flight", self.node_id, term,
                 self._in_flight())
        self._kick()

    def _in_flight(self) -> int:
        return len(self.machine._active)        # one int read (the GIL): no lock needed

    def _stop_driving(self) -> None:
        if self._driver is not None:
            log.info("marker %d: no longer the leader; the driver stops", self.node_id)
            with self.lock:
                self._driver.close()
        self._driver = None
        self._drop_waiters()

    def _shard(self, shard_id: int) -> ShardClient:
        c = self._shards.get(shard_id)
        if c is None:
            cfg = self.config
            if self._shard_keys is False:
                self._shard_keys = cfg.client_keys()       # loaded once (None: insecure)
            c = self._shards[shard_id] = ShardClient(self.system.shard_clients(shard_id),
                                                     timeout_s=cfg.shard_timeout_ms / 1000,
                                                     attempt_timeout_s=cfg.shard_attempt_timeout_ms / 1000,
                                                     keys=self._shard_keys)
        return c

    def tick(self, now_ms: int) -> None:
        self._settle_finished()
        if self._waiter_deadlines:
            self._expire_waiters(time.monotonic())
        if self._driver is not None and self.is_leader:
            self._drive(now_ms)

    def _kick(self) -> None:
        if self._driver is not None:
            self._drive(int(time.time() * 1000))

    def _drive(self, now_ms: int) -> None:
        driver = self._driver
        assert driver is not None
        with self.lock:
            sends = driver.poll(now_ms)
        for s in sends:
            self._send(s)
        proposed = False
        while self._results_inflight < self.config.results_entries_inflight_max:
            results = driver.take_results(JOB_RESULTS_ENTRY_MAX)     # small entries, pipelined
            if not results:
                break
            self._propose([job_results_command(results)])
            proposed = True
        if (not proposed and self._results_inflight < self.config.results_entries_inflight_max
                and self._in_flight() and time.monotonic() - self._last_entry_at > self.config.tick_entry_ms / 1000):
            self._propose([])                    # a tick: the machine's time moves on (deadlines)

    def _send(self, s: Send) -> None:
        try:
            client = self._shard(s.shard)
            if s.records is not None:
                fut = client.apply_batch_async(s.records)
            else:
                fut = client._read(W.Op.RESULT_OF, W.encode_ids(s.dedup_ids or []), issued_ms=s.issued_ms,
                                   with_reply=True)
        except Exception as exc:  # noqa: BLE001 - a closed or broken client: the outcome is unknown
            self._on_reply(s, None, f"send failed: {exc}")
            return
        fut.add_done_callback(functools.partial(self._future_done, s))

    def _future_done(self, s: Send, f: Future) -> None:
        self.call_soon(lambda: self._on_future(s, f))      # the shard client's I/O thread -> main thread

    def _on_future(self, s: Send, f: Future) -> None:
        exc = f.exception()
        if exc is not None:
            self.counters_marker["shard_errors"] += 1
            self._on_reply(s, None, f"{type(exc).__name__}: {exc}")
            return
        if s.records is not None:
            self._on_reply(s, np.asarray(f.result()), None)
            return
        reply, payload = f.result()
        found = np.array(W.results_view(payload), copy=True)
        R.put_u128(found["dedup_id"], s.dedup_ids or [])
        unknown = found["code"] == W.RESULT_UNKNOWN
        if unknown.any():
            # never applied for sure when issued after the shard's history is complete (the client's rule)
            never = s.issued_ms >= reply.results_complete_since_ms + R.ISSUED_AHEAD_MAX_MS
            found["code"][unknown] = int(R.Code.DEDUP_EXPIRED) if never else NOT_REMEMBERED
        self._on_reply(s, found, None)

    def _on_reply(self, s: Send, results: np.ndarray | None, error: str | None) -> None:
        if self._driver is None:
            return
        self._driver.on_reply(s.send_id, results, error, int(time.time() * 1000))
        self._kick()

    def _note_entry(self, ts: int) -> None:
        self._last_entry_ts = max(self._last_entry_ts, ts)
        self._last_entry_at = time.monotonic()

    def _propose(self, commands: list[Any]) -> None:
        ts = max(self._last_entry_ts, int(time.time() * 1000))
        self._note_entry(ts)
        self._results_inflight += 1
        term = self._driver_term

        def done(f: Future) -> None:
            if term == self._driver_term:
                self._results_inflight -= 1
            if f.exception() is not None:
                self.counters_marker["results_entries_failed"] += 1   # the results are found again (re-sent)
            self._kick()
        self.propose(encode_entry(commands, ts), done)

    def on_stop(self) -> None:
        self._drop_waiters()
        for c in self._shards.values():
            c.close()
        self._shards.clear()


def _reply_of(o: Outcome, brief: tuple[str, int | None] | None) -> MW.SubmitReply:
    wid = u128_bytes(o.workflow_id) if o.workflow_id else b""
    r = MW.SubmitReply(wid, o.status, o.state, o.code, False, o.reason, o.message)
    if brief is not None:
        r = _finished_reply(r, brief) if brief[0] in TERMINAL_STATES else MW.SubmitReply(
            wid, o.status, brief[0], brief[1], False, o.reason, o.message)
    return r


def _finished_reply(r: MW.SubmitReply, brief: tuple[str, int | None]) -> MW.SubmitReply:
    return MW.SubmitReply(r.workflow_id, r.status, brief[0], brief[1], brief[0] in TERMINAL_STATES, r.reason,
                          r.message)


def _wire_workflow(wf: dict[str, Any] | None) -> dict[str, Any] | None:
    """A workflow dict with its u128 ids as 16-byte little-endian bytes (msgpack ints stop at 64 bits)."""
    if wf is None:
        return None
    out = dict(wf)
    out["workflow_id"] = u128_bytes(wf["workflow_id"])
    out["jobs"] = [dict(j, dedup_id=u128_bytes(j["dedup_id"])) for j in wf["jobs"]]
    return out


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zwallet marker", description="run one replica of a Marker group")
    p.add_argument("--config", required=True, help="TOML config file (docs/marker.md)")
    p.add_argument("--id", type=int, help="this replica's id (overrides [node] id)")
    p.add_argument("--no-sync", action="store_true", help="skip fsync (NOT durable; experiments only)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    overrides: dict[str, Any] = {"node_id": args.id}
    if args.no_sync:
        overrides["sync"] = False
    if args.verbose:
        overrides["verbose"] = True
    try:
        config = MarkerConfig.from_toml(args.config, **overrides)
    except (OSError, ValueError) as exc:
        print(f"zwallet marker: {exc}", file=sys.stderr, flush=True)
        return 2
    setup_logging(config.node_id, config.verbose)
    tune_malloc()                          # before any thread starts
    server = MarkerServer(config)
    return run_until_signalled(server)


if __name__ == "__main__":
    raise SystemExit(main())
