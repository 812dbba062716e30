"""Model-based test: random command sequences against the Cython ledger and the pure-Python model
(tests/ledger_model.py); every result and every account must agree after every step."""
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine import Ledger
from engine.records import I128_MAX
from tests.ledger_model import ModelLedger

ACCOUNTS = st.integers(1, 6)        # 1-5 exist from the start (5 is an unbounded "bank"); 6 may be created
CURRENCIES = st.sampled_from(["USD", "EUR"])
RESERVATIONS = st.integers(0, 3)
TXNS = st.integers(0, 12)
AMOUNTS = st.one_of(st.integers(-5, 60), st.integers(-5, 60), st.integers(-5, 60),
                    st.sampled_from([I128_MAX, I128_MAX - 10, -I128_MAX, 10 ** 30]))
LIMITS = st.one_of(st.none(), st.integers(-100, 100))


class LedgerVsModel(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.ledger = Ledger(dedup_retention=1 << 12, event_retention=1 << 16)
        self.model = ModelLedger()
        self.next_dedup = 1
        self.used: list[int] = []
        self.now = 1000                 # every command's timestamp (the entry's time); see advance_time
        setup = [("USD", 0, None), ("USD", -50, None), ("USD", 0, 150), ("EUR", 0, None), ("USD", None, None)]
        for aid, (cur, lo, hi) in enumerate(setup, start=1):
            self.both("create_account", self.dedup(None), aid, cur, lower_limit=lo, upper_limit=hi)
        self.both("batch_balance_operation", self.dedup(None),
                  [(1, 100, "USD"), (2, 100, "USD"), (3, 100, "USD"), (5, -300, "USD")])

    # dedup ids: usually new, sometimes one used before (a retry, or another command reusing it)
    def dedup(self, reuse):
        if reuse is not None and self.used:
            return self.used[reuse % len(self.used)]
        d = self.next_dedup
        self.next_dedup += 1
        self.used.append(d)
        return d

    def both(self, method, *args, **kwargs):
        kwargs.setdefault("timestamp", self.now)
        real = getattr(self.ledger, method)(*args, **kwargs)
        model = getattr(self.model, method)(*args, **kwargs)
        assert (real.code, real.duplicate, real.seq_num) == (model.code, model.duplicate, model.seq_num), \
            (method, args, kwargs, real, model)
        if real.seq_num and not real.duplicate:
            parts = len(self.ledger.events(real.seq_num, real.seq_num))
            assert parts == self.model.event_parts[real.seq_num - 1]
        return real

    REUSE = st.one_of(st.none(), st.none(), st.none(), st.none(), st.none(), st.integers(0, 1000))

    @rule(reuse=REUSE, aid=ACCOUNTS, cur=CURRENCIES, lo=LIMITS, hi=LIMITS)
    def create(self, reuse, aid, cur, lo, hi):
        self.both("create_account", self.dedup(reuse), aid, cur, lower_limit=lo, upper_limit=hi)

    @rule(reuse=REUSE, aid=ACCOUNTS, what=st.sampled_from(["lock_account", "unlock_account", "delete_account"]))
    def state(self, reuse, aid, what):
        self.both(what, self.dedup(reuse), aid)

    @rule(reuse=REUSE, aid=ACCOUNTS, lo=st.one_of(st.just(...), LIMITS), hi=st.one_of(st.just(...), LIMITS))
    def update(self, reuse, aid, lo, hi):
        kw = {}
        if lo is not ...:
            kw["lower_limit"] = lo
        if hi is not ...:
            kw["upper_limit"] = hi
        self.both("update_account_config", self.dedup(reuse), aid, **kw)

    @rule(reuse=REUSE, a=ACCOUNTS, b=ACCOUNTS, amount=AMOUNTS, cur=CURRENCIES,
          ef=st.one_of(st.none(), st.integers(-10, 60)), et=st.one_of(st.none(), st.integers(-10, 60)))
    def transfer(self, reuse, a, b, amount, cur, ef, et):
        self.both("transfer", self.dedup(reuse), a, b, amount, cur, ef, et)

    @rule(reuse=REUSE, specs=st.lists(st.tuples(ACCOUNTS, AMOUNTS, CURRENCIES), max_size=4),
          pre=st.lists(st.tuples(ACCOUNTS, st.integers(-5, 60)), max_size=2))
    def batch(self, reuse, specs, pre):
        self.both("batch_balance_operation", self.dedup(reuse), specs, pre)

    @rule(reuse=REUSE, aid=ACCOUNTS, rid=RESERVATIONS, amount=AMOUNTS)
    def reserve(self, reuse, aid, rid, amount):
        self.both("reserve", self.dedup(reuse), aid, rid, amount)

    @rule(reuse=REUSE, aid=ACCOUNTS, rid=RESERVATIONS, amount=st.one_of(st.none(), AMOUNTS))
    def release(self, reuse, aid, rid, amount):
        self.both("release", self.dedup(reuse), aid, rid, amount)

    # expires: 0 (never), or relative to now (<= 0: already past, refused)
    @rule(reuse=REUSE, txn=TXNS, specs=st.lists(st.tuples(ACCOUNTS, AMOUNTS, CURRENCIES), max_size=3),
          expires=st.one_of(st.just(None), st.integers(-5, 5), st.integers(0, 3000)))
    def tcc_try(self, reuse, txn, specs, expires):
        self.both("tcc_try", self.dedup(reuse), txn, specs,
                  expires_ms=0 if expires is None else max(1, self.now + expires))

    # a try that usually applies (so expiry, and a cancel refused by 3's upper limit, are reached often)
    @rule(reuse=REUSE, txn=TXNS, a=st.sampled_from([1, 2, 3, 5]), b=st.sampled_from([3, 5]),
          amount=st.integers(1, 40), expires=st.integers(1, 3000))
    def tcc_try_expiring(self, reuse, txn, a, b, amount, expires):
        self.both("tcc_try", self.dedup(reuse), txn, [(a, -amount, "USD"), (b, amount, "USD")],
                  expires_ms=self.now + expires)

    @rule(dt=st.one_of(st.integers(0, 10), st.integers(0, 2500)))
    def advance_time(self, dt):
        self.now += dt

    @rule(reuse=REUSE, txn=TXNS, confirm=st.booleans())
    def tcc_finish(self, reuse, txn, confirm):
        self.both("tcc_confirm" if confirm else "tcc_cancel", self.dedup(reuse), txn)

    @rule(reuse=REUSE, orig=st.one_of(st.integers(0, 1000), st.integers(10 ** 7, 10 ** 7 + 5)))
    def compensate(self, reuse, orig):
        original = self.used[orig % len(self.used)] if (orig < 10 ** 7 and self.used) else orig
        self.both("compensate", self.dedup(reuse), original)

    @rule(reuse=st.integers(0, 1000))
    def result_of(self, reuse):
        if self.used:
            d = self.used[reuse % len(self.used)]
            real, model = self.ledger.result_of(d), self.model.result_of(d)
            assert (real is None) == (model is None)
            if real is not None:
                assert (real.code, real.seq_num) == (model.code, model.seq_num)

    @precondition(lambda self: self.ledger.last_seq % 7 == 3)
    @rule()
    def snapshot_round_trip(self):
        restored = Ledger.restore(self.ledger.snapshot())
        assert restored.digest() == self.ledger.digest()
        self.ledger = restored

    @invariant()
    def same_accounts(self):
        assert self.ledger.last_seq == self.model.last_seq
        for aid in range(1, 7):
            assert self.ledger.get_account(aid) == self.model.get_account(aid), aid
        for cur in ("USD", "EUR"):
            assert self.ledger.totals(cur) == self.model.totals(cur)

    @invariant()
    def bookkeeping_is_consistent(self):
        self.ledger._check_invariants()

    @invariant()
    def events_are_gap_free(self):
        if self.ledger.last_seq:
            seqs = np.unique(self.ledger.events(1, self.ledger.last_seq)["seq_num"])
            assert len(seqs) == self.ledger.last_seq and seqs[-1] == self.ledger.last_seq


LedgerVsModel.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestLedgerVsModel = LedgerVsModel.TestCase
