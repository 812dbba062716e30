"""Conservation: the sum over accounts of available + reserved + pending_out changes only by the net of
applied batch balance operations (and their compensations) and of confirmed unbalanced TCC specs."""
import random

import numpy as np
import pytest

from engine import Code, Ledger
from engine import records as R

N_ACCOUNTS = 200


def held(led):
    t = led.totals("USD")
    return t["available"] + t["reserved"] + t["pending_out"]


@pytest.mark.parametrize("seed", range(6))
def test_money_is_conserved_under_a_random_workload(seed):
    rng = random.Random(seed)
    led = Ledger()
    for aid in range(1, N_ACCOUNTS + 1):
        assert led.create_account(aid, aid, "USD", lower_limit=rng.choice([0, 0, -100, None])).code == Code.OK
    expected = 0
    dedup = 10_000
    batch_nets = {}
    tried = {}
    for step in range(400):
        dedup += 1
        what = rng.random()
        before = held(led)
        if what < 0.35:     # a batch of transfers through apply_batch: moves money, never creates it
            n = rng.randint(1, 300)
            ops = R.transfers(np.arange(dedup, dedup + n), np.array([rng.randint(1, N_ACCOUNTS) for _ in range(n)]),
                              np.array([rng.randint(1, N_ACCOUNTS) for _ in range(n)]),
                              np.array([rng.randint(-2, 50) for _ in range(n)]), "USD")
            dedup += n
            led.apply_batch(ops)
        elif what < 0.5:
            specs = [(rng.randint(1, N_ACCOUNTS), rng.randint(-30, 60), "USD") for _ in range(rng.randint(1, 4))]
            if led.batch_balance_operation(dedup, specs).code == Code.OK:
                expected += sum(a for _, a, _ in specs)
                batch_nets[dedup] = sum(a for _, a, _ in specs)
        elif what < 0.6 and batch_nets:
            orig = rng.choice(list(batch_nets))
            if led.compensate(dedup, orig).code == Code.OK:
                expected -= batch_nets.pop(orig)
        elif what < 0.72:
            aid, rid = rng.randint(1, N_ACCOUNTS), rng.randint(1, 5)
            if rng.random() < 0.5:
                led.reserve(dedup, aid, rid, rng.randint(1, 40))
            else:
                led.release(dedup, aid, rid, rng.choice([None, rng.randint(1, 20)]))
        elif what < 0.85:
            txn = rng.randint(1, 10 ** 9)
            specs = [(rng.randint(1, N_ACCOUNTS), rng.choice([-1, 1]) * rng.randint(1, 30), "USD")
                     for _ in range(rng.randint(1, 3))]
            if led.tcc_try(dedup, txn, specs).code == Code.OK:
                tried[txn] = sum(a for _, a, _ in specs)
        elif tried:
            txn = rng.choice(list(tried))
            if rng.random() < 0.6:
                if led.tcc_confirm(dedup, txn).code == Code.OK:
                    expected += tried.pop(txn)
            elif led.tcc_cancel(dedup, txn).code == Code.OK:
                tried.pop(txn)
        else:
            led.transfer(dedup, rng.randint(1, N_ACCOUNTS), rng.randint(1, N_ACCOUNTS), rng.randint(1, 40), "USD")
        assert held(led) == expected, (seed, step, before)
        if led.result_of(dedup) is not None:       # a retry of anything changes nothing
            seq = led.last_seq
            assert led.transfer(dedup, 1, 2, 1, "USD").duplicate
            assert led.last_seq == seq and held(led) == expected
    per_account = sum(a["available"] + a["reserved"] + sum(a["pending_out"].values())
                      for a in (led.get_account(i) for i in range(1, N_ACCOUNTS + 1)))
    assert per_account == expected


def test_model_and_ledger_agree_on_raw_record_batches():
    """The mixed op-record batches of the benchmark and the demo, through both apply_batch paths."""
    from engine.devtools.workload import Workload
    from tests.ledger_model import ModelLedger
    led, model = Ledger(), ModelLedger()
    work = Workload(300, seed=3)
    for ops in work.create():
        res = led.apply_batch(ops)
        mres = model.apply_batch(ops)
        assert list(res["code"]) == [r.code for r in mres]
    for _ in range(5):
        ops = work.mixed(2000)
        res = led.apply_batch(ops, 9)
        mres = model.apply_batch(ops, 9)
        assert list(res["code"]) == [int(r.code) for r in mres]
        assert list(res["seq_num"]) == [r.seq_num for r in mres]
    for aid in range(1, 302):
        assert led.get_account(aid) == model.get_account(aid)
