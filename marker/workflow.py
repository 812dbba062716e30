"""The Marker's replicated state machine: cross-shard workflows (TCC transfers, sagas) as DAGs of jobs.

Pure: no I/O, no clock, no randomness. ``apply(entry)`` is a function of (state, entry bytes); the entry's
timestamp is the only time there is (it never goes back). Same entries, same state, byte for byte
(``snapshot()``, ``digest()``).

**Workflows.** A SUBMIT creates a workflow whose jobs are all planned at once, from the spec alone:

    TCC (legs grouped by shard s_0 < s_1 < ... < s_{n-1}, one group per shard):
        0..n-1      TRY on s_k           (TCC_TRY group of that shard's legs, txn id derived per shard)
        n           DECIDE               (internal; depends on every TRY settled)
        n+1..2n     CONFIRM on s_k       (depends on DECIDE = OK)
        2n+1..3n    CANCEL on s_k        (depends on DECIDE failed and TRY s_k applied-or-unknown)
    SAGA (steps 0..m-1, each on one shard):
        0..m-1      STEP k               (depends on STEP k-1 = OK)
        m           DECIDE               (depends on every STEP settled)
        m+1..2m     COMPENSATE step m-1, m-2, .., 0  (depends on DECIDE failed, its step applied-or-unknown,
                                          and the compensation before it settled: strictly reverse order)

A job's dependency is (job, condition), condition one of SETTLED, OK, FAILED, APPLIED_OR_UNKNOWN; a
dependency that can no longer hold SKIPS the job (the cancel of a try that failed: nothing to cancel; the
steps after a failed step). Jobs only depend on jobs with a lower index, so one pass in index order
settles the graph.

**Job states.** WAITING -> READY (all dependencies hold; the leader's driver sends it) -> DONE (a
definite result was applied) | SKIPPED | ABANDONED (phase 1 only, after the decision, when its outcome
no longer matters and a null compensation/cancel makes a late arrival harmless) | STUCK (phase 2 only).
A phase-2 job refused with a retryable code (``PHASE2_RETRY_CODES``: the money moved on) gets a new attempt
(a new dedup id) after a backoff, visible as a JOB_RETRY event; after ``PHASE2_ATTEMPTS_MAX`` attempts, or
at once for any other refusal, it is STUCK: an invariant violation (counter ``stuck_jobs``, a STUCK event,
the workflow's state STUCK), never silently retried forever nor ignored.

**Workflow states.** RUNNING (phase 1) -> DECIDE -> COMMITTING (OK, confirms to do) or ROLLING_BACK
(failed: cancels/compensations) -> SUCCEEDED | FAILED once every job is settled (terminal; the outcome
code is OK, or the first failed phase-1 job's business code in job order, or DEADLINE_EXCEEDED), or
STUCK. The deadline (``deadline_ms``, absolute) in phase 1 forces the decision to DEADLINE_EXCEEDED;
in phase 2 it sets ``overdue`` (an OVERDUE event, ``status()["overdue"]``) and the jobs go on.

Cancels and the anti-suspension rule: until the ledger has null cancel (``Code.NULL_CANCELLED``), a
cancel of a try that has not yet arrived returns TXN_NOT_FOUND and the late try would then apply and hold
money forever. So, unless ``null_cancel``, a CANCEL waits for its TRY to be settled (the driver keeps
re-sending the same try records until it has a definite result; a late duplicate is deduped by the shard).
With ``null_cancel`` the decision ABANDONS unsettled tries and cancels at once (the shard makes a late try
fail with TXN_ALREADY_CANCELLED). Saga steps are always abandoned on a deadline: COMPENSATE has null
compensation (NULL_COMPENSATED, the late original is refused).

**Ids.** Every id is derived from the workflow id, so every leader sends the same records:
``blake2b(workflow_id(16 LE) || tag || index u32 || attempt u32, 16 bytes)`` read little-endian, 0 -> 1;
tag b"J" for a job's dedup id, b"X" for the txn id of a TCC's k-th shard. Derived when needed, never
kept before (the same on every replica and after a restore): a phase-1 job's at planning, a phase-2 job's
when it becomes READY (most phase-2 jobs are skipped and never need one), a txn id at the first record
built. issued_ms of a phase-1 job is the creating entry's time; of a phase-2 job the deciding entry's
time (a retry attempt: the entry's time that re-issued it). A job's op records are built from the spec
and these values (``job_records``).

**What is persisted before what is acted on.** Every state change above happens only in ``apply``, that
is after the entry carrying it is committed in the Marker's log: a decision is made by applying the
JOB_RESULTS (or the tick) that completes phase 1, so a phase-2 job is READY only once the decision is in
the log; the driver only ever sends READY jobs, and a shard's result becomes a job's state only when the
JOB_RESULTS command carrying it is applied. A new leader's driver re-sends every READY job (the same
records: the shards dedup them). Results for a job not READY, of another attempt, or of an unknown or
finished workflow are ignored (duplicates and stale leaders are normal).

**Exactly-once of workflows.** A SUBMIT of a known workflow id is a duplicate (the existing workflow's
state). Finished workflows are kept (``finished_retained_max``, FIFO); evicting one moves the machine's
``horizon_ms`` past its ``issued_ms`` (the client's first-issue time, the same on every re-submit), and a
SUBMIT of an unknown workflow issued at or before the horizon is refused EXPIRED: it may have run before.
"""
from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

import msgspec
import numpy as np

from engine._ledger import OpEncoder
from engine.records import ISSUED_AHEAD_MAX_MS, OP_DTYPE, Code, encode_currency
from engine.shard_map import ShardMap
from marker.commands import (
    BatchStep, Drain, JobResults, SagaSpec, Submit, TccSpec, TransferStep, WorkflowSpec, bytes_i128, bytes_u128,
    decode_entry, decode_spec, encode_spec, step_accounts, validate_spec, JOB_RESULTS_MAX, WORKFLOW_KIND_SAGA,
    WORKFLOW_KIND_TCC,
)
from marker.events import MARKER_EVENT_DTYPE, NO_JOB, NO_SHARD, EventKind

TRY_EXPIRY_MIN_MS = 4 * 3_600_000        # try_expiry_ms, when on: 4 x DEADLINE_AHEAD_MAX_MS at least
WORKFLOWS_INFLIGHT_MAX = 10_000          # workflows not yet finished (stuck ones included): more is OVERLOADED
FINISHED_RETAINED_MAX = 100_000          # finished workflows kept for duplicate submits and queries
PHASE2_ATTEMPTS_MAX = 16                 # attempts (new dedup ids) of a phase-2 job refused with a retryable code
PHASE2_RETRY_BASE_MS = 100               # backoff before attempt k: base * 2**(k-1), capped
PHASE2_RETRY_MAX_MS = 30_000
SNAPSHOT_VERSION = 1
_null_cancelled = Code.__members__.get("NULL_CANCELLED")      # lands with the ledger's null cancel
NULL_CANCELLED: int | None = None if _null_cancelled is None else int(_null_cancelled)


class MarkerCode(IntEnum):
    """Workflow outcome codes of the Marker's own (beyond the ledger's ``Code`` values, all < 1000)."""
    DEADLINE_EXCEEDED = 1000


class WorkflowState(IntEnum):
    RUNNING = 1          # phase 1
    COMMITTING = 2       # decided OK, confirms in progress
    ROLLING_BACK = 3     # decided failed, cancels / compensations in progress
    SUCCEEDED = 4
    FAILED = 5
    STUCK = 6            # a phase-2 job cannot succeed: operator needed


TERMINAL_WORKFLOW = (WorkflowState.SUCCEEDED, WorkflowState.FAILED)


class JobKind(IntEnum):
    TRY = 1
    CONFIRM = 2
    CANCEL = 3
    STEP = 4
    COMPENSATE = 5
    DECIDE = 6


class JobState(IntEnum):
    WAITING = 0
    READY = 1
    DONE = 2
    SKIPPED = 3
    ABANDONED = 4
    STUCK = 5


_SETTLED_JOB = (JobState.DONE, JobState.SKIPPED, JobState.ABANDONED)


class Cond(IntEnum):
    SETTLED = 0
    OK = 1
    FAILED = 2
    APPLIED_OR_UNKNOWN = 3


# phase-2 codes that mean "done" (beyond OK), per kind; any other code is a refusal
_CANCEL_DONE = {int(Code.OK), int(Code.TXN_NOT_FOUND), int(Code.TXN_ALREADY_CANCELLED)} | (
    {NULL_CANCELLED} if NULL_CANCELLED is not None else set())
PHASE2_DONE_CODES: dict[JobKind, frozenset[int]] = {
    JobKind.CONFIRM: frozenset({int(Code.OK), int(Code.TXN_ALREADY_CONFIRMED)}),
    JobKind.CANCEL: frozenset(_CANCEL_DONE),
    JobKind.COMPENSATE: frozenset({int(Code.OK), int(Code.NULL_COMPENSATED), int(Code.ORIGINAL_COMPENSATED)}),
}
PHASE2_RETRY_CODES = frozenset({int(Code.BALANCE_LIMIT_EXCEEDED), int(Code.OVERFLOW),
                                int(Code.INVALID_ACCOUNT_STATE)})
_PHASE2 = (JobKind.CONFIRM, JobKind.CANCEL, JobKind.COMPENSATE)
_PHASE1 = (JobKind.TRY, JobKind.STEP)
# the hot paths compare with module globals (an enum member through its class is a slower lookup)
_WAITING, _READY, _DONE, _SKIPPED, _ABANDONED, _STUCK = (
    JobState.WAITING, JobState.READY, JobState.DONE, JobState.SKIPPED, JobState.ABANDONED, JobState.STUCK)
_SETTLED, _C_OK, _C_FAILED = Cond.SETTLED, Cond.OK, Cond.FAILED
_TRY, _CONFIRM, _CANCEL, _DECIDE, _COMPENSATE = (JobKind.TRY, JobKind.CONFIRM, JobKind.CANCEL, JobKind.DECIDE,
                                                 JobKind.COMPENSATE)
_OK = int(Code.OK)


class Refusal:
    OVERLOADED = "OVERLOADED"
    DRAINING = "DRAINING"
    INVALID_SPEC = "INVALID_SPEC"
    EXPIRED = "EXPIRED"                  # issued at or before the horizon of evicted workflows
    ISSUED_IN_FUTURE = "ISSUED_IN_FUTURE"
    MALFORMED_ENTRY = "MALFORMED_ENTRY"


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one command of an entry did. ``status``: "created", "duplicate", "refused", "accepted" or
    "error" (the whole entry did not parse: nothing applied)."""
    status: str
    reason: str = ""                     # refused / error: a ``Refusal`` value
    message: str = ""
    workflow_id: int = 0
    state: str = ""                      # SUBMIT: the workflow's state name
    code: int | None = None              # SUBMIT: the workflow's outcome code once decided
    accepted: int = 0                    # JOB_RESULTS: results recorded
    ignored: int = 0                     # JOB_RESULTS: results for no READY job of that attempt


def derive_id(workflow_id: int, tag: bytes, index: int, attempt: int = 0) -> int:
    h = hashlib.blake2b(workflow_id.to_bytes(16, "little") + tag + index.to_bytes(4, "little")
                        + attempt.to_bytes(4, "little"), digest_size=16).digest()
    return int.from_bytes(h, "little") or 1


# ----------------------------------------------------------------------------- op records, as bytes
# The TCC and compensate records built straight as bytes (OP_DTYPE, 128 bytes each: dedup_id @0, account_id
# @16, other_id @32, amount @48, expected_a/b @64/@80, currency @96, kind @104, flags @105, group_size @106,
# reserved @108, issued_ms @112, expires_ms @120), byte for byte what engine._ledger.OpEncoder builds
# (tests/test_marker_machine.py checks it) at a tenth of its cost: no numpy array per job. The spec's ids and
# amounts are already 16-byte little-endian (checked by validate_spec), so they go in as they are.
_Z4, _Z8, _Z16, _Z32, _Z56 = bytes(4), bytes(8), bytes(16), bytes(32), bytes(56)
_KIND_TCC_TRY, _KIND_TCC_CONFIRM, _KIND_TCC_CANCEL, _KIND_COMPENSATE, _KIND_GROUP_SPEC = 10, 11, 12, 13, 14
_currency_bytes: dict[str, bytes] = {}


def _currency8(c: str) -> bytes:
    raw = _currency_bytes.get(c)
    if raw is None:
        raw = encode_currency(c).ljust(8, b"\0")
        if len(_currency_bytes) < 4096:
            _currency_bytes[c] = raw
    return raw


def one_op_record(kind: int, dedup_id: int, other_id: int, issued_ms: int) -> bytes:
    """A single-record op (TCC_CONFIRM, TCC_CANCEL: other_id = the txn id; COMPENSATE: the original's dedup id)."""
    return (dedup_id.to_bytes(16, "little") + _Z16 + other_id.to_bytes(16, "little") + _Z56
            + bytes((kind, 0, 1, 0)) + _Z4 + issued_ms.to_bytes(8, "little") + _Z8)


def tcc_try_records(dedup_id: int, txn_id: int, legs: list[tuple[bytes, bytes, str]], issued_ms: int,
                    expires_ms: int = 0) -> bytes:
    """A TCC_TRY group: the header (other_id = txn id, group_size = 1 + legs, ``expires_ms``: 0 = never) and one
    GROUP_SPEC per leg."""
    d = dedup_id.to_bytes(16, "little")
    n = 1 + len(legs)
    parts = [d, _Z16, txn_id.to_bytes(16, "little"), _Z56, bytes((_KIND_TCC_TRY, 0)), n.to_bytes(2, "little"), _Z4,
             issued_ms.to_bytes(8, "little"), expires_ms.to_bytes(8, "little")]
    member_tail = bytes((_KIND_GROUP_SPEC, 0, 0, 0)) + _Z4 + _Z16
    for account, amount, currency in legs:
        parts += (d, account, _Z16, amount, _Z32, _currency8(currency), member_tail)
    return b"".join(parts)


class _Shape(NamedTuple):
    """The job graph of one workflow kind and size (shared by every workflow of that shape): job kinds,
    refs (TCC: the shard group; SAGA: the step) and dependencies."""
    kinds: tuple[JobKind, ...]
    refs: tuple[int, ...]
    deps: tuple[tuple[tuple[int, Cond], ...], ...]


_shapes: dict[tuple[int, int], _Shape] = {}


def _shape(kind: int, n: int) -> _Shape:
    got = _shapes.get((kind, n))
    if got is not None:
        return got
    kinds: list[JobKind] = []
    refs: list[int] = []
    deps: list[tuple[tuple[int, Cond], ...]] = []

    def add(kind: JobKind, ref: int, dep: tuple[tuple[int, Cond], ...]) -> None:
        kinds.append(kind)
        refs.append(ref)
        deps.append(dep)
    if kind == WORKFLOW_KIND_TCC:
        for k in range(n):
            add(JobKind.TRY, k, ())
        add(JobKind.DECIDE, 0, tuple((k, Cond.SETTLED) for k in range(n)))
        for k in range(n):
            add(JobKind.CONFIRM, k, ((n, Cond.OK),))
        for k in range(n):
            add(JobKind.CANCEL, k, ((n, Cond.FAILED), (k, Cond.APPLIED_OR_UNKNOWN)))
    else:
        m = n
        for k in range(m):
            add(JobKind.STEP, k, ((k - 1, Cond.OK),) if k else ())
        add(JobKind.DECIDE, 0, tuple((k, Cond.SETTLED) for k in range(m)))
        for r in range(m):                          # job m+1+r compensates step m-1-r
            step = m - 1 - r
            d = [(m, Cond.FAILED), (step, Cond.APPLIED_OR_UNKNOWN)]
            if r:
                d.append((m + r, Cond.SETTLED))
            add(JobKind.COMPENSATE, step, tuple(d))
    got = _Shape(tuple(kinds), tuple(refs), tuple(deps))
    if len(_shapes) < 4096:
        _shapes[(kind, n)] = got
    return got


@dataclass(slots=True)
class Job:
    kind: JobKind
    shard: int                            # NO_SHARD for DECIDE
    ref: int                              # TCC: the shard group k; SAGA: the step index
    deps: tuple[tuple[int, Cond], ...]
    state: JobState = JobState.WAITING
    code: int | None = None
    seq: int = 0
    attempt: int = 0
    issued_ms: int = 0
    not_before_ms: int = 0
    dedup_id: int = 0                     # derived, 0 until needed: phase 1 at planning, phase 2 once READY
    records: bytes | None = None          # derived: its op records at this attempt, built once (not snapshotted)


@dataclass(slots=True)
class Workflow:
    workflow_id: int
    kind: int                             # WORKFLOW_KIND_TCC / WORKFLOW_KIND_SAGA
    spec: WorkflowSpec
    spec_bytes: bytes
    part_shards: list[int]                # TCC: shard of each leg; SAGA: shard of each step
    epoch: int
    create_seq: int
    created_ms: int
    jobs: list[Job] = field(default_factory=list)
    state: WorkflowState = WorkflowState.RUNNING
    code: int | None = None
    decided_ms: int = 0
    finished_ms: int = 0
    overdue: bool = False
    groups: list[tuple[int, list[int]]] = field(default_factory=list)   # TCC: (shard, leg indices)
    txn_ids: list[int] | None = None      # derived (TCC: the txn id of each shard group), on first use

    @property
    def deadline_ms(self) -> int:
        return self.spec.deadline_ms

    @property
    def issued_ms(self) -> int:
        return self.spec.issued_ms


class ReadyJob(NamedTuple):
    """A job the leader's driver may send now (or once ``not_before_ms`` has passed)."""
    workflow_id: int
    job_index: int
    attempt: int
    shard: int
    dedup_id: int
    kind: JobKind
    not_before_ms: int


EventSink = Callable[[list[np.ndarray]], None]
# MARKER_EVENT_DTYPE as a struct: seq, timestamp, workflow_id lo/hi, dedup_id lo/hi, kind, workflow_kind, state,
# job_kind, job_index, shard_id, code, attempt, reserved, job_seq, issued_ms, deadline_ms, shard_epoch, reserved2
_EVENT_STRUCT = struct.Struct("<QQQQQQBBBBHHHHIQQQQ32x")
assert _EVENT_STRUCT.size == MARKER_EVENT_DTYPE.itemsize
ReadyObserver = Callable[[tuple[int, int, int, int] | None], None]


class MarkerMachine:
    """The Marker's state machine. ``shard_map`` is configuration (the same on every replica); each
    workflow records the map's epoch and the shard of every part it was planned with (in the snapshot)."""

    def __init__(self, shard_map: ShardMap, *, event_sink: EventSink | None = None,
                 workflows_inflight_max: int = WORKFLOWS_INFLIGHT_MAX,
                 finished_retained_max: int = FINISHED_RETAINED_MAX, null_cancel: bool | None = None,
                 try_expiry_ms: int = 0) -> None:
        """``try_expiry_ms`` (configuration, the same on every replica; 0: off): TCC tries carry
        ``expires_ms`` = the workflow's creation time + it, after which a shard cancels a try it still holds
        by itself (docs/ledger.md, expiry). A safety net for a Marker group lost for good; it must be far
        longer than any outage to ride out, since a try that expires before its decided confirm arrives makes
        the workflow STUCK (its other shards confirmed)."""
        if not 1 <= workflows_inflight_max <= 1 << 24 or not 1 <= finished_retained_max <= 1 << 26:
            raise ValueError("workflows_inflight_max in 1..2**24, finished_retained_max in 1..2**26")
        if try_expiry_ms and not TRY_EXPIRY_MIN_MS <= try_expiry_ms <= 1 << 40:
            raise ValueError(f"try_expiry_ms is 0 (off) or at least TRY_EXPIRY_MIN_MS={TRY_EXPIRY_MIN_MS}: "
                             "longer than any workflow's phase 1 (DEADLINE_AHEAD_MAX_MS) with room for phase 2")
        self.try_expiry_ms = int(try_expiry_ms)
        self.shard_map = shard_map
        self.event_sink = event_sink
        self.workflows_inflight_max = workflows_inflight_max
        self.finished_retained_max = finished_retained_max
        self.null_cancel = (NULL_CANCELLED is not None) if null_cancel is None else bool(null_cancel)
        self._encoder = OpEncoder()
        self._ready_observers: list[ReadyObserver] = []
        self._reset()

    def _reset(self) -> None:
        self.now_ms = 0
        self.last_seq = 0
        self.create_seq = 0
        self.draining = False
        self.horizon_ms = 0                # a SUBMIT issued at or before it, of an unknown workflow: EXPIRED
        self.applied_entries = 0
        self.rejected_entries = 0
        self.stuck_jobs = 0
        self.phase2_retries = 0
        self.ignored_results = 0
        self._active: dict[int, Workflow] = {}
        self._finished: dict[int, Workflow] = {}
        # derived (rebuilt on restore, not in the snapshot)
        self._deadlines: list[tuple[int, int, int]] = []     # (deadline_ms, create_seq, workflow_id)
        self._ready: dict[tuple[int, int], None] = {}
        self._events: list[tuple] = []

    # ----------------------------------------------------------------------------------------- apply
    def apply(self, entry: bytes | memoryview) -> list[Outcome]:
        """Apply one committed entry; one Outcome per command (one "error" Outcome if the entry does not
        parse: nothing applied). Never raises on any bytes."""
        try:
            ts, commands = decode_entry(entry)
        except ValueError as exc:
            self.rejected_entries += 1
            return [Outcome(status="error", reason=Refusal.MALFORMED_ENTRY, message=str(exc))]
        self.applied_entries += 1
        self.now_ms = max(self.now_ms, ts)
        out: list[Outcome] = []
        for cmd in commands:
            if isinstance(cmd, Submit):
                out.append(self._submit(cmd.spec))
            elif isinstance(cmd, JobResults):
                out.append(self._job_results(cmd.results))
            else:
                assert isinstance(cmd, Drain)
                self.draining = bool(cmd.on)
                out.append(Outcome(status="accepted"))
        self._check_deadlines()
        self._flush_events()
        return out

    def _submit(self, spec: WorkflowSpec) -> Outcome:
        try:
            wid = bytes_u128(spec.workflow_id)
        except ValueError as exc:
            return Outcome(status="refused", reason=Refusal.INVALID_SPEC, message=str(exc))
        wf = self._active.get(wid) or self._finished.get(wid)
        if wf is not None:
            return Outcome(status="duplicate", workflow_id=wid, state=wf.state.name, code=wf.code)
        if self.draining:
            return Outcome(status="refused", reason=Refusal.DRAINING, workflow_id=wid, message="marker is draining")
        if len(self._active) >= self.workflows_inflight_max:
            return Outcome(status="refused", reason=Refusal.OVERLOADED, workflow_id=wid,
                           message=f"workflows_inflight_max={self.workflows_inflight_max} in flight")
        try:
            validate_spec(spec, self.now_ms)
            if spec.issued_ms > self.now_ms + ISSUED_AHEAD_MAX_MS:
                return Outcome(status="refused", reason=Refusal.ISSUED_IN_FUTURE, workflow_id=wid,
                               message=f"issued_ms more than {ISSUED_AHEAD_MAX_MS} ms ahead")
            if spec.issued_ms <= self.horizon_ms:
                return Outcome(status="refused", reason=Refusal.EXPIRED, workflow_id=wid,
                               message=f"issued_ms {spec.issued_ms} at or before the horizon {self.horizon_ms}")
            wf = self._plan(wid, spec, encode_spec(spec), None, self.create_seq + 1, self.now_ms,
                            self.shard_map.epoch)
            for k, j in enumerate(wf.jobs):
                if j.kind in _PHASE1:
                    # every phase-1 job must build: refuse it now if not (and keep them for the driver)
                    j.records = self._record_bytes(wf, k, j)
        except (ValueError, TypeError, OverflowError) as exc:
            return Outcome(status="refused", reason=Refusal.INVALID_SPEC, workflow_id=wid, message=str(exc))
        self.create_seq += 1
        self._active[wid] = wf
        heapq.heappush(self._deadlines, (wf.deadline_ms, wf.create_seq, wid))
        self._emit(EventKind.CREATED, wf, None, None)
        self._advance(wf)
        return Outcome(status="created", workflow_id=wid, state=wf.state.name, code=wf.code)

    def _plan(self, wid: int, spec: WorkflowSpec, spec_bytes: bytes, part_shards: list[int] | None,
              create_seq: int, created_ms: int, epoch: int) -> Workflow:
        """The workflow and its job graph (all jobs WAITING), from the spec and the shard of each part. The
        graph's structure is shared by every workflow of its shape (``_shape``); the phase-1 jobs' dedup ids
        are derived here, the phase-2 jobs' only once they become READY (most are skipped: never derived)."""
        if isinstance(spec, TccSpec):
            if part_shards is None:
                shard_of = self.shard_map.shard_of
                part_shards = [shard_of(int.from_bytes(a, "little")) for a, _, _ in spec.legs]
            wf = Workflow(wid, WORKFLOW_KIND_TCC, spec, spec_bytes, part_shards, epoch, create_seq, created_ms)
            if len(part_shards) == 2 and part_shards[0] != part_shards[1]:      # the two-leg cross-shard transfer
                a, b = part_shards
                wf.groups = [(a, [0]), (b, [1])] if a < b else [(b, [1]), (a, [0])]
            else:
                by_shard: dict[int, list[int]] = {}
                for k, s in enumerate(part_shards):
                    by_shard.setdefault(s, []).append(k)
                wf.groups = sorted(by_shard.items())
            shape = _shape(WORKFLOW_KIND_TCC, len(wf.groups))
            group_shards = [s for s, _ in wf.groups]
            shards = group_shards + [NO_SHARD] + group_shards + group_shards
        else:
            assert isinstance(spec, SagaSpec)
            if part_shards is None:
                part_shards = []
                for k, st in enumerate(spec.steps):
                    shard_set = {self.shard_map.shard_of(a) for a in step_accounts(st)}
                    if len(shard_set) != 1:
                        raise ValueError(f"step {k}: its accounts are on shards {sorted(shard_set)}: a step is "
                                         f"one shard's operation")
                    part_shards.append(shard_set.pop())
            wf = Workflow(wid, WORKFLOW_KIND_SAGA, spec, spec_bytes, part_shards, epoch, create_seq, created_ms)
            m = len(spec.steps)
            shape = _shape(WORKFLOW_KIND_SAGA, m)
            shards = list(part_shards) + [NO_SHARD] + [part_shards[m - 1 - r] for r in range(m)]
        jobs = []
        for k, (kind, ref, deps, shard) in enumerate(zip(shape.kinds, shape.refs, shape.deps, shards)):
            if kind in _PHASE1:
                jobs.append(Job(kind, shard, ref, deps, issued_ms=created_ms, dedup_id=derive_id(wid, b"J", k, 0)))
            else:
                jobs.append(Job(kind, shard, ref, deps))
        wf.jobs = jobs
        return wf

    # ------------------------------------------------------------------------------------ transitions
    def _dep_holds(self, wf: Workflow, dep: tuple[int, Cond]) -> bool | None:
        """True / False (never will) / None (not yet)."""
        j = wf.jobs[dep[0]]
        cond = dep[1]
        if j.state not in _SETTLED_JOB:
            return None
        ok = j.state == JobState.DONE and j.code == Code.OK
        if cond == Cond.SETTLED:
            return True
        if cond == Cond.OK:
            return ok
        if cond == Cond.FAILED:
            return j.state == JobState.DONE and not ok
        return ok or j.state == JobState.ABANDONED

    def _advance(self, wf: Workflow) -> None:
        """Settle the job graph after a change: make ready / skip / decide, in index order; then finish.
        (``_dep_holds`` inlined: this runs for every workflow on every change, on every replica.)"""
        jobs = wf.jobs
        for k, j in enumerate(jobs):
            if j.state != _WAITING:
                continue
            never = pending = False
            for dk, cond in j.deps:
                d = jobs[dk]
                st = d.state
                if st == _DONE:
                    ok = d.code == _OK
                    holds = True if cond == _SETTLED else (ok if cond != _C_FAILED else not ok)
                elif st == _SKIPPED:
                    holds = cond == _SETTLED
                elif st == _ABANDONED:
                    holds = cond != _C_OK and cond != _C_FAILED
                else:
                    pending = True
                    continue
                if not holds:
                    never = True
                    break
            if never:
                j.state = _SKIPPED
                self._emit(EventKind.JOB_SKIPPED, wf, k, j)
            elif not pending:
                if j.kind == _DECIDE:
                    self._decide(wf, k, None)
                else:
                    self._make_ready(wf, k, j)
        self._maybe_finish(wf)

    def _make_ready(self, wf: Workflow, k: int, j: Job) -> None:
        if j.kind in _PHASE2:
            j.issued_ms = self.now_ms
            if not j.dedup_id:
                j.dedup_id = derive_id(wf.workflow_id, b"J", k, j.attempt)
        j.state = _READY
        self._ready[(wf.workflow_id, k)] = None
        for obs in self._ready_observers:
            obs((wf.workflow_id, k, j.attempt, j.shard))

    def _unready(self, wf: Workflow, k: int) -> None:
        wid = wf.workflow_id
        wf.jobs[k].records = None
        if self._ready.pop((wid, k), 0) is None:
            for obs in self._ready_observers:
                obs((wid, k, -1, NO_SHARD))

    def _decide(self, wf: Workflow, k: int, forced: int | None) -> None:
        d = wf.jobs[k]
        code = forced
        if code is None:
            code = _OK
            for j in wf.jobs[:k]:
                if j.state == _DONE and j.code != _OK:
                    assert j.code is not None
                    code = j.code
                    break
        d.state, d.code = _DONE, code
        wf.code, wf.decided_ms = code, self.now_ms
        wf.state = WorkflowState.COMMITTING if code == _OK else WorkflowState.ROLLING_BACK
        if forced is not None:                   # the phase-1 jobs not settled at the deadline
            for i, j in enumerate(wf.jobs[:k]):
                if j.state == _WAITING:
                    j.state = _SKIPPED
                    self._emit(EventKind.JOB_SKIPPED, wf, i, j)
                elif j.state == _READY and (wf.kind == WORKFLOW_KIND_SAGA or self.null_cancel):
                    j.state = _ABANDONED
                    self._unready(wf, i)
                    self._emit(EventKind.JOB_ABANDONED, wf, i, j)
        self._emit(EventKind.DECIDED, wf, k, d, code)

    def _maybe_finish(self, wf: Workflow) -> None:
        if wf.state in TERMINAL_WORKFLOW or wf.state == WorkflowState.RUNNING:
            return
        settled = True
        for j in wf.jobs:
            st = j.state
            if st == _STUCK:
                if wf.state != WorkflowState.STUCK:
                    wf.state = WorkflowState.STUCK
                return
            if st == _WAITING or st == _READY:
                settled = False
        if not settled:
            return
        wf.state = WorkflowState.SUCCEEDED if wf.code == _OK else WorkflowState.FAILED
        wf.finished_ms = self.now_ms
        for j in wf.jobs:
            j.records = None
        self._emit(EventKind.FINISHED, wf, None, None, wf.code)
        del self._active[wf.workflow_id]
        self._finished[wf.workflow_id] = wf
        while len(self._finished) > self.finished_retained_max:
            old_id = next(iter(self._finished))
            old = self._finished.pop(old_id)
            self.horizon_ms = max(self.horizon_ms, old.issued_ms)

    def _job_results(self, results: list[tuple[bytes, int, int, int, int]]) -> Outcome:
        if len(results) > JOB_RESULTS_MAX:
            return Outcome(status="refused", reason=Refusal.INVALID_SPEC,
                           message=f"{len(results)} results, over JOB_RESULTS_MAX={JOB_RESULTS_MAX}")
        accepted = ignored = 0
        touched: dict[int, Workflow] = {}
        active = self._active
        for wid_b, k, attempt, code, seq in results:
            wf = active.get(int.from_bytes(wid_b, "little")) if len(wid_b) == 16 else None
            j = wf.jobs[k] if wf is not None and 0 <= k < len(wf.jobs) else None
            if (wf is None or j is None or j.state != _READY or j.attempt != attempt
                    or not 0 <= code <= 0xFFFF or not 0 <= seq < 1 << 64):
                ignored += 1
                continue
            accepted += 1
            self._unready(wf, k)
            j.seq = seq
            if j.kind in _PHASE2 and code not in PHASE2_DONE_CODES[j.kind]:
                j.code = code
                if code in PHASE2_RETRY_CODES and j.attempt + 1 < PHASE2_ATTEMPTS_MAX:
                    self.phase2_retries += 1
                    self._emit(EventKind.JOB_RETRY, wf, k, j, code)
                    j.attempt += 1
                    j.dedup_id = derive_id(wf.workflow_id, b"J", k, j.attempt)
                    j.not_before_ms = self.now_ms + min(PHASE2_RETRY_MAX_MS,
                                                        PHASE2_RETRY_BASE_MS << min(j.attempt - 1, 20))
                    self._make_ready(wf, k, j)
                else:
                    j.state = _STUCK
                    self.stuck_jobs += 1
                    self._emit(EventKind.STUCK, wf, k, j, code)
                    wf.state = WorkflowState.STUCK
            else:
                j.state, j.code = _DONE, code
                self._emit(EventKind.JOB_DONE, wf, k, j, code)
            touched[wf.workflow_id] = wf
        for wf in touched.values():
            self._advance(wf)
        self.ignored_results += ignored
        return Outcome(status="accepted", accepted=accepted, ignored=ignored)

    def _check_deadlines(self) -> None:
        while self._deadlines and self._deadlines[0][0] < self.now_ms:
            _, _, wid = heapq.heappop(self._deadlines)
            wf = self._active.get(wid)
            if wf is None:
                continue
            if wf.state == WorkflowState.RUNNING:
                k = next(i for i, j in enumerate(wf.jobs) if j.kind == JobKind.DECIDE)
                self._decide(wf, k, int(MarkerCode.DEADLINE_EXCEEDED))
                self._advance(wf)
                if wf.workflow_id in self._active:       # rolling back past the deadline: visible
                    wf.overdue = True
                    self._emit(EventKind.OVERDUE, wf, None, None, wf.code)
            elif not wf.overdue:
                wf.overdue = True
                self._emit(EventKind.OVERDUE, wf, None, None, wf.code)

    # ----------------------------------------------------------------------------------------- events
    def _emit(self, kind: EventKind, wf: Workflow, k: int | None, j: Job | None, code: int | None = None) -> None:
        self.last_seq += 1
        self._events.append((self.last_seq, kind, wf, k, j, code))

    def _flush_events(self) -> None:
        # one struct.pack per record into one buffer, one numpy view for the lot (a numpy field assignment per
        # record and field cost ~1 us each; a tuple per record through np.array ~5 us a record); the values
        # are read now, at the end of the entry, as they always were. A skipped job was never sent: its
        # event carries dedup_id 0 (its id is derived only when it is needed)
        events = self._events
        if not events:
            return
        m64 = 0xFFFFFFFFFFFFFFFF
        now = self.now_ms
        pack = _EVENT_STRUCT.pack
        rows = []
        for seq, kind, wf, k, j, code in events:
            wid = wf.workflow_id
            c = 0 if code is None else code
            spec = wf.spec
            if j is None:
                rows.append(pack(seq, now, wid & m64, wid >> 64, 0, 0, kind, wf.kind, wf.state, 0,
                                 NO_JOB if k is None else k, NO_SHARD, c, 0, 0, 0, spec.issued_ms,
                                 spec.deadline_ms, wf.epoch))
            else:
                d = 0 if kind == EventKind.JOB_SKIPPED else j.dedup_id
                rows.append(pack(seq, now, wid & m64, wid >> 64, d & m64, d >> 64, kind, wf.kind, wf.state, j.kind,
                                 NO_JOB if k is None else k, j.shard, c, min(j.attempt, 0xFFFF), 0, j.seq,
                                 j.issued_ms, spec.deadline_ms, wf.epoch))
        evs = np.frombuffer(b"".join(rows), dtype=MARKER_EVENT_DTYPE)
        events.clear()
        if self.event_sink is not None:
            self.event_sink([evs])

    # ------------------------------------------------------------------------------------ for the driver
    def add_ready_observer(self, observer: ReadyObserver) -> None:
        """``observer((workflow_id, job_index, attempt, shard))`` whenever a job becomes READY (attempt -1:
        it left READY), and ``observer(None)`` after a restore (the READY set is then ``ready_jobs()``).
        Called in ``apply`` / ``restore``, on their thread: the leader's driver keeps its index with it. It
        only learns: the machine's state does not depend on who observes it."""
        self._ready_observers.append(observer)

    def remove_ready_observer(self, observer: ReadyObserver) -> None:
        if observer in self._ready_observers:
            self._ready_observers.remove(observer)

    def ready_job(self, workflow_id: int, k: int) -> ReadyJob | None:
        """Job ``k`` of a workflow if it is READY now, else None."""
        wf = self._active.get(workflow_id)
        if wf is None or not 0 <= k < len(wf.jobs):
            return None
        j = wf.jobs[k]
        if j.state != _READY:
            return None
        return ReadyJob(workflow_id, k, j.attempt, j.shard, j.dedup_id, j.kind, j.not_before_ms)

    def job_record_bytes(self, workflow_id: int, k: int) -> bytes:
        """``job_records(workflow_id, k)`` as bytes, built once per attempt (phase-1 jobs: at their SUBMIT)."""
        wf = self._active.get(workflow_id)
        if wf is None:
            return self.job_records(workflow_id, k).tobytes()
        j = wf.jobs[k]
        if j.records is None:
            j.records = self._record_bytes(wf, k, j)
        return j.records

    def job_issued_ms(self, workflow_id: int, k: int) -> int:
        """The issued_ms job ``k``'s records carry at its current attempt."""
        wf = self._active.get(workflow_id) or self._finished.get(workflow_id)
        if wf is None:
            raise ValueError(f"unknown workflow {workflow_id}")
        return wf.jobs[k].issued_ms

    def ready_jobs(self) -> Iterator[ReadyJob]:
        """Every READY job, in the order they became ready (what a leader's driver sends)."""
        for wid, k in self._ready:
            j = self._active[wid].jobs[k]
            yield ReadyJob(wid, k, j.attempt, j.shard, j.dedup_id, j.kind, j.not_before_ms)

    def job_records(self, wf_or_id: Workflow | int, k: int) -> np.ndarray:
        """The op records (OP_DTYPE) of job ``k`` of a workflow at its current attempt: the same bytes on
        every leader and every retry. ValueError for a DECIDE job or an unknown workflow."""
        wf = wf_or_id if isinstance(wf_or_id, Workflow) else (self._active.get(wf_or_id)
                                                               or self._finished.get(wf_or_id))
        if wf is None:
            raise ValueError(f"unknown workflow {wf_or_id}")
        return np.frombuffer(self._record_bytes(wf, k, wf.jobs[k]), dtype=OP_DTYPE)

    def _dedup_id(self, wf: Workflow, k: int, j: Job) -> int:
        """Job k's dedup id at its attempt, derived if it is not yet (without keeping it: a query must not
        change the state)."""
        return j.dedup_id or derive_id(wf.workflow_id, b"J", k, j.attempt)

    def _txn_id(self, wf: Workflow, group: int) -> int:
        txn = wf.txn_ids
        if txn is None:
            txn = wf.txn_ids = [derive_id(wf.workflow_id, b"X", g) for g in range(len(wf.groups))]
        return txn[group]

    def _record_bytes(self, wf: Workflow, k: int, j: Job) -> bytes:
        ts, spec, kind = j.issued_ms, wf.spec, j.kind
        if kind == _TRY:
            assert isinstance(spec, TccSpec)
            legs = spec.legs
            return tcc_try_records(self._dedup_id(wf, k, j), self._txn_id(wf, j.ref),
                                   [legs[i] for i in wf.groups[j.ref][1]], ts,
                                   wf.created_ms + self.try_expiry_ms if self.try_expiry_ms else 0)
        if kind == _CONFIRM or kind == _CANCEL:
            return one_op_record(_KIND_TCC_CONFIRM if kind == _CONFIRM else _KIND_TCC_CANCEL,
                                 self._dedup_id(wf, k, j), self._txn_id(wf, j.ref), ts)
        if kind == _COMPENSATE:
            return one_op_record(_KIND_COMPENSATE, self._dedup_id(wf, k, j),
                                 self._dedup_id(wf, j.ref, wf.jobs[j.ref]), ts)
        if kind == JobKind.STEP:
            enc = self._encoder
            assert isinstance(spec, SagaSpec)
            st = spec.steps[j.ref]
            dedup = self._dedup_id(wf, k, j)
            if isinstance(st, TransferStep):
                return enc.transfer(dedup, bytes_u128(st.from_id), bytes_u128(st.to_id), bytes_i128(st.amount),
                                    st.currency,
                                    None if st.expected_from is None else bytes_i128(st.expected_from),
                                    None if st.expected_to is None else bytes_i128(st.expected_to),
                                    timestamp=ts).tobytes()
            assert isinstance(st, BatchStep)
            return enc.batch_balance_operation(
                dedup, [(bytes_u128(a), bytes_i128(m), c) for a, m, c in st.specs],
                [(bytes_u128(a), bytes_i128(e)) for a, e in st.preconditions], timestamp=ts).tobytes()
        raise ValueError(f"job {k} of workflow {wf.workflow_id} is internal ({j.kind.name})")

    # ---------------------------------------------------------------------------------------- queries
    def workflow_brief(self, workflow_id: int) -> tuple[str, int | None] | None:
        """(state name, outcome code) of a workflow, or None: what a SUBMIT's reply needs, without
        ``get_workflow``'s dicts."""
        wf = self._active.get(workflow_id) or self._finished.get(workflow_id)
        return None if wf is None else (wf.state.name, wf.code)

    def get_workflow(self, workflow_id: int) -> dict[str, Any] | None:
        wf = self._active.get(workflow_id) or self._finished.get(workflow_id)
        if wf is None:
            return None
        return {
            "workflow_id": wf.workflow_id, "kind": "TCC" if wf.kind == WORKFLOW_KIND_TCC else "SAGA",
            "state": wf.state.name, "code": wf.code, "created_ms": wf.created_ms, "decided_ms": wf.decided_ms,
            "finished_ms": wf.finished_ms, "deadline_ms": wf.deadline_ms, "issued_ms": wf.issued_ms,
            "overdue": wf.overdue, "shard_epoch": wf.epoch,
            "jobs": [{"index": k, "kind": j.kind.name, "shard": None if j.shard == NO_SHARD else j.shard,
                      "dedup_id": 0 if j.kind == _DECIDE else self._dedup_id(wf, k, j), "state": j.state.name,
                      "code": j.code, "seq": j.seq,
                      "attempt": j.attempt, "issued_ms": j.issued_ms} for k, j in enumerate(wf.jobs)],
        }

    def status(self) -> dict[str, Any]:
        active = self._active.values()
        return {
            "in_flight": len(self._active), "finished_retained": len(self._finished),
            "overdue": sum(1 for w in active if w.overdue),
            "stuck": sum(1 for w in active if w.state == WorkflowState.STUCK),
            "ready_jobs": len(self._ready), "draining": self.draining, "now_ms": self.now_ms,
            "last_seq": self.last_seq, "horizon_ms": self.horizon_ms, "stuck_jobs": self.stuck_jobs,
            "phase2_retries": self.phase2_retries, "ignored_results": self.ignored_results,
            "applied_entries": self.applied_entries, "rejected_entries": self.rejected_entries,
            "workflows_inflight_max": self.workflows_inflight_max,
            "finished_retained_max": self.finished_retained_max,
        }

    def workflow_ids(self, finished: bool = False) -> list[int]:
        return list(self._finished if finished else self._active)

    # --------------------------------------------------------------------------- snapshot and digest
    @staticmethod
    def _wf_state(wf: Workflow) -> tuple:
        return (wf.spec_bytes, wf.part_shards, wf.epoch, wf.create_seq, wf.created_ms, int(wf.state), wf.code,
                wf.decided_ms, wf.finished_ms, wf.overdue,
                [(int(j.state), j.code, j.seq, j.attempt, j.issued_ms, j.not_before_ms) for j in wf.jobs])

    def snapshot(self) -> bytes:
        """The whole state, canonical (same state, same bytes): msgpack, versioned."""
        return msgspec.msgpack.encode((
            SNAPSHOT_VERSION, self.null_cancel, self.now_ms, self.last_seq, self.create_seq, self.draining,
            self.horizon_ms, self.applied_entries, self.rejected_entries, self.stuck_jobs, self.phase2_retries,
            self.ignored_results, [self._wf_state(w) for w in self._active.values()],
            [self._wf_state(w) for w in self._finished.values()]))

    def digest(self) -> bytes:
        return hashlib.blake2b(self.snapshot(), digest_size=32).digest()

    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot's. ValueError if it is not one (the state is then unchanged)."""
        try:
            doc = msgspec.msgpack.decode(data)
            (version, null_cancel, now_ms, last_seq, create_seq, draining, horizon_ms, applied, rejected, stuck,
             retries, ignored, active, finished) = doc
            if version != SNAPSHOT_VERSION:
                raise ValueError(f"snapshot version {version}, not {SNAPSHOT_VERSION}")
            act = [self._wf_from(w) for w in active]
            fin = [self._wf_from(w) for w in finished]
        except (msgspec.MsgspecError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"not a Marker snapshot: {exc}") from None
        self._reset()
        self.null_cancel = bool(null_cancel)
        self.now_ms, self.last_seq, self.create_seq, self.draining, self.horizon_ms = (
            now_ms, last_seq, create_seq, draining, horizon_ms)
        self.applied_entries, self.rejected_entries, self.stuck_jobs = applied, rejected, stuck
        self.phase2_retries, self.ignored_results = retries, ignored
        for wf in act:
            self._active[wf.workflow_id] = wf
            heapq.heappush(self._deadlines, (wf.deadline_ms, wf.create_seq, wf.workflow_id))
            for k, j in enumerate(wf.jobs):
                if j.state == JobState.READY:
                    self._ready[(wf.workflow_id, k)] = None
        for wf in fin:
            self._finished[wf.workflow_id] = wf
        for obs in self._ready_observers:
            obs(None)

    def _wf_from(self, w: list) -> Workflow:
        spec_bytes, part_shards, epoch, create_seq, created_ms, state, code, decided, finished, overdue, jobs = w
        spec = decode_spec(spec_bytes)
        wf = self._plan(bytes_u128(spec.workflow_id), spec, spec_bytes, list(part_shards), create_seq, created_ms,
                        epoch)
        if len(jobs) != len(wf.jobs):
            raise ValueError("snapshot: a workflow's job count does not match its spec")
        wf.state, wf.code, wf.decided_ms, wf.finished_ms, wf.overdue = (WorkflowState(state), code, decided,
                                                                        finished, overdue)
        for k, (j, (st, jcode, seq, attempt, issued, not_before)) in enumerate(zip(wf.jobs, jobs)):
            j.state, j.code, j.seq, j.attempt, j.issued_ms, j.not_before_ms = (JobState(st), jcode, seq, attempt,
                                                                              issued, not_before)
            if j.kind in _PHASE2:                # derived once it has been READY (see _plan, _make_ready)
                j.dedup_id = (derive_id(wf.workflow_id, b"J", k, attempt)
                              if j.state in (_READY, _DONE, _STUCK) else 0)
        return wf
