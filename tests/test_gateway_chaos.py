"""A bank through the gateway across 2 shards x 3 replicas while a shard leader, the Marker leader and a
gateway replica are killed (kill -9): every request ends with a definite result once retried with its
own ids, money is conserved across the shards, nothing stays pending."""
from __future__ import annotations

import random
import threading
import time

import gateway
from engine import Code
from engine.client import ClientError
from engine.devtools.up import LocalSystem
from engine.system import System

CUR = "USD"
START = 10_000
RETRY_FOR_S = 60.0


def retry(fn, *args):
    """The same call (the same ids) until it has a result."""
    end = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            return fn(*args)
        except ClientError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def test_bank_through_the_gateway_with_kills(tmp_path):
    with LocalSystem(str(tmp_path), shards=2, replicas=3, gateways=2) as ls:
        ls.start()
        smap = System.load(ls.system_path).shard_map
        accounts = list(range(1, 13))
        assert {smap.shard_of(a) for a in accounts} == {1, 2}
        with gateway.Client(ls.gateway_addresses, timeout_s=15.0, keys=ls.client_keys) as c:
            for a in accounts:
                assert retry(c.create_account, 10_000 + a, a, CUR).ok
                assert retry(c.batch_balance_operation, 20_000 + a, [(a, START, CUR)]).ok
            rng = random.Random(7)
            plans = []
            for k in range(300):
                x, y, z = rng.sample(accounts, 3)
                if k % 3:
                    plans.append(("transfer", (100_000 + k, x, y, rng.randint(1, 300), CUR)))
                else:
                    plans.append(("pay", (100_000 + k, x, y, rng.randint(1, 300), CUR, 3, z)))
            results: dict[int, object] = {}

            def worker(part):
                for name, args in part:
                    results[args[0]] = retry(getattr(c, name), *args)

            threads = [threading.Thread(target=worker, args=(plans[i::4],)) for i in range(4)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            leaders = ls.wait_leaders()
            ls.shards[1].kill(leaders["shard 1"])
            time.sleep(0.5)
            ls.marker.kill(leaders["marker"])
            time.sleep(0.5)
            ls.kill_gateway(1)
            done_at_kills = len(results)
            for t in threads:
                t.join(120)
            assert len(results) == len(plans)
            assert done_at_kills < len(plans), "the kills came after the work: nothing was tested"
            assert all(getattr(r, "code", None) is not None for r in results.values())
            ok = sum(1 for r in results.values() if r.ok)
            assert ok > len(plans) // 2, ok
            # every request again, with its own ids: the same outcome, nothing moves again
            for name, args in plans[:20]:
                again = retry(getattr(c, name), *args)
                assert again.code == results[args[0]].code and (not again.ok or again.duplicate)
            accs = retry(c.get_accounts, accounts)
            assert sum(a["available"] for a in accs) == START * len(accounts)
            assert all(not a["pending_in"] and not a["pending_out"] for a in accs)
            assert all(r.code in (Code.OK, Code.BALANCE_LIMIT_EXCEEDED) for r in results.values()), \
                {k: r for k, r in results.items() if r.code not in (Code.OK, Code.BALANCE_LIMIT_EXCEEDED)}
