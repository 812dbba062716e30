"""A real 3-replica shard on 127.0.0.1 driven through the clients: the per-call API behaves exactly like
the embedded Ledger, writes find the leader, reads are linearizable or read-your-writes, concurrent calls
share batches, events reach subscribers in order. (Faults: tests/test_node_chaos.py.)"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from engine import Ledger
from engine import records as R
from engine.client import AsyncClient, Client, RequestRefused, Subscriber
from engine.devtools.cluster import NodeCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = NodeCluster(3, str(tmp_path_factory.mktemp("shard")), insecure=True)   # node behaviour; CURVE: test_security
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture()
def client(cluster):
    with Client(cluster.client_addresses, timeout_s=20) as cl:
        yield cl


_ids = iter(range(1_000_000, 10**9))


def fresh(n=1):
    return [next(_ids) for _ in range(n)]


def test_per_call_api_matches_the_embedded_ledger(client):
    embedded = Ledger()
    a, b, c = fresh(3)
    d = fresh(20)
    calls = [
        ("create_account", (d[0], a, "USD"), {"lower_limit": None}),
        ("create_account", (d[1], b, "USD"), {"upper_limit": 10_000}),
        ("create_account", (d[1], b, "USD"), {}),                                  # duplicate
        ("create_account", (d[2], b, "USD"), {}),                                  # ALREADY_EXISTS
        ("create_account", (d[3], c, "EUR"), {}),
        ("transfer", (d[4], a, b, 500, "USD"), {"expected_to_balance": 0}),
        ("transfer", (d[5], a, b, 50_000, "USD"), {}),                             # upper limit
        ("transfer", (d[6], a, c, 5, "USD"), {}),                                  # CURRENCY_MISMATCH
        ("batch_balance_operation", (d[7], [(a, -5, "USD"), (b, 5, "USD")], [(b, 500)]), {}),
        ("reserve", (d[8], b, 77, 100), {}),
        ("release", (d[9], b, 77, 40), {}),
        ("tcc_try", (d[10], d[10], [(a, -10, "USD"), (b, 10, "USD")]), {}),
        ("tcc_confirm", (d[11], d[10]), {}),
        ("tcc_cancel", (d[12], d[10]), {}),                                        # ALREADY_CONFIRMED
        ("compensate", (d[13], d[4]), {}),
        ("compensate", (d[14], d[19]), {}),                                        # NULL_COMPENSATED
        ("transfer", (d[19], a, b, 1, "USD"), {}),                                 # ORIGINAL_COMPENSATED
        ("lock_account", (d[15], b), {}),
        ("transfer", (d[16], a, b, 1, "USD"), {}),                                 # INVALID_ACCOUNT_STATE
        ("unlock_account", (d[17], b), {}),
        ("update_account_config", (d[18], b), {"upper_limit": None}),
    ]
    codes = set()
    for name, args, kw in calls:
        want = getattr(embedded, name)(*args, **kw)
        got = getattr(client, name)(*args, **kw)
        assert (got.code, got.duplicate, got.dedup_id, got.kind) == \
            (want.code, want.duplicate, want.dedup_id, want.kind), name
        assert {k: {f: v[f] for f in ("available", "version", "state")} for k, v in got.accounts.items()} == \
            {k: {f: v[f] for f in ("available", "version", "state")} for k, v in want.accounts.items()}, name
        codes.add(got.code)
    assert len(codes) >= 8
    for acc in (a, b, c):
        remote = client.get_account(acc)
        local = embedded.get_account(acc)
        assert {k: v for k, v in remote.items() if k != "version"} == {k: v for k, v in local.items() if k != "version"}
    assert client.get_account(fresh()[0]) is None
    r = client.result_of(d[4])
    assert r.code == R.Code.OK and r.duplicate
    assert client.result_of(fresh()[0]) is None


def test_bad_input_is_an_error_reply_and_changes_nothing(cluster, client):
    from tests.node_helpers import wait_converged
    with pytest.raises(ValueError):
        client.transfer(fresh()[0], 1, 2, 5, "WAYTOOLONG")
    ops = R.transfers(fresh(2), [1, 1], [2, 2], [5, 5], "USD")
    ops["kind"][1] = 200
    # every replica has applied what earlier tests wrote (a follower may still be applying the last of it)
    before = wait_converged(client, cluster)[0]
    with pytest.raises(RequestRefused, match="BAD_REQUEST"):
        client.apply_batch(ops)
    with pytest.raises(ValueError):
        client.apply_batch(np.zeros(R.BATCH_SIZE_MAX + 1, dtype=R.OP_DTYPE))
    after = wait_converged(client, cluster)[0]
    assert (before["last_seq"], before["digest"]) == (after["last_seq"], after["digest"])


def test_a_client_that_knows_only_a_follower_is_redirected(cluster, client):
    st = client.status(0)
    leader = st["leader"]
    follower = next(i for i in cluster.ids if i != leader)
    with Client([cluster.client_addr[follower]], timeout_s=20) as one:
        a = fresh()[0]
        assert one.create_account(fresh()[0], a, "USD").code == R.Code.OK
        assert one.leader_address == cluster.client_addr[leader]


def test_follower_reads_see_the_clients_own_writes(cluster, client):
    a, b = fresh(2)
    client.create_account(fresh()[0], a, "USD", lower_limit=None)
    client.create_account(fresh()[0], b, "USD")
    for k in range(20):
        r = client.transfer(fresh()[0], a, b, 1, "USD")
        assert r.ok
        # every replica (round robin) waits for this client's last seq before answering
        assert client.get_account(b, consistency="follower")["available"] == k + 1
    with pytest.raises(ValueError):
        client.get_account(b, consistency="eventual")


def test_binary_batches_with_events(client):
    a, b = fresh(2)
    client.create_account(fresh()[0], a, "USD", lower_limit=None)
    client.create_account(fresh()[0], b, "USD")
    n = R.BATCH_SIZE_MAX
    ops = R.transfers(np.array(fresh(n)), np.full(n, a), np.full(n, b), np.full(n, 2), "USD")
    res, events = client.apply_batch(ops, want_events=True)
    assert (res["code"] == R.Code.OK).all() and len(events) == 2 * n
    assert np.array_equal(np.unique(events["seq_num"]), np.sort(res["seq_num"]))
    again = client.apply_batch(ops)                       # the same bytes: duplicates, nothing re-applied
    assert (again["flags"] & R.ResultFlag.DUPLICATE).all() and np.array_equal(again["seq_num"], res["seq_num"])
    assert client.get_account(b)["available"] == 2 * n
    fetched = client.events(int(res["seq_num"][0]), int(res["seq_num"][-1]))
    assert fetched.tobytes() == events.tobytes()


def test_batches_that_share_an_entry_get_their_own_results_and_events(cluster, client):
    """Requests pipelined on one connection are grouped into few log entries, applied in one call each;
    every reply carries exactly its own batch's results (and events, when asked), duplicates included."""
    from engine import wire as W
    from tests.node_helpers import RawPeer, find_leader, header
    a, b = fresh(2)
    client.create_account(fresh()[0], a, "USD", lower_limit=None)
    client.create_account(fresh()[0], b, "USD")
    leader = find_leader(client, cluster)
    dedups = fresh(60)
    amounts = list(range(1, 61))
    batches = [R.transfers([d], [a], [b], [m], "USD") for d, m in zip(dedups, amounts)]
    batches.append(batches[7].copy())                       # the same dedup id again: a duplicate
    batches.append(R.transfers(fresh(3), [a] * 3, [b] * 3, [1, 2, 3], "USD"))    # a batch of three
    before = client.status(leader)["counters"]
    peer = RawPeer(cluster.client_addr[cluster.ids[leader]])
    try:
        for k, ops in enumerate(batches):
            peer.send(header(k + 1, int(W.Op.APPLY), want_events=k % 2 == 0), ops.tobytes())
        replies = {}
        for _ in batches:
            got = peer.recv(10.0)
            assert got is not None, "a request was not answered"
            replies[got[0].req_id] = got
    finally:
        peer.close()
    after = client.status(leader)["counters"]
    assert after["entries_proposed"] - before["entries_proposed"] < len(batches) // 2   # they were grouped
    seen = set()
    for k, ops in enumerate(batches):
        reply, frames = replies[k + 1]
        assert reply.status == W.Status.OK
        res = np.frombuffer(frames[0], dtype=R.RESULT_DTYPE)
        assert len(res) == len(ops) and (res["code"] == R.Code.OK).all()
        assert np.array_equal(R.get_u128(res["dedup_id"]), R.get_u128(ops["dedup_id"]))
        if k == 60:
            assert res["flags"][0] & R.ResultFlag.DUPLICATE
            assert res["seq_num"][0] == np.frombuffer(replies[8][1][0], dtype=R.RESULT_DTYPE)["seq_num"][0]
        else:
            assert not (res["flags"] & R.ResultFlag.DUPLICATE).any()
            seen.update(res["seq_num"].tolist())
        if k % 2 == 0:
            evs = np.frombuffer(frames[1], dtype=R.EVENT_DTYPE)
            assert len(frames) == 2 and set(evs["seq_num"].tolist()) == set(res["seq_num"].tolist())
        else:
            assert len(frames) == 1
    assert len(seen) == 60 + 3                                # one seq per transfer applied once
    assert client.get_account(b)["available"] == sum(amounts) + 6


def test_concurrent_calls_share_batches(cluster):
    a, b = fresh(2)

    async def run():
        async with AsyncClient(cluster.client_addresses, timeout_s=20) as ac:
            await ac.create_account(fresh()[0], a, "USD", lower_limit=None)
            await ac.create_account(fresh()[0], b, "USD")
            before = (await ac.status(0))
            results = await asyncio.gather(*[ac.transfer(d, a, b, 3, "USD") for d in fresh(500)])
            after = (await ac.status(0))
            return before, results, after, await ac.get_account(b)

    before, results, after, acc_b = asyncio.run(run())
    assert all(r.ok and not r.duplicate for r in results)
    assert len({r.seq_num for r in results}) == 500 and acc_b["available"] == 1500
    # 500 concurrent calls travelled in far fewer requests than 500
    requests = after["counters"]["requests"] - before["counters"]["requests"]
    assert requests < 250, requests


def test_threads_share_one_client(client):
    a, b = fresh(2)
    client.create_account(fresh()[0], a, "USD", lower_limit=None)
    client.create_account(fresh()[0], b, "USD")
    errors = []

    def worker():
        try:
            for d in fresh(50):
                assert client.transfer(d, a, b, 1, "USD").ok
        except BaseException as exc:  # noqa: BLE001 - collected and asserted empty by the test
            errors.append(exc)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and client.get_account(b)["available"] == 400


def test_subscriber_yields_every_event_in_order(cluster, client):
    head = client.status(0)["last_seq"]
    a, b = fresh(2)
    client.create_account(fresh()[0], a, "USD", lower_limit=None)
    client.create_account(fresh()[0], b, "USD")
    for d in fresh(30):
        client.transfer(d, a, b, 1, "USD")
    last = client.last_seq_seen           # not a replica's status: a follower may not have applied it yet
    # from the very first seq: the past comes from the event stores, then the live stream
    with Subscriber(cluster.pub_addresses, cluster.client_addresses, from_seq=1) as sub:
        chunks = []
        while sub.next_seq <= last:
            evs = sub.poll(2000)
            if evs is not None:
                chunks.append(evs)
        seqs = np.unique(np.concatenate(chunks)["seq_num"])
        assert seqs[0] == 1 and seqs[-1] >= last and (np.diff(seqs) == 1).all()
        assert head < last
        # live: a new write arrives through PUB
        client.transfer(fresh()[0], a, b, 1, "USD")
        live = None
        for _ in range(10):
            live = sub.poll(1000)
            if live is not None:
                break
        assert live is not None and int(live["seq_num"][0]) == last + 1


def test_replicas_agree(cluster, client):
    import time
    deadline = time.monotonic() + 20
    while True:
        st = [client.status(k, with_digest=True) for k in range(3)]
        if len({(s["sm_applied"], s["digest"]) for s in st}) == 1:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


def test_events_that_no_replica_holds_fail_fast(client):
    import time as _time
    head = client.status(0)["last_seq"]
    t = _time.monotonic()
    with pytest.raises(RequestRefused, match="EVENTS_UNAVAILABLE"):
        client.events(head + 1_000_000, head + 1_000_001)
    assert _time.monotonic() - t < 5


def test_status_reports_the_stall_log_and_zwallet_status_prints_it(cluster, client, capsys):
    from engine import status as status_cli
    assert client.create_account(fresh()[0], fresh()[0], "USD").code == R.Code.OK    # a leader is elected
    st = client.status(0)
    assert st["stalls"]["threshold_ms"] == 5 and isinstance(st["stalls"]["by_cause"], dict)
    assert all(set(v) == {"count", "total_ms", "max_ms"} for v in st["stalls"]["by_cause"].values())
    log_files = st["log_store"]          # the Raft log's segment files (engine/raft/log_store.py)
    assert log_files["segments"] >= 1 and log_files["bytes_written"] > 0
    assert log_files["segments_removed"] >= 0 and log_files["segments_without_spare"] >= 0
    assert status_cli.main(["--nodes", ",".join(cluster.client_addresses), "--no-digest"]) == 0
    out = capsys.readouterr().out
    assert "leader:" in out and out.count("follower") == 2
