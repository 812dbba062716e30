"""A random ledger workload for the query tests: every command kind that makes events, on one Ledger."""
from __future__ import annotations

import random
from typing import Any

from engine import Ledger


def random_ledger(seed: int, accounts: int = 20, commands: int = 600, *, start_ms: int = 1_000_000,
                  first_account: int = 1, trace: dict[int, dict[int, dict[str, Any]]] | None = None
                  ) -> tuple[Ledger, list[int]]:
    """A ledger after ``commands`` random commands (transfers, batches, reserves/releases, TCC try/confirm/
    cancel, compensations, locks, null cancels) on ``accounts`` accounts in two currencies; timestamps grow
    by 0..3 ms a command (several commands share a time). Returns (ledger, account ids). ``trace``, if given,
    gets {seq: {account id: the account right after that seq}} (the reference of point-in-time answers)."""
    rnd = random.Random(seed)
    led = Ledger()
    ts = start_ms
    ids = [first_account + k for k in range(accounts)]
    cur = {a: ("USD" if k % 3 else "EUR") for k, a in enumerate(ids)}
    did = 1_000_000 * seed + 1
    for a in ids:
        led.create_account(did, a, cur[a], lower_limit=None, timestamp=ts)
        did += 1
    transfers: list[int] = []
    tries: list[int] = []
    reservations: dict[int, list[int]] = {}
    seen = 0

    def record() -> None:
        nonlocal seen
        if trace is None or led.last_seq == seen:
            return
        evs = led.events(seen + 1, led.last_seq)
        later: set[int] = set()                 # accounts a later seq of this same call touched: not as of seq
        for seq in range(led.last_seq, seen, -1):
            accs = {int(w[0]) | (int(w[1]) << 64) for w in evs[evs["seq_num"] == seq]["account_id"]} - {0}
            trace[seq] = {}
            for x in accs - later:
                g = led.get_account(x)
                assert g is not None
                trace[seq][x] = dict(g, ts=int(evs[evs["seq_num"] == seq]["timestamp"][0]))
            later |= accs
        seen = led.last_seq

    record()
    for _ in range(commands):
        record()
        ts += rnd.randint(0, 3)
        did += 1
        r = rnd.random()
        a = rnd.choice(ids)
        same = [b for b in ids if cur[b] == cur[a] and b != a]
        if r < 0.40:
            b = rnd.choice(same)
            led.transfer(did, a, b, rnd.randint(1, 500), cur[a], timestamp=ts)
            transfers.append(did)
        elif r < 0.50:
            specs: list[Any] = [(a, rnd.randint(-300, 300) or 1, cur[a]),
                                (rnd.choice(same), rnd.randint(1, 99), cur[a])]
            led.batch_balance_operation(did, specs, timestamp=ts)
            transfers.append(did)
        elif r < 0.60:
            rid = rnd.randint(1, 5)
            led.reserve(did, a, rid, rnd.randint(1, 200), timestamp=ts)
            reservations.setdefault(a, []).append(rid)
        elif r < 0.68 and reservations.get(a):
            rid = rnd.choice(reservations[a])
            led.release(did, a, rid, None if rnd.random() < 0.5 else rnd.randint(1, 100), timestamp=ts)
        elif r < 0.78:
            b = rnd.choice(same)
            amt = rnd.randint(1, 300)
            txn = did
            specs = [(a, -amt, cur[a]), (b, amt, cur[a])]
            if rnd.random() < 0.2:
                specs.append((a, -1, cur[a]))
            led.tcc_try(did, txn, specs, timestamp=ts, expires_ms=ts + rnd.randint(1, 40) if rnd.random() < 0.3 else 0)
            tries.append(txn)
        elif r < 0.88 and tries:
            txn = tries.pop(rnd.randrange(len(tries)))
            if rnd.random() < 0.5:
                led.tcc_confirm(did, txn, timestamp=ts)
            else:
                led.tcc_cancel(did, txn, timestamp=ts)
        elif r < 0.92 and transfers:
            led.compensate(did, transfers.pop(rnd.randrange(len(transfers))), timestamp=ts)
        elif r < 0.94:
            led.tcc_cancel(did, 10**15 + did, timestamp=ts)          # a null cancel: an event with no account
        elif r < 0.97:
            led.lock_account(did, a, timestamp=ts)
        else:
            led.unlock_account(did, a, timestamp=ts)
    record()
    return led, ids


def chunks_of(evs: Any, rnd: random.Random, max_seqs: int = 40) -> list[Any]:
    """The records cut into chunks of whole seqs (1..max_seqs seqs each), in order."""
    import numpy as np
    seqs = evs["seq_num"]
    bounds = np.flatnonzero(np.r_[True, seqs[1:] != seqs[:-1]]).tolist() + [len(evs)]
    out = []
    i = 0
    while i < len(bounds) - 1:
        j = min(len(bounds) - 1, i + rnd.randint(1, max_seqs))
        out.append(evs[bounds[i]:bounds[j]])
        i = j
    return out
