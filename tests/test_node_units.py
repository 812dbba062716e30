"""Units of the node's edges that need no cluster: OpEncoder, entries, the event store, config, wire."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest

from engine import Ledger
from engine import records as R
from engine import wire as W
from engine._ledger import OpEncoder, check_batch
from engine.event_store import EventStore, EventsUnavailable
from engine.ledger_machine import NODE_EVENT_RETENTION, LedgerMachine, ledger_entry, parse_entry
from engine.node import NodeConfig
from engine.raft.messages import Entry


def _commands(e):
    """The same command sequence, as (method, args, kwargs), for the encoder/ledger comparison."""
    return [
        ("create_account", (1, 10, "USD"), {"lower_limit": None}),
        ("create_account", (2, 20, "USD"), {"upper_limit": 10_000}),
        ("transfer", (3, 10, 20, 500, "USD"), {"expected_to_balance": 0}),
        ("batch_balance_operation", (4, [(10, -5, "USD"), (20, 5, "USD")], [(20, 500)]), {}),
        ("reserve", (5, 20, 77, 100), {}),
        ("release", (6, 20, 77), {}),
        ("tcc_try", (7, 99, [(10, -10, "USD"), (20, 10, "USD")]), {}),
        ("tcc_confirm", (8, 99), {}),
        ("compensate", (9, 3), {}),
        ("update_account_config", (10, 20), {"upper_limit": None}),
        ("lock_account", (11, 20), {}),
        ("unlock_account", (12, 20), {}),
        ("transfer", (3, 10, 20, 500, "USD"), {}),      # duplicate
    ]


def test_op_encoder_builds_exactly_what_the_ledger_applies():
    enc, direct, batched = OpEncoder(), Ledger(), Ledger()
    for name, args, kw in _commands(enc):
        recs = getattr(enc, name)(*args, timestamp=5, **kw)          # timestamp: the records' issued_ms
        check_batch(recs)
        assert int(recs["issued_ms"][0]) == 5
        r1 = getattr(direct, name)(*args, timestamp=5, **kw)
        res = batched.apply_batch(recs, 5)
        assert int(res["code"][0]) == int(r1.code), name
        assert int(res["seq_num"][0]) == r1.seq_num, name
        assert bool(res["flags"][0] & 1) == r1.duplicate, name
    assert direct.digest() == batched.digest()


def test_op_encoder_checks_input_like_the_ledger():
    enc = OpEncoder()
    with pytest.raises(ValueError):
        enc.transfer(1, 2, 3, 10, "TOOLONGCUR")
    with pytest.raises(ValueError):
        enc.transfer(1 << 128, 2, 3, 10, "USD")
    with pytest.raises(TypeError):
        enc.transfer("1", 2, 3, 10, "USD")


def test_check_batch_refuses_malformed_batches():
    ops = R.transfers([1, 2], [1, 1], [2, 2], [5, 5], "USD")
    check_batch(ops)
    bad = ops.copy()
    bad["kind"][1] = 99
    with pytest.raises(ValueError, match="record 1"):
        check_batch(bad)
    with pytest.raises(TypeError):
        check_batch(np.zeros(2, dtype=R.RESULT_DTYPE))
    with pytest.raises(ValueError):
        check_batch(np.zeros(R.BATCH_SIZE_MAX + 1, dtype=R.OP_DTYPE))


def test_entry_round_trip_and_malformed_entries():
    a = R.transfers([1], [1], [2], [5], "USD")
    b = R.transfers([2, 3], [1, 1], [2, 2], [5, 6], "USD")
    ts, batches = parse_entry(ledger_entry([a, b.tobytes()], 1234))
    assert ts == 1234 and [len(x) for x in batches] == [1, 2]
    assert batches[1].tobytes() == b.tobytes()
    good = ledger_entry([a], 1)
    for broken in (b"", good[:10], good[:-1], good + b"x", b"ZWL1" + good[4:]):
        with pytest.raises(ValueError):
            parse_entry(broken)
    with pytest.raises(ValueError):
        ledger_entry([], 1)


def test_machine_applies_groups_and_refuses_a_bad_batch_alike_everywhere():
    seen = []
    m1, m2 = LedgerMachine(event_sink=seen.append), LedgerMachine()
    enc = OpEncoder()
    create = np.concatenate([enc.create_account(1, 10, "USD", lower_limit=None), enc.create_account(2, 20, "USD")])
    bad = R.transfers([3], [10], [20], [5], "USD")
    bad["reserved"][0] = 1
    good = R.transfers([4], [10], [20], [5], "USD")
    entries = [Entry(term=1, index=1, kind=0, data=ledger_entry([create], 10)),
               Entry(term=1, index=2, kind=0, data=ledger_entry([bad, good], 11)),
               Entry(term=1, index=3, kind=0, data=b"garbage")]
    out1, out2 = m1.apply(entries), m2.apply(entries)
    assert out1[2] is None and m1.rejected_entries == 1
    o_bad, o_good = out1[1]
    assert o_bad.results is None and "reserved" in o_bad.error and o_bad.first_seq > o_bad.last_seq
    assert int(o_good.results["code"][0]) == R.Code.OK and o_good.first_seq == o_good.last_seq == 3
    assert m1.ledger.digest() == m2.ledger.digest()
    assert [[o.error for o in x] if x else x for x in out1] == [[o.error for o in x] if x else x for x in out2]
    events = np.concatenate([c for chunks in seen for c in chunks])
    assert events["seq_num"].tolist() == [1, 2, 3, 3]          # events of every entry, in order, no gap
    m3 = LedgerMachine()
    m3.restore(m1.snapshot())
    assert m3.ledger.digest() == m1.ledger.digest() and m3.applied == 3


def test_snapshots_are_compressed_in_chunks_and_raw_ones_still_restore(monkeypatch):
    import engine.ledger_machine as lm
    enc = OpEncoder()
    m = LedgerMachine()
    ops = np.concatenate([enc.create_account(k, 100 + k, "USD", lower_limit=None) for k in range(1, 200)])
    m.apply([Entry(term=1, index=1, kind=0, data=ledger_entry([ops], 10))])
    raw = struct.pack("<QQQQ", m.applied, m.ops, m.rejected_batches, m.rejected_entries) + m.ledger.snapshot()
    monkeypatch.setattr(lm, "SNAPSHOT_CHUNK_BYTES", 4096)          # many chunks, the last one partial
    snap = m.snapshot()
    assert snap.startswith(lm.SNAPSHOT_LZ4_MAGIC) and len(snap) < len(raw) // 2
    assert bytes(lm.decompress_snapshot(snap)) == raw
    for data in (snap, raw):                                        # raw: written before compression
        other = LedgerMachine()
        other.restore(data)
        assert other.ledger.digest() == m.ledger.digest() and other.applied == 1
    damaged = bytearray(snap)
    damaged[len(damaged) // 2] ^= 0xFF
    for bad in (snap[:-1], snap + b"x", bytes(damaged), snap[:20]):
        with pytest.raises(ValueError):
            LedgerMachine().restore(bad)


def test_machine_applies_a_run_of_batches_in_one_call_exactly_as_one_call_each():
    # An entry of many small client batches (mixed commands, groups, duplicates, rejections, one malformed
    # batch, one batch too big to join a run): the machine's outcomes, seq ranges, events and digest equal
    # those of applying every batch by itself on a plain ledger.
    from engine.devtools.workload import Workload
    rng = np.random.default_rng(3)
    work = Workload(300, seed=9, first_account=1)
    setup = list(work.create_batches())
    ops = np.concatenate([work.mixed(400) for _ in range(3)])
    ops = np.concatenate([ops, ops[:50]])                          # duplicates of earlier commands
    cuts, k = [], 0
    while k < len(ops):                                            # split at group boundaries into 1..9 records
        n = int(rng.integers(1, 10))
        end = min(k + n, len(ops))
        while end < len(ops) and ops["kind"][end] in (R.Kind.SPEC, R.Kind.PRECONDITION):
            end += 1
        cuts.append(ops[k:end])
        k = end
    bad = R.transfers([10 ** 9], [1], [2], [5], "USD")
    bad["reserved"][0] = 1
    big = np.concatenate([R.transfers(np.arange(2 * 10 ** 9, 2 * 10 ** 9 + 8000), np.full(8000, 1), np.full(8000, 2),
                                      np.full(8000, 1), "USD")])
    batches = cuts[:40] + [bad] + cuts[40:80] + [big] + cuts[80:]
    seen = []
    machine = LedgerMachine(event_sink=seen.append)
    plain = Ledger(event_retention=NODE_EVENT_RETENTION)     # the digest covers the retained events
    entries = [Entry(term=1, index=i + 1, kind=0, data=ledger_entry([b], 5)) for i, b in enumerate(setup)]
    machine.apply(entries)
    for b in setup:
        plain.apply_batch(b, 5)
    [outcomes] = machine.apply([Entry(term=1, index=len(entries) + 1, kind=0, data=ledger_entry(batches, 6))])
    assert len(outcomes) == len(batches)
    refused = 0
    for b, o in zip(batches, outcomes):
        first = plain.last_seq + 1
        try:
            expect = plain.apply_batch(b, 6)
        except ValueError as exc:
            assert o.results is None and o.error == str(exc) and o.first_seq == first and o.last_seq == first - 1
            refused += 1
            continue
        assert o.error == "" and o.results.tobytes() == expect.tobytes()
        assert (o.first_seq, o.last_seq) == (first, plain.last_seq)
    assert machine.ledger.digest() == plain.digest() and machine.rejected_batches == refused >= 1
    events = np.concatenate([c for chunks in seen for c in chunks])
    assert events.tobytes() == plain.events(1, plain.last_seq).tobytes()


def _ledger_events(n_transfers):
    led = Ledger()
    led.create_account(1, 1, "USD", lower_limit=None)
    led.create_account(2, 2, "USD")
    for k in range(n_transfers):
        led.transfer(100 + k, 1, 2, 1, "USD")
    return led


def test_event_store_ranges_limits_holes_and_reopen(tmp_path):
    led = _ledger_events(20)                       # seqs 1, 2, then 3..22 with 2 parts each
    es = EventStore(str(tmp_path))
    es.append([led.events(1, 10)])
    es.append([led.events(11, 22)])
    got = es.read(2, 22, 1000)
    assert got.tobytes() == led.events(2, 22).tobytes()
    cut = es.read(1, 22, 5)                       # at most 5 records, whole seqs only
    assert len(cut) <= 5 and cut["seq_num"].tolist() == [1, 2, 3, 3]
    one = es.read(15, 15, 1)                      # a seq bigger than the limit still comes whole
    assert one["seq_num"].tolist() == [15, 15]
    assert es.read(20, 30, 100)["seq_num"][-1] == 22     # past the end: the prefix this replica holds
    with pytest.raises(EventsUnavailable):
        es.read(23, 30, 100)
    es.append([led.events(11, 22)])               # replay after a restart rewrites identical events
    assert es.read(1, 22, 1000).tobytes() == led.events(1, 22).tobytes()
    es.note_restored(40)                          # restored from a newer snapshot: 23..40 never arrive
    with pytest.raises(EventsUnavailable, match="snapshot"):
        es.read(23, 25, 100)
    assert es.read(21, 25, 100)["seq_num"].tolist() == [21, 21, 22, 22]   # the prefix before the hole
    es.close()
    es = EventStore(str(tmp_path))
    assert es.last_seq == 40
    with pytest.raises(EventsUnavailable):
        es.read(30, 30, 100)
    es.close()


def test_event_store_groups_appends_into_few_transactions_and_reads_see_them(tmp_path, monkeypatch):
    import engine.service.event_store as es_mod      # the store (and its bounds) are the service's
    led = _ledger_events(60)                       # seqs 1..62
    es = EventStore(str(tmp_path))

    def in_lmdb():
        with es._env.begin(db=es._chunks) as txn:
            return txn.stat(es._chunks)["entries"]
    es.append([led.events(1, 5)])
    es.append([led.events(6, 9)])
    assert in_lmdb() == 0 and es.last_seq == 9     # waiting in memory, counted
    assert es.read(7, 9, 100).tobytes() == led.events(7, 9).tobytes()    # a read of them flushes first
    assert in_lmdb() == 2
    es.append([led.events(10, 12)])
    assert es.read(1, 12, 1000).tobytes() == led.events(1, 12).tobytes()
    monkeypatch.setattr(es_mod, "PENDING_CHUNKS_MAX", 4)                    # the count bound
    for first in range(13, 33, 2):
        es.append([led.events(first, first + 1)])
        assert len(es._pending) < 4
    monkeypatch.setattr(es_mod, "PENDING_BYTES_MAX", 1)                     # the bytes bound
    es.append([led.events(33, 40)])
    assert not es._pending
    es.append([led.events(41, 50)])
    es.close()                                     # close flushes what waits
    es = EventStore(str(tmp_path))
    assert es.last_seq == 50 and es.read(1, 50, 10_000).tobytes() == led.events(1, 50).tobytes()
    es.append([led.events(51, 62)])
    es.sync()                                      # sync (before a snapshot) flushes too
    assert not es._pending
    es.close()


def test_event_store_prunes_below_retention(tmp_path):
    led = _ledger_events(40)
    es = EventStore(str(tmp_path), retention_seqs=10)
    for first in range(1, 43, 6):
        es.append([led.events(first, min(first + 5, 42))])
    assert es.prune_now() > 0
    assert es.first_available() > 1
    with pytest.raises(EventsUnavailable, match="pruned"):
        es.read(1, 2, 10)
    assert es.read(35, 42, 100)["seq_num"][-1] == 42
    es.close()


def test_event_store_compresses_new_stores_and_still_reads_raw_ones(tmp_path):
    import lmdb
    import struct
    led = _ledger_events(2000)
    es = EventStore(str(tmp_path / "new"))
    assert es.format == 2
    es.append([led.events(1, 1000)])
    es.append([led.events(1001, led.last_seq)])
    with es._env.begin(db=es._chunks) as txn:
        stored = sum(len(v) for _, v in txn.cursor())
    assert stored * 3 < led.events(1, led.last_seq).nbytes          # LZ4: a batch's events shrink ~6x
    assert es.read(1, led.last_seq, 10 ** 6).tobytes() == led.events(1, led.last_seq).tobytes()
    es.close()
    # a store written before compression: raw records as values, no format in meta
    env = lmdb.open(str(tmp_path / "old"), map_size=1 << 26, max_dbs=4)
    chunks = env.open_db(b"chunks")
    with env.begin(write=True, db=chunks) as txn:
        txn.put(struct.pack(">Q", 1), led.events(1, 500).tobytes())
    env.close()
    old = EventStore(str(tmp_path / "old"))
    assert old.format == 1 and old.last_seq == 500
    old.append([led.events(501, 900)])
    assert old.read(400, 900, 10 ** 6).tobytes() == led.events(400, 900).tobytes()
    old.close()
    assert EventStore(str(tmp_path / "old")).format == 1                     # stays raw across reopen


def test_node_config_toml_round_trip_and_errors(tmp_path):
    replicas = {i: {"raft": f"tcp://127.0.0.1:{7000 + i}", "client": f"tcp://127.0.0.1:{7100 + i}",
                    "pub": f"tcp://127.0.0.1:{7200 + i}"} for i in (1, 2, 3)}
    cfg = NodeConfig(node_id=2, replicas=replicas, insecure=True, data_dir=str(tmp_path / "n2"), inflight_entries_max=3)
    path = tmp_path / "n.toml"
    path.write_text(cfg.to_toml())
    back = NodeConfig.from_toml(str(path))
    assert back == cfg
    assert NodeConfig.from_toml(str(path), node_id=3).node_id == 3
    path.write_text(cfg.to_toml().replace("[limits]", "[limits]\nbogus = 1"))
    with pytest.raises(ValueError, match="bogus"):
        NodeConfig.from_toml(str(path))
    with pytest.raises(ValueError, match="not one of the replicas"):
        NodeConfig(node_id=9, replicas=replicas, insecure=True, data_dir="x").validate()
    with pytest.raises(ValueError, match="batch_records_max"):
        NodeConfig(node_id=1, replicas=replicas, insecure=True, data_dir="x", batch_records_max=9000).validate()


def test_wire_header_checks():
    req = W.Request(7, W.Op.APPLY)
    assert W.decode_request(W.encode(req)) == req
    with pytest.raises(ValueError, match="version"):
        W.decode_request(W.encode(W.Request(7, W.Op.APPLY, version=99)))
    with pytest.raises(ValueError, match="HEADER_BYTES_MAX"):
        W.decode_request(b"\x91" + b"x" * W.HEADER_BYTES_MAX)
    ids = [0, 1, (1 << 128) - 1]
    assert W.decode_ids(W.encode_ids(ids)) == ids
    acc = Ledger()
    acc.create_account(1, 1 << 100, "BTC", lower_limit=None)
    acc.batch_balance_operation(2, [(1 << 100, 1 << 120, "BTC")])
    acc.reserve(3, 1 << 100, 1 << 90, 1 << 110)
    a = acc.get_account(1 << 100)
    assert W.decode_accounts(W.encode_accounts([a, None])) == [a, None]


def test_forked_snapshot_sees_the_state_at_the_fork(tmp_path):
    import time as _time
    from engine.node import ForkedSnapshot
    led = Ledger()
    led.create_account(1, 1, "USD", lower_limit=None)
    before = led.snapshot()
    pending = ForkedSnapshot(led.snapshot, str(tmp_path))
    led.create_account(2, 2, "USD")                     # the parent goes on; the child's copy does not move
    deadline = _time.monotonic() + 10
    data = None
    while data is None and _time.monotonic() < deadline:
        data = pending.poll()
        _time.sleep(0.01)
    with open(data.path, "rb") as f:                    # a durable file, handed over with size and crc
        raw = f.read()
    assert raw == before and data.size == len(raw) and data.crc32 == zlib.crc32(raw)
    assert Ledger.restore(raw).account_count == 1
    os.unlink(data.path)
    assert not list(tmp_path.iterdir())                 # nothing else is left behind
    failing = ForkedSnapshot(lambda: 1 / 0, str(tmp_path))
    with pytest.raises(RuntimeError, match="failed"):
        while failing.poll() is None:
            _time.sleep(0.01)
    slow = ForkedSnapshot(lambda: _time.sleep(30) or b"", str(tmp_path))
    slow.cancel()
    assert not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the expected death
def test_a_node_whose_raft_thread_dies_stops_instead_of_lingering(tmp_path):
    """Fail-stop: a storage error in apply (here: the event store refuses a write, as on a full disk) kills
    the driver thread; the node must then leave serve() with a non-zero exit code, not stay half-alive."""
    import threading
    from engine.client import Client, ClientError
    from engine.node import Node
    from engine.devtools.local_raft import free_ports
    ports = free_ports(3)
    replicas = {1: {"raft": f"tcp://127.0.0.1:{ports[0]}", "client": f"tcp://127.0.0.1:{ports[1]}",
                    "pub": f"tcp://127.0.0.1:{ports[2]}"}}
    node = Node(NodeConfig(node_id=1, replicas=replicas, insecure=True, data_dir=str(tmp_path), election_ticks=10,
                           heartbeat_ticks=2, tick_ms=5))

    def broken_append(chunks):
        raise OSError(28, "No space left on device")
    node.events.append = broken_append
    node.start()
    server = threading.Thread(target=node.serve, daemon=True)
    server.start()
    with Client([replicas[1]["client"]], timeout_s=5) as client:
        with pytest.raises(ClientError):
            client.create_account(1, 10, "USD")          # applying it fails the driver: no answer comes
    server.join(10)
    assert not server.is_alive() and node.exit_code == 3


def test_ok_reply_header_parts_match_the_encoded_reply():
    # the leader encodes one reply header per entry and splices each batch's req_id in
    from engine.node import _INT_ENCODER, _ok_reply_parts
    for last_seq in (0, 5, 300, 2 ** 40):
        prefix, suffix = _ok_reply_parts(last_seq, 3)
        for req_id in (0, 1, 127, 128, 255, 65_536, 2 ** 63, 2 ** 64 - 1):
            assert prefix + _INT_ENCODER.encode(req_id) + suffix == \
                W.encode(W.Reply(req_id, W.Status.OK, last_seq=last_seq, node_id=3))
            assert W.decode_reply(prefix + _INT_ENCODER.encode(req_id) + suffix).req_id == req_id


def test_leader_defers_its_entry_count_snapshots_but_not_the_bytes_bound():
    from types import SimpleNamespace
    from engine.raft.driver import DriverConfig, RaftDriver
    cfg = DriverConfig(snapshot_threshold_entries=1000, snapshot_keep_entries=10, leader_snapshot_defer=4)
    def due(is_leader, applied, snapshot_index=0, bytes_since=0, phase=0):
        me = SimpleNamespace(config=cfg, is_leader=is_leader, _applied=applied, _snapshot_index=snapshot_index,
                             _bytes_since_snapshot=bytes_since, _snapshot_phase=phase)
        return RaftDriver._snapshot_due(me)
    assert due(False, 1000) and not due(True, 1000) and not due(True, 3999) and due(True, 4000)
    assert due(False, 1500, snapshot_index=900, phase=500)          # a follower's phase point
    assert not due(True, 1500, snapshot_index=900, phase=500)
    assert due(True, 10, bytes_since=cfg.snapshot_threshold_bytes)   # memory stays bounded on the leader
    with pytest.raises(ValueError):
        DriverConfig(leader_snapshot_defer=0).validate()


def test_event_store_dedup_index_finds_commands_until_pruned(tmp_path):
    led = _ledger_events(300)
    es = EventStore(str(tmp_path), retention_seqs=100)
    for first in range(1, led.last_seq + 1, 25):
        es.append([led.events(first, min(first + 24, led.last_seq))])
        es.flush()                                  # one index block per flush
    evs = led.events(1, led.last_seq)
    by_seq = {int(s): R.get_u128(evs["dedup_id"][k:k + 1])[0]
              for k, s in enumerate(evs["seq_num"]) if evs["part"][k] == 0}
    assert all(es.lookup(d) == s for s, d in by_seq.items())
    assert es.lookup(987654321) is None
    es.append([led.events(led.last_seq, led.last_seq)])      # a replayed seq: idempotent
    newest = max(by_seq)
    assert es.lookup(by_seq[newest]) == newest              # found in the pending chunks (flushed first)
    ts_last = int(evs["timestamp"][-1])
    assert es.lookup(by_seq[1], since_ms=ts_last + 1) is None   # bounded by time: not searched that far
    es.close()
    es = EventStore(str(tmp_path), retention_seqs=100)       # durable
    assert es.lookup(by_seq[5]) == 5 and es.index_complete_from() == 1
    es.prune_now(pass_chunks=2)
    floor = es.first_available()
    assert floor > 1 and es.index_complete_from() == floor
    assert es.lookup(by_seq[5]) is None and es.lookup(by_seq[newest]) == newest
    es.close()


def test_event_store_prunes_in_the_background_in_bounded_passes(tmp_path, monkeypatch):
    from engine import event_store as es_mod
    led = _ledger_events(400)
    es = EventStore(str(tmp_path), retention_seqs=10)
    for first in range(1, led.last_seq + 1, 2):
        es.append([led.events(first, min(first + 1, led.last_seq))])
    es.flush()
    passes = []
    real = es.prune_pass

    def counting(cutoff, pass_chunks=es_mod.PRUNE_PASS_CHUNKS):
        n = real(cutoff, 5)
        passes.append(n)
        return n
    monkeypatch.setattr(es, "prune_pass", counting)
    es.prune()                                      # returns at once; the pruner thread does the work
    import time as _t
    deadline = _t.monotonic() + 10
    while es.first_available() < led.last_seq - 12 and _t.monotonic() < deadline:
        _t.sleep(0.01)
    assert es.first_available() >= led.last_seq - 12
    assert len([n for n in passes if n]) >= 10 and max(passes) <= 5    # many small transactions
    es.close()


def test_event_store_pruning_killed_midway_leaves_a_consistent_store(tmp_path):
    import os
    import signal
    led = _ledger_events(400)
    es = EventStore(str(tmp_path), retention_seqs=10)
    for first in range(1, led.last_seq + 1, 2):
        es.append([led.events(first, min(first + 1, led.last_seq))])
    es.close()
    pid = os.fork()
    if pid == 0:                                    # a child prunes one small pass at a time, then is killed
        child = EventStore(str(tmp_path), retention_seqs=10)
        cutoff = child.last_seq - 10
        for _ in range(30):
            child.prune_pass(cutoff, 3)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    es = EventStore(str(tmp_path), retention_seqs=10)
    floor = es.first_available()
    assert 1 < floor < es.last_seq
    got = es.read(floor, es.last_seq, 100_000)
    assert got["seq_num"][0] == floor and got["seq_num"][-1] == es.last_seq
    es.close()


def test_event_store_index_block_layout(tmp_path):
    """A flush's index block is the documented layout, whatever the chunks: the header, then the commands'
    (part-0 events') id hashes sorted (stable), then their seqs in that order."""
    from engine.service.event_store import _BLOCK_HEADER, dedup_hashes
    led = _ledger_events(40)                        # seqs 1, 2 (one part each), then 3..42 with 2 parts each
    es = EventStore(str(tmp_path))
    chunks = [led.events(1, 1), led.events(2, 9), led.events(10, 10), led.events(11, 42)]
    for c in chunks:
        es.append([c])
    key, value = es._index_block()
    evs = led.events(1, 42)
    firsts = evs[evs["part"] == 0]
    hashes = dedup_hashes(np.ascontiguousarray(firsts["dedup_id"]))
    order = np.argsort(hashes, kind="stable")
    ts = firsts["timestamp"]
    want = (_BLOCK_HEADER.pack(1, 42, int(ts.min()), int(ts.max()), len(firsts))
            + hashes[order].astype("<u8").tobytes() + firsts["seq_num"][order].astype("<u8").tobytes())
    assert key == struct.pack(">Q", 1) and value == want
    es.flush()
    assert all(es.lookup(R.get_u128(firsts["dedup_id"][k:k + 1])[0]) == int(firsts["seq_num"][k])
               for k in range(len(firsts)))
    es.close()
