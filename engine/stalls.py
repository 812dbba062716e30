"""A replica's stall log: pauses on its latency path that last longer than a threshold, counted by cause.

One request's latency at 10K requests/s is a few milliseconds, so one pause of 50 ms anywhere on the path
(an fsync queued behind writeback, a fork for a snapshot, a long apply) sets the p99 of everything queued
behind it. The driver and the node time their phases (persist, apply, snapshot, one pass of the main
loop) and add those that reach ``STALL_THRESHOLD_S`` here; ``zwallet status`` and the benchmarks show the
counts, so a tail can be traced to its cause instead of guessed at.

``SchedulerProbe`` (off unless ``stall_probe_ms`` is set in the node's config, because its wake-ups cost a
little CPU) is a thread that sleeps a millisecond at a time and records how late it woke: lateness it sees
while no phase above was long means the process had no CPU, or another thread held the GIL.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

STALL_THRESHOLD_S = 0.005      # pauses shorter than this are not recorded
RECENT_STALLS_KEPT = 32        # the last stalls, with their time, for `zwallet status`


class StallLog:
    def __init__(self, threshold_s: float = STALL_THRESHOLD_S, recent: int = RECENT_STALLS_KEPT) -> None:
        self.threshold_s = threshold_s
        self._lock = threading.Lock()
        self._by_cause: dict[str, list[float]] = {}           # cause -> [count, total s, max s]
        self._recent: collections.deque[tuple[float, str, float]] = collections.deque(maxlen=recent)

    def add(self, cause: str, seconds: float) -> None:
        """Record ``seconds`` spent in ``cause`` if that reaches the threshold (cheap otherwise)."""
        if seconds < self.threshold_s:
            return
        with self._lock:
            c = self._by_cause.get(cause)
            if c is None:
                c = self._by_cause[cause] = [0, 0.0, 0.0]
            c[0] += 1
            c[1] += seconds
            if seconds > c[2]:
                c[2] = seconds
            self._recent.append((time.time(), cause, seconds))

    def report(self) -> dict[str, Any]:
        """Cumulative counts since the start: {"threshold_ms", "by_cause": {cause: {count, total_ms, max_ms}},
        "recent": [[unix time, cause, ms], ...]}."""
        with self._lock:
            return {"threshold_ms": self.threshold_s * 1000,
                    "by_cause": {k: {"count": int(v[0]), "total_ms": round(v[1] * 1000, 1),
                                     "max_ms": round(v[2] * 1000, 1)} for k, v in sorted(self._by_cause.items())},
                    "recent": [[round(t, 3), cause, round(s * 1000, 1)] for t, cause, s in self._recent]}


def stall_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The stalls recorded between two ``report()``s, by cause: {cause: {"count", "total_ms"}} (max_ms is
    the cumulative maximum, so it is given only when the cause is new in ``after``)."""
    out: dict[str, dict[str, float]] = {}
    b = before.get("by_cause", {})
    for cause, v in after.get("by_cause", {}).items():
        prev = b.get(cause, {"count": 0, "total_ms": 0.0})
        n = v["count"] - prev["count"]
        if n > 0:
            d = {"count": n, "total_ms": round(v["total_ms"] - prev["total_ms"], 1)}
            if cause not in b:
                d["max_ms"] = v["max_ms"]
            out[cause] = d
    return out


def stall_text(by_cause: dict[str, dict[str, float]]) -> str:
    """One line: "raft-persist 3 (max 12.5 ms), main-pass 1 (24.0 ms total)", or "none"."""
    parts = []
    for cause, v in sorted(by_cause.items(), key=lambda kv: -kv[1]["total_ms"]):
        extra = f"max {v['max_ms']:g} ms" if "max_ms" in v else f"{v['total_ms']:g} ms total"
        parts.append(f"{cause} {v['count']} ({extra})")
    return ", ".join(parts) or "none"


def replicas_text(deltas: dict, leader: int | None = None) -> str:
    """One line for several replicas: "replica 1*: raft-persist 2 (...); replica 2: none" (* = leader)."""
    return "; ".join(f"replica {n}{'*' if n == leader else ''}: {stall_text(d)}"
                     for n, d in sorted(deltas.items(), key=lambda kv: str(kv[0])))


class SchedulerProbe:
    """Sleeps ``interval_s`` at a time on its own thread and records, as cause ``not-scheduled``, how much
    later than asked it woke up."""

    def __init__(self, log: StallLog, interval_s: float) -> None:
        self.log = log
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        interval = self.interval_s
        while not self._stop.is_set():
            t0 = time.monotonic()
            time.sleep(interval)
            self.log.add("not-scheduled", time.monotonic() - t0 - interval)
