"""The Marker's event records: what happened to workflows, gap-free by ``seq_num`` per machine.

Fixed 128-byte records (the generic event store keys them by the u64 ``seq_num`` in their first 8 bytes),
little-endian, every reserved byte zero:

| offset | field | meaning |
|---|---|---|
| 0 | `seq_num` u64 | gap-free from 1 |
| 8 | `timestamp` u64 | the entry's time (ms since the Unix epoch), never decreasing |
| 16 | `workflow_id` u128 | `[lo, hi]` |
| 32 | `dedup_id` u128 | the job's dedup id (this attempt's), 0 for workflow-level events and JOB_SKIPPED (never sent) |
| 48 | `kind` u8 | `EventKind` |
| 49 | `workflow_kind` u8 | 1 TCC, 2 SAGA |
| 50 | `state` u8 | the workflow's `WorkflowState` after the event |
| 51 | `job_kind` u8 | `JobKind` (0 for workflow-level events) |
| 52 | `job_index` u16 | 0xFFFF for workflow-level events |
| 54 | `shard_id` u16 | the job's shard (0xFFFF: none) |
| 56 | `code` u16 | JOB_DONE/JOB_RETRY/STUCK: the shard's result code; DECIDED/FINISHED: the workflow's outcome |
| 58 | `attempt` u16 | the job's attempt (phase-2 retries with a new dedup id) |
| 60 | `reserved` u32 | |
| 64 | `job_seq` u64 | the shard's event seq of the job's result (0: none) |
| 72 | `issued_ms` u64 | the job's issued_ms; CREATED: the workflow's |
| 80 | `deadline_ms` u64 | the workflow's deadline |
| 88 | `shard_epoch` u64 | the shard map epoch the workflow was planned with |
| 96 | `reserved2` 4 x u64 | |
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

_U128 = ("<u8", (2,))
NO_JOB = 0xFFFF
NO_SHARD = 0xFFFF


class EventKind(IntEnum):
    CREATED = 1
    JOB_DONE = 2          # a job's definite result was recorded
    JOB_SKIPPED = 3       # a job whose dependencies can never hold (e.g. the cancel of a try that failed)
    DECIDED = 4           # phase 1 is over: commit (code OK) or roll back (the failing code)
    FINISHED = 5          # SUCCEEDED or FAILED, every job settled
    OVERDUE = 6           # past the deadline in phase 2: still driven, now visible
    STUCK = 7             # a phase-2 job refused with a business code: an invariant violation, operator needed
    JOB_RETRY = 8         # a phase-2 job refused with a retryable code: re-issued with a new attempt
    JOB_ABANDONED = 9     # a phase-1 job whose outcome no longer matters (a null compensation covers it)


MARKER_EVENT_DTYPE = np.dtype(
    [
        ("seq_num", "<u8"),
        ("timestamp", "<u8"),
        ("workflow_id", _U128),
        ("dedup_id", _U128),
        ("kind", "u1"),
        ("workflow_kind", "u1"),
        ("state", "u1"),
        ("job_kind", "u1"),
        ("job_index", "<u2"),
        ("shard_id", "<u2"),
        ("code", "<u2"),
        ("attempt", "<u2"),
        ("reserved", "<u4"),
        ("job_seq", "<u8"),
        ("issued_ms", "<u8"),
        ("deadline_ms", "<u8"),
        ("shard_epoch", "<u8"),
        ("reserved2", "<u8", (4,)),
    ]
)
assert MARKER_EVENT_DTYPE.itemsize == 128
assert MARKER_EVENT_DTYPE.fields is not None and MARKER_EVENT_DTYPE.fields["seq_num"][1] == 0
