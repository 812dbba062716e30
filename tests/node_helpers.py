"""Helpers for the multi-process node tests (tests/test_node_chaos.py): cluster status polling, leader
discovery, convergence, a raw DEALER for hand-made frames, and event-log checks.

Replica *indexes* are positions in ``cluster.client_addresses`` (what ``Client.status(i)`` takes);
``cluster.ids`` are the 1-based node ids (what ``cluster.kill/pause/start_replica`` take):
``node = cluster.ids[index]``.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import numpy as np
import zmq

from engine import records as R
from engine import wire as W
from engine.client import Client, ClientError, Unavailable

CURRENCY = "USD"


# ------------------------------------------------------------------------------------------- status
def status_client(cluster: Any) -> Client:
    """A client for STATUS polling: short timeouts, so a dead or paused replica costs ~1 s, not 10."""
    return Client(cluster.client_addresses, timeout_s=1.0, attempt_timeout_s=0.5,
                  keys=getattr(cluster, "client_keys", None))


def status_of(sc: Client, index: int, with_digest: bool = False) -> dict[str, Any] | None:
    try:
        return sc.status(index, with_digest=with_digest)
    except (Unavailable, ClientError):
        return None


def find_leader(sc: Client, cluster: Any, skip: Iterable[int] = (), timeout_s: float = 15.0) -> int:
    """The index of the replica that says it is leader (and that a second replica agrees on)."""
    skip = set(skip)
    deadline = time.monotonic() + timeout_s
    last: dict[int, Any] = {}
    while time.monotonic() < deadline:
        for i in range(len(cluster.ids)):
            if i in skip or not cluster.alive(cluster.ids[i]):
                continue
            st = status_of(sc, i)
            last[i] = st and (st["role"], st["term"], st["leader"])
            if st is not None and st["role"] == "leader":
                return i
        time.sleep(0.05)
    raise AssertionError(f"no leader among the replicas within {timeout_s}s (skipping {sorted(skip)}): {last}")


def wait_converged(sc: Client, cluster: Any, timeout_s: float = 30.0,
                   indexes: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
    """Poll until every replica reports the same commit index, has applied all of it, and its ledger is at
    the same applied index with the same digest. Returns the statuses (with digests)."""
    indexes = list(range(len(cluster.ids))) if indexes is None else list(indexes)
    deadline = time.monotonic() + timeout_s
    sts: dict[int, Any] = {}
    while True:
        sts = {i: status_of(sc, i, with_digest=True) for i in indexes}
        if all(st is not None for st in sts.values()):
            if (len({st["digest"] for st in sts.values()}) == 1
                    and len({st["sm_applied"] for st in sts.values()}) == 1
                    and len({st["commit"] for st in sts.values()}) == 1
                    and all(st["applied"] == st["commit"] for st in sts.values())
                    and len({st["last_seq"] for st in sts.values()}) == 1):
                return sts
        if time.monotonic() > deadline:
            brief = {i: st and {k: st[k] for k in ("role", "term", "commit", "applied", "sm_applied", "last_seq",
                                                   "snapshot_index", "digest")}
                     for i, st in sts.items()}
            raise AssertionError(f"replicas did not converge within {timeout_s}s: {brief}")
        time.sleep(0.1)


def retry_unavailable(fn: Any, *args: Any, timeout_s: float = 60.0, **kwargs: Any) -> Any:
    """Call ``fn`` until it does not raise Unavailable (the exactly-once contract: same arguments, so the
    same dedup ids, on every attempt)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn(*args, **kwargs)
        except Unavailable:
            if time.monotonic() > deadline:
                raise


# -------------------------------------------------------------------------------------- raw frames
class RawPeer:
    """One DEALER to one replica's client ROUTER, for frames no well-behaved client would send."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout_s: float = 5.0) -> tuple[W.Reply, list[bytes]] | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frames = self.sock.recv_multipart()
        return W.decode_reply(frames[0]), frames[1:]

    def request(self, *frames: bytes, timeout_s: float = 5.0) -> tuple[W.Reply, list[bytes]] | None:
        self.send(*frames)
        return self.recv(timeout_s)


def header(req_id: int, op: int, **fields: Any) -> bytes:
    return W.encode(W.Request(req_id, op, **fields))


# ------------------------------------------------------------------------------------------ events
def check_event_log(evs: np.ndarray, last_seq: int) -> None:
    """Seqs 1..last_seq, each once, its parts 0..parts-1 in order; the records sorted by seq."""
    seqs = evs["seq_num"].astype(np.int64)
    assert len(evs), "no events"
    assert (np.diff(seqs) >= 0).all(), "events out of seq order"
    uniq, first_idx, counts = np.unique(seqs, return_index=True, return_counts=True)
    assert uniq[0] == 1 and uniq[-1] == last_seq and len(uniq) == last_seq, \
        f"event seqs are not exactly 1..{last_seq}: {len(uniq)} distinct, {uniq[0]}..{uniq[-1]}"
    parts = evs["parts"].astype(np.int64)
    part = evs["part"].astype(np.int64)
    assert (parts[first_idx] == counts).all(), "an event's record count differs from its parts field"
    expected_part = np.arange(len(evs)) - np.repeat(first_idx, counts)
    assert (part == expected_part).all(), "event parts are not 0..parts-1 in order"


def replay_balances(evs: np.ndarray, kinds: set[int]) -> dict[int, int]:
    """Sum the events' signed ``amount`` per account (only kinds whose amount is a delta of available),
    checking on the way that each record's ``available`` equals the running sum."""
    bal: dict[int, int] = defaultdict(int)
    ids = R.get_u128(evs["account_id"])
    amounts = R.get_i128(evs["amount"])
    avail = R.get_i128(evs["available"])
    for k in range(len(evs)):
        kind = int(evs["kind"][k])
        assert kind in kinds, f"unexpected event kind {kind} at seq {int(evs['seq_num'][k])}"
        bal[ids[k]] += amounts[k]
        assert bal[ids[k]] == avail[k], (f"seq {int(evs['seq_num'][k])} account {ids[k]}: available "
                                         f"{avail[k]} but the replay of amounts gives {bal[ids[k]]}")
    return dict(bal)


def _events_at(peer: RawPeer, first: int, last: int) -> np.ndarray | None:
    """Events first..last from this replica's own store (a FOLLOWER read: no quorum round), or None if it
    does not hold all of them."""
    got = peer.request(header(first, W.Op.EVENTS, consistency=W.Consistency.FOLLOWER, first_seq=first,
                              last_seq=last), b"", timeout_s=5.0)
    assert got is not None, f"no reply to EVENTS {first}..{last}"
    reply, frames = got
    if reply.status != W.Status.OK:
        assert reply.error == W.ErrorCode.EVENTS_UNAVAILABLE, reply
        return None
    evs = np.frombuffer(frames[0], dtype=R.EVENT_DTYPE)
    assert len(evs) and int(evs["seq_num"][0]) == first and int(evs["seq_num"][-1]) <= last, \
        f"EVENTS {first}..{last} returned seqs {evs['seq_num'][:1]}..{evs['seq_num'][-1:]}"
    return evs if int(evs["seq_num"][-1]) == last else None     # a prefix only (allowed): not all of it


def events_from_replicas(cluster: Any, last_seq: int, chunk_seqs: int = 256) -> tuple[np.ndarray, list[int]]:
    """Events 1..last_seq assembled from every replica's own event store (EVENTS requests to each replica,
    not ``Client.events``), in chunks. Replicas that hold the same chunk must hold identical records; a chunk
    no replica holds whole is assembled seq by seq. Returns the events and, per replica, how many chunks it
    could not serve whole (a replica that caught up from a snapshot has a hole in its events)."""
    peers = [RawPeer(a) for a in cluster.client_addresses]
    partial = [0] * len(peers)
    out: list[np.ndarray] = []
    try:
        for first in range(1, last_seq + 1, chunk_seqs):
            last = min(last_seq, first + chunk_seqs - 1)
            copies = [_events_at(p, first, last) for p in peers]
            held = [c for c in copies if c is not None]
            for i, c in enumerate(copies):
                partial[i] += c is None
            if not held:
                for seq in range(first, last + 1):
                    one = [c for c in (_events_at(p, seq, seq) for p in peers) if c is not None]
                    assert one, f"no replica holds event {seq}"
                    held.append(one[0])
                    assert all(c.tobytes() == one[0].tobytes() for c in one), f"replicas disagree on event {seq}"
                out.append(np.concatenate(held))
                continue
            assert all(c.tobytes() == held[0].tobytes() for c in held), \
                f"replicas disagree on events {first}..{last}"
            out.append(held[0])
    finally:
        for p in peers:
            p.close()
    return np.concatenate(out), partial


def decode_status(payload: bytes) -> dict[str, Any]:
    return msgspec.msgpack.decode(payload)
