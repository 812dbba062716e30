"""The smallest app on the replicated-service machinery: a counter. ``zwallet replica`` runs one replica;
the Raft tests and ``bench/bench_raft.py`` run three (``engine/devtools/local_raft.py``).

    zwallet replica --id 1 --peers 1=tcp://...,2=... --clients 1=tcp://...,2=... --pubs 1=...,2=... \
        --data-dir DIR

State machine (deterministic, never raises on any entry bytes): an entry holds a batch of counter
increments, ``COUNTER_ENTRY`` = magic b"CTR1", u32 count, then ``count`` little-endian i64 increments, then
optional padding (to make entries of a chosen size). Each increment is one operation. Applying an entry
adds the increments to the counter and extends a blake2b hash chain over (index, term, data), so two
replicas that applied the same log report the same ``digest`` at the same ``applied`` index. An entry that
does not parse counts as one rejected operation (result -1) and changes only the digest. A group entry
(``make_entry`` of several requests: magic b"CTRG", u32 n, then n times u32 length + a counter entry) is
applied as its parts in order, one result each.

Client protocol: the service's header (engine/service/protocol.py) with the ops below; STATUS is the
service's (with ``counter``, ``ops``, ``digest``, ``sm_applied``). The counter has no event stream.
  PROPOSE  payload: one counter entry  -> OK, payload msgpack [index, counter] (counter -1: rejected)
  READ     empty payload, linearizable -> OK, payload msgpack counter
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
import numpy as np

from engine.service.config import ServiceConfig
from engine.service.server import run_until_signalled, READ, WRITE, OpSpec, Pending, ReplicatedServer

COUNTER_MAGIC = b"CTR1"
GROUP_MAGIC = b"CTRG"
COUNTER_HEADER = struct.Struct("<4sI")
_PART = struct.Struct("<I")
COUNTER_OPS_PER_ENTRY_MAX = 1 << 20
OP_PROPOSE = 1
OP_READ = 2
COUNTER_EVENT_DTYPE = np.dtype([("seq_num", "<u8"), ("value", "<i8")])    # (no events are emitted)


def counter_entry(increments: Sequence[int] | np.ndarray, size_bytes: int = 0) -> bytes:
    """Encode a batch of increments as one entry, zero-padded up to size_bytes."""
    arr = np.asarray(increments, dtype="<i8")
    body = COUNTER_HEADER.pack(COUNTER_MAGIC, len(arr)) + arr.tobytes()
    if size_bytes > len(body):
        body += bytes(size_bytes - len(body))
    return body


def group_entry(payloads: Sequence[bytes]) -> bytes:
    """One entry of several requests' counter entries (one alone is its own entry, unchanged)."""
    if len(payloads) == 1:
        return bytes(payloads[0])
    parts = [COUNTER_HEADER.pack(GROUP_MAGIC, len(payloads))]
    for p in payloads:
        parts += [_PART.pack(len(p)), bytes(p)]
    return b"".join(parts)


class CounterMachine:
    def __init__(self) -> None:
        self.counter = 0
        self.ops = 0
        self.rejected = 0
        self.applied = 0
        self.digest = bytes(32)

    def apply(self, entries: Sequence[Any]) -> list[Any]:
        """One result per entry: (index, counter) for a counter entry, a list of them for a group entry."""
        results: list[Any] = []
        for e in entries:
            data = bytes(e.data)
            h = hashlib.blake2b(self.digest, digest_size=32)
            h.update(struct.pack("<QQ", e.index, e.term))
            h.update(data)
            self.digest = h.digest()
            self.applied = e.index
            parts = _group_parts(data)
            if parts is None:
                results.append(self._apply_one(e.index, data))
            else:
                results.append([self._apply_one(e.index, p) for p in parts])
        return results

    def _apply_one(self, index: int, data: bytes) -> tuple[int, int]:
        ok = len(data) >= COUNTER_HEADER.size
        if ok:
            magic, count = COUNTER_HEADER.unpack_from(data, 0)
            ok = magic == COUNTER_MAGIC and count <= COUNTER_OPS_PER_ENTRY_MAX and \
                len(data) >= COUNTER_HEADER.size + 8 * count
        if not ok:
            self.rejected += 1
            return (index, -1)
        incs = np.frombuffer(data, dtype="<i8", count=count, offset=COUNTER_HEADER.size)
        self.counter += int(incs.sum())
        self.ops += count
        return (index, self.counter)

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode([self.counter, self.ops, self.rejected, self.applied, self.digest])

    def restore(self, data: bytes) -> None:
        self.counter, self.ops, self.rejected, self.applied, self.digest = msgspec.msgpack.decode(data)

    def status(self) -> dict[str, Any]:
        return {"counter": self.counter, "ops": self.ops, "digest": self.digest.hex(), "sm_applied": self.applied}


def _group_parts(data: bytes) -> list[bytes] | None:
    """The parts of a group entry; None if ``data`` is not one (then it is a counter entry, or junk)."""
    if len(data) < COUNTER_HEADER.size or data[:4] != GROUP_MAGIC:
        return None
    _, n = COUNTER_HEADER.unpack_from(data, 0)
    parts, at = [], COUNTER_HEADER.size
    for _ in range(n):
        if at + _PART.size > len(data):
            return None
        (size,) = _PART.unpack_from(data, at)
        at += _PART.size
        if at + size > len(data):
            return None
        parts.append(data[at:at + size])
        at += size
    return parts


@dataclass
class CounterConfig(ServiceConfig):
    inflight_entries_max: int = 1024          # bench_raft pipelines many entries: Raft's own group commit
    group_requests_max: int = 1               # requests grouped into one entry (1: an entry per request)

    TOML_APP_SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {"counter": ("group_requests_max",)}

    def validate(self) -> None:
        super().validate()
        if self.group_requests_max < 1:
            raise ValueError("group_requests_max must be >= 1")


class CounterServer(ReplicatedServer):
    EVENT_DTYPE = COUNTER_EVENT_DTYPE
    config: CounterConfig

    def __init__(self, config: CounterConfig) -> None:
        super().__init__(config)
        self.sm = CounterMachine()
        self.ops = {OP_PROPOSE: OpSpec("PROPOSE", WRITE, 1, COUNTER_HEADER.size, config.frame_bytes_max),
                    OP_READ: OpSpec("READ", READ)}
        self.entry_requests_max = config.group_requests_max

    # Raft thread, lock held
    def apply_entries(self, entries: Sequence[Any]) -> list[Any]:
        return self.sm.apply(entries)

    def snapshot_state(self) -> bytes:
        return self.sm.snapshot()

    def restore_state(self, data: bytes) -> None:
        self.sm.restore(data)

    # main thread
    def last_seq(self) -> int:
        return 0

    def make_entry(self, payloads: list[Any], timestamp_ms: int) -> bytes:
        return group_entry(payloads)

    def entry_applied(self, group: list[Pending], outcome: Any) -> None:
        results = [outcome] if len(group) == 1 else outcome
        for p, r in zip(group, results):
            self.reply(p, payload=msgspec.msgpack.encode(list(r)))

    def serve_read(self, p: Pending) -> None:
        with self.lock:
            value = self.sm.counter
        self.reply(p, payload=msgspec.msgpack.encode(value))

    def status_fields(self) -> dict[str, Any]:
        return dict(self.sm.status(), last_seq=0)


def parse_peers(text: str) -> dict[int, str]:
    peers = {}
    for part in text.split(","):
        node, _, addr = part.partition("=")
        peers[int(node)] = addr
    return peers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zwallet replica", description="run one replica of the counter app")
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--peers", required=True, help="1=tcp://127.0.0.1:7001,2=...,3=... (Raft addresses, all)")
    p.add_argument("--clients", required=True, help="1=tcp://127.0.0.1:7101,... (client ROUTER addresses, all)")
    p.add_argument("--pubs", required=True, help="1=tcp://127.0.0.1:7201,... (PUB addresses, all)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tick-ms", type=int, default=10)
    p.add_argument("--election-ticks", type=int, default=30)
    p.add_argument("--heartbeat-ticks", type=int, default=3)
    p.add_argument("--snapshot-threshold", type=int, default=50_000)
    p.add_argument("--map-size-gib", type=int, default=64)
    p.add_argument("--no-sync", action="store_true", help="skip fsync (NOT durable; for experiments only)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s replica-{args.id} %(levelname)s %(name)s: %(message)s")
    raft, clients, pubs = parse_peers(args.peers), parse_peers(args.clients), parse_peers(args.pubs)
    replicas = {i: {"raft": raft[i], "client": clients[i], "pub": pubs[i]} for i in raft}
    config = CounterConfig(node_id=args.id, replicas=replicas, data_dir=args.data_dir, tick_ms=args.tick_ms,
                           insecure=True,          # the Raft test app: no keys (docs/security.md)
                           election_ticks=args.election_ticks, heartbeat_ticks=args.heartbeat_ticks,
                           snapshot_threshold_entries=args.snapshot_threshold,
                           snapshot_keep_entries=min(args.snapshot_threshold // 2, 5000), sync=not args.no_sync,
                           map_size_gib=args.map_size_gib, snapshot_in_child=False,
                           frame_bytes_max=64 << 20, pending_bytes_per_client_max=256 << 20,
                           pending_bytes_max=1 << 30, connection_held_bytes_max=1 << 30, held_bytes_max=2 << 30)
    server = CounterServer(config)
    return run_until_signalled(server)


if __name__ == "__main__":
    raise SystemExit(main())
