"""Unit tests of every ledger operation and every result code, through the per-call API and apply_batch."""
import collections
import random
import uuid

import numpy as np
import pytest

from engine import Code, Ledger, State
from engine import records as R

USD = "USD"


def make(*accounts, **kw):
    """A ledger with accounts (id, currency[, lower[, upper]]) created with dedup ids 1_000_000 + i."""
    led = Ledger(**kw)
    for i, spec in enumerate(accounts):
        aid, cur, *limits = spec
        r = led.create_account(1_000_000 + i, aid, cur, *limits)
        assert r.code == Code.OK
    return led


def fund(led, dedup, account_id, amount, currency=USD):
    r = led.batch_balance_operation(dedup, [(account_id, amount, currency)])
    assert r.code == Code.OK, r
    return r


# ------------------------------------------------------------------------------ account management
def test_create_account_defaults_and_get_account():
    led = Ledger()
    r = led.create_account(1, 10, USD, timestamp=7)
    assert r.code == Code.OK and not r.duplicate and r.seq_num == 1
    acc = led.get_account(10)
    assert acc == {"account_id": 10, "currency": "USD", "state": State.NORMAL, "available": 0, "reserved": 0,
                   "reservations": {}, "pending_in": {}, "pending_out": {}, "lower_limit": 0,
                   "upper_limit": None, "version": 1}
    assert led.get_account(11) is None
    ev = led.events(1, 1)
    assert len(ev) == 1 and ev["timestamp"][0] == 7 and ev["kind"][0] == R.Kind.CREATE_ACCOUNT


def test_create_account_codes():
    led = Ledger()
    assert led.create_account(1, 10, USD).code == Code.OK
    assert led.create_account(2, 10, "EUR").code == Code.ACCOUNT_ALREADY_EXISTS
    assert led.create_account(3, 0, USD).code == Code.INVALID_ID
    assert led.create_account(4, 11, USD, lower_limit=5).code == Code.INVALID_LIMITS      # 0 below lower
    assert led.create_account(5, 11, USD, upper_limit=-1).code == Code.INVALID_LIMITS
    assert led.create_account(6, 11, USD, lower_limit=None, upper_limit=100).code == Code.OK
    assert led.get_account(11)["lower_limit"] is None and led.get_account(11)["upper_limit"] == 100
    assert led.account_count == 2


def test_invalid_currency_is_an_error_not_a_result():
    led = Ledger()
    for bad in ("", "TOOLONGCUR", "U D", "€"):
        with pytest.raises(ValueError):
            led.create_account(1, 10, bad)
    with pytest.raises(TypeError):
        led.create_account(1, 10, 840)
    assert led.last_seq == 0 and led.result_of(1) is None


def test_invalid_currency_code_in_a_raw_record():
    led = Ledger()
    ops = R.empty_ops(1)
    R.put_u128(ops["dedup_id"], [1])
    R.put_u128(ops["account_id"], [10])
    ops["kind"] = R.Kind.CREATE_ACCOUNT
    ops["group_size"] = 1
    ops["currency"] = b"\x01AB"
    assert led.apply_batch(ops)["code"][0] == Code.INVALID_CURRENCY
    assert led.account_count == 0


def test_lock_unlock_delete_transitions():
    led = make((10, USD))
    assert led.unlock_account(1, 10).code == Code.INVALID_STATE_TRANSITION
    assert led.lock_account(2, 10).code == Code.OK
    assert led.get_account(10)["state"] == State.LOCKED
    assert led.lock_account(3, 10).code == Code.INVALID_STATE_TRANSITION
    assert led.unlock_account(4, 10).code == Code.OK
    assert led.delete_account(5, 10).code == Code.OK
    assert led.get_account(10)["state"] == State.DELETED
    for i, op in enumerate((led.lock_account, led.unlock_account, led.delete_account)):
        assert op(10 + i, 10).code == Code.INVALID_STATE_TRANSITION      # DELETED is final
    assert led.lock_account(20, 99).code == Code.ACCOUNT_NOT_FOUND
    assert led.get_account(10)["version"] == 4
    assert led.create_account(21, 10, USD).code == Code.ACCOUNT_ALREADY_EXISTS


def test_delete_requires_zero_balance_and_nothing_open():
    led = make((10, USD), (11, USD, None))
    fund(led, 1, 10, 100)
    assert led.delete_account(2, 10).code == Code.BALANCE_NOT_ZERO
    assert led.transfer(3, 10, 11, 100, USD).code == Code.OK
    led.create_account(4, 12, USD, None)
    assert led.tcc_try(5, 77, [(10, 5, USD), (12, -5, USD)]).code == Code.OK
    assert led.delete_account(6, 10).code == Code.BALANCE_NOT_ZERO        # pending_in open
    assert led.tcc_cancel(7, 77).code == Code.OK
    assert led.reserve(8, 11, 1, 1).code == Code.OK
    assert led.release(9, 11, 1, None).code == Code.OK
    assert led.delete_account(10, 10).code == Code.OK


def test_update_account_config():
    led = make((10, USD))
    fund(led, 1, 10, 50)
    assert led.update_account_config(2, 10, upper_limit=100).code == Code.OK
    acc = led.get_account(10)
    assert (acc["lower_limit"], acc["upper_limit"], acc["version"]) == (0, 100, 3)
    assert led.update_account_config(3, 10, upper_limit=40).code == Code.INVALID_LIMITS   # balance outside
    assert led.update_account_config(4, 10, lower_limit=200).code == Code.INVALID_LIMITS  # lower > upper
    assert led.update_account_config(5, 10, lower_limit=None, upper_limit=None).code == Code.OK
    acc = led.get_account(10)
    assert acc["lower_limit"] is None and acc["upper_limit"] is None
    assert led.update_account_config(6, 99, lower_limit=0).code == Code.ACCOUNT_NOT_FOUND
    assert led.update_account_config(7, 10).code == Code.OK          # unchanged: still a change event
    fund(led, 8, 10, -50)
    led.delete_account(9, 10)
    assert led.update_account_config(10, 10, lower_limit=0).code == Code.INVALID_ACCOUNT_STATE


# ------------------------------------------------------------------------------------------ transfer
def test_transfer_moves_money_and_versions():
    led = make((1, USD), (2, USD))
    fund(led, 10, 1, 1000)
    r = led.transfer(11, 1, 2, 300, USD, timestamp=99)
    assert r.code == Code.OK
    assert led.get_account(1)["available"] == 700 and led.get_account(2)["available"] == 300
    assert r.accounts[1]["available"] == 700 and r.accounts[2]["version"] == 2
    ev = led.events(r.seq_num, r.seq_num)
    assert list(ev["part"]) == [0, 1] and list(ev["parts"]) == [2, 2]
    assert R.get_i128(ev["amount"]) == [-300, 300]
    assert R.get_u128(ev["other_id"]) == [2, 1]


def test_transfer_codes():
    led = make((1, USD), (2, USD), (3, "EUR"), (4, USD, 0, 10))
    fund(led, 10, 1, 100)
    assert led.transfer(1, 1, 2, 0, USD).code == Code.INVALID_AMOUNT
    assert led.transfer(2, 1, 2, -5, USD).code == Code.INVALID_AMOUNT
    assert led.transfer(3, 1, 1, 5, USD).code == Code.SAME_ACCOUNT
    assert led.transfer(4, 1, 99, 5, USD).code == Code.ACCOUNT_NOT_FOUND
    assert led.transfer(5, 1, 3, 5, USD).code == Code.CURRENCY_MISMATCH
    assert led.transfer(6, 1, 2, 5, "EUR").code == Code.CURRENCY_MISMATCH
    assert led.transfer(7, 1, 2, 101, USD).code == Code.BALANCE_LIMIT_EXCEEDED
    assert led.transfer(8, 1, 4, 11, USD).code == Code.BALANCE_LIMIT_EXCEEDED             # upper limit
    assert led.transfer(9, 1, 2, 5, USD, expected_from_balance=99).code == Code.PRECONDITION_FAILED
    assert led.transfer(12, 1, 2, 5, USD, expected_to_balance=1).code == Code.PRECONDITION_FAILED
    assert led.transfer(13, 1, 2, 5, USD, expected_from_balance=100, expected_to_balance=0).code == Code.OK
    led.lock_account(14, 2)
    assert led.transfer(15, 1, 2, 5, USD).code == Code.INVALID_ACCOUNT_STATE
    assert led.transfer(16, 2, 1, 5, USD).code == Code.INVALID_ACCOUNT_STATE
    assert led.get_account(1)["available"] == 95


def test_128_bit_amounts_and_overflow():
    wei = 10 ** 18
    big = 10 ** 20 * wei                     # 10^38 minor units: needs more than 64 bits
    led = make((1, "ETH", None), (2, "ETH", None))
    assert led.transfer(1, 1, 2, big, "ETH").code == Code.OK
    assert led.get_account(2)["available"] == big and led.get_account(1)["available"] == -big
    top = (1 << 127) - 1
    assert led.transfer(2, 1, 2, top, "ETH").code == Code.OVERFLOW
    assert led.batch_balance_operation(3, [(2, top, "ETH")]).code == Code.OVERFLOW
    assert led.get_account(2)["available"] == big
    with pytest.raises(ValueError):
        led.transfer(4, 1, 2, 1 << 127, "ETH")
    with pytest.raises(ValueError):
        led.transfer(5, 1, 2, -(1 << 127) - 1, "ETH")
    assert led.result_of(4) is None


def test_uuid_and_large_ids():
    led = Ledger()
    a, b = uuid.uuid4(), uuid.uuid4()
    assert led.create_account(uuid.uuid4(), a, USD, None).code == Code.OK
    assert led.create_account((1 << 128) - 1, b, USD).code == Code.OK
    assert led.transfer(uuid.uuid4(), a, b, 5, USD).code == Code.OK
    assert led.get_account(b.int)["available"] == 5
    assert led.result_of((1 << 128) - 1).code == Code.OK
    with pytest.raises(ValueError):
        led.get_account(1 << 128)
    with pytest.raises(ValueError):
        led.transfer(-1, a, b, 5, USD)
    with pytest.raises(TypeError):
        led.transfer("7", a, b, 5, USD)
    with pytest.raises(TypeError):
        led.transfer(True, a, b, 5, USD)
    assert led.transfer(np.uint64(9), a, b, 1, USD).code == Code.OK        # numpy integers are ints too


# ----------------------------------------------------------------------------------- exactly-once
def test_duplicates_return_the_original_result_and_emit_nothing():
    led = make((1, USD), (2, USD))
    fund(led, 10, 1, 100)
    first = led.transfer(11, 1, 2, 30, USD)
    seq = led.last_seq
    again = led.transfer(11, 1, 2, 30, USD)
    assert again.duplicate and again.code == Code.OK and again.seq_num == first.seq_num
    other = led.transfer(11, 2, 1, 1, USD)          # same dedup id, different command: still the original
    assert other.duplicate and other.code == Code.OK
    assert led.last_seq == seq and led.get_account(2)["available"] == 30
    rej = led.transfer(12, 1, 2, 1000, USD)
    assert rej.code == Code.BALANCE_LIMIT_EXCEEDED and rej.seq_num == 0
    fund(led, 13, 1, 10_000)
    again = led.transfer(12, 1, 2, 1000, USD)       # a remembered rejection is not retried either
    assert again.duplicate and again.code == Code.BALANCE_LIMIT_EXCEEDED
    assert led.transfer(0, 1, 2, 1, USD).code == Code.INVALID_ID


def test_result_of_applies_nothing():
    led = make((1, USD), (2, USD))
    assert led.result_of(50) is None
    fund(led, 50, 1, 5)
    r = led.result_of(50)
    assert r.code == Code.OK and r.duplicate and r.seq_num == led.last_seq
    seq = led.last_seq
    led.result_of(51)
    assert led.last_seq == seq and led.result_of(51) is None


def test_dedup_retention_window():
    led = make((1, USD, None), (2, USD), dedup_retention=16)
    assert led.dedup_retention == 16
    for i in range(100, 140):
        assert led.transfer(i, 1, 2, 1, USD, timestamp=1000 + i).code == Code.OK
    assert led.dedup_count == 16
    assert led.result_of(139) is not None and led.result_of(100) is None
    assert led.transfer(139, 1, 2, 1, USD, timestamp=1139).duplicate
    window = led.dedup_window()
    assert window["horizon_ms"] == 1124 and window["oldest_issued_ms"] == 1124 and window["size"] == 16
    before = led.get_account(2)["available"], led.last_seq
    # past the window: the identical command (same issued time) is refused, never applied again
    r = led.transfer(100, 1, 2, 1, USD, timestamp=1100)
    assert r.code == Code.DEDUP_EXPIRED and not r.duplicate and r.seq_num == 0
    assert (led.get_account(2)["available"], led.last_seq) == before
    assert led.dedup_count == 16 and led.result_of(100) is None        # a refusal spends no window
    # a new command issued now is applied; one issued before the horizon is refused whatever its id
    assert led.transfer(1000, 1, 2, 1, USD, timestamp=1140).code == Code.OK
    assert led.transfer(1001, 1, 2, 1, USD, timestamp=1123).code == Code.DEDUP_EXPIRED


def test_past_the_window_a_retry_never_moves_money_after_many_commands():
    """The reported hole: a transfer re-sent after more than a window of other commands was applied again."""
    led = make((1, USD, None), (2, USD), dedup_retention=1 << 10)
    first = led.transfer(7, 1, 2, 5, USD, timestamp=5_000)
    assert first.code == Code.OK
    for k in range(12 * (1 << 10)):
        assert led.transfer(10_000 + k, 1, 2, 1, USD, timestamp=5_000 + k // 100).code == Code.OK
    before = led.get_account(2)["available"]
    for ts in (5_000, 0):                      # the same command; and the default (no timestamp) one
        r = led.transfer(7, 1, 2, 5, USD, timestamp=ts)
        assert r.code == Code.DEDUP_EXPIRED
    assert led.get_account(2)["available"] == before


def test_issued_in_the_future_is_refused():
    led = make((1, USD, None), (2, USD))
    ops = R.transfers([9], [1], [2], [3], USD, issued_ms=10_000 + R.ISSUED_AHEAD_MAX_MS + 1)
    res = led.apply_batch(ops, 10_000)
    assert res["code"][0] == Code.ISSUED_IN_FUTURE and led.result_of(9) is None
    ops["issued_ms"] = 10_000 + R.ISSUED_AHEAD_MAX_MS
    assert led.apply_batch(ops, 10_000)["code"][0] == Code.OK


def test_time_never_goes_back():
    """A leader whose clock is behind (after a failover) stamps older entries: events keep the newest time."""
    led = make((1, USD, None), (2, USD))
    led.apply_batch(R.transfers([50], [1], [2], [1], USD, issued_ms=9_000), 9_000)
    led.apply_batch(R.transfers([51], [1], [2], [1], USD, issued_ms=8_000), 8_000)
    evs = led.events(led.last_seq - 1, led.last_seq)
    assert evs["timestamp"].tolist() == [9_000] * 4
    assert led.dedup_window()["last_timestamp_ms"] == 9_000


M64 = (1 << 64) - 1


def _hmix(k: int) -> int:
    """engine/ledger_core.h's hmix, to build dedup ids that land in one index bucket."""
    lo, hi = k & M64, k >> 64
    x = lo ^ ((hi * 0x9E3779B97F4A7C15) & M64) ^ (hi >> 29)
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    return x ^ (x >> 33)


def _same_bucket_ids(count: int, buckets: int, start: int) -> list[int]:
    out, k = [], start
    while len(out) < count:
        if _hmix(k) & (buckets - 1) == 0:
            out.append(k)
        k += 1
    return out


def test_dedup_index_full_bucket_overflows_and_drains():
    # retention 1024: a ring of 1024 entries and 512 index buckets of 7 slots. Forty ids in one bucket:
    # seven take its slots, the rest go to the side map, and all are found; once they leave the window
    # they are all forgotten and the side map is empty again.
    led = make((1, USD, None), (2, USD), dedup_retention=1024)
    crowd = _same_bucket_ids(40, 512, 3 * 10 ** 6)
    assert all(_hmix(1_000_000 + i) & 511 for i in range(2))     # make()'s two ids sit elsewhere
    for i in crowd:
        assert led.transfer(i, 1, 2, 1, USD, timestamp=1).code == Code.OK
    assert led.memory_bytes()["dedup_overflow"] == 33
    for i in crowd:
        r = led.transfer(i, 1, 2, 1, USD, timestamp=1)
        assert r.duplicate and r.code == Code.OK
    assert led.get_account(2)["available"] == 40
    snap = Ledger.restore(led.snapshot())
    assert snap.digest() == led.digest() and snap.memory_bytes()["dedup_overflow"] == 33
    assert all(snap.result_of(i) is not None for i in crowd)
    # new ids, at most three per bucket and none in the crowded one (whose slots stay live until the
    # crowd leaves): none of them overflows
    spread, per_bucket, k = [], collections.Counter(), 5 * 10 ** 6
    while len(spread) < 1024:
        b = _hmix(k) & 511
        if b and per_bucket[b] < 3:
            per_bucket[b] += 1
            spread.append(k)
        k += 1
    for i in spread:
        assert led.transfer(i, 1, 2, 1, USD, timestamp=2).code == Code.OK
    assert led.memory_bytes()["dedup_overflow"] == 0
    assert all(led.result_of(i) is None for i in crowd)
    assert led.transfer(crowd[0], 1, 2, 1, USD, timestamp=1).code == Code.DEDUP_EXPIRED   # past the window
    assert led.transfer(crowd[0], 1, 2, 1, USD, timestamp=2).code == Code.OK     # a new command, reusing the id


def test_dedup_window_matches_a_fifo_model():
    # Random resends of old ids, many of them crowding one bucket, against a plain FIFO of the last
    # `retention` new ids: the ledger says "duplicate" exactly when the model remembers the id.
    rnd = random.Random(5)
    retention = 64                    # a ring of 64, 64 buckets
    led = make((1, USD, None), (2, USD), dedup_retention=retention)
    crowd = _same_bucket_ids(60, 64, 10 ** 7)
    pool = crowd + [rnd.getrandbits(127) + 1 for _ in range(140)]
    window: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys([1_000_000, 1_000_001])
    for step in range(6000):
        i = rnd.choice(pool)
        r = led.transfer(i, 1, 2, 1, USD, timestamp=step + 1)    # a resend of a forgotten id is a new command
        assert r.duplicate == (i in window), step
        if not r.duplicate:
            window[i] = None
            if len(window) > retention:
                window.popitem(last=False)
        assert led.dedup_count == len(window)
    assert all(led.result_of(i) is not None for i in window)
    assert sum(led.result_of(i) is not None for i in pool) == len(window)
    assert led.get_account(2)["available"] == led.last_seq - 2        # every new id moved 1 (two creates)


# --------------------------------------------------------------------------- batch balance operation
def test_batch_balance_operation_all_or_nothing():
    led = make((1, USD), (2, USD), (3, "EUR"))
    r = led.batch_balance_operation(1, [(1, 100, USD), (2, 50, USD), (1, -30, USD)])
    assert r.code == Code.OK
    assert led.get_account(1)["available"] == 70 and led.get_account(1)["version"] == 2
    assert len(led.events(r.seq_num, r.seq_num)) == 3
    before = led.digest()
    assert led.batch_balance_operation(2, [(1, -10, USD), (2, -51, USD)]).code == Code.BALANCE_LIMIT_EXCEEDED
    assert led.batch_balance_operation(3, [(1, 10, USD), (99, 1, USD)]).code == Code.ACCOUNT_NOT_FOUND
    assert led.batch_balance_operation(4, [(1, 10, USD), (3, 1, USD)]).code == Code.CURRENCY_MISMATCH
    assert led.batch_balance_operation(5, [(1, 0, USD)]).code == Code.INVALID_AMOUNT
    assert led.batch_balance_operation(6, []).code == Code.INVALID_AMOUNT
    assert led.batch_balance_operation(7, [(1, 1, USD)], [(2, 49)]).code == Code.PRECONDITION_FAILED
    assert led.batch_balance_operation(8, [(1, 1, USD)], [(98, 0)]).code == Code.ACCOUNT_NOT_FOUND
    led2_digest = led.digest()
    assert led2_digest != before          # rejections are remembered (dedup table) ...
    assert led.get_account(1)["available"] == 70 and led.get_account(2)["available"] == 50   # ... nothing moved
    assert led.batch_balance_operation(9, [(1, 1, USD)], [(2, 50), (1, 70)]).code == Code.OK
    led.lock_account(10, 2)
    assert led.batch_balance_operation(11, [(2, 1, USD)]).code == Code.INVALID_ACCOUNT_STATE


def test_batch_too_large():
    led = make((1, USD, None))
    specs = [(1, 1, USD)] * (R.GROUP_SPECS_MAX + 1)
    assert led.batch_balance_operation(1, specs).code == Code.BATCH_TOO_LARGE
    assert led.tcc_try(2, 5, specs).code == Code.BATCH_TOO_LARGE
    assert led.batch_balance_operation(3, specs[:R.GROUP_SPECS_MAX]).code == Code.OK
    with pytest.raises(ValueError):
        led.batch_balance_operation(4, [(1, 1, USD)] * R.BATCH_SIZE_MAX)


# ---------------------------------------------------------------------------------- reserve/release
def test_reserve_and_release():
    led = make((1, USD))
    fund(led, 1, 1, 100)
    assert led.reserve(2, 1, 500, 30).code == Code.OK
    assert led.reserve(3, 1, 500, 20).code == Code.OK              # adds to the reservation
    acc = led.get_account(1)
    assert acc["available"] == 50 and acc["reserved"] == 50 and acc["reservations"] == {500: 50}
    assert led.reserve(4, 1, 501, 51).code == Code.BALANCE_LIMIT_EXCEEDED
    assert led.reserve(5, 1, 501, 0).code == Code.INVALID_AMOUNT
    assert led.reserve(6, 1, 0, 1).code == Code.INVALID_ID
    assert led.reserve(7, 9, 501, 1).code == Code.ACCOUNT_NOT_FOUND
    assert led.release(8, 1, 501).code == Code.RESERVATION_NOT_FOUND
    assert led.release(9, 1, 500, 51).code == Code.RESERVATION_INSUFFICIENT
    assert led.release(10, 1, 500, 0).code == Code.INVALID_AMOUNT
    assert led.release(11, 1, 500, 10).code == Code.OK               # partial
    assert led.get_account(1)["reservations"] == {500: 40}
    assert led.release(12, 1, 500).code == Code.OK                   # full
    acc = led.get_account(1)
    assert acc["available"] == 100 and acc["reserved"] == 0 and acc["reservations"] == {}
    led.lock_account(13, 1)
    assert led.reserve(14, 1, 502, 1).code == Code.INVALID_ACCOUNT_STATE


def test_release_respects_upper_limit():
    led = make((1, USD, 0, 100))
    fund(led, 1, 1, 100)
    assert led.reserve(2, 1, 7, 60).code == Code.OK
    fund(led, 3, 1, 60)
    assert led.release(4, 1, 7).code == Code.BALANCE_LIMIT_EXCEEDED
    assert led.get_account(1)["reserved"] == 60


# ------------------------------------------------------------------------------------------------ TCC
def test_tcc_try_confirm():
    led = make((1, USD), (2, USD))
    fund(led, 1, 1, 100)
    assert led.tcc_try(2, 900, [(1, -40, USD), (2, 40, USD)]).code == Code.OK
    a1, a2 = led.get_account(1), led.get_account(2)
    assert a1["available"] == 60 and a1["pending_out"] == {900: 40}
    assert a2["available"] == 0 and a2["pending_in"] == {900: 40}
    assert led.tcc_confirm(3, 900).code == Code.OK
    a1, a2 = led.get_account(1), led.get_account(2)
    assert (a1["available"], a1["pending_out"], a2["available"], a2["pending_in"]) == (60, {}, 40, {})
    assert led.tcc_confirm(4, 900).code == Code.TXN_ALREADY_CONFIRMED
    assert led.tcc_cancel(5, 900).code == Code.TXN_ALREADY_CONFIRMED
    assert led.tcc_try(6, 900, [(1, -1, USD)]).code == Code.TXN_ALREADY_EXISTS


def test_tcc_try_cancel_and_codes():
    led = make((1, USD), (2, USD, 0, 50), (3, "EUR"))
    fund(led, 1, 1, 100)
    assert led.tcc_confirm(2, 1).code == Code.TXN_NOT_FOUND
    assert led.tcc_cancel(3, 99).code == Code.NULL_CANCELLED       # never tried: a tombstone (tests/test_ledger_tcc.py)
    assert led.tcc_try(4, 0, [(1, -1, USD)]).code == Code.INVALID_ID
    assert led.tcc_try(5, 1, []).code == Code.INVALID_AMOUNT
    assert led.tcc_try(6, 1, [(1, 0, USD)]).code == Code.INVALID_AMOUNT
    assert led.tcc_try(7, 1, [(1, -101, USD)]).code == Code.BALANCE_LIMIT_EXCEEDED
    assert led.tcc_try(8, 1, [(2, 51, USD)]).code == Code.BALANCE_LIMIT_EXCEEDED      # upper limit at try
    assert led.tcc_try(9, 1, [(3, 1, USD)]).code == Code.CURRENCY_MISMATCH
    assert led.tcc_try(10, 1, [(77, 1, USD)]).code == Code.ACCOUNT_NOT_FOUND
    assert led.tcc_try(11, 1, [(1, -30, USD), (2, 30, USD)]).code == Code.OK
    assert led.tcc_try(12, 2, [(2, 21, USD)]).code == Code.BALANCE_LIMIT_EXCEEDED     # counts pending_in
    assert led.tcc_cancel(13, 1).code == Code.OK
    assert led.get_account(1)["available"] == 100 and led.get_account(2)["pending_in"] == {}
    assert led.tcc_cancel(14, 1).code == Code.TXN_ALREADY_CANCELLED
    assert led.tcc_confirm(15, 1).code == Code.TXN_ALREADY_CANCELLED
    led.lock_account(16, 1)
    assert led.tcc_try(17, 3, [(1, -1, USD)]).code == Code.INVALID_ACCOUNT_STATE


# ---------------------------------------------------------------------------------------- compensate
def test_compensate_transfer_and_batch():
    led = make((1, USD), (2, USD))
    fund(led, 1, 1, 100)
    assert led.transfer(2, 1, 2, 30, USD).code == Code.OK
    r = led.compensate(3, 2)
    assert r.code == Code.OK
    assert led.get_account(1)["available"] == 100 and led.get_account(2)["available"] == 0
    assert led.compensate(4, 2).code == Code.ORIGINAL_COMPENSATED
    assert led.compensate(3, 2).duplicate
    assert led.compensate(5, 1).code == Code.OK                      # the funding batch
    assert led.get_account(1)["available"] == 0
    assert led.compensate(6, 6).code == Code.INVALID_ID
    assert led.compensate(7, 0).code == Code.INVALID_ID


def test_null_compensate_refuses_the_late_original():
    led = make((1, USD), (2, USD))
    fund(led, 1, 1, 100)
    r = led.compensate(10, 20)
    assert r.code == Code.NULL_COMPENSATED and r.seq_num > 0
    late = led.transfer(20, 1, 2, 5, USD)
    assert late.code == Code.ORIGINAL_COMPENSATED and not late.duplicate
    assert led.get_account(2)["available"] == 0
    assert led.compensate(11, 20).code == Code.ORIGINAL_COMPENSATED


def test_compensate_rejected_original_and_not_compensatable():
    led = make((1, USD), (2, USD))
    assert led.transfer(1, 1, 2, 5, USD).code == Code.BALANCE_LIMIT_EXCEEDED
    assert led.compensate(2, 1).code == Code.OK                      # nothing to undo
    assert led.compensate(3, 1).code == Code.ORIGINAL_COMPENSATED
    assert led.lock_account(4, 1).code == Code.OK
    assert led.compensate(5, 4).code == Code.NOT_COMPENSATABLE


def test_compensate_can_fail_on_limits_and_be_retried():
    led = make((1, USD), (2, USD), (3, USD))
    fund(led, 1, 1, 100)
    assert led.transfer(2, 1, 2, 100, USD).code == Code.OK
    assert led.transfer(3, 2, 3, 100, USD).code == Code.OK           # the money moved on
    assert led.compensate(4, 2).code == Code.BALANCE_LIMIT_EXCEEDED
    assert led.transfer(5, 3, 2, 100, USD).code == Code.OK
    assert led.compensate(6, 2).code == Code.OK
    assert led.get_account(1)["available"] == 100
    led.delete_account(7, 3)
    assert led.compensate(8, 5).code == Code.INVALID_ACCOUNT_STATE  # the payee account is gone


# --------------------------------------------------------------------------------------------- events
def test_events_are_gap_free_and_range_checked():
    led = make((1, USD, None), (2, USD))
    for i in range(10):
        led.transfer(100 + i, 1, 2, 1, USD)
        led.transfer(200 + i, 1, 2, 0, USD)                           # rejected: no event
    ev = led.events(1, led.last_seq)
    seqs = np.unique(ev["seq_num"])
    assert list(seqs) == list(range(1, led.last_seq + 1))
    with pytest.raises(ValueError):
        led.events(0, 1)
    assert (led.events(1, led.last_seq + 5) == ev).all()             # past the newest seq: what exists
    assert len(led.events(led.last_seq + 1, led.last_seq + 9)) == 0


def test_event_retention_window():
    led = make((1, USD, None), (2, USD), event_retention=4096)
    for i in range(5000):
        led.transfer(100 + i, 1, 2, 1, USD)
    last = led.last_seq
    ev = led.events(last - 1000, last)
    assert len(ev) == 2002 and ev["seq_num"][0] == last - 1000
    with pytest.raises(ValueError, match="no longer retained"):
        led.events(1, 10)


# ------------------------------------------------------------------------------- snapshot and digest
def _workload(led):
    led.create_account(1, 1, USD, None)
    led.create_account(2, 2, USD)
    led.create_account(3, 3, "BTC", None, 10 ** 30)
    led.transfer(4, 1, 2, 50, USD)
    led.reserve(5, 2, 9, 20)
    led.tcc_try(6, 33, [(2, -10, USD), (1, 10, USD)])
    led.tcc_try(7, 34, [(1, -5, USD)])
    led.tcc_confirm(8, 34)
    led.batch_balance_operation(9, [(3, 10 ** 25, "BTC")])
    led.compensate(10, 99)
    led.lock_account(11, 1)
    led.transfer(12, 2, 1, 1, USD)                                    # rejected, remembered


def test_snapshot_restore_round_trip_and_digest():
    a, b = Ledger(), Ledger(initial_capacity=1)
    _workload(a)
    _workload(b)
    assert a.digest() == b.digest()                                   # independent of capacity
    c = Ledger.restore(a.snapshot())
    assert c.digest() == a.digest()
    for aid in (1, 2, 3):
        assert c.get_account(aid) == a.get_account(aid)
    assert (c.events(1, c.last_seq) == a.events(1, a.last_seq)).all()
    assert c.transfer(12, 2, 1, 1, USD).duplicate                      # dedup state survived
    assert c.transfer(99, 1, 2, 1, USD).code == Code.ORIGINAL_COMPENSATED
    assert c.tcc_confirm(13, 33).code == Code.OK and a.tcc_confirm(13, 33).code == Code.OK
    assert c.digest() == a.digest()
    a.transfer(14, 2, 3, 1, USD)
    assert c.digest() != a.digest()


def test_restore_rejects_corruption():
    led = Ledger()
    _workload(led)
    snap = bytearray(led.snapshot())
    snap[100] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        Ledger.restore(bytes(snap))
    with pytest.raises(ValueError):
        Ledger.restore(b"nonsense")
    with pytest.raises(TypeError):
        Ledger.restore(12)


# --------------------------------------------------------------------------------------- apply_batch
def _group(kind, dedup, members, other=0):
    ops = R.empty_ops(1 + len(members))
    R.put_u128(ops["dedup_id"], [dedup] * len(ops))
    ops["kind"][0] = kind
    ops["group_size"][0] = len(ops)
    R.put_u128(ops["other_id"][0:1], [other])
    for k, (mkind, aid, amount, cur) in enumerate(members, start=1):
        ops["kind"][k] = mkind
        R.put_u128(ops["account_id"][k:k + 1], [aid])
        R.put_i128(ops["amount"][k:k + 1], [amount])
        ops["currency"][k] = cur
    return ops


def test_apply_batch_matches_per_call_api():
    a, b = Ledger(), Ledger()
    for led in (a, b):
        led.create_account(1, 1, USD, None)
        led.create_account(2, 2, USD)
    n = 1000
    ops = R.transfers(np.arange(10, 10 + n), np.ones(n, np.int64), np.full(n, 2), np.arange(1, n + 1), USD,
                      issued_ms=5)
    res = a.apply_batch(ops, timestamp=5)
    assert (res["code"] == 0).all() and list(res["seq_num"]) == list(range(3, 3 + n))
    for k in range(n):
        assert b.transfer(10 + k, 1, 2, k + 1, USD, timestamp=5).code == Code.OK
    assert a.digest() == b.digest()
    again = a.apply_batch(ops)
    assert (again["flags"] == R.ResultFlag.DUPLICATE).all() and a.last_seq == 2 + n


def test_apply_batch_groups():
    led = Ledger()
    led.create_account(1, 1, USD, None)
    led.create_account(2, 2, USD)
    batch = np.concatenate([
        _group(R.Kind.BATCH_BALANCE, 10, [(R.Kind.SPEC, 1, -5, b"USD"), (R.Kind.SPEC, 2, 5, b"USD"),
                                          (R.Kind.PRECONDITION, 2, 0, b"")]),
        _group(R.Kind.TCC_TRY, 11, [(R.Kind.SPEC, 2, -5, b"USD"), (R.Kind.SPEC, 1, 5, b"USD")], other=77),
    ])
    res = led.apply_batch(batch)
    assert list(res["code"]) == [0] * 7
    assert list(res["seq_num"]) == [3, 3, 3, 3, 4, 4, 4]
    assert led.get_account(2)["pending_out"] == {77: 5}


@pytest.mark.parametrize("mutate, message", [
    (lambda ops: ops["kind"].__setitem__(1, 99), "unknown operation kind"),
    (lambda ops: ops["kind"].__setitem__(1, R.Kind.SPEC), "outside a group"),
    (lambda ops: ops["reserved"].__setitem__(1, 1), "reserved bytes"),
    (lambda ops: ops["group_size"].__setitem__(1, 2), "group_size"),
    (lambda ops: ops["group_size"].__setitem__(1, 0), "group_size"),
    (lambda ops: ops["expires_ms"].__setitem__(1, 5), "expires_ms must be 0 except on a TCC_TRY header"),
])
def test_apply_batch_rejects_malformed_records_and_changes_nothing(mutate, message):
    led = Ledger()
    led.create_account(1, 1, USD, None)
    led.create_account(2, 2, USD)
    before = led.digest()
    ops = R.transfers(np.arange(10, 13), np.ones(3, np.int64), np.full(3, 2), np.ones(3, np.int64), USD)
    mutate(ops)
    with pytest.raises(ValueError, match=message):
        led.apply_batch(ops)
    assert led.digest() == before


def test_apply_batch_rejects_truncated_group_and_wrong_members():
    led = Ledger()
    before = led.digest()
    g = _group(R.Kind.BATCH_BALANCE, 10, [(R.Kind.SPEC, 1, 5, b"USD")])
    with pytest.raises(ValueError, match="runs past"):
        led.apply_batch(g[:1].copy())
    bad = g.copy()
    R.put_u128(bad["dedup_id"][1:2], [11])
    with pytest.raises(ValueError, match="dedup_id"):
        led.apply_batch(bad)
    t = _group(R.Kind.TCC_TRY, 12, [(R.Kind.PRECONDITION, 1, 5, b"")], other=3)
    with pytest.raises(ValueError, match="wrong kind"):
        led.apply_batch(t)
    assert led.digest() == before


def test_apply_batch_type_checks():
    led = Ledger()
    with pytest.raises(TypeError):
        led.apply_batch([1, 2])
    with pytest.raises(TypeError):
        led.apply_batch(np.zeros(3, dtype=R.RESULT_DTYPE))
    ops = R.empty_ops(4)
    with pytest.raises(ValueError):
        led.apply_batch(ops[::2])
    with pytest.raises(ValueError, match="BATCH_SIZE_MAX"):
        led.apply_batch(np.zeros(R.BATCH_SIZE_MAX + 1, dtype=R.OP_DTYPE))
    assert len(led.apply_batch(R.empty_ops(0))) == 0


def test_capacity_grows_to_many_accounts():
    led = Ledger(initial_capacity=1)
    n = 100_000
    for start in range(0, n, R.BATCH_SIZE_MAX):
        k = min(R.BATCH_SIZE_MAX, n - start)
        ops = R.empty_ops(k)
        ids = np.arange(start + 1, start + k + 1, dtype=np.int64)
        R.put_u128(ops["dedup_id"], ids)
        R.put_u128(ops["account_id"], ids * 7919)
        ops["kind"] = R.Kind.CREATE_ACCOUNT
        ops["group_size"] = 1
        ops["currency"] = b"USD"
        assert (led.apply_batch(ops)["code"] == 0).all()
    assert led.account_count == n
    assert led.get_account(7919 * 77_777)["version"] == 1
    assert led.get_account(7919 * (n + 1)) is None
    mem = led.memory_bytes()
    assert mem["account_capacity"] >= n


def test_every_code_is_reached_by_these_tests():
    # Keeps the list honest: a new Code must get a test above that produces it.
    produced = {
        Code.OK, Code.ACCOUNT_NOT_FOUND, Code.ACCOUNT_ALREADY_EXISTS, Code.INVALID_ACCOUNT_STATE,
        Code.BALANCE_LIMIT_EXCEEDED, Code.CURRENCY_MISMATCH, Code.INVALID_AMOUNT, Code.PRECONDITION_FAILED,
        Code.RESERVATION_NOT_FOUND, Code.RESERVATION_INSUFFICIENT, Code.TXN_NOT_FOUND, Code.TXN_ALREADY_EXISTS,
        Code.TXN_ALREADY_CONFIRMED, Code.TXN_ALREADY_CANCELLED, Code.BALANCE_NOT_ZERO,
        Code.INVALID_STATE_TRANSITION, Code.OVERFLOW, Code.SAME_ACCOUNT, Code.ORIGINAL_COMPENSATED,
        Code.BATCH_TOO_LARGE, Code.NULL_COMPENSATED, Code.NOT_COMPENSATABLE, Code.INVALID_LIMITS,
        Code.INVALID_CURRENCY, Code.INVALID_ID, Code.DEDUP_EXPIRED, Code.ISSUED_IN_FUTURE,
        Code.OPEN_ITEMS_LIMIT_EXCEEDED, Code.ACCOUNT_CAPACITY_EXCEEDED,
        Code.NULL_CANCELLED, Code.TXN_EXPIRED,                      # tests/test_ledger_tcc.py
    }
    assert produced == set(Code)


def test_open_items_per_account_are_limited():
    led = make((1, USD, None), (2, USD, None))
    for k in range(R.OPEN_ITEMS_MAX - 1):
        assert led.reserve(1000 + k, 1, 5000 + k, 1).code == Code.OK
    assert led.tcc_try(10, 77, [(1, -1, USD), (2, 1, USD)]).code == Code.OK      # the last open item
    assert led.reserve(11, 1, 9, 1).code == Code.OPEN_ITEMS_LIMIT_EXCEEDED
    assert led.tcc_try(12, 78, [(1, -1, USD), (2, 1, USD)]).code == Code.OPEN_ITEMS_LIMIT_EXCEEDED
    assert led.reserve(13, 1, 5000, 1).code == Code.OK                  # adding to an open one is fine
    assert led.tcc_confirm(14, 77).code == Code.OK
    assert led.reserve(15, 1, 9, 1).code == Code.OK                     # room again
    assert Ledger.restore(led.snapshot()).digest() == led.digest()


def test_tcc_try_upper_limit_counts_every_open_pending_in():
    """The aggregate of pending_in kept per account gives the same answers as summing them per try."""
    led = make((1, USD, None), (2, USD, 0, 100))
    for k in range(4):
        assert led.tcc_try(20 + k, 300 + k, [(1, -25, USD), (2, 25, USD)]).code == Code.OK
    assert led.tcc_try(30, 400, [(1, -1, USD), (2, 1, USD)]).code == Code.BALANCE_LIMIT_EXCEEDED
    assert led.tcc_cancel(31, 300).code == Code.OK
    r = Ledger.restore(led.snapshot())
    for x in (led, r):
        assert x.tcc_try(32, 401, [(1, -25, USD), (2, 25, USD)]).code == Code.OK
        assert x.tcc_try(33, 402, [(1, -1, USD), (2, 1, USD)]).code == Code.BALANCE_LIMIT_EXCEEDED
        assert x.tcc_confirm(34, 301).code == Code.OK                  # 25 moves into available
        assert x.tcc_try(35, 403, [(1, -1, USD), (2, 1, USD)]).code == Code.BALANCE_LIMIT_EXCEEDED
    assert r.digest() == led.digest()


def test_account_capacity_is_a_refusal_and_growth_keeps_every_account():
    led = Ledger(accounts_max=3000, initial_capacity=1)
    for k in range(3000):
        assert led.create_account(k + 1, 10 ** 20 + k, USD).code == Code.OK
    r = led.create_account(5000, 7, USD)
    assert r.code == Code.ACCOUNT_CAPACITY_EXCEEDED and led.account_count == 3000
    assert all(led.get_account(10 ** 20 + k)["version"] == 1 for k in range(0, 3000, 7))
    assert led.get_account(7) is None
    with pytest.raises(ValueError, match="accounts_max"):
        Ledger.restore(led.snapshot(), accounts_max=100)
    assert Ledger.restore(led.snapshot()).digest() == led.digest()


def test_spec_with_an_empty_currency_is_invalid_currency():
    led = make((1, USD, None), (2, USD))
    ops = _group(R.Kind.BATCH_BALANCE, 40, [(R.Kind.SPEC, 1, 5, b"")])
    assert led.apply_batch(ops)["code"][0] == Code.INVALID_CURRENCY
    ops = _group(R.Kind.TCC_TRY, 41, [(R.Kind.SPEC, 1, -5, b""), (R.Kind.SPEC, 2, 5, USD)], other=9)
    assert led.apply_batch(ops)["code"][0] == Code.INVALID_CURRENCY
    t = R.transfers([42], [1], [2], [1], USD)
    t["currency"] = b""
    assert led.apply_batch(t)["code"][0] == Code.INVALID_CURRENCY


def test_chain_digest_follows_state_changes_only():
    a, b = make((1, USD, None), (2, USD)), make((1, USD, None), (2, USD))
    for led in (a, b):
        led.transfer(50, 1, 2, 5, USD)
    assert a.chain_digest() == b.chain_digest()
    a.transfer(50, 1, 2, 5, USD)                       # a duplicate changes nothing
    assert a.chain_digest() == b.chain_digest()
    a.transfer(51, 1, 2, 5, USD)
    assert a.chain_digest() != b.chain_digest()
    assert Ledger.restore(a.snapshot()).chain_digest() == a.chain_digest()
