"""The ledger as a replicated state machine: what a Raft entry carries and how a replica applies it.

An entry is ``LEDGER_ENTRY`` = magic b"ZWL1", u64 leader timestamp (ms), then whole op records
(``records.OP_DTYPE``). Apply is a pure function of (state, entry): the timestamp comes from the entry,
never from the replica's clock, so every replica reaches the same digest. An entry that does not parse or
that the ledger refuses as malformed applies nothing and yields the result ``None`` on every replica alike.
"""
from __future__ import annotations

import struct
from typing import Any, Sequence

import numpy as np

from engine import Ledger
from engine.records import OP_DTYPE

LEDGER_MAGIC = b"ZWL1"
LEDGER_HEADER = struct.Struct("<4sQ")


def ledger_entry(ops: np.ndarray, timestamp_ms: int) -> bytes:
    if ops.dtype != OP_DTYPE:
        raise TypeError("ops must be records.OP_DTYPE")
    return LEDGER_HEADER.pack(LEDGER_MAGIC, timestamp_ms) + ops.tobytes()


class LedgerMachine:
    """Applies committed entries to an embedded ``Ledger``; snapshots are the ledger's own."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.applied = 0
        self.ops = 0
        self.rejected_entries = 0

    def apply(self, entries: Sequence[Any]) -> list[tuple[int, Any]]:
        out = []
        for e in entries:
            self.applied = e.index
            data = e.data
            result = None
            if len(data) >= LEDGER_HEADER.size and (len(data) - LEDGER_HEADER.size) % OP_DTYPE.itemsize == 0:
                magic, ts = LEDGER_HEADER.unpack_from(data, 0)
                if magic == LEDGER_MAGIC:
                    ops = np.frombuffer(data, dtype=OP_DTYPE, offset=LEDGER_HEADER.size)
                    try:
                        res = self.ledger.apply_batch(ops, ts)
                        self.ops += len(ops)
                        result = res.tobytes()
                    except (TypeError, ValueError):
                        result = None
            if result is None:
                self.rejected_entries += 1
            out.append((e.index, result))
        return out

    def snapshot(self) -> bytes:
        return struct.pack("<QQQ", self.applied, self.ops, self.rejected_entries) + self.ledger.snapshot()

    def restore(self, data: bytes) -> None:
        self.applied, self.ops, self.rejected_entries = struct.unpack_from("<QQQ", data, 0)
        self.ledger = Ledger.restore(data[24:])

    def status(self) -> dict[str, Any]:
        t = self.ledger.totals("USD")
        return {"counter": t["available"] + t["reserved"] + t["pending_out"], "ops": self.ops,
                "digest": self.ledger.digest().hex(), "sm_applied": self.applied,
                "accounts": self.ledger.account_count, "last_seq": self.ledger.last_seq}
