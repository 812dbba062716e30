"""A few seconds of bench/bench_flood.py's attacks against every replica of a local shard: each replica stays
up and small, and an honest client beside the flood is answered, quickly, every time.

Before the intake was bounded this failed every way: a 16 MiB GET_ACCOUNTS frame was decoded to a million
ints (1.7 s of the main thread) before its size was checked, so honest requests timed out, and a message
of many legal-sized frames grew a replica by ~80 MB/s (libzmq buffers every part of a message until its
last) with nothing to stop it. The bounds are loose on purpose (CI shares 2 cores with the flooders);
bench_flood measures against the real bar."""
from __future__ import annotations

import pytest

from bench.bench_flood import report, run_flood
from engine.devtools.cluster import NodeCluster

RSS_MAX_BYTES = 1 << 30
P99_MAX_MS = 1000.0


@pytest.fixture()
def cluster(tmp_path):
    c = NodeCluster(3, str(tmp_path / "shard"), insecure=True)
    try:
        c.start()
        yield c
    finally:
        c.close()


def test_a_flood_of_oversized_and_malformed_frames_leaves_every_replica_up_and_honest_calls_answered(cluster):
    res = run_flood(cluster, 4.0, accounts=20, oversized_per_s=20, multipart_mb_per_s=150, malformed_per_s=1000)
    text = report(res)
    assert all(res["alive"].values()), text
    assert all(v < RSS_MAX_BYTES for v in res["vmhwm_bytes"].values()), text
    assert res["honest_failure_count"] == 0, text
    for kind, v in res["honest"].items():
        assert v["count"] >= 5 and v["p99_ms"] < P99_MAX_MS, (kind, text)
    for node, refusals in res["refusals"].items():
        assert isinstance(refusals, dict), text
        # every kind of refusal the flood provokes is counted (the endless message is cut by the guard)
        for reason in ("frames", "header", "version", "payload", "batch_too_large", "bad_batch",
                       "connection_held_in"):
            assert refusals.get(reason, 0) > 0, (node, reason, text)


def test_intake_limits_are_validated_and_the_frame_limit_follows_the_record_size():
    from engine import records as R
    from engine import wire as W
    from engine.node import NodeConfig
    replicas = {1: {"raft": "tcp://127.0.0.1:1", "client": "tcp://127.0.0.1:2", "pub": "tcp://127.0.0.1:3"}}
    cfg = NodeConfig(node_id=1, replicas=replicas, insecure=True, data_dir="x")
    cfg.validate()
    assert cfg.frame_bytes_max == R.BATCH_SIZE_MAX * R.OP_DTYPE.itemsize + W.HEADER_BYTES_MAX
    for bad in ({"pending_bytes_per_client_max": cfg.frame_bytes_max},            # one largest request must fit
                {"pending_bytes_max": (32 << 20) - 1},                             # below the per-client bound
                {"connection_held_bytes_max": cfg.frame_bytes_max},                # two largest must fit
                {"held_bytes_max": (64 << 20) - 1},
                {"connection_check_ms": -1}, {"expensive_read_ms_per_s": 0},
                {"frame_bytes_max": W.HEADER_BYTES_MAX - 1}):
        with pytest.raises(ValueError):
            NodeConfig(node_id=1, replicas=replicas, insecure=True, data_dir="x", **bad).validate()
    text = cfg.to_toml()
    for name in ("pending_bytes_max", "pending_bytes_per_client_max", "connection_held_bytes_max", "held_bytes_max",
                 "connection_check_ms", "expensive_read_ms_per_s"):
        assert f"\n{name} = {getattr(cfg, name)}\n" in text
