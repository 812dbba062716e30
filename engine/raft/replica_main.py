"""A runnable Raft replica that replicates a counter: ``python -m engine.raft.replica_main --id 1 --peers ...``.

Used by the multi-process tests and the Raft benchmark, and as the smallest example of plugging a state
machine into ``RaftDriver``.

State machine (deterministic, never raises on any entry bytes): an entry holds a batch of counter
increments, ``COUNTER_ENTRY`` = magic b"CTR1", u32 count, then ``count`` little-endian i64 increments, then
optional padding (to make entries of a chosen size). Each increment is one operation. Applying an entry
adds the increments to the counter and extends a blake2b hash chain over (index, term, data), so two
replicas that applied the same log report the same ``digest`` at the same ``applied`` index. An entry that
does not parse counts as one rejected operation (result code -1) and changes only the digest.

Client protocol on ``--client`` (a ROUTER; clients use DEALER), one request per multipart message:
  [req_id(8 bytes), b"P", entry, entry, ...]  propose entries -> [req_id, b"OK", msgpack [[index, counter],...]]
                                              or [req_id, b"NL", msgpack leader_id|None] (not the leader)
                                              or [req_id, b"ER", utf-8 message]
  [req_id, b"S"]                              status -> [req_id, b"OK", msgpack dict]
  [req_id, b"R"]                              linearizable read -> [req_id, b"OK", msgpack counter]
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import os
import signal
import struct
import sys
import threading
from typing import Any
from collections.abc import Sequence

import msgspec
import numpy as np
import zmq

from engine.raft.driver import DriverConfig, NotLeader, RaftDriver

COUNTER_MAGIC = b"CTR1"
COUNTER_HEADER = struct.Struct("<4sI")
COUNTER_OPS_PER_ENTRY_MAX = 1 << 20
CLIENT_FRAMES_MAX = 10_000


def counter_entry(increments: Sequence[int] | np.ndarray, size_bytes: int = 0) -> bytes:
    """Encode a batch of increments as one entry, zero-padded up to size_bytes."""
    arr = np.asarray(increments, dtype="<i8")
    body = COUNTER_HEADER.pack(COUNTER_MAGIC, len(arr)) + arr.tobytes()
    if size_bytes > len(body):
        body += bytes(size_bytes - len(body))
    return body


class CounterMachine:
    def __init__(self) -> None:
        self.counter = 0
        self.ops = 0
        self.rejected = 0
        self.applied = 0
        self.digest = bytes(32)

    def apply(self, entries: Sequence[Any]) -> list[tuple[int, int]]:
        results = []
        for e in entries:
            data = bytes(e.data)
            h = hashlib.blake2b(self.digest, digest_size=32)
            h.update(struct.pack("<QQ", e.index, e.term))
            h.update(data)
            self.digest = h.digest()
            self.applied = e.index
            ok = len(data) >= COUNTER_HEADER.size
            if ok:
                magic, count = COUNTER_HEADER.unpack_from(data, 0)
                ok = magic == COUNTER_MAGIC and count <= COUNTER_OPS_PER_ENTRY_MAX and \
                    len(data) >= COUNTER_HEADER.size + 8 * count
            if not ok:
                self.rejected += 1
                results.append((e.index, -1))
                continue
            incs = np.frombuffer(data, dtype="<i8", count=count, offset=COUNTER_HEADER.size)
            self.counter += int(incs.sum())
            self.ops += count
            results.append((e.index, self.counter))
        return results

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode([self.counter, self.ops, self.rejected, self.applied, self.digest])

    def restore(self, data: bytes) -> None:
        self.counter, self.ops, self.rejected, self.applied, self.digest = msgspec.msgpack.decode(data)

    def status(self) -> dict[str, Any]:
        return {"counter": self.counter, "ops": self.ops, "digest": self.digest.hex(), "sm_applied": self.applied}


def _make_machine(name: str) -> Any:
    if name == "counter":
        return CounterMachine()
    raise ValueError(f"unknown state machine {name!r}")


def parse_peers(text: str) -> dict[int, str]:
    peers = {}
    for part in text.split(","):
        node, _, addr = part.partition("=")
        peers[int(node)] = addr
    return peers


class Replica:
    def __init__(self, args: argparse.Namespace) -> None:
        self.sm = _make_machine(args.machine)
        self.sm_lock = threading.Lock()   # status() reads the machine from the client thread
        config = DriverConfig(tick_interval_ms=args.tick_ms, election_ticks=args.election_ticks,
                              heartbeat_ticks=args.heartbeat_ticks,
                              snapshot_threshold_entries=args.snapshot_threshold,
                              snapshot_keep_entries=min(args.snapshot_threshold // 2, 5000),
                              sync=not args.no_sync, map_size_bytes=args.map_size_gib << 30)
        self.driver = RaftDriver(args.id, parse_peers(args.peers), args.data_dir, apply=self._apply,
                                 snapshot=self._snapshot, restore=self._restore, config=config)
        self.ctx = zmq.Context()
        self.client = self.ctx.socket(zmq.ROUTER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.setsockopt(zmq.RCVHWM, 100_000)
        self.client.setsockopt(zmq.SNDHWM, 100_000)
        self.client.bind(args.client)
        self.replies: collections.deque[list[bytes]] = collections.deque()
        self.reply_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.stopping = False

    def _apply(self, entries: Sequence[Any]) -> list[tuple[int, int]]:
        with self.sm_lock:
            return self.sm.apply(entries)

    def _snapshot(self) -> bytes:
        with self.sm_lock:
            return self.sm.snapshot()

    def _restore(self, data: bytes) -> None:
        with self.sm_lock:
            self.sm.restore(data)

    def _reply(self, frames: list[bytes]) -> None:
        self.replies.append(frames)
        os.eventfd_write(self.reply_fd, 1)

    def _on_proposals(self, ident: bytes, req_id: bytes, futures: list) -> None:
        remaining = [len(futures)]
        lock = threading.Lock()

        def done(_f: Any) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            results, err = [], None
            for f in futures:
                exc = f.exception()
                if exc is not None:
                    err = exc
                    break
                results.append(list(f.result()))
            if err is None:
                self._reply([ident, req_id, b"OK", msgspec.msgpack.encode(results)])
            elif isinstance(err, NotLeader):
                self._reply([ident, req_id, b"NL", msgspec.msgpack.encode(err.leader_id)])
            else:
                self._reply([ident, req_id, b"ER", f"{type(err).__name__}: {err}".encode()])

        for f in futures:
            f.add_done_callback(done)

    def _status(self) -> dict[str, Any]:
        st = self.driver.status()
        with self.sm_lock:
            st.update(self.sm.status(), pid=os.getpid())
        return st

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 3 or len(frames) > CLIENT_FRAMES_MAX:
            return
        ident, req_id, cmd = frames[0], frames[1], frames[2]
        if cmd == b"P" and len(frames) > 3:
            self._on_proposals(ident, req_id, self.driver.propose_many(frames[3:]))
        elif cmd == b"S":
            self.client.send_multipart([ident, req_id, b"OK", msgspec.msgpack.encode(self._status())])
        elif cmd == b"R":
            fut = self.driver.read_index()

            def read_done(f: Any) -> None:
                exc = f.exception()
                if exc is None:
                    with self.sm_lock:
                        value = self.sm.status()["counter"]
                    self._reply([ident, req_id, b"OK", msgspec.msgpack.encode(value)])
                elif isinstance(exc, NotLeader):
                    self._reply([ident, req_id, b"NL", msgspec.msgpack.encode(exc.leader_id)])
                else:
                    self._reply([ident, req_id, b"ER", str(exc).encode()])
            fut.add_done_callback(read_done)
        else:
            self.client.send_multipart([ident, req_id, b"ER", b"bad request"])

    def serve(self) -> None:
        self.driver.start()
        print("READY", flush=True)
        poller = zmq.Poller()
        poller.register(self.client, zmq.POLLIN)
        poller.register(self.reply_fd, zmq.POLLIN)
        while not self.stopping:
            events = dict(poller.poll(200))
            if self.client in events:
                for _ in range(1000):
                    try:
                        frames = self.client.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(frames)
            if self.reply_fd in events:
                try:
                    os.eventfd_read(self.reply_fd)
                except BlockingIOError:
                    pass
            while self.replies:
                try:
                    self.client.send_multipart(self.replies.popleft(), zmq.NOBLOCK)
                except zmq.Again:
                    pass          # the client is gone or slow: it will retry
        self.driver.stop()
        self.client.close(linger=0)
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--peers", required=True, help="1=tcp://127.0.0.1:7001,2=...,3=... (this replica included)")
    p.add_argument("--client", required=True, help="client ROUTER address, e.g. tcp://127.0.0.1:7101")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tick-ms", type=int, default=10)
    p.add_argument("--election-ticks", type=int, default=30)
    p.add_argument("--heartbeat-ticks", type=int, default=3)
    p.add_argument("--snapshot-threshold", type=int, default=50_000)
    p.add_argument("--map-size-gib", type=int, default=64)
    p.add_argument("--machine", default="counter", choices=["counter"],
                   help="the replicated state machine (a counter; the ledger runs in engine.node)")
    p.add_argument("--no-sync", action="store_true", help="skip fsync (NOT durable; for experiments only)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s replica-{args.id} %(levelname)s %(name)s: %(message)s")
    replica = Replica(args)

    def on_term(_sig: int, _frm: Any) -> None:
        replica.stopping = True
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    replica.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
