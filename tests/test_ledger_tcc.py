"""TCC on the shard side of a cross-shard coordinator: null cancel / anti-suspension (a cancel that overtakes
its try) and expiry of abandoned tries (docs/ledger.md, "TCC: reordering and expiry")."""
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest

from engine import Code, Ledger
from engine import records as R
from engine._ledger import OpEncoder, check_batch
from engine.ledger_machine import LedgerMachine, ledger_entry

USD = "USD"
EXPIRY_RECORDS_PER_TS_MAX = 8192        # engine/ledger_core.h
EXPIRY_RETRY_MS = 1000


def make(**kw):
    """Accounts 1 (unbounded, the bank) and 2 (lower 0, upper 100), 1 funded with 0 and 2 with 50."""
    led = Ledger(**kw)
    assert led.create_account(1_000_001, 1, USD, None, timestamp=10).ok
    assert led.create_account(1_000_002, 2, USD, 0, 100, timestamp=10).ok
    assert led.transfer(1_000_003, 1, 2, 50, USD, timestamp=10).ok
    return led


def try_op(dedup, txn, specs, issued_ms=0, expires_ms=0):
    """A TCC_TRY group as raw op records."""
    ops = R.empty_ops(1 + len(specs))
    R.put_u128(ops["dedup_id"], [dedup] * len(ops))
    ops["kind"][0] = R.Kind.TCC_TRY
    ops["group_size"][0] = len(ops)
    R.put_u128(ops["other_id"][0:1], [txn])
    ops["issued_ms"][0] = issued_ms
    ops["expires_ms"][0] = expires_ms
    for k, (aid, amount) in enumerate(specs, start=1):
        ops["kind"][k] = R.Kind.SPEC
        R.put_u128(ops["account_id"][k:k + 1], [aid])
        R.put_i128(ops["amount"][k:k + 1], [amount])
        ops["currency"][k] = USD.encode()
    return ops


def snapshot_of(led):
    return {aid: led.get_account(aid) for aid in (1, 2)}, led.totals(USD)


# ---------------------------------------------------------------------------------- null cancel
def test_cancel_before_its_try_leaves_a_tombstone_and_the_late_try_changes_nothing():
    led = make()
    before_accounts, before_totals = snapshot_of(led)
    r = led.tcc_cancel(20, 500, timestamp=100)                 # the try was delayed: the cancel comes first
    assert (r.code, r.duplicate, r.ok) == (Code.NULL_CANCELLED, False, True) and r.seq_num == led.last_seq
    ev = led.events(r.seq_num, r.seq_num)
    assert len(ev) == 1 and ev["kind"][0] == R.Kind.TCC_CANCEL and ev["code"][0] == Code.NULL_CANCELLED
    assert R.get_u128(ev["other_id"]) == [500] and R.get_u128(ev["account_id"]) == [0]
    assert R.get_u128(ev["dedup_id"]) == [20] and r.accounts == {}
    seq = led.last_seq
    late = led.tcc_try(21, 500, [(2, -30, USD), (1, 30, USD)], timestamp=101)
    assert (late.code, late.duplicate, late.seq_num) == (Code.TXN_ALREADY_CANCELLED, False, 0)
    assert led.last_seq == seq and snapshot_of(led) == (before_accounts, before_totals)
    again = led.tcc_try(21, 500, [(2, -30, USD), (1, 30, USD)], timestamp=102)     # its retry
    assert (again.code, again.duplicate) == (Code.TXN_ALREADY_CANCELLED, True)
    assert led.tcc_confirm(22, 500, timestamp=103).code == Code.TXN_ALREADY_CANCELLED
    assert led.tcc_cancel(23, 500, timestamp=104).code == Code.TXN_ALREADY_CANCELLED   # another cancel
    assert led.last_seq == seq and snapshot_of(led) == (before_accounts, before_totals)
    led._check_invariants()
    # the tombstone is in the snapshot
    restored = Ledger.restore(led.snapshot())
    assert restored.digest() == led.digest()
    assert restored.tcc_try(24, 500, [(2, -1, USD)], timestamp=105).code == Code.TXN_ALREADY_CANCELLED


def test_the_late_try_is_refused_in_a_raw_batch_too():
    led = make()
    cancel = R.empty_ops(1)
    R.put_u128(cancel["dedup_id"], [20])
    cancel["kind"], cancel["group_size"] = R.Kind.TCC_CANCEL, 1
    R.put_u128(cancel["other_id"], [500])
    batch = np.concatenate([cancel, try_op(21, 500, [(2, -30), (1, 30)])])   # cancel and try in one batch
    res = led.apply_batch(batch, timestamp=100)
    assert list(res["code"]) == [Code.NULL_CANCELLED] + [Code.TXN_ALREADY_CANCELLED] * 3
    assert led.get_account(2)["pending_out"] == {} and led.get_account(2)["available"] == 50


def test_null_cancel_is_idempotent():
    led = make()
    first = led.tcc_cancel(20, 500, timestamp=100)
    seq, chain = led.last_seq, led.chain_digest()
    again = led.tcc_cancel(20, 500, timestamp=200)
    assert (again.code, again.duplicate, again.seq_num) == (Code.NULL_CANCELLED, True, first.seq_num)
    assert led.last_seq == seq and led.chain_digest() == chain          # no new event
    known = led.result_of(20)
    assert known is not None and (known.code, known.seq_num) == (Code.NULL_CANCELLED, first.seq_num)


def test_confirm_of_an_unknown_txn_stays_not_found_and_leaves_nothing():
    led = make()
    assert led.tcc_confirm(20, 500, timestamp=100).code == Code.TXN_NOT_FOUND
    assert led.tcc_try(21, 500, [(2, -30, USD), (1, 30, USD)], timestamp=101).code == Code.OK


def test_a_late_try_after_its_tombstone_left_the_window_is_behind_the_horizon():
    # Tries tried before the null cancel and expiring after it finish txns without any command, so the
    # tombstone can leave the finished window (dedup_retention = 16) while the null cancel's own dedup entry
    # is still in the dedup window: evicting the tombstone itself must move the horizon past the cancel.
    led = Ledger(dedup_retention=16)
    assert led.create_account(1, 1, USD, None, timestamp=10).ok
    for k in range(16):
        assert led.tcc_try(100 + k, 900 + k, [(1, -1, USD)], timestamp=50, expires_ms=200).ok
    assert led.tcc_cancel(20, 500, timestamp=100).code == Code.NULL_CANCELLED
    assert led.dedup_window()["horizon_ms"] <= 100
    assert led.transfer(21, 1, 77, 1, USD, timestamp=200).code == Code.ACCOUNT_NOT_FOUND   # 16 tries expire
    assert led.result_of(20) is not None                     # the null cancel is still in the dedup window
    assert led.dedup_window()["horizon_ms"] == 101           # but its tombstone left: the horizon moved
    late = led.tcc_try(22, 500, [(1, -5, USD)], timestamp=201)
    late_issued_before = led.apply_batch(try_op(23, 500, [(1, -5)], issued_ms=90), timestamp=201)
    assert late.code == Code.OK                              # issued after the cancel: a new try (documented)
    assert late_issued_before["code"][0] == Code.DEDUP_EXPIRED
    led._check_invariants()


# --------------------------------------------------------------------------------------- expiry
def test_a_try_expires_exactly_at_its_expiry_time():
    led = make()
    before_accounts, before_totals = snapshot_of(led)
    r = led.tcc_try(20, 500, [(2, -30, USD), (1, 30, USD)], timestamp=100, expires_ms=1000)
    assert r.ok and led.get_account(2)["pending_out"] == {500: 30}
    assert led.transfer(21, 1, 2, 1, USD, timestamp=999).ok              # not yet due
    assert led.get_account(2)["pending_out"] == {500: 30} and led.get_account(1)["pending_in"] == {500: 30}
    v2 = led.get_account(2)["version"]
    seq = led.last_seq
    t = led.transfer(22, 2, 1, 1, USD, timestamp=1000)                   # due: expired before this command
    assert t.ok and t.seq_num == seq + 2 and led.seq_before_commands == seq + 1
    ev = led.events(seq + 1, seq + 1)
    assert list(ev["kind"]) == [R.Kind.TCC_CANCEL] * 2 and list(ev["code"]) == [Code.TXN_EXPIRED] * 2
    assert R.get_u128(ev["dedup_id"]) == [0, 0] and R.get_u128(ev["other_id"]) == [500, 500]
    assert R.get_i128(ev["amount"]) == [30, -30] and list(ev["timestamp"]) == [1000, 1000]
    a2 = led.get_account(2)
    assert a2["pending_out"] == {} and led.get_account(1)["pending_in"] == {} and a2["version"] == v2 + 2
    assert led.totals(USD) == before_totals
    assert a2["available"] == before_accounts[2]["available"] + 1 - 1
    assert led.tcc_confirm(23, 500, timestamp=1001).code == Code.TXN_ALREADY_CANCELLED
    assert led.tcc_cancel(24, 500, timestamp=1001).code == Code.TXN_ALREADY_CANCELLED
    retry = led.tcc_try(20, 500, [(2, -30, USD), (1, 30, USD)], timestamp=100, expires_ms=1000)
    assert (retry.code, retry.duplicate, retry.seq_num) == (Code.OK, True, r.seq_num)
    led._check_invariants()


def test_a_try_already_past_its_expiry_is_refused():
    led = make()
    for dedup, expires in ((20, 99), (21, 100)):
        r = led.tcc_try(dedup, 500, [(2, -30, USD)], timestamp=100, expires_ms=expires)
        assert (r.code, r.seq_num) == (Code.TXN_EXPIRED, 0)
    assert led.get_account(2)["pending_out"] == {}
    assert led.tcc_try(22, 500, [(2, -30, USD)], timestamp=100, expires_ms=101).ok   # nothing was left


def test_confirm_before_expiry_wins_and_leaves_nothing_to_expire():
    led = make()
    assert led.tcc_try(20, 500, [(2, -30, USD), (1, 30, USD)], timestamp=100, expires_ms=1000).ok
    assert led.tcc_confirm(21, 500, timestamp=999).ok
    seq = led.last_seq
    assert led.transfer(22, 1, 2, 1, USD, timestamp=5000).seq_num == seq + 1     # nothing expired
    assert led.get_account(1)["available"] == -50 + 30 - 1
    led._check_invariants()


def _expiring_batches():
    """(timestamp, batch) pairs: tries with expiry times out of txn order, then commands later."""
    b1 = np.concatenate([try_op(20, 503, [(2, -1), (1, 1)], 100, 700),
                         try_op(21, 501, [(2, -2), (1, 2)], 100, 500),
                         try_op(22, 502, [(2, -3), (1, 3)], 100, 500),
                         try_op(23, 504, [(2, -4)], 100, 0)])          # never expires
    later = R.transfers([30], [1], [2], [1], USD, issued_ms=800)
    return [(100, b1), (800, later)]


def test_expiry_cancels_due_tries_in_order_of_expiry_then_txn_id_deterministically():
    a, b = make(), make()
    for led in (a, b):
        for ts, batch in _expiring_batches():
            led.apply_batch(batch, timestamp=ts)
    assert a.chain_digest() == b.chain_digest() and a.digest() == b.digest()
    first = a.seq_before_commands - 2
    order = [R.get_u128(a.events(s, s)["other_id"])[0] for s in range(first, first + 3)]
    assert order == [501, 502, 503]
    assert a.get_account(2)["pending_out"] == {504: 4}
    a._check_invariants()


def test_expiry_survives_snapshot_and_restore():
    (ts1, b1), (ts2, b2) = _expiring_batches()
    plain = make()
    plain.apply_batch(b1, timestamp=ts1)
    snap = plain.snapshot()
    restored = Ledger.restore(snap)
    restored._check_invariants()
    for led in (plain, restored):
        led.apply_batch(b2, timestamp=ts2)
    assert restored.digest() == plain.digest() and restored.chain_digest() == plain.chain_digest()
    assert restored.get_account(2)["pending_out"] == {504: 4}


def test_a_cancel_refused_by_the_upper_limit_is_retried_later_and_the_try_stays_unconfirmable():
    led = make()                                      # account 2: upper limit 100, holds 50
    assert led.tcc_try(20, 500, [(2, -30, USD), (1, 30, USD)], timestamp=100, expires_ms=1000).ok
    assert led.transfer(21, 1, 2, 80, USD, timestamp=500).ok            # 2 holds 100: no room for 30 back
    seq = led.last_seq
    assert led.transfer(22, 1, 77, 1, USD, timestamp=1000).seq_num == 0  # due, but the cancel is refused
    assert led.last_seq == seq and led.get_account(2)["pending_out"] == {500: 30}
    assert led.tcc_confirm(23, 500, timestamp=1001).code == Code.TXN_EXPIRED
    assert led.transfer(24, 2, 1, 50, USD, timestamp=1500).ok            # room again; retry not due yet
    assert led.get_account(2)["pending_out"] == {500: 30}
    led._check_invariants()
    led = Ledger.restore(led.snapshot())                                 # the retry time is in the snapshot
    assert led.transfer(25, 1, 77, 1, USD, timestamp=1000 + EXPIRY_RETRY_MS).seq_num == 0
    assert led.get_account(2)["pending_out"] == {} and led.get_account(2)["available"] == 80
    assert led.events(led.last_seq, led.last_seq)["code"][0] == Code.TXN_EXPIRED
    led._check_invariants()


def test_expiry_writes_a_bounded_number_of_event_records_per_entry_time():
    led = Ledger()
    led.create_account(1, 1, USD, None)
    n_txns, specs = EXPIRY_RECORDS_PER_TS_MAX // 1024 + 1, [(1, -1)] * 1024
    for k in range(n_txns):
        res = led.apply_batch(try_op(100 + k, 900 + k, specs, 10, 1000), timestamp=10)
        assert res["code"][0] == Code.OK
    seq = led.last_seq
    led.apply_batch(R.transfers([200], [1], [77], [1], USD, issued_ms=1000), timestamp=1000)
    led.apply_batch(R.transfers([201], [1], [77], [1], USD, issued_ms=1000), timestamp=1000)  # same entry time
    assert led.last_seq == seq + n_txns - 1                              # the budget: 8 of 9 expired
    assert led.tcc_confirm(202, 900 + n_txns - 1, timestamp=1000).code == Code.TXN_EXPIRED
    led.apply_batch(R.transfers([203], [1], [77], [1], USD, issued_ms=1001), timestamp=1001)
    assert led.last_seq == seq + n_txns and led.get_account(1)["pending_out"] == {}
    led._check_invariants()


def test_expires_ms_is_only_allowed_on_a_tcc_try_header():
    t = try_op(20, 500, [(2, -1)], expires_ms=5)
    check_batch(t)
    bad = t.copy()
    bad["expires_ms"][1] = 5
    with pytest.raises(ValueError, match="expires_ms must be 0 on a group member"):
        check_batch(bad)
    for kind in (R.Kind.TCC_CONFIRM, R.Kind.TCC_CANCEL, R.Kind.TRANSFER):
        op = R.empty_ops(1)
        op["kind"], op["group_size"], op["expires_ms"] = kind, 1, 5
        with pytest.raises(ValueError, match="expires_ms must be 0 except on a TCC_TRY header"):
            Ledger().apply_batch(op)


def test_op_encoder_writes_expires_ms():
    ops = OpEncoder().tcc_try(1, 2, [(3, -4, USD)], timestamp=7, expires_ms=9)
    assert list(ops["expires_ms"]) == [9, 0] and list(ops["issued_ms"]) == [7, 0]
    with pytest.raises(ValueError):
        OpEncoder().tcc_try(1, 2, [(3, -4, USD)], expires_ms=-1)


# ------------------------------------------------------------------------------ snapshot format 2
def test_a_format_2_snapshot_still_restores():
    # written by the ledger before TCC expiry (tests/data; see the commit that added it): open txn 500,
    # 501 confirmed, 502 cancelled
    led = Ledger.restore((pathlib.Path(__file__).parent / "data" / "ledger_snapshot_v2.bin").read_bytes())
    led._check_invariants()
    assert led.last_seq == 8 and led.get_account(1)["pending_out"] == {500: 30}
    assert led.tcc_confirm(5, 501, timestamp=1003).duplicate
    assert led.tcc_cancel(9, 502, timestamp=1007).code == Code.TXN_ALREADY_CANCELLED
    assert led.tcc_try(10, 501, [(1, -1, USD)], timestamp=1007).code == Code.TXN_ALREADY_EXISTS
    assert led.transfer(11, 1, 2, 1, USD, timestamp=10 ** 6).ok           # no expiry in a format-2 txn
    assert led.tcc_confirm(12, 500, timestamp=10 ** 6).ok
    again = Ledger.restore(led.snapshot())                                # now written as format 3
    assert again.digest() == led.digest()


# ----------------------------------------------------------------------------- ledger machine
def test_an_entry_whose_only_events_are_expiries_hands_them_to_the_sink_and_to_no_batch():
    got = []
    m = LedgerMachine(event_sink=got.extend, dedup_retention=1 << 10)
    enc = OpEncoder()
    setup = np.concatenate([enc.create_account(1, 1, USD, None, timestamp=100),
                            enc.tcc_try(20, 500, [(1, -5, USD)], timestamp=100, expires_ms=1000)])
    m.apply([SimpleNamespace(index=1, data=ledger_entry([setup], 100))])
    rejected = R.transfers([30], [1], [77], [1], USD, issued_ms=1000)
    rejected2 = R.transfers([31], [1], [78], [1], USD, issued_ms=1000)
    for index, batches in ((2, [rejected, rejected2]), ):           # one apply call for the whole entry
        (outcomes,) = m.apply([SimpleNamespace(index=index, data=ledger_entry(batches, 1000))])
        assert [(o.first_seq, o.last_seq) for o in outcomes] == [(4, 3), (4, 3)]
        assert list(outcomes.events["code"]) == [Code.TXN_EXPIRED]
    assert got[-1]["seq_num"].tolist() == [3] and m.ledger.get_account(1)["pending_out"] == {}
    # batch by batch (a batch that alone is malformed sends the entry down that path)
    m2 = LedgerMachine(dedup_retention=1 << 10)
    m2.apply([SimpleNamespace(index=1, data=ledger_entry([setup], 100))])
    bad = R.empty_ops(1)
    bad["kind"] = 99
    (outcomes,) = m2.apply([SimpleNamespace(index=2, data=ledger_entry([rejected, bad], 1000))])
    assert (outcomes[0].first_seq, outcomes[0].last_seq) == (4, 3) and outcomes[1].results is None
    assert list(outcomes.events["code"]) == [Code.TXN_EXPIRED]
