"""The PostgreSQL baseline (bench/pg_ledger.py) gives the same result codes and the same final accounts as
the embedded zwallet ledger on identical op streams, so the benchmark compares like with like.

Starts a private PostgreSQL (engine/devtools/pg_server.py: Debian's packages, installed with apt-get if missing) for
the module. If PostgreSQL or psycopg cannot be had, the tests FAIL with the reason: they never skip.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine import Ledger
from engine import records as R
from engine._ledger import OpEncoder
from engine.records import Code
from engine.devtools.workload import Workload

pytestmark = pytest.mark.bench      # benchmark-only: run with `pytest -m bench` (CI runs them)

enc = OpEncoder()


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"psycopg 3 is needed for the PostgreSQL baseline tests: pip install 'psycopg[binary]' ({exc})")
    from engine.devtools.pg_server import PostgresServer
    server = PostgresServer(tmp_path_factory.mktemp("pg"))
    try:
        server.start()
    except Exception as exc:   # noqa: BLE001 - any failure to install/start is a test failure, said clearly
        pytest.fail(f"could not install or start PostgreSQL for the baseline tests: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg(pg_server):
    from bench.pg_ledger import PgLedger
    led = PgLedger(pg_server.dsn)
    led.create_schema()            # a fresh, empty ledger for every test
    try:
        yield led
    finally:
        led.close()


def cat(*groups: np.ndarray) -> np.ndarray:
    return np.concatenate(groups) if groups else R.empty_ops(0)


def assert_same_results(mine: np.ndarray, theirs: np.ndarray, ops: np.ndarray) -> None:
    assert mine.dtype == theirs.dtype == R.RESULT_DTYPE and len(mine) == len(theirs) == len(ops)
    bad = np.flatnonzero((mine["code"] != theirs["code"]) | (mine["flags"] != theirs["flags"])
                         | (mine["kind"] != theirs["kind"])
                         | (mine["dedup_id"] != theirs["dedup_id"]).any(axis=1)
                         | ((mine["seq_num"] == 0) != (theirs["seq_num"] == 0)))
    if bad.size:
        i = int(bad[0])
        raise AssertionError(
            f"{bad.size} records differ; first at {i} (kind {R.Kind(int(ops['kind'][i])).name}, dedup "
            f"{R.get_u128(ops['dedup_id'][i:i + 1])[0]}): zwallet code {Code(int(mine['code'][i])).name} "
            f"flags {mine['flags'][i]}, postgres code {Code(int(theirs['code'][i])).name} flags {theirs['flags'][i]}")


def command_codes(res: np.ndarray) -> list[Code]:
    """One code per command: the first result record of each run of records with one dedup id."""
    d = res["dedup_id"]
    first = np.r_[True, (d[1:] != d[:-1]).any(axis=1)] if len(res) else np.zeros(0, dtype=bool)
    return [Code(int(c)) for c in res["code"][first]]


def group_boundary(ops: np.ndarray, at: int) -> int:
    """The first record index >= at that starts a command (so ops[:k] is a well-formed batch)."""
    member = (ops["kind"] == R.Kind.SPEC) | (ops["kind"] == R.Kind.PRECONDITION)
    starts = np.flatnonzero(~member)
    return int(starts[np.searchsorted(starts, at)]) if at <= starts[-1] else len(ops)


ACCOUNT_FIELDS = ("currency", "available", "reserved", "reservations", "pending_in", "pending_out",
                  "lower_limit", "upper_limit", "version")


def assert_same_accounts(zw: Ledger, pg, ids) -> None:
    for a in ids:
        mine, theirs = zw.get_account(a), pg.get_account(a)
        if mine is None or theirs is None:
            assert mine is None and theirs is None, (a, mine, theirs)
            continue
        for f in ACCOUNT_FIELDS:
            assert mine[f] == theirs[f], (a, f, mine[f], theirs[f])


class Both:
    """Applies the same batches to an embedded zwallet Ledger and to the PostgreSQL baseline."""

    def __init__(self, pg) -> None:
        self.zw = Ledger()
        self.pg = pg
        self.conn = pg.connect()

    def batch(self, ops: np.ndarray) -> np.ndarray:
        mine = self.zw.apply_batch(ops)
        theirs = self.pg.apply_batch(self.conn, ops)
        assert_same_results(mine, theirs, ops)
        return mine

    def one_by_one(self, *commands: np.ndarray) -> list[int]:
        """Each command in its own transaction (PgLedger.apply_one)."""
        codes = []
        for ops in commands:
            mine = self.zw.apply_batch(ops)
            theirs = self.pg.apply_one(self.conn, ops)
            assert_same_results(mine, theirs, ops)
            codes.append(int(mine["code"][0]))
        return codes

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def both(pg):
    b = Both(pg)
    yield b
    b.close()


def setup_accounts(both: Both) -> None:
    both.batch(cat(
        enc.create_account(1, 1, "USD", lower_limit=None),            # the bank: may go negative
        enc.create_account(2, 2, "USD"),
        enc.create_account(3, 3, "USD"),
        enc.create_account(4, 4, "USD", upper_limit=1_000),
        enc.create_account(5, 5, "EUR"),
        enc.create_account(6, 6, "USD", lower_limit=-500),
        enc.create_account(7, 2, "USD"),                              # ACCOUNT_ALREADY_EXISTS
        enc.create_account(8, 9, "USD", lower_limit=5),               # INVALID_LIMITS
        enc.create_account(9, 10, "USD", upper_limit=-1),             # INVALID_LIMITS
        enc.create_account(10, 0, "USD"),                             # INVALID_ID
        enc.create_account(7, 11, "USD"),                             # duplicate dedup id: original code
        enc.transfer(11, 1, 2, 10_000, "USD"),
        enc.transfer(12, 1, 3, 10_000, "USD"),
        enc.transfer(13, 1, 6, 100, "USD"),
    ))
    bad_currency = enc.create_account(14, 12, "USD")
    bad_currency["currency"] = b"U\x01D"
    both.batch(bad_currency)


CREATED = (1, 2, 3, 4, 5, 6, 9, 10, 11, 12)


def test_create_and_transfer_codes(both):
    setup_accounts(both)
    res = both.batch(cat(
        enc.transfer(20, 2, 3, 100, "USD"),                            # OK
        enc.transfer(21, 2, 3, 20_000, "USD"),                         # BALANCE_LIMIT_EXCEEDED (lower 0)
        enc.transfer(22, 2, 2, 1, "USD"),                              # SAME_ACCOUNT
        enc.transfer(23, 2, 99, 1, "USD"),                             # ACCOUNT_NOT_FOUND
        enc.transfer(24, 99, 2, 1, "USD"),
        enc.transfer(25, 2, 5, 1, "USD"),                              # CURRENCY_MISMATCH
        enc.transfer(26, 2, 3, 1, "EUR"),
        enc.transfer(27, 2, 4, 2_000, "USD"),                          # over 4's upper limit
        enc.transfer(28, 2, 4, 1_000, "USD"),                          # exactly at it: OK
        enc.transfer(29, 6, 3, 601, "USD"),                            # 6: 100 - 601 < -500
        enc.transfer(30, 6, 3, 601, "USD", expected_from_balance=7),   # PRECONDITION_FAILED first
        enc.transfer(31, 6, 3, 599, "USD", expected_from_balance=100, expected_to_balance=10_100),
        enc.transfer(32, 2, 3, 5, "USD", expected_to_balance=1),       # PRECONDITION_FAILED
        enc.transfer(0, 2, 3, 5, "USD"),                               # dedup 0: INVALID_ID
        enc.transfer(21, 3, 2, 1, "USD"),                              # duplicate of a rejection
        enc.transfer(20, 2, 3, 100, "USD"),                            # duplicate of an OK
    ))
    codes = res["code"].tolist()
    assert codes == [Code.OK, Code.BALANCE_LIMIT_EXCEEDED, Code.SAME_ACCOUNT, Code.ACCOUNT_NOT_FOUND,
                          Code.ACCOUNT_NOT_FOUND, Code.CURRENCY_MISMATCH, Code.CURRENCY_MISMATCH,
                          Code.BALANCE_LIMIT_EXCEEDED, Code.OK, Code.BALANCE_LIMIT_EXCEEDED,
                          Code.PRECONDITION_FAILED, Code.OK, Code.PRECONDITION_FAILED, Code.INVALID_ID,
                          Code.BALANCE_LIMIT_EXCEEDED, Code.OK]
    assert res["flags"].tolist()[14:16] == [1, 1]
    # a rejected transfer retried later stays rejected even though it would now succeed
    res = both.batch(cat(enc.transfer(21, 2, 3, 1, "USD"), enc.transfer(40, 1, 2, 20_000, "USD"),
                         enc.transfer(41, 2, 3, 20_000, "USD")))
    assert res["code"].tolist() == [Code.BALANCE_LIMIT_EXCEEDED, Code.OK, Code.OK]
    assert_same_accounts(both.zw, both.pg, CREATED + (99,))
    assert both.pg.totals("USD") == both.zw.totals("USD")


def test_one_command_per_transaction(both):
    setup_accounts(both)
    codes = both.one_by_one(
        enc.transfer(20, 2, 3, 100, "USD"), enc.transfer(21, 2, 3, 20_000, "USD"), enc.transfer(22, 2, 2, 1, "USD"),
        enc.transfer(23, 2, 99, 1, "USD"), enc.transfer(25, 2, 5, 1, "USD"), enc.transfer(26, 2, 3, 1, "EUR"),
        enc.transfer(27, 2, 4, 2_000, "USD"), enc.transfer(30, 6, 3, 600, "USD", expected_from_balance=7),
        enc.transfer(0, 2, 3, 5, "USD"), enc.transfer(21, 3, 2, 1, "USD"), enc.transfer(20, 2, 3, 100, "USD"),
        enc.batch_balance_operation(50, [(2, -10, "USD"), (3, 10, "USD")]),
        enc.reserve(51, 2, 7, 100), enc.release(52, 2, 7, 40), enc.release(53, 2, 7, None),
        enc.tcc_try(54, 900, [(2, -30, "USD"), (3, 30, "USD")]), enc.tcc_confirm(55, 900),
        enc.tcc_confirm(56, 900),
    )
    assert codes == [Code.OK, Code.BALANCE_LIMIT_EXCEEDED, Code.SAME_ACCOUNT, Code.ACCOUNT_NOT_FOUND,
                     Code.CURRENCY_MISMATCH, Code.CURRENCY_MISMATCH, Code.BALANCE_LIMIT_EXCEEDED,
                     Code.PRECONDITION_FAILED, Code.INVALID_ID, Code.BALANCE_LIMIT_EXCEEDED, Code.OK,
                     Code.OK, Code.OK, Code.OK, Code.OK, Code.OK, Code.OK, Code.TXN_ALREADY_CONFIRMED]
    assert_same_accounts(both.zw, both.pg, CREATED)


def test_batch_balance_operations(both):
    setup_accounts(both)
    too_many = [(2, 1, "USD")] * 1025
    res = both.batch(cat(
        enc.batch_balance_operation(60, [(2, -300, "USD"), (3, 100, "USD"), (6, 200, "USD")]),   # OK
        enc.batch_balance_operation(61, [(2, -300, "USD"), (2, -300, "USD"), (3, 600, "USD")]),  # same account twice
        enc.batch_balance_operation(62, [(2, -50_000, "USD"), (3, 50_000, "USD")]),              # BLE
        enc.batch_balance_operation(63, [(2, 0, "USD"), (3, 1, "USD")]),                         # INVALID_AMOUNT
        enc.batch_balance_operation(64, [(2, -1, "USD"), (99, 1, "USD")]),                       # ACCOUNT_NOT_FOUND
        enc.batch_balance_operation(65, [(99, 0, "USD")]),                                       # amount first
        enc.batch_balance_operation(66, [(2, -1, "USD"), (5, 1, "USD")]),                        # CURRENCY_MISMATCH
        enc.batch_balance_operation(67, [(2, -5, "USD"), (3, 5, "USD")], [(2, 9_100), (3, 10_700)]),
        enc.batch_balance_operation(68, [(2, -5, "USD"), (3, 5, "USD")], [(2, 1)]),              # PRECONDITION_FAILED
        enc.batch_balance_operation(69, [(2, -5, "USD"), (3, 5, "USD")], [(98, 1)]),             # ACCOUNT_NOT_FOUND
        enc.batch_balance_operation(70, [(4, 5_000, "USD"), (1, -5_000, "USD")]),                # 4's upper limit
        enc.batch_balance_operation(71, [(4, 900, "USD"), (4, 200, "USD"), (4, -300, "USD"), (1, -800, "USD")]),
        enc.batch_balance_operation(72, too_many),                                               # BATCH_TOO_LARGE
        enc.batch_balance_operation(73, [(1, 1, "USD")]),                                        # unbalanced is fine
        enc.batch_balance_operation(60, [(2, -1, "USD"), (3, 1, "USD")]),                        # duplicate
    ))
    assert command_codes(res) == [
        Code.OK, Code.OK, Code.BALANCE_LIMIT_EXCEEDED, Code.INVALID_AMOUNT, Code.ACCOUNT_NOT_FOUND,
        Code.INVALID_AMOUNT, Code.CURRENCY_MISMATCH, Code.OK, Code.PRECONDITION_FAILED, Code.ACCOUNT_NOT_FOUND,
        Code.BALANCE_LIMIT_EXCEEDED, Code.OK, Code.BATCH_TOO_LARGE, Code.OK, Code.OK]
    assert_same_accounts(both.zw, both.pg, CREATED)


def test_reserve_release(both):
    setup_accounts(both)
    res = both.batch(cat(
        enc.reserve(80, 2, 500, 1_000),              # OK
        enc.reserve(81, 2, 500, 500),                # adds to the same reservation
        enc.reserve(82, 2, 501, 100_000),            # BALANCE_LIMIT_EXCEEDED
        enc.reserve(83, 2, 0, 1),                    # INVALID_ID
        enc.reserve(84, 2, 502, 0),                  # INVALID_AMOUNT
        enc.reserve(85, 99, 502, 1),                 # ACCOUNT_NOT_FOUND
        enc.release(86, 2, 500, 200),                # partial
        enc.release(87, 2, 500, 1_301),              # RESERVATION_INSUFFICIENT (holds 1300)
        enc.release(88, 2, 777, 1),                  # RESERVATION_NOT_FOUND
        enc.release(89, 3, 500, 1),                  # another account's reservation id: NOT_FOUND
        enc.release(90, 2, 500, 0),                  # INVALID_AMOUNT
        enc.reserve(91, 6, 600, 550),                # 6: 100 - 550 >= -500: OK
        enc.reserve(92, 4, 1, 1),                    # 4 holds 0: BLE (lower 0)
        enc.release(93, 2, 500, None),               # full release of the rest
        enc.release(94, 2, 500, None),               # RESERVATION_NOT_FOUND now
        enc.reserve(95, 3, 700, 300),
        enc.reserve(80, 2, 500, 1_000),              # duplicate
    ))
    assert res["code"].tolist() == [
        Code.OK, Code.OK, Code.BALANCE_LIMIT_EXCEEDED, Code.INVALID_ID, Code.INVALID_AMOUNT,
        Code.ACCOUNT_NOT_FOUND, Code.OK, Code.RESERVATION_INSUFFICIENT, Code.RESERVATION_NOT_FOUND,
        Code.RESERVATION_NOT_FOUND, Code.INVALID_AMOUNT, Code.OK, Code.BALANCE_LIMIT_EXCEEDED, Code.OK,
        Code.RESERVATION_NOT_FOUND, Code.OK, Code.OK]
    assert_same_accounts(both.zw, both.pg, CREATED)
    # releasing into an account at its upper limit: BALANCE_LIMIT_EXCEEDED; in a later request
    res = both.batch(cat(enc.transfer(96, 2, 4, 1_000, "USD"), enc.reserve(97, 4, 800, 300),
                         enc.transfer(98, 2, 4, 300, "USD"), enc.release(99, 4, 800, None)))
    assert res["code"].tolist() == [Code.OK, Code.OK, Code.OK, Code.BALANCE_LIMIT_EXCEEDED]
    res = both.batch(cat(enc.release(100, 3, 700, 100), enc.release(101, 6, 600, None)))
    assert res["code"].tolist() == [Code.OK, Code.OK]
    assert_same_accounts(both.zw, both.pg, CREATED)
    assert both.pg.totals("USD") == both.zw.totals("USD")


def test_tcc(both):
    setup_accounts(both)
    res = both.batch(cat(
        enc.tcc_try(110, 1000, [(2, -700, "USD"), (3, 700, "USD")]),                  # OK
        enc.tcc_confirm(111, 1000),                                                    # OK
        enc.tcc_confirm(112, 1000),                                                    # TXN_ALREADY_CONFIRMED
        enc.tcc_cancel(113, 1000),                                                     # TXN_ALREADY_CONFIRMED
        enc.tcc_try(114, 1000, [(2, -1, "USD"), (3, 1, "USD")]),                       # TXN_ALREADY_EXISTS
        enc.tcc_try(115, 1001, [(2, -500, "USD"), (2, -200, "USD"), (4, 700, "USD")]),  # OK, 2 twice
        enc.tcc_cancel(116, 1001),                                                     # OK: back to 2
        enc.tcc_confirm(117, 1001),                                                    # TXN_ALREADY_CANCELLED
        enc.tcc_try(118, 1002, [(2, -100_000, "USD"), (3, 100_000, "USD")]),           # BLE (lower)
        enc.tcc_try(119, 1003, [(2, -600, "USD"), (4, 600, "USD")]),                   # OK: 4 pending_in 600
        enc.tcc_try(120, 1004, [(3, -600, "USD"), (4, 600, "USD")]),                   # BLE: 4's upper 1000
        enc.tcc_try(121, 1005, [(2, -1, "USD"), (99, 1, "USD")]),                      # ACCOUNT_NOT_FOUND
        enc.tcc_try(122, 1006, [(2, 0, "USD")]),                                       # INVALID_AMOUNT
        enc.tcc_try(123, 1007, [(2, -1, "USD"), (5, 1, "EUR")]),                       # OK: currencies per spec
        enc.tcc_try(124, 1008, [(2, -1, "USD"), (5, 1, "USD")]),                       # CURRENCY_MISMATCH
        enc.tcc_try(125, 0, [(2, -1, "USD")]),                                         # INVALID_ID
        enc.tcc_confirm(126, 4242),                                                    # TXN_NOT_FOUND
        enc.tcc_try(127, 1009, [(6, -300, "USD"), (3, 300, "USD")]),                   # OK (6 may go to -500)
        enc.tcc_try(110, 1000, [(2, -700, "USD"), (3, 700, "USD")]),                   # duplicate
    ))
    assert command_codes(res) == [
        Code.OK, Code.OK, Code.TXN_ALREADY_CONFIRMED, Code.TXN_ALREADY_CONFIRMED, Code.TXN_ALREADY_EXISTS,
        Code.OK, Code.OK, Code.TXN_ALREADY_CANCELLED, Code.BALANCE_LIMIT_EXCEEDED, Code.OK,
        Code.BALANCE_LIMIT_EXCEEDED, Code.ACCOUNT_NOT_FOUND, Code.INVALID_AMOUNT, Code.OK,
        Code.CURRENCY_MISMATCH, Code.INVALID_ID, Code.TXN_NOT_FOUND, Code.OK, Code.OK]
    assert_same_accounts(both.zw, both.pg, CREATED)
    assert both.pg.totals("USD") == both.zw.totals("USD")
    # confirm/cancel in later requests, of transactions tried earlier: their accounts are found and locked
    res = both.batch(cat(enc.tcc_confirm(130, 1003), enc.tcc_cancel(131, 1009), enc.tcc_cancel(132, 1007),
                         enc.transfer(133, 2, 4, 500, "USD")))   # 4 now holds 600 + 500 > 1000: BLE
    assert res["code"].tolist() == [Code.OK, Code.OK, Code.OK, Code.BALANCE_LIMIT_EXCEEDED]
    # a confirm that would take an account past its upper limit (money arrived after the try)
    res = both.batch(cat(enc.tcc_try(140, 1011, [(2, -300, "USD"), (4, 300, "USD")]),
                         enc.transfer(141, 2, 4, 400, "USD"), enc.tcc_confirm(142, 1011), enc.tcc_cancel(143, 1011)))
    assert command_codes(res) == [Code.OK, Code.OK, Code.BALANCE_LIMIT_EXCEEDED, Code.OK]
    both.one_by_one(enc.tcc_try(134, 1010, [(2, -5, "USD"), (3, 5, "USD")]))
    assert both.one_by_one(enc.tcc_confirm(135, 1010), enc.tcc_cancel(136, 1010)) == [
        Code.OK, Code.TXN_ALREADY_CONFIRMED]
    assert_same_accounts(both.zw, both.pg, CREATED)
    assert both.pg.totals("USD") == both.zw.totals("USD")


def test_mixed_workload(both):
    w = Workload(3_000, seed=7)
    for ops in w.create():
        res = both.batch(ops)
        assert (res["code"] == Code.OK).all()
    for _ in range(3):
        ops = w.mixed(R.BATCH_SIZE_MAX)
        both.batch(ops)
        res = both.batch(ops[:group_boundary(ops, 500)])    # a retry of part of it: all duplicates
        assert (res["flags"] == R.ResultFlag.DUPLICATE).all()
    # small balances: rejections happen too (ids shifted so transfers run out of money)
    for _ in range(2):
        ops = w.mixed(4000)
        both.batch(ops)
    ids = np.arange(1, 3_002)
    zw_avail = np.array([both.zw.get_account(int(a))["available"] for a in ids])
    np.testing.assert_array_equal(both.pg.balances(ids), zw_avail)
    assert both.pg.totals("USD") == both.zw.totals("USD")
    assert both.pg.dedup_count() == both.zw.dedup_count
    assert both.pg.total("USD") == 0           # Workload.create funds customers from the bank
    assert_same_accounts(both.zw, both.pg, ids[:200])


def test_mixed_with_rejections(both):
    """Accounts with little money, so the mixed workload's transfers, batch operations, reservations and
    TCC tries are rejected often."""
    w = Workload(50, seed=11)
    batches = w.create()
    batches[-1] = batches[-1].copy()
    R.put_i128(batches[-1]["amount"], np.full(len(batches[-1]), 900))
    for ops in batches:
        both.batch(ops)
    n_rejected = 0
    for _ in range(3):
        res = both.batch(w.mixed(3000))
        n_rejected += int((res["code"] != Code.OK).sum())
    assert n_rejected > 100
    assert_same_accounts(both.zw, both.pg, range(1, 52))


def random_command(rng: np.random.Generator, dedup_id: int) -> np.ndarray:
    """One command over a few small accounts (ids 1..9, some never created), chosen so that every
    result code of the covered kinds comes up: the stream is differential, not scripted."""
    acct = lambda: int(rng.integers(1, 10))  # noqa: E731
    amount = lambda hi: int(rng.choice([0, -1, 1, 5, hi, int(rng.integers(1, hi + 1))]))  # noqa: E731
    cur = lambda: "USD" if rng.random() < 0.9 else "EUR"  # noqa: E731
    roll = rng.random()
    if roll < 0.1:
        lo = [0, None, -100, 5][int(rng.integers(0, 4))]
        hi = [None, None, 500, -1][int(rng.integers(0, 4))]
        return enc.create_account(dedup_id, acct(), cur(), lower_limit=lo, upper_limit=hi)
    if roll < 0.45:
        a, b = acct(), acct()
        kw = {}
        if rng.random() < 0.1:
            kw["expected_from_balance"] = int(rng.integers(0, 3)) * 100
        if rng.random() < 0.1:
            kw["expected_to_balance"] = int(rng.integers(0, 3)) * 100
        return enc.transfer(dedup_id, a, b if rng.random() < 0.95 else a, amount(300), cur(), **kw)
    if roll < 0.6:
        specs = [(acct(), int(rng.integers(-200, 201)), cur()) for _ in range(int(rng.integers(0, 4)))]
        pre = [(acct(), int(rng.integers(0, 3)) * 100) for _ in range(int(rng.integers(0, 2)))] \
            if rng.random() < 0.3 else []
        return enc.batch_balance_operation(dedup_id, specs, pre)
    if roll < 0.7:
        return enc.reserve(dedup_id, acct(), int(rng.integers(0, 4)), amount(200))
    if roll < 0.8:
        return enc.release(dedup_id, acct(), int(rng.integers(0, 4)),
                           None if rng.random() < 0.4 else amount(200))
    if roll < 0.9:
        specs = [(acct(), int(rng.integers(-200, 201)), cur()) for _ in range(int(rng.integers(1, 4)))]
        return enc.tcc_try(dedup_id, int(rng.integers(0, 25)), specs)
    txn = int(rng.integers(0, 25))
    return enc.tcc_confirm(dedup_id, txn) if rng.random() < 0.6 else enc.tcc_cancel(dedup_id, txn)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_streams(both, seed):
    rng = np.random.default_rng(seed)
    both.batch(cat(*[enc.create_account(d, d, "USD", lower_limit=None if d == 1 else 0) for d in range(1, 6)],
                   *[enc.transfer(10 + d, 1, d, 500, "USD") for d in range(2, 6)]))
    seen = list(range(1, 6))
    next_dedup = 100
    codes: set[int] = set()
    for step in range(30):
        cmds = []
        for _ in range(int(rng.integers(1, 40))):
            if rng.random() < 0.1:
                d = int(rng.choice(seen))              # a retry: a duplicate, maybe of a different command
            else:
                d = next_dedup
                next_dedup += 1
                seen.append(d)
            cmds.append(random_command(rng, d))
        if step % 5 == 4:
            codes.update(both.one_by_one(*cmds))
        else:
            codes.update(int(c) for c in both.batch(cat(*cmds))["code"])
    assert_same_accounts(both.zw, both.pg, range(1, 10))
    assert both.pg.totals("USD") == both.zw.totals("USD")
    assert both.pg.totals("EUR") == both.zw.totals("EUR")
    assert len(codes) >= 12, sorted(Code(c).name for c in codes)


def test_unbatched_concurrent_exactly_once(pg, pg_server):
    """64 connections in 2 processes, one transfer per transaction, a hot account and every dedup id sent
    twice (the copies race on different connections): each applied once, balances as zwallet's."""
    from bench.pg_ledger import run_unbatched
    ids = np.arange(1, 201, dtype=np.int64)
    pg.load_accounts(ids, "USD", lower_limit=None, initial_available=0, analyze=False)
    zw = Ledger()
    for a in ids:
        zw.create_account(int(a), int(a), "USD", lower_limit=None)
    rng = np.random.default_rng(5)
    n = 1500
    a = rng.choice(ids, n)
    b = rng.choice(ids, n)
    hot = rng.random(n) < 0.5
    a[hot] = 7
    b[b == a] = np.where(a[b == a] == 1, 2, 1)
    ops = R.transfers(np.arange(1000, 1000 + n), a, b, rng.integers(1, 1000, n), "USD")
    stream = np.concatenate([ops, ops])
    stream = stream[rng.permutation(len(stream))]
    r = run_unbatched(pg_server.dsn, stream, connections=64, processes=2)
    assert (r["codes"] == Code.OK).all()
    assert int(r["duplicate"].sum()) == n
    zw.apply_batch(ops)
    np.testing.assert_array_equal(pg.balances(ids), [zw.get_account(int(x))["available"] for x in ids])
    assert pg.totals("USD")["available"] == 0
    assert pg.dedup_count() == n
    # open loop at a fixed offered rate: latencies measured from each transfer's due time
    more = R.transfers(np.arange(5000, 5300), a[:300], b[:300], np.ones(300, dtype=np.int64), "USD")
    r = run_unbatched(pg_server.dsn, more, connections=8, processes=1, rate=1000.0)
    assert (r["codes"] == Code.OK).all() and (r["latency_s"] > 0).all()
    assert r["wall_s"] >= 0.25


def test_concurrent_batches_exactly_once(pg, pg_server):
    """Batches on 3 connections at once. Overlapping accounts: row locks taken in id order, so they queue
    (no deadlock) and a batch sent twice finds its first copy's dedup rows. Disjoint accounts but the
    same dedup ids: both run at once, the second to insert its dedup rows fails (unique violation), is
    rolled back and retried, and then returns duplicates. Every dedup id is applied once."""
    from bench.pg_ledger import run_batched
    ids = np.arange(1, 401, dtype=np.int64)
    pg.load_accounts(ids, "USD", lower_limit=None, initial_available=0, analyze=False)
    rng = np.random.default_rng(9)

    def batch(first_dedup: int, lo: int, hi: int, n: int = 500) -> np.ndarray:
        a = rng.integers(lo, hi, n)
        b = rng.integers(lo, hi, n)
        b[b == a] = np.where(a[b == a] == lo, lo + 1, lo)
        return R.transfers(np.arange(first_dedup, first_dedup + n), a, b, rng.integers(1, 100, n), "USD")

    shared = [batch(10_000 * (k + 1), 1, 301) for k in range(4)]            # accounts 1..300
    twins = [(batch(100_000 * (k + 1), 1, 201), batch(100_000 * (k + 1), 201, 401)) for k in range(4)]
    overlap = np.concatenate([shared[0][250:], shared[1][:250]])           # half of two batches
    stream = [*shared, *shared[:2], overlap]
    for x, y in twins:                                                     # twins side by side: concurrent
        stream += [x, y]
    r = run_batched(pg_server.dsn, stream, connections=3)
    res = r["results"]
    assert all((x["code"] == Code.OK).all() for x in res)
    zw = Ledger()
    for x in ids:
        zw.create_account(int(x), int(x), "USD", lower_limit=None)
    for b in shared:
        zw.apply_batch(b)
    for k, (x, y) in enumerate(twins):                                    # exactly one twin applied
        rx, ry = res[7 + 2 * k], res[8 + 2 * k]
        assert {int(rx["flags"].max()), int(ry["flags"].max())} == {0, 1}
        assert (rx["flags"] == rx["flags"][0]).all() and (ry["flags"] == ry["flags"][0]).all()
        zw.apply_batch(x if rx["flags"][0] == 0 else y)
    assert sum(int((x["flags"] == 0).sum()) for x in res) == 8 * 500
    np.testing.assert_array_equal(pg.balances(ids), [zw.get_account(int(x))["available"] for x in ids])
    assert pg.dedup_count() == 8 * 500


def test_not_covered_kinds_raise(pg):
    conn = pg.connect()
    with pytest.raises(NotImplementedError):
        pg.apply_batch(conn, enc.lock_account(1, 1))
    with pytest.raises(ValueError):
        pg.apply_batch(conn, enc.transfer(1, 2**64, 3, 1, "USD"))
    conn.close()
