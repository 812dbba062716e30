"""The shard map (engine/shard_map.py) and system.toml (engine/system.py)."""
from __future__ import annotations

import numpy as np
import pytest

from engine import records as R
from engine.shard_map import SLOTS, ShardMap, slot_of, slots_of
from engine.system import Group, System


def test_slot_function_is_the_documented_one_and_vectorised_agrees():
    ids = [0, 1, 2, 12345, (1 << 64) + 7, (1 << 128) - 1, 0xDEADBEEF << 70]
    for a in ids:
        lo, hi = a & ((1 << 64) - 1), a >> 64
        assert slot_of(a) == (((lo ^ hi) * 0x9E3779B97F4A7C15) % (1 << 64)) >> (64 - 14)
    ops = R.empty_ops(len(ids))
    R.put_u128(ops["account_id"], ids)
    assert slots_of(ops["account_id"]).tolist() == [slot_of(a) for a in ids]
    with pytest.raises(ValueError):
        slot_of(1 << 128)


def test_uniform_map_spreads_ids_and_round_trips():
    m = ShardMap.uniform([1, 2, 3], epoch=4)
    counts = dict.fromkeys((1, 2, 3), 0)
    for a in range(1, 30_001):
        counts[m.shard_of(a)] += 1
    assert all(8_000 < c < 12_000 for c in counts.values()), counts
    again = ShardMap.from_dict(m.to_dict())
    assert again == m and again.epoch == 4
    ops = R.empty_ops(1000)
    R.put_u128(ops["account_id"], list(range(1, 1001)))
    assert m.shards_of(ops["account_id"]).tolist() == [m.shard_of(a) for a in range(1, 1001)]


@pytest.mark.parametrize("doc, what", [
    ({"slots": [[0, SLOTS - 1, 1]]}, "epoch"),
    ({"epoch": 1, "slots": [[0, 100, 1]]}, "without a shard"),
    ({"epoch": 1, "slots": [[0, SLOTS - 1, 1], [5, 5, 2]]}, "overlaps"),
    ({"epoch": 1, "slots": [[0, SLOTS, 1]]}, "bad slot range"),
    ({"epoch": 0, "slots": [[0, SLOTS - 1, 1]]}, "epoch"),
    ({"epoch": 1, "slots": [[0, SLOTS - 1]]}, "first, last, shard"),
    ({"epoch": 1, "shards": [2], "slots": [[0, SLOTS - 1, 1]]}, "not listed"),
])
def test_bad_maps_are_refused_clearly(doc, what):
    with pytest.raises(ValueError, match=what):
        ShardMap.from_dict(doc)


def test_system_file_round_trips(tmp_path):
    m = ShardMap.uniform([1, 2])
    shards = {s: Group(s, (f"tcp://127.0.0.1:{7000 + s}",), (f"tcp://127.0.0.1:{7100 + s}",)) for s in (1, 2)}
    sysm = System(m, shards, (Group(1, ("tcp://127.0.0.1:7200",)),), {"gateway": {"clients": ["tcp://x:1"]}})
    path = str(tmp_path / "system.toml")
    sysm.write(path)
    back = System.load(path)
    assert back.shard_map == m and back.shards == shards and back.markers == sysm.markers
    assert back.extra == {"gateway": {"clients": ["tcp://x:1"]}}
    assert back.shard_clients(2) == ("tcp://127.0.0.1:7002",)
    with pytest.raises(ValueError, match="no shard 9"):
        back.shard_clients(9)


def test_system_file_errors_name_the_file(tmp_path):
    p = tmp_path / "system.toml"
    p.write_text("[[shard]]\nid = 1\nclients = []\n")
    with pytest.raises(ValueError, match="system.toml.*shard_map"):
        System.load(str(p))
    with pytest.raises(ValueError, match="cannot read"):
        System.load(str(tmp_path / "missing.toml"))
    m = ShardMap.uniform([1, 2])
    with pytest.raises(ValueError, match="no \\[\\[shard\\]\\] table"):
        System(m, {1: Group(1, ("tcp://a:1",))})


def test_owner_array_is_read_only():
    m = ShardMap.uniform([1])
    with pytest.raises(ValueError):
        m._owner[0] = 3
    assert np.all(m.shards_of(np.zeros((3, 2), dtype="<u8")) == 1)
