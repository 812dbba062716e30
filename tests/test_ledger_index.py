"""What the ledger keeps for the event store's durable dedup index (``Ledger.event_index``, docs/ledger.md
"Exactly-once and retention"): the C hash of a dedup id is the event store's, each seq's hash is its part-0
record's, and the index blocks built from the ledger's ready arrays are byte for byte the ones the store
extracts from the records itself (so stores and blocks written before stay valid)."""
import numpy as np
import pytest

from engine import Ledger
from engine import records as R
from engine._ledger import OpEncoder
from engine._ledger import dedup_hashes as c_dedup_hashes
from engine.event_store import EventStore
from engine.ledger_machine import LedgerMachine, ledger_entry
from engine.service.event_store import IndexedEvents, _stable_order, dedup_hashes
from engine.raft.messages import Entry

USD = "USD"
U64 = (1 << 64) - 1


def test_the_c_dedup_hash_is_the_event_stores_on_random_ids():
    rng = np.random.default_rng(12)
    ids = rng.integers(0, 1 << 64, (200_000, 2), dtype=np.uint64)
    edge = np.array([[0, 0], [1, 0], [0, 1], [U64, 0], [0, U64], [U64, U64], [1 << 63, 1 << 63],
                     [0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9]], dtype=np.uint64)
    ids = np.concatenate([ids, edge, ids[:1000] & np.uint64(0xFFFF)])    # and small ids, as clients use
    assert np.array_equal(c_dedup_hashes(ids), dedup_hashes(ids))
    assert int(c_dedup_hashes(np.zeros((1, 2), dtype=np.uint64))[0]) == 0   # an expiry's dedup_id 0


def _part0(evs):
    return evs[evs["part"] == 0]


def _check_index(led, first, last):
    evs = led.events(first, last)
    hashes, ts_first, ts_last = led.event_index(first, last)
    firsts = _part0(evs)
    assert firsts["seq_num"].tolist() == list(range(first, last + 1))
    assert np.array_equal(hashes, dedup_hashes(np.ascontiguousarray(firsts["dedup_id"])))
    assert (ts_first, ts_last) == (int(firsts["timestamp"].min()), int(firsts["timestamp"].max()))


def _mixed_ledger(**kw):
    """Every kind of event: creates, transfers (2 parts), batch balances (3 parts), reservations, TCC tries,
    confirms, null cancels, expiries (dedup_id 0), compensations, null compensations; big dedup ids."""
    led = Ledger(**kw)
    t = 1_000
    for a in (1, 2, 3):
        assert led.create_account((1 << 100) + a, a, USD, None, timestamp=t).ok
    for k in range(60):
        t += 7
        d = (k << 70) | (k * 0x9E3779B97F4A7C15 & U64) | 1
        kind = k % 6
        if kind == 0:
            assert led.transfer(d, 1, 2, 5, USD, timestamp=t).ok
        elif kind == 1:
            assert led.batch_balance_operation(d, [(1, -3, USD), (2, 1, USD), (3, 2, USD)], timestamp=t).ok
        elif kind == 2:
            assert led.tcc_try(d, 5_000 + k, [(1, -2, USD), (3, 2, USD)], timestamp=t, expires_ms=t + 20).ok
        elif kind == 3:
            assert led.tcc_cancel(d, 9_000 + k, timestamp=t).ok            # never tried: null cancel
        elif kind == 4:
            assert led.compensate(d, d + 2, timestamp=t).ok               # never seen: null compensation
        else:
            assert led.reserve(d, 2, 77 + k, 1, timestamp=t).ok
    return led


def test_event_index_is_each_seqs_part0_hash_and_the_timestamps_bounds():
    led = _mixed_ledger()
    kinds = set(led.events(1, led.last_seq)["kind"].tolist())
    assert {int(R.Kind.TCC_CANCEL), int(R.Kind.BATCH_BALANCE), int(R.Kind.COMPENSATE)} <= kinds
    assert (led.events(1, led.last_seq)["dedup_id"] == 0).all(axis=1).any()      # expiries happened
    _check_index(led, 1, led.last_seq)
    for a, b in [(1, 1), (4, 9), (led.last_seq, led.last_seq), (17, led.last_seq - 3)]:
        _check_index(led, a, b)
    with pytest.raises(ValueError):
        led.event_index(0, 1)
    with pytest.raises(ValueError):
        led.event_index(1, led.last_seq + 1)


def test_event_index_and_events_across_the_ring_wrap_and_after_restore():
    led = Ledger(event_retention=4096, dedup_retention=1 << 12)
    assert led.create_account(1, 1, USD, None, timestamp=5).ok
    assert led.create_account(2, 2, USD, timestamp=5).ok
    for k in range(5000):                       # 2 records a seq: the ring wraps several times
        assert led.transfer(10 + k, 1, 2, 1, USD, timestamp=5 + k // 100).ok
    last = led.last_seq
    first_live = last - 1500
    evs = led.events(first_live, last)          # crosses the ring's end (two copies)
    assert np.array_equal(evs, np.concatenate([led.events(s, s) for s in range(first_live, last + 1)]))
    _check_index(led, first_live, last)
    with pytest.raises(ValueError):
        led.event_index(1, last)                # left the ring
    restored = Ledger.restore(led.snapshot())
    for a, b in [(first_live, last), (last - 3, last)]:
        assert np.array_equal(restored.event_index(a, b)[0], led.event_index(a, b)[0])
        assert restored.event_index(a, b)[1:] == led.event_index(a, b)[1:]
        _check_index(restored, a, b)


def test_stable_order_is_the_stable_argsort():
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 7, 64, 1000, 40_000):
        h = rng.integers(0, 1 << 64, n, dtype=np.uint64)
        cases = [h, h & np.uint64(0xFFFF), h | np.uint64(0xFFFF)]      # low bits only / high bits alike
        if n > 2:
            d = h.copy()
            d[n // 2:] = d[: n - n // 2]             # exact duplicates (stable: by position)
            near = h.copy()
            near[1] = (near[0] & ~np.uint64(0xFF)) | ((near[0] + np.uint64(1)) & np.uint64(0xFF))
            near[2] = near[0] ^ np.uint64(1)         # share every high bit with near[0]
            cases += [d, near, np.zeros(n, dtype=np.uint64), np.arange(n, 0, -1, dtype=np.uint64)]
        for c in cases:
            ordered, order = _stable_order(c)
            want = np.argsort(c, kind="stable")
            assert np.array_equal(order, want) and np.array_equal(ordered, c[want])


def _transfer_entries(n_entries, per_batch=300, batches=2):
    """(machine fed with setup entries, the timed entries' bytes): accounts 1..50 and random transfers."""
    rng = np.random.default_rng(5)
    template = OpEncoder().create_account(1, 1, USD, lower_limit=None)
    ops = np.repeat(template, 50)
    ids = np.arange(1, 51)
    R.put_u128(ops["dedup_id"], ids)
    R.put_u128(ops["account_id"], ids)
    ops["issued_ms"] = 100
    entries = [ledger_entry([ops], 100)]
    dedup = 1 << 90
    for e in range(n_entries):
        bs = []
        for _ in range(batches):
            src = rng.integers(1, 51, per_batch)
            dst = src % 50 + 1
            b = R.transfers(np.zeros(per_batch, dtype=np.int64), src, dst, np.ones(per_batch, dtype=np.int64), USD)
            R.put_u128(b["dedup_id"], [dedup + k for k in range(per_batch)])
            dedup += per_batch
            b["issued_ms"] = 100 + e
            bs.append(b)
        entries.append(ledger_entry(bs, 101 + e))
    return entries


def test_index_blocks_from_the_ledgers_arrays_are_the_extracted_ones(tmp_path):
    """The machine's IndexedEvents chunks make, flush by flush, the same index block bytes as the plain
    records (the store's own extraction, as for a store written before), and a lookup finds every command."""
    chunks: list[np.ndarray] = []
    machine = LedgerMachine(event_sink=chunks.extend)
    for i, data in enumerate(_transfer_entries(6), start=1):
        machine.apply([Entry(1, i, 0, data)])
    assert all(isinstance(c, IndexedEvents) and c.dedup_index is not None for c in chunks)
    fast = EventStore(str(tmp_path / "fast"))
    slow = EventStore(str(tmp_path / "slow"))
    for group in ([chunks[0]], chunks[1:3], chunks[3:]):
        for c in group:
            fast.append([c])
            slow.append([np.array(c).view(np.ndarray)])        # plain records: extracted
        assert fast._index_block() == slow._index_block()
        fast.flush()
        slow.flush()
    # a replayed chunk (seqs already there) mixed in: not one run of seqs, the gathered path
    for es in (fast, slow):
        es.append([chunks[2] if es is fast else np.array(chunks[2])])
        es.append([chunks[1] if es is fast else np.array(chunks[1])])
    assert fast._index_block() == slow._index_block()
    fast.flush()
    evs = machine.ledger.events(1, machine.ledger.last_seq)
    firsts = _part0(evs)
    for k in range(0, len(firsts), 97):
        assert fast.lookup(R.get_u128(firsts["dedup_id"][k:k + 1])[0]) == int(firsts["seq_num"][k])
    fast.close()
    slow.close()


def test_a_view_of_indexed_events_carries_no_index():
    machine = LedgerMachine()
    for i, data in enumerate(_transfer_entries(1), start=1):
        out = machine.apply([Entry(1, i, 0, data)])
    evs = out[0].events
    assert isinstance(evs, IndexedEvents) and evs.dedup_index is not None
    assert evs[1:].dedup_index is None and evs[["seq_num"]].dedup_index is None


def test_the_chain_digest_and_events_are_the_ones_before_the_hot_path_rewrite():
    """ev_add/ev_end write and fold the event records without memset and in registers: the same bytes and
    the same running digest as before (values from main 974d570, whose fold read the records back)."""
    led = _mixed_ledger()
    assert led.chain_digest().hex() == "447a6f6e37a8e7ddb45b1eaa368014b7"
    assert led.digest().hex().startswith("2afb110d31b33d47")
