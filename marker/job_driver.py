"""The Marker leader's job driver, sans I/O: what to send to which shard, and what came back.

``poll(now_ms)`` returns the ``Send``s to make now: every READY job of the machine that is not in flight and
whose retry is due, batched into ONE op-record array per shard per round (at most ``SEND_RECORDS_MAX``
records; a job's records, a TCC_TRY group included, are never split), plus one RESULT_OF send per shard for
jobs whose records were refused with DEDUP_EXPIRED. The shell sends them and calls ``on_reply`` with the
shard's result records, or with ``results=None`` / an ``error`` for a timeout or a transport failure.

A result is **definite** when the shard returned a result code for the job's dedup id (any code: OK, a
business refusal, a duplicate's original code): it goes to ``take_results()``, which the shell proposes
as a JOB_RESULTS command. It becomes the job's state only when the machine applies that command: the
driver never decides anything itself (it holds the job back for ``resolved_hold_ms`` meanwhile; if the
proposal was lost, the job is sent again and the shard answers the duplicate with the same result).
DEDUP_EXPIRED means the shard no longer remembers the id: ask RESULT_OF (``Send.dedup_ids``); its answer
is definite unless its code is ``NOT_REMEMBERED`` (0xFFFF: unknown, ask again later); the shell answers
DEDUP_EXPIRED when the shard says the command was definitely never applied (``results_complete_since_ms``).
ISSUED_IN_FUTURE (our clock ahead of the shard's) and anything unknown are retried with the SAME records
after an exponential backoff with a deterministic jitter drawn from the job's dedup id, capped at
``retry_max_ms``.

A new leader builds a fresh driver over its machine: every READY job is sent again.
Bounded: at most ``inflight_jobs_per_shard_max`` jobs in flight to one shard.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from engine.records import BATCH_SIZE_MAX, RESULT_DTYPE, Code
from marker.commands import JobResults, u128_bytes
from marker.workflow import MarkerMachine

SEND_RECORDS_MAX = BATCH_SIZE_MAX                 # op records (or RESULT_OF ids) in one send
INFLIGHT_JOBS_PER_SHARD_MAX = 16_384              # jobs in flight to one shard
RETRY_BASE_MS = 50                                # first retry after ~this; doubles per unknown outcome
RETRY_MAX_MS = 5_000
RESOLVED_HOLD_MS = 5_000                          # a definite result waiting to be applied: not re-sent before
NOT_REMEMBERED = 0xFFFF                           # RESULT_OF: the shard cannot tell
_DEDUP_EXPIRED = int(Code.DEDUP_EXPIRED)
_ISSUED_IN_FUTURE = int(Code.ISSUED_IN_FUTURE)

JobKey = tuple[int, int, int]                     # (workflow_id, job_index, attempt)
JobResult = tuple[int, int, int, int, int]        # (workflow_id, job_index, attempt, code, seq)


@dataclass(slots=True)
class Send:
    """One request to one shard: apply ``records`` (OP_DTYPE), or RESULT_OF ``dedup_ids`` (issued at or
    after ``issued_ms``). ``jobs``: (job key, offset of its first record / its id, record count)."""
    send_id: int
    shard: int
    records: np.ndarray | None
    dedup_ids: list[int] | None
    issued_ms: int
    jobs: list[tuple[JobKey, int, int, int]] = field(default_factory=list)   # (key, offset, n, dedup_id)


@dataclass(slots=True)
class _Track:
    tries: int = 0
    next_at_ms: int = 0
    result_of: bool = False
    send_id: int = 0


class JobDriver:
    def __init__(self, machine: MarkerMachine, *, inflight_jobs_per_shard_max: int = INFLIGHT_JOBS_PER_SHARD_MAX,
                 retry_base_ms: int = RETRY_BASE_MS, retry_max_ms: int = RETRY_MAX_MS,
                 resolved_hold_ms: int = RESOLVED_HOLD_MS, send_id_base: int = 1) -> None:
        if not 1 <= inflight_jobs_per_shard_max <= 1 << 24 or not 1 <= retry_base_ms <= retry_max_ms:
            raise ValueError("inflight_jobs_per_shard_max in 1..2**24 and 1 <= retry_base_ms <= retry_max_ms")
        self.machine = machine
        self.inflight_jobs_per_shard_max = inflight_jobs_per_shard_max
        self.retry_base_ms, self.retry_max_ms, self.resolved_hold_ms = retry_base_ms, retry_max_ms, resolved_hold_ms
        self._next_send_id = send_id_base
        self._tracks: dict[JobKey, _Track] = {}
        self._sends: dict[int, Send] = {}
        self._inflight: dict[int, int] = {}
        self._results: list[JobResult] = []
        self.unknown_outcomes = 0
        self.bad_replies = 0
        self.sent_jobs = 0

    # ------------------------------------------------------------------------------------------ poll
    def poll(self, now_ms: int) -> list[Send]:
        m = self.machine
        apply: dict[int, tuple[list[np.ndarray], Send]] = {}
        rof: dict[int, Send] = {}
        seen: set[JobKey] = set()
        for rj in m.ready_jobs():
            key = (rj.workflow_id, rj.job_index, rj.attempt)
            seen.add(key)
            t = self._tracks.get(key)
            if t is None:
                t = self._tracks[key] = _Track()
            if t.send_id or t.next_at_ms > now_ms or rj.not_before_ms > now_ms:
                continue
            if self._inflight.get(rj.shard, 0) >= self.inflight_jobs_per_shard_max:
                continue
            if t.result_of:
                s = rof.get(rj.shard)
                if s is None:
                    s = rof[rj.shard] = Send(0, rj.shard, None, [], 0)
                assert s.dedup_ids is not None
                if len(s.dedup_ids) >= SEND_RECORDS_MAX:
                    continue
                issued = m.job_records(rj.workflow_id, rj.job_index)["issued_ms"][0]
                s.issued_ms = int(issued) if not s.dedup_ids else min(s.issued_ms, int(issued))
                s.jobs.append((key, len(s.dedup_ids), 1, rj.dedup_id))
                s.dedup_ids.append(rj.dedup_id)
            else:
                recs = m.job_records(rj.workflow_id, rj.job_index)
                parts, s = apply.get(rj.shard) or ([], Send(0, rj.shard, None, None, 0))
                n = sum(len(p) for p in parts)
                if n + len(recs) > SEND_RECORDS_MAX:
                    continue                               # next round: a job's records are never split
                parts.append(recs)
                s.jobs.append((key, n, len(recs), rj.dedup_id))
                apply[rj.shard] = (parts, s)
            self._inflight[rj.shard] = self._inflight.get(rj.shard, 0) + 1
            t.send_id = -1                                 # assigned below
        for key in [k for k, t in self._tracks.items() if k not in seen and not t.send_id]:
            del self._tracks[key]                          # done (or superseded by another attempt)
        out: list[Send] = []
        for parts, s in apply.values():
            s.records = np.concatenate(parts) if len(parts) > 1 else parts[0]
            out.append(s)
        out += rof.values()
        for s in out:
            s.send_id = self._next_send_id
            self._next_send_id += 1
            self._sends[s.send_id] = s
            for key, _, _, _ in s.jobs:
                self._tracks[key].send_id = s.send_id
            self.sent_jobs += len(s.jobs)
        return out

    # -------------------------------------------------------------------------------------- replies
    def on_reply(self, send_id: int, results: np.ndarray | None, error: str | None, now_ms: int) -> None:
        """The shard's answer to a send (RESULT_DTYPE records, one per record / asked id), or None / an
        error: outcome unknown. A reply to a send not in flight (a late one after a timeout) is ignored."""
        s = self._sends.pop(send_id, None)
        if s is None:
            return
        expected = len(s.records) if s.records is not None else len(s.dedup_ids or ())
        ok = (error is None and isinstance(results, np.ndarray) and results.dtype == RESULT_DTYPE
              and results.shape == (expected,))
        if error is None and not ok:
            self.bad_replies += 1
        for key, off, _n, dedup_id in s.jobs:
            self._inflight[s.shard] -= 1
            t = self._tracks.get(key)
            if t is None:
                t = self._tracks[key] = _Track()
            t.send_id = 0
            definite = False
            if ok:
                assert results is not None
                r = results[off]
                code, seq = int(r["code"]), int(r["seq_num"])
                rid = int(r["dedup_id"][0]) | (int(r["dedup_id"][1]) << 64)
                if rid != dedup_id:
                    self.bad_replies += 1
                elif s.records is not None and code == _DEDUP_EXPIRED:
                    t.result_of, t.tries, t.next_at_ms = True, 0, now_ms
                    continue
                elif code not in (_ISSUED_IN_FUTURE, NOT_REMEMBERED):
                    definite = True
            if definite:
                self._results.append((key[0], key[1], key[2], code, seq))
                t.tries, t.next_at_ms = 0, now_ms + self.resolved_hold_ms
            else:
                self.unknown_outcomes += 1
                t.tries += 1
                t.next_at_ms = now_ms + self._backoff_ms(dedup_id, t.tries)

    def _backoff_ms(self, dedup_id: int, tries: int) -> int:
        delay = min(self.retry_max_ms, self.retry_base_ms << min(tries - 1, 20))
        h = hashlib.blake2b(dedup_id.to_bytes(16, "little") + tries.to_bytes(4, "little"), digest_size=8).digest()
        return delay // 2 + int.from_bytes(h, "little") % (delay // 2 + 1)

    def take_results(self) -> list[JobResult]:
        """The definite results gathered since the last call (propose them: ``job_results_command``)."""
        out, self._results = self._results, []
        return out

    def status(self) -> dict[str, int | dict[int, int]]:
        return {"sends_in_flight": len(self._sends), "jobs_in_flight": dict(self._inflight),
                "tracked_jobs": len(self._tracks), "results_pending": len(self._results),
                "unknown_outcomes": self.unknown_outcomes, "bad_replies": self.bad_replies,
                "sent_jobs": self.sent_jobs}


def job_results_command(results: list[JobResult]) -> JobResults:
    """The JOB_RESULTS command carrying driver results (for ``encode_entry``)."""
    return JobResults([(u128_bytes(w), k, a, c, s) for w, k, a, c, s in results])

