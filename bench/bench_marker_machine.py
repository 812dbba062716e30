"""CPU per workflow of the Marker's pure cores, in one process: no sockets, no Raft, no other process.

    python -m bench.bench_marker_machine                       # 20,000 two-leg TCC transfers, 5 rounds
    python -m bench.bench_marker_machine --workflows 50000 --submit-entry 512 --results-entry 4096

A leader's ``MarkerMachine`` + ``JobDriver`` and a follower's ``MarkerMachine`` apply the same entries: SUBMIT
entries of ``--submit-entry`` two-leg cross-shard transfers, then the driver's sends answered OK at once by a
fake shard, then JOB_RESULTS entries of at most ``--results-entry`` results, until every workflow finished.
Reported, in microseconds of thread CPU time per workflow (the median of ``--rounds`` rounds): each
replica's apply of the SUBMITs, of the try results and of the confirm results; the leader's driver
(poll, on_reply, take_results and the entry encoding); snapshot(); and the longest single entry's apply in
ms (what holds the Raft driver thread, and so the heartbeats, per entry). The follower's final digest must
equal the leader's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from engine.records import RESULT_DTYPE, Code
from engine.shard_map import ShardMap
from marker.commands import Submit, encode_entry, transfer
from marker.job_driver import JobDriver, job_results_command
from marker.workflow import MarkerMachine

T0 = 1_800_000_000_000


def _accounts(sm: ShardMap, shard: int, n: int) -> list[int]:
    out: list[int] = []
    a = 1 << 20
    while len(out) < n:
        a += 1
        if sm.shard_of(a) == shard:
            out.append(a)
    return out


def _answer(send: Any, seq: list[int]) -> np.ndarray:
    recs = send.records
    res = np.zeros(len(recs), dtype=RESULT_DTYPE)
    res["dedup_id"] = recs["dedup_id"]
    res["code"] = int(Code.OK)
    res["seq_num"] = np.arange(seq[0], seq[0] + len(recs))
    seq[0] += len(recs)
    return res


def one_round(n: int, submit_entry: int, results_entry: int, first_id: int) -> dict[str, float]:
    sm = ShardMap.uniform([1, 2])
    src, dst = _accounts(sm, 1, 512), _accounts(sm, 2, 512)
    leader = MarkerMachine(sm, event_sink=lambda chunks: None, workflows_inflight_max=max(n, 1), )
    follower = MarkerMachine(sm, event_sink=lambda chunks: None, workflows_inflight_max=max(n, 1))
    driver = JobDriver(leader)
    cpu = time.thread_time
    t_apply = {"submit": 0.0, "results": 0.0}
    t_follow = {"submit": 0.0, "results": 0.0}
    t_driver = 0.0
    t_encode = 0.0
    entry_max_s = 0.0
    now = T0
    seq = [1]
    specs = [transfer(first_id + k, src[k % 512], dst[(k * 7) % 512], 1 + k % 100, "USD", issued_ms=T0,
                      deadline_ms=T0 + 600_000) for k in range(n)]

    def apply_both(entry: bytes, what: str) -> None:
        nonlocal entry_max_s
        c = cpu()
        leader.apply(entry)
        d = cpu() - c
        t_apply[what] += d
        entry_max_s = max(entry_max_s, d)
        c = cpu()
        follower.apply(entry)
        t_follow[what] += cpu() - c

    for k in range(0, n, submit_entry):
        now += 1
        c = cpu()
        entry = encode_entry([Submit(s) for s in specs[k:k + submit_entry]], now)
        t_encode += cpu() - c
        apply_both(entry, "submit")
    rounds = 0
    while leader.status()["in_flight"] and rounds < 10_000:
        rounds += 1
        now += 1
        c = cpu()
        sends = driver.poll(now)
        t_driver += cpu() - c
        answers = [(s.send_id, _answer(s, seq)) for s in sends]
        c = cpu()
        for sid, res in answers:
            driver.on_reply(sid, res, None, now)
        results = driver.take_results()
        entries = [encode_entry([job_results_command(results[i:i + results_entry])], now)
                   for i in range(0, len(results), results_entry)]
        t_driver += cpu() - c
        for e in entries:
            apply_both(e, "results")
    c = cpu()
    snap = leader.snapshot()
    t_snap = cpu() - c
    assert leader.status()["in_flight"] == 0, leader.status()
    assert follower.digest() == leader.digest()
    us = 1e6 / n
    return {"submit_apply_us": t_apply["submit"] * us, "results_apply_us": t_apply["results"] * us,
            "follower_submit_us": t_follow["submit"] * us, "follower_results_us": t_follow["results"] * us,
            "driver_us": t_driver * us, "submit_encode_us": t_encode * us, "snapshot_us": t_snap * us,
            "entry_apply_max_ms": entry_max_s * 1000, "snapshot_bytes_per_wf": len(snap) / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workflows", type=int, default=20_000)
    p.add_argument("--submit-entry", type=int, default=512, help="SUBMITs per entry")
    p.add_argument("--results-entry", type=int, default=65_536, help="results per JOB_RESULTS entry")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    rows = [one_round(args.workflows, args.submit_entry, args.results_entry, 1 + r * args.workflows)
            for r in range(args.rounds)]
    print(f"{args.workflows:,} two-leg TCC workflows, {args.submit_entry} SUBMITs / entry, "
          f"<= {args.results_entry} results / entry; median of {args.rounds} rounds (thread CPU time):")
    for key in rows[0]:
        vals = [r[key] for r in rows]
        print(f"  {key:24s} {statistics.median(vals):10.2f}   (min {min(vals):.2f}, max {max(vals):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
