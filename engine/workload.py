"""Generators of realistic op-record batches, shared by the demo and the benchmarks.

A ``Workload`` hands out fresh dedup, reservation and txn ids (never repeated), so every batch it makes is
new work, and a retry of the same bytes is a duplicate.
"""
from __future__ import annotations

import numpy as np

from engine import records as R

BANK = 1                 # the funding account (may go negative)
CURRENCY = "USD"
FUNDING = 1_000_000      # minor units per account


class Workload:
    def __init__(self, accounts: int, seed: int = 1, first_account: int = 2) -> None:
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
        out = []
        ids = np.arange(1, self.accounts + 2, dtype=np.int64)       # the bank + the customers
        for start in range(0, len(ids), R.BATCH_SIZE_MAX):
            chunk = ids[start:start + R.BATCH_SIZE_MAX]
            ops = R.empty_ops(len(chunk))
            R.put_u128(ops["dedup_id"], self.ids(len(chunk)))
            R.put_u128(ops["account_id"], chunk)
            ops["kind"] = R.Kind.CREATE_ACCOUNT
            ops["group_size"] = 1
            ops["currency"] = CURRENCY.encode()
            ops["flags"] = np.where(chunk == BANK, R.OpFlag.HAS_EXPECTED_A | R.OpFlag.LOWER_UNBOUNDED, 0)
            out.append(ops)
        # fund every customer from the bank: transfers, so the total stays 0 (the bank holds the debt)
        customers = ids[1:]
        for start in range(0, len(customers), R.BATCH_SIZE_MAX):
            chunk = customers[start:start + R.BATCH_SIZE_MAX]
            out.append(R.transfers(self.ids(len(chunk)), np.full(len(chunk), BANK), chunk,
                                   np.full(len(chunk), FUNDING), CURRENCY))
        return out

    def mixed(self, size: int) -> np.ndarray:
        """About 70% transfers, 10% batch balance operations (balanced), 10% reserve+release, 10% TCC."""
        parts = []
        n = 0
        acct = lambda: int(self.rng.integers(self.first_account, self.first_account + self.accounts))  # noqa: E731
        while n < size - 8:
            roll = self.rng.random()
            a, b = acct(), acct()
            if a == b:
                continue
            if roll < 0.7:
                g = R.transfers(self.ids(1), np.array([a]), np.array([b]), self.rng.integers(1, 5000, 1), CURRENCY)
            elif roll < 0.8:
                c = acct()
                g = R.empty_ops(4)
                R.put_u128(g["dedup_id"], np.repeat(self.ids(1), 4))
                g["kind"] = [R.Kind.BATCH_BALANCE, R.Kind.SPEC, R.Kind.SPEC, R.Kind.SPEC]
                g["group_size"][0] = 4
                R.put_u128(g["account_id"], np.array([0, a, b, c]))
                R.put_i128(g["amount"], np.array([0, -300, 100, 200]))
                g["currency"][1:] = CURRENCY.encode()
            elif roll < 0.9:
                g = R.empty_ops(2)
                R.put_u128(g["dedup_id"], self.ids(2))
                g["kind"] = [R.Kind.RESERVE, R.Kind.RELEASE]
                g["group_size"] = 1
                R.put_u128(g["account_id"], np.array([a, a]))
                R.put_u128(g["other_id"], np.array([self.next_txn, self.next_txn]))
                R.put_i128(g["amount"], np.array([250, 0]))
                g["flags"][1] = R.OpFlag.FULL_RELEASE
                self.next_txn += 1
            else:
                g = R.empty_ops(4)
                d = self.ids(2)
                R.put_u128(g["dedup_id"], np.array([d[0], d[0], d[0], d[1]]))
                g["kind"] = [R.Kind.TCC_TRY, R.Kind.SPEC, R.Kind.SPEC, R.Kind.TCC_CONFIRM]
                g["group_size"] = [3, 0, 0, 1]
                R.put_u128(g["account_id"], np.array([0, a, b, 0]))
                R.put_u128(g["other_id"], np.array([self.next_txn, 0, 0, self.next_txn]))
                R.put_i128(g["amount"], np.array([0, -700, 700, 0]))
                g["currency"][1:3] = CURRENCY.encode()
                self.next_txn += 1
            parts.append(g)
            n += len(g)
        return np.concatenate(parts)
