"""Exactly-once past the dedup window, on a replicated shard: a late retry never moves money, RESULT_OF
answers from the event store's durable index, and the client settles a refused late retry."""
from __future__ import annotations

import time

import numpy as np
import pytest

from engine import records as R
from engine.client import Client
from engine.devtools.cluster import NodeCluster
from engine.node import NodeConfig

WINDOW = 1 << 17                  # the node's minimum (4 full log entries)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = NodeCluster(3, str(tmp_path_factory.mktemp("shard-eo")), dedup_retention=WINDOW, insecure=True)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.client_addresses, timeout_s=30) as cl:
        yield cl


def _now_ms() -> int:
    return int(time.time() * 1000)


def _flood(client: Client, count: int, first_dedup: int, src: int, dst: int) -> None:
    """``count`` other commands, in batches, each batch issued now."""
    done = 0
    while done < count:
        n = min(8190, count - done)
        ids = np.arange(first_dedup + done, first_dedup + done + n, dtype=np.int64)
        ops = R.transfers(ids, np.full(n, src), np.full(n, dst), np.ones(n, np.int64), "USD", issued_ms=_now_ms())
        res = client.apply_batch(ops)
        assert (res["code"] == R.Code.OK).all()
        done += n


def test_identical_record_resent_after_12_windows_moves_no_money(client, cluster):
    assert client.create_account(10, 100, "USD", lower_limit=None).code == R.Code.OK
    assert client.create_account(11, 200, "USD").code == R.Code.OK
    original = R.transfers([77], [100], [200], [5_00], "USD", issued_ms=_now_ms())
    first = client.apply_batch(original)
    assert first["code"][0] == R.Code.OK
    seq = int(first["seq_num"][0])
    _flood(client, 12 * WINDOW, 1_000_000, 100, 200)
    st = client.status()
    assert st["dedup"]["retention"] == WINDOW and st["dedup"]["size"] == WINDOW
    assert st["dedup"]["horizon_ms"] > int(original["issued_ms"][0])
    before = client.get_account(200)["available"]
    again = client.apply_batch(original)                      # the very same bytes, 12 windows later
    assert again["code"][0] == R.Code.DEDUP_EXPIRED and again["seq_num"][0] == 0
    assert client.get_account(200)["available"] == before
    # RESULT_OF still knows it: from the event store's index, with its seq and kind
    r = client.result_of(77)
    assert r is not None and r.code == R.Code.OK and r.seq_num == seq and r.duplicate
    assert r.kind == R.Kind.TRANSFER
    for node in range(3):                                     # on every replica (follower reads)
        with Client([cluster.client_addresses[node]], timeout_s=10) as one:
            got = one.result_of(77, consistency="follower")
            assert got is not None and got.seq_num == seq


def test_per_call_late_retry_is_settled_with_the_original_outcome(client):
    issued = _now_ms()
    r = client.transfer(88, 100, 200, 3, "USD", timestamp=issued)
    assert r.code == R.Code.OK
    _flood(client, 2 * WINDOW, 2_000_000, 100, 200)
    before = client.get_account(200)["available"]
    # the application retries the same command (the same issue time) past the window: the shard refuses
    # it, the client asks RESULT_OF and hands back the original outcome
    late = client.transfer(88, 100, 200, 3, "USD", timestamp=issued)
    assert late.code == R.Code.OK and late.duplicate and late.seq_num == r.seq_num
    assert client.get_account(200)["available"] == before


def test_a_never_applied_command_past_the_horizon_is_definitely_not_applied(client):
    st = client.status()
    old = st["dedup"]["horizon_ms"] - 1
    before = client.get_account(200)["available"]
    r = client.transfer(99_999, 100, 200, 3, "USD", timestamp=old)
    assert r.code == R.Code.DEDUP_EXPIRED and not r.duplicate and r.seq_num == 0
    assert client.get_account(200)["available"] == before
    assert client.result_of(99_999) is None


def test_dedup_retention_is_a_node_limit():
    doc = {"node": {"id": 1, "data_dir": "/tmp/x"}, "limits": {"dedup_retention": 1 << 22},
           "security": {"insecure": True},
           "replica": [{"id": 1, "raft": "tcp://127.0.0.1:1", "client": "tcp://127.0.0.1:2", "pub": "tcp://127.0.0.1:3"}]}
    cfg = NodeConfig.from_dict(doc)
    assert cfg.dedup_retention == 1 << 22 and "dedup_retention = 4194304" in cfg.to_toml()
    doc["limits"]["dedup_retention"] = 3
    with pytest.raises(ValueError, match="dedup_retention"):
        NodeConfig.from_dict(doc)
