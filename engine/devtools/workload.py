"""Generators of realistic op-record batches, shared by the demo and the benchmarks.

A ``Workload`` hands out fresh dedup, reservation and txn ids (never repeated), so every batch it makes is
new work, and a retry of the same bytes is a duplicate.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

from engine import records as R

BANK = 1                 # the funding account (may go negative)
CURRENCY = "USD"
FUNDING = 1_000_000      # minor units per account


class Workload:
    def __init__(self, accounts: int, seed: int | Sequence[int] = 1, first_account: int = 2) -> None:
        self.accounts = accounts
        self.first_account = first_account
        self.rng = np.random.default_rng(seed)
        self.next_dedup = 1
        self.next_txn = 1

    def ids(self, n: int) -> np.ndarray:
        out = np.arange(self.next_dedup, self.next_dedup + n, dtype=np.int64)
        self.next_dedup += n
        return out

    def create(self) -> list[np.ndarray]:
        return list(self.create_batches())

    def create_batches(self, with_bank: bool = True, funded: bool = True) -> Iterator[np.ndarray]:
        """The bank (account BANK, no lower limit; unless ``with_bank`` is False: it exists already) and the
        customers (first_account..), then a transfer of FUNDING from the bank to every customer: batches of at
        most BATCH_SIZE_MAX, made as they are consumed (10M accounts need not be in memory at once).
        ``funded=False``: customers with no lower limit instead and no funding transfers (half the commands:
        for growing a ledger to measure its size, where what the money is does not matter)."""
        ids = np.arange(self.first_account, self.first_account + self.accounts, dtype=np.int64)
        if with_bank:
            ids = np.concatenate([np.array([BANK], dtype=np.int64), ids])
        unbounded = R.OpFlag.HAS_EXPECTED_A | R.OpFlag.LOWER_UNBOUNDED
        for start in range(0, len(ids), R.BATCH_SIZE_MAX):
            chunk = ids[start:start + R.BATCH_SIZE_MAX]
            ops = R.empty_ops(len(chunk))
            R.put_u128(ops["dedup_id"], self.ids(len(chunk)))
            R.put_u128(ops["account_id"], chunk)
            ops["kind"] = R.Kind.CREATE_ACCOUNT
            ops["group_size"] = 1
            ops["currency"] = CURRENCY.encode()
            ops["flags"] = np.where((chunk == BANK) | (not funded), unbounded, 0)
            yield ops
        if not funded:
            return
        # fund every customer from the bank: transfers, so the total stays 0 (the bank holds the debt)
        customers = ids[1:] if with_bank else ids
        for start in range(0, len(customers), R.BATCH_SIZE_MAX):
            chunk = customers[start:start + R.BATCH_SIZE_MAX]
            yield R.transfers(self.ids(len(chunk)), np.full(len(chunk), BANK), chunk,
                              np.full(len(chunk), FUNDING), CURRENCY)

    def transfers(self, n: int, hot: int | None = None, hot_share: float = 0.5, amount_max: int = 100) -> np.ndarray:
        """``n`` TRANSFER records (any n) between uniformly random distinct customers, amounts 1..amount_max-1.
        With ``hot``: a ``hot_share`` of them move money between ``hot`` and a random customer instead, in
        either direction (a merchant or fee account that every other transfer touches)."""
        lo, hi = self.first_account, self.first_account + self.accounts
        src = self.rng.integers(lo, hi, n)
        dst = lo + (src - lo + self.rng.integers(1, self.accounts, n)) % self.accounts     # never == src
        if hot is not None:
            h = self.rng.random(n) < hot_share
            inbound = self.rng.random(n) < 0.5
            dst = np.where(h & inbound, hot, dst)
            src = np.where(h & ~inbound, hot, src)
        dedup, amount, m = self.ids(n), self.rng.integers(1, amount_max, n), R.BATCH_SIZE_MAX
        return np.concatenate([R.transfers(dedup[k:k + m], src[k:k + m], dst[k:k + m], amount[k:k + m], CURRENCY)
                               for k in range(0, n, m)]) if n > m else R.transfers(dedup, src, dst, amount, CURRENCY)

    def mixed(self, size: int) -> np.ndarray:
        """About 70% transfers, 10% batch balance operations (balanced), 10% reserve+release, 10% TCC
        try+confirm; groups are added while fewer than ``size - 8`` records were made (so at most
        ``size - 5`` records). Built with numpy, column by column (a batch takes milliseconds)."""
        lens_of = np.array([1, 4, 2, 4])               # records per group: transfer, batch, reserve, tcc
        ids_of = np.array([1, 1, 2, 2])                # dedup ids per group
        guess = int(size / 1.7 * 1.3) + 16
        while True:
            roll = self.rng.random(guess)
            g = np.select([roll < 0.7, roll < 0.8, roll < 0.9], [0, 1, 2], 3)
            lens = lens_of[g]
            starts = np.cumsum(lens) - lens
            k = int(np.searchsorted(starts, size - 8, side="left"))   # groups that start below size - 8
            if k < guess:
                break
            guess *= 2
        g, starts = g[:k], starts[:k]
        total = int(starts[-1] + lens[k - 1]) if k else 0
        lo, n_acc = self.first_account, self.accounts
        a = self.rng.integers(lo, lo + n_acc, k)
        b = lo + (a - lo + self.rng.integers(1, n_acc, k)) % n_acc     # never == a
        c = self.rng.integers(lo, lo + n_acc, k)
        n_ids = ids_of[g]
        first_id = self.next_dedup + np.cumsum(n_ids) - n_ids
        self.next_dedup += int(n_ids.sum())
        txn = np.zeros(k, dtype=np.int64)
        uses_txn = g >= 2
        txn[uses_txn] = self.next_txn + np.arange(int(uses_txn.sum()))
        self.next_txn += int(uses_txn.sum())
        ops = R.empty_ops(total)
        kind = ops["kind"]
        gsize = ops["group_size"]
        dedup = np.zeros(total, dtype=np.int64)
        account = np.zeros(total, dtype=np.int64)
        other = np.zeros(total, dtype=np.int64)
        amount = np.zeros(total, dtype=np.int64)
        has_currency = np.zeros(total, dtype=bool)
        flags = ops["flags"]

        def put(which: int, offset: int, **cols: Any) -> np.ndarray:
            at = starts[g == which] + offset
            for name, value in cols.items():
                {"kind": kind, "gsize": gsize, "dedup": dedup, "account": account, "other": other,
                 "amount": amount, "currency": has_currency, "flags": flags}[name][at] = value
            return at

        m = g == 0                                     # transfer a -> b
        put(0, 0, kind=R.Kind.TRANSFER, gsize=1, dedup=first_id[m], account=a[m], other=b[m],
            amount=self.rng.integers(1, 5000, int(m.sum())), currency=True)
        m = g == 1                                     # batch balance: -300 a, +100 b, +200 c
        put(1, 0, kind=R.Kind.BATCH_BALANCE, gsize=4, dedup=first_id[m])
        for off, acct, amt in ((1, a, -300), (2, b, 100), (3, c, 200)):
            put(1, off, kind=R.Kind.SPEC, dedup=first_id[m], account=acct[m], amount=amt, currency=True)
        m = g == 2                                     # reserve 250 on a, then release it all
        put(2, 0, kind=R.Kind.RESERVE, gsize=1, dedup=first_id[m], account=a[m], other=txn[m], amount=250)
        put(2, 1, kind=R.Kind.RELEASE, gsize=1, dedup=first_id[m] + 1, account=a[m], other=txn[m],
            flags=R.OpFlag.FULL_RELEASE)
        m = g == 3                                     # TCC try (a -700, b +700), then confirm
        put(3, 0, kind=R.Kind.TCC_TRY, gsize=3, dedup=first_id[m], other=txn[m])
        put(3, 1, kind=R.Kind.SPEC, dedup=first_id[m], account=a[m], amount=-700, currency=True)
        put(3, 2, kind=R.Kind.SPEC, dedup=first_id[m], account=b[m], amount=700, currency=True)
        put(3, 3, kind=R.Kind.TCC_CONFIRM, gsize=1, dedup=first_id[m] + 1, other=txn[m])
        R.put_u128(ops["dedup_id"], dedup)
        R.put_u128(ops["account_id"], account)
        R.put_u128(ops["other_id"], other)
        R.put_i128(ops["amount"], amount)
        ops["currency"][has_currency] = CURRENCY.encode()
        return ops

class BatchStream(Sequence[np.ndarray]):
    """A deterministic, lazily made sequence of ``count`` batches: batch i is the same array every time it is
    asked for (its own generator seeded by (seed, i); dedup and txn ids in a range of their own), so one
    command stream can be sent to two systems, or the prefix one of them reaches in a time box.

    ``kind``: "transfers" (uniform), "hot" (``hot_share`` of them touch account BANK) or "mixed"
    (``Workload.mixed``)."""
    STRIDE = 1 << 24                   # dedup (and txn) ids per batch, well above any batch's need

    def __init__(self, kind: str, accounts: int, count: int, size: int = R.BATCH_SIZE_MAX, seed: int = 1,
                 first_dedup: int = 1 << 40, first_account: int = 2, **options: Any) -> None:
        if kind not in ("transfers", "hot", "mixed"):
            raise ValueError(f"unknown stream kind {kind!r}")
        if not 1 <= size <= R.BATCH_SIZE_MAX:
            raise ValueError(f"batch size {size} not in 1..{R.BATCH_SIZE_MAX}")
        # the number of batches is ``length``, not ``count``: that name is Sequence.count(value)
        self.kind, self.accounts, self.length, self.size = kind, accounts, count, size
        self.seed, self.first_dedup, self.first_account, self.options = seed, first_dedup, first_account, options

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.length))]
        if not 0 <= i < self.length:
            raise IndexError(i)
        w = Workload(self.accounts, seed=[self.seed, i], first_account=self.first_account)
        w.next_dedup = w.next_txn = self.first_dedup + i * self.STRIDE
        if self.kind == "mixed":
            return w.mixed(self.size)
        return w.transfers(self.size, hot=BANK if self.kind == "hot" else None, **self.options)
