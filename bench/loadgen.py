"""One-command-per-request load from several client processes, shared by the PostgreSQL and zwallet drivers.

The parent (``run_processes``) splits a stream of op records over ``processes`` child processes (record k goes
to child k % processes), starts them with "spawn", waits until every child has connected, then gives them one
common start time t0 and collects what each completed. A child is a function

    child(rows: bytes, positions: bytes, connections: int, rate: float | None, duration_s: float | None,
          drain_s: float, *extra, ready, go, t0_shared, out)

that connects, ``ready.put(pid)``, waits for ``go``, reads t0 from ``t0_shared.value``, sends its records and
finally ``out.put(outcomes.result(...))`` (``Outcomes``: the per-record arrays it fills in). Two modes, the
same for every system measured:

- closed loop (``rate=None``): every connection sends its next record as soon as the previous one is
  answered; latency = reply - send.
- open loop (``rate``): record at stream position p is due at t0 + p/rate and is sent then, whatever happened
  to earlier ones; its latency runs from the due time (if it was sent late, the wait counts: no coordinated
  omission). ``send_lag_s`` = send - due is the client's own lateness, reported so a reader can see it.

``duration_s``: no record is started after t0 + duration_s; what was started is waited for. Without it the
whole stream is sent. In the open loop a record due inside the window but not yet sent when it ends (every
connection busy: an overloaded system) may still be started for ``drain_s`` more, and replies are waited for
that long; the rest is never answered (infinitely late).
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# a code for "no result record": the request failed at the transport or protocol level (not a ledger code)
CODE_NO_RESULT = 0xFFFE


@dataclass
class ChildResult:
    """What one child completed, one entry per record answered (stream positions in ``positions``)."""
    positions: np.ndarray
    latency_s: np.ndarray
    service_s: np.ndarray
    send_lag_s: np.ndarray
    done_s: np.ndarray            # perf_counter() at each reply (CLOCK_MONOTONIC: comparable across processes)
    codes: np.ndarray
    duplicate: np.ndarray
    start: float
    end: float
    retries: int
    cpu_s: float
    sent: int                     # records sent (those not in ``positions`` were never answered)

    def as_tuple(self) -> tuple:
        return (self.positions.tobytes(), self.latency_s.tobytes(), self.service_s.tobytes(),
                self.send_lag_s.tobytes(), self.done_s.tobytes(), self.codes.tobytes(), self.duplicate.tobytes(),
                self.start, self.end, self.retries, self.cpu_s, self.sent)

    @classmethod
    def from_tuple(cls, t: tuple) -> ChildResult:
        pos, lat, svc, lag, done, codes, dups, start, end, retries, cpu, sent = t
        return cls(np.frombuffer(pos, dtype=np.int64), np.frombuffer(lat), np.frombuffer(svc), np.frombuffer(lag),
                   np.frombuffer(done), np.frombuffer(codes, dtype=np.uint16), np.frombuffer(dups, dtype=np.uint8),
                   start, end, retries, cpu, sent)


class Outcomes:
    """What a child fills in, one entry per record of its slice (index = the record's place in the slice):
    latency, service time, send lag, reply time, result code, duplicate flag, and whether it was answered."""

    def __init__(self, m: int) -> None:
        self.latency_s, self.service_s, self.send_lag_s, self.done_s = (np.zeros(m) for _ in range(4))
        self.codes = np.full(m, CODE_NO_RESULT, dtype=np.uint16)
        self.duplicate = np.zeros(m, dtype=np.uint8)
        self.finished = np.zeros(m, dtype=bool)

    def result(self, positions: np.ndarray, start: float, end: float, retries: int, cpu_s: float,
               sent: int) -> tuple:
        """The answered entries as a ChildResult, ready for ``out.put``."""
        f = self.finished
        return ChildResult(positions[f], self.latency_s[f], self.service_s[f], self.send_lag_s[f], self.done_s[f],
                           self.codes[f], self.duplicate[f], start, end, retries, cpu_s, sent).as_tuple()


def child_slice(rows: bytes, positions: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A child's records and their stream positions, from the bytes the parent passed."""
    from engine.records import OP_DTYPE
    return np.frombuffer(rows, dtype=OP_DTYPE), np.frombuffer(positions, dtype=np.int64)


def start_time(t0_shared: Any) -> float:
    """Sleep until the common start time and return it (called by a child after ``go``)."""
    t0 = t0_shared.value
    delay = t0 - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    return t0


def wait_for_reply_or(sock: Any, due: float) -> bool:
    """Open loop: wait until ``due`` (a perf_counter time) or a reply on ``sock``, whichever comes first;
    True if a reply is waiting. zmq's poll counts whole milliseconds, and rounding a shorter wait up to 1 ms
    sent requests up to 1 ms late (at 10K/s one is due every 0.1 ms); a shorter wait sleeps instead (not
    polling meanwhile delays a reply's timestamp by less than the wait). Never spins: the replicas need
    the CPU. (Measured at 10K/s: the sender's p99 lateness 1.4 -> 0.7 ms, for 0.17 more cores of client
    CPU on the replicas' machine; the p99 the replicas give did not move. PostgreSQL's asyncio sender
    sleeps to the due time too.)"""
    wait_s = due - time.perf_counter()
    if wait_s >= 0.001:
        return bool(sock.poll(int(wait_s * 1000)))
    if wait_s > 0:
        time.sleep(wait_s)
    return bool(sock.poll(0))


DRAIN_S_DEFAULT = 30.0


def run_processes(child: Callable[..., None], ops: np.ndarray, *, connections: int, processes: int,
                  rate: float | None = None, duration_s: float | None = None, drain_s: float = DRAIN_S_DEFAULT,
                  extra: tuple = (), connect_timeout_s: float = 120.0) -> dict[str, Any]:
    """Run ``ops`` through ``processes`` children (see the module doc) and merge what they completed.

    Returns ``{"positions", "latency_s", "service_s", "send_lag_s", "done_s", "codes", "duplicate"}`` (arrays
    over the completed records, in stream order; with no ``duration_s`` that is every record) and ``"t0"``,
    ``"wall_s"`` (first send to last reply), ``"count"`` (records completed), ``"sent"``, ``"offered"``
    (records in the stream), ``"retries"``, ``"rate"``, ``"duration_s"``, ``"client_cpu_s"`` (the children's
    CPU in the timed part). The caller's script must guard its entry point with
    ``if __name__ == "__main__":`` (spawn)."""
    n = len(ops)
    processes = max(1, min(processes, connections, max(1, n)))
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    t0_shared = ctx.Value("d", 0.0)
    procs = []
    for p in range(processes):
        idx = np.arange(p, n, processes, dtype=np.int64)
        conns = connections // processes + (1 if p < connections % processes else 0)
        pr = ctx.Process(target=child, args=(ops[idx].tobytes(), idx.tobytes(), conns, rate, duration_s, drain_s,
                                             *extra, ready, go, t0_shared, out), daemon=True)
        pr.start()
        procs.append(pr)

    def get(q: Any, what: str, timeout_s: float) -> Any:
        """The next item of q; fails fast (instead of waiting out the timeout) if a child died."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return q.get(timeout=0.5)
            except queue.Empty:
                dead = [pr.exitcode for pr in procs if pr.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a load client process died (exit code {dead[0]}) while waiting for "
                                       f"{what}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out waiting for {what}") from None

    try:
        for _ in procs:
            get(ready, "the client processes to connect", connect_timeout_s)
        t0 = time.perf_counter() + 0.05
        t0_shared.value = t0
        go.set()
        parts = [ChildResult.from_tuple(get(out, "results", 24 * 3600)) for _ in procs]
        for pr in procs:
            pr.join(timeout=30)
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.kill()
    positions = np.concatenate([c.positions for c in parts])
    order = np.argsort(positions, kind="stable")
    merged = {name: np.concatenate([getattr(c, name) for c in parts])[order]
              for name in ("positions", "latency_s", "service_s", "send_lag_s", "done_s", "codes", "duplicate")}
    count = len(positions)
    return {**merged, "t0": t0, "wall_s": (max(c.end for c in parts) - min(c.start for c in parts)) if count else 0.0,
            "count": count, "sent": sum(c.sent for c in parts), "offered": n, "retries": sum(c.retries for c in parts),
            "rate": rate, "duration_s": duration_s, "client_cpu_s": sum(c.cpu_s for c in parts)}
