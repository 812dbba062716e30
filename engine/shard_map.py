"""The shard map: which shard owns an account, versioned by an epoch.

Account ids are u128 values chosen by clients, so the map does not partition the id space itself: an id
hashes to one of ``SLOTS`` slots (a fixed, documented function of the id, the same in every process and
every language), and the map gives each slot to a shard. Moving accounts between shards is moving slots,
with a new epoch; nothing here moves data.

    slot(id) = ((lo64(id) XOR hi64(id)) * 0x9E3779B97F4A7C15 mod 2**64) >> (64 - SLOT_BITS)

A shard node holds the map it serves (its epoch and its own shard id) and refuses, before anything reaches
the log, a command for an account the map gives to another shard (``WRONG_SHARD``) or a request routed with
an older epoch (``STALE_EPOCH``); both replies carry the node's epoch so the router refreshes its map.

The map travels as plain data (``to_dict``/``from_dict``) in ``system.toml`` and in node configs:

    epoch = 1
    shards = [0, 1]                    # the shard ids
    slots = [[0, 8191, 0], [8192, 16383, 1]]   # inclusive slot ranges and their shard
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

SLOT_BITS = 14
SLOTS = 1 << SLOT_BITS                 # 16384 slots: fine-grained enough to move a 1/16384 of the accounts
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(64 - SLOT_BITS)
SHARD_ID_MAX = 65_535                  # shard ids are u16
_MASK64 = (1 << 64) - 1


def slot_of(account_id: int) -> int:
    """The slot of one account id (a Python int, 0 <= id < 2**128)."""
    if not 0 <= account_id < 1 << 128:
        raise ValueError(f"account id {account_id} is not a u128")
    x = ((account_id & _MASK64) ^ (account_id >> 64)) * 0x9E3779B97F4A7C15 & _MASK64
    return x >> (64 - SLOT_BITS)


def slots_of(ids_lo_hi: np.ndarray) -> np.ndarray:
    """The slots of many ids, from their ``(n, 2)`` little-endian u64 halves (a u128 record field)."""
    halves = np.asarray(ids_lo_hi, dtype="<u8").reshape(-1, 2)
    with np.errstate(over="ignore"):
        return ((halves[:, 0] ^ halves[:, 1]) * _GOLDEN) >> _SHIFT


class ShardMap:
    """Slot -> shard id for every slot, with the epoch of this version of the map."""

    __slots__ = ("epoch", "shards", "_owner")

    def __init__(self, epoch: int, owner: np.ndarray, shards: Sequence[int] | None = None) -> None:
        owner = np.asarray(owner, dtype=np.uint16)
        if owner.shape != (SLOTS,):
            raise ValueError(f"a shard map gives every one of the {SLOTS} slots an owner (got {owner.shape})")
        if not 1 <= int(epoch) < 1 << 63:
            raise ValueError(f"shard map epoch {epoch} must be >= 1")
        self.epoch = int(epoch)
        owners = sorted({int(s) for s in np.unique(owner)})
        self.shards = tuple(sorted(int(s) for s in shards)) if shards is not None else tuple(owners)
        missing = set(owners) - set(self.shards)
        if missing:
            raise ValueError(f"slots are given to shards {sorted(missing)} not listed in shards {list(self.shards)}")
        self._owner = owner
        self._owner.setflags(write=False)

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def uniform(cls, shard_ids: Sequence[int], epoch: int = 1) -> ShardMap:
        """Slots split into equal contiguous ranges, one per shard, in the order given."""
        ids = [int(s) for s in shard_ids]
        if not ids or len(set(ids)) != len(ids) or not all(0 <= s <= SHARD_ID_MAX for s in ids):
            raise ValueError(f"shard ids must be distinct u16 values, at least one: {shard_ids}")
        owner = np.empty(SLOTS, dtype=np.uint16)
        bounds = np.linspace(0, SLOTS, len(ids) + 1).astype(int)
        for k, s in enumerate(ids):
            owner[bounds[k]:bounds[k + 1]] = s
        return cls(epoch, owner, ids)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ShardMap:
        """From ``{"epoch", "shards", "slots": [[first, last, shard], ...]}``; every slot covered once."""
        try:
            epoch = int(doc["epoch"])
            ranges = doc["slots"]
            shards = [int(s) for s in doc.get("shards", [])] or None
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a shard map needs epoch and slots: {exc}") from None
        owner = np.full(SLOTS, -1, dtype=np.int32)
        for r in ranges:
            if not isinstance(r, (list, tuple)) or len(r) != 3:
                raise ValueError(f"a slot range is [first, last, shard]: {r!r}")
            first, last, shard = (int(v) for v in r)
            if not 0 <= first <= last < SLOTS or not 0 <= shard <= SHARD_ID_MAX:
                raise ValueError(f"bad slot range {r!r}: slots are 0..{SLOTS - 1}, shards u16")
            if (owner[first:last + 1] != -1).any():
                raise ValueError(f"slot range {r!r} overlaps another")
            owner[first:last + 1] = shard
        if (owner == -1).any():
            raise ValueError(f"the shard map leaves slot {int(np.argmax(owner == -1))} without a shard")
        return cls(epoch, owner.astype(np.uint16), shards)

    def to_dict(self) -> dict[str, Any]:
        ranges: list[list[int]] = []
        owner = self._owner
        start = 0
        for k in range(1, SLOTS + 1):
            if k == SLOTS or owner[k] != owner[start]:
                ranges.append([start, k - 1, int(owner[start])])
                start = k
        return {"epoch": self.epoch, "shards": list(self.shards), "slots": ranges}

    # ------------------------------------------------------------------------------------- lookups
    def shard_of(self, account_id: int) -> int:
        return int(self._owner[slot_of(int(account_id))])

    def shards_of(self, ids_lo_hi: np.ndarray) -> np.ndarray:
        """The owning shard of each id in a ``(n, 2)`` u128 record field (vectorised)."""
        return self._owner[slots_of(ids_lo_hi)]

    def group_by_shard(self, account_ids: Iterable[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for a in account_ids:
            out.setdefault(self.shard_of(a), []).append(int(a))
        return out

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ShardMap) and self.epoch == other.epoch and self.shards == other.shards
                and bool(np.array_equal(self._owner, other._owner)))

    def __hash__(self) -> int:
        return hash((self.epoch, self.shards))

    def __repr__(self) -> str:
        return f"ShardMap(epoch={self.epoch}, shards={list(self.shards)})"
