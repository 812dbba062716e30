"""Whole-group checks shared by the demos and the tests: leaders, convergence of a replica group, a gap-free
event follower, account ids by shard.

Every check here talks to the processes only through their client protocol (STATUS with the digest, EVENTS,
the PUB stream), so it holds for any app on the service machinery (a shard, a Marker group, the counter).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.client import Client, ClientError, Subscriber
from engine.system import System


def accounts_by_shard(system: System, per_shard: int, start: int = 1) -> dict[int, list[int]]:
    """The first ``per_shard`` account ids from ``start`` that the shard map gives to each shard."""
    out: dict[int, list[int]] = {s: [] for s in system.shards}
    a = start
    while min(len(v) for v in out.values()) < per_shard:
        s = system.shard_map.shard_of(a)
        if len(out[s]) < per_shard:
            out[s].append(a)
        a += 1
    return out


def statuses(client: Client, count: int, with_digest: bool = False) -> dict[int, dict[str, Any] | None]:
    """STATUS of each of ``count`` replicas (by index into the client's addresses); None if it did not answer."""
    out: dict[int, dict[str, Any] | None] = {}
    for k in range(count):
        try:
            out[k] = client.status(k, with_digest=with_digest)
        except ClientError:                  # down or restarting
            out[k] = None
    return out


def find_leader_index(client: Client, count: int, timeout_s: float = 20.0) -> int:
    """The index of the replica that says it leads."""
    deadline = time.monotonic() + timeout_s
    while True:
        for k, st in statuses(client, count).items():
            if st is not None and st.get("role") == "leader":
                return k
        if time.monotonic() > deadline:
            raise TimeoutError(f"no leader among {count} replicas within {timeout_s:.0f} s")
        time.sleep(0.05)


def converged(sts: dict[int, dict[str, Any] | None]) -> bool:
    """Every replica answered, has applied everything committed, and they agree on the commit index, the
    app's applied index, the last event seq and the state digest."""
    if not sts or any(st is None for st in sts.values()):
        return False
    got = [st for st in sts.values() if st is not None]
    return (len({st["digest"] for st in got}) == 1 and bool(got[0]["digest"])
            and len({st["commit"] for st in got}) == 1 and all(st["applied"] == st["commit"] for st in got)
            and len({st["sm_applied"] for st in got}) == 1 and len({st.get("last_seq") for st in got}) == 1)


def wait_converged(addresses: Sequence[str], timeout_s: float = 60.0, keys: Any = None) -> dict[int, dict[str, Any]]:
    """Poll the replicas at ``addresses`` until they converge (``converged``); their statuses, with digests.
    TimeoutError saying what differs if they do not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with Client(list(addresses), timeout_s=2.0, attempt_timeout_s=0.5, keys=keys) as c:
        while True:
            sts = statuses(c, len(addresses), with_digest=True)
            if converged(sts):
                return {k: st for k, st in sts.items() if st is not None}
            if time.monotonic() > deadline:
                brief = {k: st and {f: st.get(f) for f in ("role", "term", "commit", "applied", "sm_applied",
                                                          "last_seq", "digest")} for k, st in sts.items()}
                raise TimeoutError(f"the replicas did not converge within {timeout_s:.0f} s: {brief}")
            time.sleep(0.1)


class GapFreeFollower(threading.Thread):
    """Follows one shard's events from seq 1 with a ``Subscriber`` and checks every chunk continues the last
    with no gap and no repeat (``seen``: the last seq; ``error``: what broke, if anything)."""

    def __init__(self, pub_addresses: Sequence[str], client_addresses: Sequence[str], name: str = "follower",
                 keys: Any = None) -> None:
        super().__init__(daemon=True, name=name)
        self.sub = Subscriber(list(pub_addresses), list(client_addresses), from_seq=1, keys=keys)
        self.seen = 0
        self.events = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                evs = self.sub.poll(200)
                if evs is not None:
                    seqs = np.unique(evs["seq_num"])
                    if seqs[0] != self.seen + 1 or not (np.diff(seqs) == 1).all():
                        raise AssertionError(f"event gap or repeat: after seq {self.seen} came "
                                             f"{seqs[0]}..{seqs[-1]} ({len(seqs)} seqs)")
                    self.seen = int(seqs[-1])
                    self.events += len(evs)
        except BaseException as exc:  # noqa: BLE001 - reported by the thread that checks
            self.error = exc
        finally:
            self.sub.close()

    def wait_for(self, last_seq: int, timeout_s: float) -> bool:
        """Wait until it has seen ``last_seq``; True if it did with no error."""
        deadline = time.monotonic() + timeout_s
        while self.seen < last_seq and self.error is None and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.error is None and self.seen >= last_seq
