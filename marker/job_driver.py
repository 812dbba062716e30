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

import collections
import hashlib
import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np

from engine.records import BATCH_SIZE_MAX, OP_DTYPE, RESULT_DTYPE, Code
from marker.commands import JOB_RESULTS_MAX, JobResults
from marker.workflow import MarkerMachine

SEND_RECORDS_MAX = BATCH_SIZE_MAX                 # op records (or RESULT_OF ids) in one send
# Results in one JOB_RESULTS entry. Every replica's Raft thread applies an entry in one go (heartbeats wait
# meanwhile), so an entry is sized from the measured apply cost (bench/bench_marker_machine.py: ~12-16 us a
# result on one replica, ~2x that in wall time when the leader's main thread shares the GIL): ~10-25 ms,
# well inside the 300 ms election timeout even with a few such entries applied in one Raft round.
JOB_RESULTS_ENTRY_MAX = 1024
POLL_JOBS_MAX = 4096                              # jobs taken by one poll (it runs with the machine's lock)
INFLIGHT_JOBS_PER_SHARD_MAX = 16_384              # jobs in flight to one shard
RETRY_BASE_MS = 50                                # first retry after ~this; doubles per unknown outcome
RETRY_MAX_MS = 5_000
RESOLVED_HOLD_MS = 5_000                          # a definite result waiting to be applied: not re-sent before
NOT_REMEMBERED = 0xFFFF                           # RESULT_OF: the shard cannot tell
_DEDUP_EXPIRED = int(Code.DEDUP_EXPIRED)
_ISSUED_IN_FUTURE = int(Code.ISSUED_IN_FUTURE)
_OP_BYTES = OP_DTYPE.itemsize

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
    attempt: int
    shard: int
    tries: int = 0
    result_of: bool = False
    send_id: int = 0                               # in flight in this send (0: not in flight)
    token: int = 0                                 # the live entry of the job in a due queue / the timer heap
    queued: bool = False                           # in its shard's due queue


class JobDriver:
    """The leader's driver over ``machine``. It keeps its own index of the machine's READY jobs (the
    machine tells it which jobs become READY or leave it, ``MarkerMachine.add_ready_observer``), so a poll
    costs O(jobs due now + timers due now), not O(every READY job): a job in flight, or waiting for its
    retry or for its result to be applied, is not looked at until its reply or its timer comes."""

    def __init__(self, machine: MarkerMachine, *, inflight_jobs_per_shard_max: int = INFLIGHT_JOBS_PER_SHARD_MAX,
                 retry_base_ms: int = RETRY_BASE_MS, retry_max_ms: int = RETRY_MAX_MS,
                 resolved_hold_ms: int = RESOLVED_HOLD_MS, send_id_base: int = 1) -> None:
        if not 1 <= inflight_jobs_per_shard_max <= 1 << 24 or not 1 <= retry_base_ms <= retry_max_ms:
            raise ValueError("inflight_jobs_per_shard_max in 1..2**24 and 1 <= retry_base_ms <= retry_max_ms")
        self.machine = machine
        self.inflight_jobs_per_shard_max = inflight_jobs_per_shard_max
        self.retry_base_ms, self.retry_max_ms, self.resolved_hold_ms = retry_base_ms, retry_max_ms, resolved_hold_ms
        self._next_send_id = send_id_base
        self._tracks: dict[tuple[int, int], _Track] = {}
        self._due: dict[int, collections.deque[tuple[tuple[int, int], int]]] = {}    # shard -> (job, token)
        self._timers: list[tuple[int, int, tuple[int, int]]] = []                      # (at_ms, token, job)
        self._tokens = itertools.count(1)
        self._sends: dict[int, Send] = {}
        self._inflight: dict[int, int] = {}
        self._results: list[JobResult] = []
        self.unknown_outcomes = 0
        self.bad_replies = 0
        self.sent_jobs = 0
        # the machine's READY edges, appended by whichever thread applies entries, drained by poll
        self._edges: collections.deque[tuple[int, int, int, int] | None] = collections.deque()
        self._edges.append(None)                   # start from the machine's whole READY set
        self._observer = self._edges.append
        machine.add_ready_observer(self._observer)

    def close(self) -> None:
        """Stop observing the machine (a driver dropped on a lost leadership)."""
        self.machine.remove_ready_observer(self._observer)

    # ------------------------------------------------------------------------------------------ index
    def _take_edges(self) -> None:
        edges = self._edges
        tracks = self._tracks
        while edges:
            e = edges.popleft()
            if e is None:                          # (re)start: the machine's READY set as it is now
                tracks.clear()
                self._due.clear()
                self._timers.clear()
                for rj in self.machine.ready_jobs():
                    self._track(rj.workflow_id, rj.job_index, rj.attempt, rj.shard)
                continue
            wid, k, attempt, shard = e
            if attempt < 0:                        # left READY (done, abandoned, superseded)
                t = tracks.get((wid, k))
                if t is not None and t.send_id == 0:
                    del tracks[(wid, k)]
                elif t is not None:
                    t.attempt = -1                 # in flight: forgotten when its reply comes
                continue
            t = tracks.get((wid, k))
            if t is None or t.attempt != attempt:
                self._track(wid, k, attempt, shard)

    def _track(self, wid: int, k: int, attempt: int, shard: int) -> None:
        old = self._tracks.get((wid, k))
        t = self._tracks[(wid, k)] = _Track(attempt, shard)
        if old is not None and old.send_id:
            t.send_id = old.send_id                # the old attempt's send still counts against the shard
            t.attempt = attempt
        self._queue(wid, k, t)

    def _queue(self, wid: int, k: int, t: _Track) -> None:
        t.token = next(self._tokens)
        t.queued = True
        q = self._due.get(t.shard)
        if q is None:
            q = self._due[t.shard] = collections.deque()
        q.append(((wid, k), t.token))

    def _later(self, key: tuple[int, int], t: _Track, at_ms: int) -> None:
        t.token = next(self._tokens)
        t.queued = False
        heapq.heappush(self._timers, (at_ms, t.token, key))

    # ------------------------------------------------------------------------------------------ poll
    def poll(self, now_ms: int, jobs_max: int = POLL_JOBS_MAX) -> list[Send]:
        """The sends to make now: at most ``jobs_max`` jobs over every shard (the rest wait, queued, for the
        next poll), at most one apply send and one RESULT_OF send per shard."""
        m = self.machine
        budget = jobs_max
        self._take_edges()
        tracks = self._tracks
        timers = self._timers
        while timers and timers[0][0] <= now_ms:
            _, token, key = heapq.heappop(timers)
            t = tracks.get(key)
            if t is not None and t.token == token and not t.send_id:
                self._queue(key[0], key[1], t)
        out: list[Send] = []
        for shard, q in self._due.items():
            if budget <= 0:
                break
            room = min(budget, self.inflight_jobs_per_shard_max - self._inflight.get(shard, 0))
            budget -= room
            parts: list[bytes] = []
            apply = Send(0, shard, None, None, 0)
            rof = Send(0, shard, None, [], 0)
            n = 0
            while q and room > 0:
                key, token = q[0]
                t = tracks.get(key)
                if t is None or t.token != token or t.send_id:
                    q.popleft()                    # a stale entry (left READY, re-queued, in flight)
                    continue
                rj = m.ready_job(key[0], key[1])
                if rj is None or rj.attempt != t.attempt:
                    q.popleft()                    # its READY edge is on its way
                    continue
                if rj.not_before_ms > now_ms:
                    q.popleft()
                    self._later(key, t, rj.not_before_ms)
                    continue
                jkey = (key[0], key[1], t.attempt)
                if t.result_of:
                    assert rof.dedup_ids is not None
                    if len(rof.dedup_ids) >= SEND_RECORDS_MAX:
                        break
                    issued = m.job_issued_ms(key[0], key[1])
                    rof.issued_ms = issued if not rof.dedup_ids else min(rof.issued_ms, issued)
                    rof.jobs.append((jkey, len(rof.dedup_ids), 1, rj.dedup_id))
                    rof.dedup_ids.append(rj.dedup_id)
                else:
                    recs = m.job_record_bytes(key[0], key[1])
                    nrec = len(recs) // _OP_BYTES
                    if n + nrec > SEND_RECORDS_MAX:
                        break                      # next round: a job's records are never split
                    parts.append(recs)
                    apply.jobs.append((jkey, n, nrec, rj.dedup_id))
                    n += nrec
                q.popleft()
                t.queued = False
                t.send_id = -1                     # assigned below
                room -= 1
            budget += room                         # what this shard did not use
            if parts:
                apply.records = np.frombuffer(b"".join(parts), dtype=OP_DTYPE)     # read-only
                out.append(apply)
            if rof.jobs:
                out.append(rof)
        for s in out:
            s.send_id = self._next_send_id
            self._next_send_id += 1
            self._sends[s.send_id] = s
            self._inflight[s.shard] = self._inflight.get(s.shard, 0) + len(s.jobs)
            for (wid, k, _), _, _, _ in s.jobs:
                tracks[(wid, k)].send_id = s.send_id
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
            t = self._tracks.get((key[0], key[1]))
            if t is None or t.send_id != send_id:
                continue                           # a newer attempt took its place
            t.send_id = 0
            if t.attempt != key[2]:                # left READY while in flight
                if t.attempt < 0:
                    del self._tracks[(key[0], key[1])]
                else:
                    self._queue(key[0], key[1], t)
                continue
            definite = False
            if ok:
                assert results is not None
                r = results[off]
                code, seq = int(r["code"]), int(r["seq_num"])
                rid = int(r["dedup_id"][0]) | (int(r["dedup_id"][1]) << 64)
                if rid != dedup_id:
                    self.bad_replies += 1
                elif s.records is not None and code == _DEDUP_EXPIRED:
                    t.result_of, t.tries = True, 0
                    self._queue(key[0], key[1], t)
                    continue
                elif code not in (_ISSUED_IN_FUTURE, NOT_REMEMBERED):
                    definite = True
            if definite:
                self._results.append((key[0], key[1], key[2], code, seq))
                t.tries = 0
                self._later((key[0], key[1]), t, now_ms + self.resolved_hold_ms)
            else:
                self.unknown_outcomes += 1
                t.tries += 1
                self._later((key[0], key[1]), t, now_ms + self._backoff_ms(dedup_id, t.tries))

    def _backoff_ms(self, dedup_id: int, tries: int) -> int:
        delay = min(self.retry_max_ms, self.retry_base_ms << min(tries - 1, 20))
        h = hashlib.blake2b(dedup_id.to_bytes(16, "little") + tries.to_bytes(4, "little"), digest_size=8).digest()
        return delay // 2 + int.from_bytes(h, "little") % (delay // 2 + 1)

    def take_results(self, max_results: int = JOB_RESULTS_ENTRY_MAX) -> list[JobResult]:
        """The oldest ``max_results`` definite results not yet taken (propose them: ``job_results_command``);
        the rest wait for the next call."""
        if not 1 <= max_results <= JOB_RESULTS_MAX:
            raise ValueError(f"max_results in 1..JOB_RESULTS_MAX={JOB_RESULTS_MAX}")
        res = self._results
        if len(res) <= max_results:
            self._results = []
            return res
        out = res[:max_results]
        del res[:max_results]
        return out

    def status(self) -> dict[str, int | dict[int, int]]:
        return {"sends_in_flight": len(self._sends), "jobs_in_flight": dict(self._inflight),
                "tracked_jobs": len(self._tracks), "results_pending": len(self._results),
                "unknown_outcomes": self.unknown_outcomes, "bad_replies": self.bad_replies,
                "sent_jobs": self.sent_jobs}


def job_results_command(results: list[JobResult]) -> JobResults:
    """The JOB_RESULTS command carrying driver results (for ``encode_entry``)."""
    return JobResults([(w.to_bytes(16, "little"), k, a, c, s) for w, k, a, c, s in results])

