"""Unit tests of the Marker's pure cores: MarkerMachine (workflows, decisions, deadlines, limits, entries,
snapshots, events) and JobDriver (batching, unknown outcomes, DEDUP_EXPIRED -> RESULT_OF)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from engine import Ledger
from engine.records import RESULT_DTYPE, Code, Kind, get_u128
from engine.shard_map import ShardMap
from marker.commands import (
    Drain, Submit, batch_step, encode_entry, saga_spec, tcc_spec, transfer, transfer_step, u128_bytes,
)
from marker.events import MARKER_EVENT_DTYPE, EventKind
from marker.job_driver import NOT_REMEMBERED, JobDriver, job_results_command
from marker.workflow import MarkerCode, MarkerMachine

T = 1_700_000_000_000
SM = ShardMap.uniform([0, 1])


def _ids_on(shard: int, n: int) -> list[int]:
    out, a = [], 1000
    while len(out) < n:
        a += 1
        if SM.shard_of(a) == shard:
            out.append(a)
    return out


A0, B0, C0 = _ids_on(0, 3)
A1, B1, C1 = _ids_on(1, 3)


class Rig:
    def __init__(self, **kw) -> None:
        self.events: list[np.ndarray] = []
        self.m = MarkerMachine(SM, event_sink=lambda chunk: self.events.extend(chunk), **kw)
        self.now = T

    def apply(self, cmds, dt: int = 1):
        self.now += dt
        return self.m.apply(encode_entry(cmds, self.now))

    def submit(self, spec, dt: int = 1):
        (out,) = self.apply([Submit(spec)], dt)
        return out

    def ready(self, wid: int) -> dict[int, int]:
        return {r.job_index: r.shard for r in self.m.ready_jobs() if r.workflow_id == wid}

    def results(self, wid: int, codes: dict[int, int], attempt: int = 0, dt: int = 1):
        (out,) = self.apply([job_results_command([(wid, k, attempt, c, 0) for k, c in codes.items()])], dt)
        return out

    def wf(self, wid: int) -> dict:
        got = self.m.get_workflow(wid)
        assert got is not None
        return got

    def event_kinds(self, wid: int) -> list[str]:
        evs = np.concatenate(self.events)
        ids = [lo | (hi << 64) for lo, hi in evs["workflow_id"].tolist()]
        return [EventKind(k).name for w, k in zip(ids, evs["kind"].tolist()) if w == wid]


def _tcc(wid: int, now: int, amount: int = 10, deadline: int = 10_000):
    return transfer(wid, A0, A1, amount, "USD", issued_ms=now, deadline_ms=now + deadline)


def test_tcc_happy_path_confirms_every_shard():
    r = Rig()
    out = r.submit(_tcc(7, r.now))
    assert (out.status, out.workflow_id, out.state) == ("created", 7, "RUNNING")
    assert r.ready(7) == {0: 0, 1: 1}                       # one try per shard, in parallel
    tries = [r.m.job_records(7, k) for k in (0, 1)]
    assert [int(t["kind"][0]) for t in tries] == [Kind.TCC_TRY] * 2
    assert all(int(t["issued_ms"][0]) == T + 1 for t in tries)
    assert get_u128(tries[0]["other_id"][:1]) != get_u128(tries[1]["other_id"][:1])   # a txn id per shard
    r.results(7, {0: Code.OK})
    assert r.ready(7) == {1: 1}
    r.results(7, {1: Code.OK}, dt=5)
    assert r.ready(7) == {3: 0, 4: 1}                       # confirms, issued at the decision's time
    confirm = r.m.job_records(7, 3)
    assert int(confirm["kind"][0]) == Kind.TCC_CONFIRM and int(confirm["issued_ms"][0]) == r.now
    assert get_u128(confirm["other_id"]) == get_u128(tries[0]["other_id"][:1])
    assert r.wf(7)["state"] == "COMMITTING"
    r.results(7, {3: Code.OK, 4: Code.TXN_ALREADY_CONFIRMED})
    wf = r.wf(7)
    assert (wf["state"], wf["code"], wf["finished_ms"]) == ("SUCCEEDED", 0, r.now)
    assert [j["state"] for j in wf["jobs"]] == ["DONE"] * 5 + ["SKIPPED"] * 2
    assert r.event_kinds(7) == ["CREATED", "JOB_DONE", "JOB_DONE", "DECIDED", "JOB_SKIPPED", "JOB_SKIPPED",
                                "JOB_DONE", "JOB_DONE", "FINISHED"]
    assert r.m.status()["in_flight"] == 0 and r.m.status()["finished_retained"] == 1


def test_failing_try_cancels_the_others_with_the_business_code():
    r = Rig()
    spec = tcc_spec(8, [(A0, -5, "USD"), (B0, -5, "USD"), (A1, 10, "USD")], issued_ms=r.now, deadline_ms=r.now + 9999)
    r.submit(spec)
    assert r.ready(8) == {0: 0, 1: 1}
    assert len(r.m.job_records(8, 0)) == 3                  # both shard-0 legs in one TCC_TRY group
    r.results(8, {0: Code.BALANCE_LIMIT_EXCEEDED, 1: Code.OK})
    assert r.ready(8) == {6: 1}                             # cancel where the try held money; the failed one's
    assert int(r.m.job_records(8, 6)["kind"][0]) == Kind.TCC_CANCEL        # cancel has nothing to cancel
    assert r.wf(8)["state"] == "ROLLING_BACK"
    r.results(8, {6: Code.OK})
    wf = r.wf(8)
    assert (wf["state"], wf["code"]) == ("FAILED", Code.BALANCE_LIMIT_EXCEEDED)


def test_cancel_treats_txn_not_found_as_done():
    r = Rig()
    r.submit(_tcc(9, r.now))
    r.results(9, {0: Code.OK, 1: Code.ACCOUNT_NOT_FOUND})
    r.results(9, {5: Code.TXN_NOT_FOUND})
    assert (r.wf(9)["state"], r.wf(9)["code"]) == ("FAILED", Code.ACCOUNT_NOT_FOUND)


def test_saga_failing_step_compensates_in_reverse():
    r = Rig()
    steps = [transfer_step(A0, B0, 5, "USD"), batch_step([(A1, -3, "USD"), (B1, 3, "USD")]),
             transfer_step(C0, B0, 1, "USD", expected_from=77)]
    r.submit(saga_spec(10, steps, issued_ms=r.now, deadline_ms=r.now + 9999))
    assert r.ready(10) == {0: 0}                            # in order
    r.results(10, {0: Code.OK})
    assert r.ready(10) == {1: 1}
    assert int(r.m.job_records(10, 1)["kind"][0]) == Kind.BATCH_BALANCE
    r.results(10, {1: Code.OK})
    rec = r.m.job_records(10, 2)
    assert int(rec["flags"][0]) == 1 and int(rec["expected_a"][0][0]) == 77      # optimistic step
    r.results(10, {2: Code.PRECONDITION_FAILED})
    # jobs: 0..2 steps, 3 decide, 4 = compensate step 2 (skipped: it failed), 5 = step 1, 6 = step 0
    assert r.ready(10) == {5: 1}
    comp = r.m.job_records(10, 5)
    assert int(comp["kind"][0]) == Kind.COMPENSATE
    assert get_u128(comp["other_id"]) == [r.wf(10)["jobs"][1]["dedup_id"]]
    r.results(10, {6: Code.OK})                             # not ready yet: ignored
    assert r.ready(10) == {5: 1}
    r.results(10, {5: Code.OK})
    assert r.ready(10) == {6: 0}
    r.results(10, {6: Code.NULL_COMPENSATED})
    wf = r.wf(10)
    assert (wf["state"], wf["code"]) == ("FAILED", Code.PRECONDITION_FAILED)
    assert [j["state"] for j in wf["jobs"]] == ["DONE"] * 4 + ["SKIPPED", "DONE", "DONE"]


def test_saga_success_has_no_phase_two():
    r = Rig()
    r.submit(saga_spec(11, [transfer_step(A0, B0, 5, "USD")], issued_ms=r.now, deadline_ms=r.now + 9999))
    r.results(11, {0: Code.OK})
    assert (r.wf(11)["state"], r.wf(11)["code"]) == ("SUCCEEDED", 0)


def test_duplicate_submit_is_one_workflow():
    r = Rig()
    spec = _tcc(12, r.now)
    a, b = r.apply([Submit(spec), Submit(spec)])
    assert (a.status, b.status, b.workflow_id, b.state) == ("created", "duplicate", 12, "RUNNING")
    r.results(12, {0: Code.OK, 1: Code.INVALID_ACCOUNT_STATE})
    r.results(12, {5: Code.OK})
    out = r.submit(spec)
    assert (out.status, out.state, out.code) == ("duplicate", "FAILED", Code.INVALID_ACCOUNT_STATE)
    assert r.m.status()["finished_retained"] == 1


def test_overloaded_and_draining():
    r = Rig(workflows_inflight_max=1)
    assert r.submit(_tcc(13, r.now)).status == "created"
    out = r.submit(_tcc(14, r.now))
    assert (out.status, out.reason) == ("refused", "OVERLOADED")
    assert r.m.get_workflow(14) is None
    r.results(13, {0: Code.OK, 1: Code.OK})
    r.results(13, {3: Code.OK, 4: Code.OK})
    assert r.apply([Drain(True)])[0].status == "accepted" and r.m.status()["draining"]
    out = r.submit(_tcc(14, r.now))
    assert (out.status, out.reason) == ("refused", "DRAINING")
    assert r.submit(_tcc(13, r.now)).status == "duplicate"        # a known workflow still answers
    r.apply([Drain(False)])
    assert r.submit(_tcc(14, r.now)).status == "created"


def test_deadline_in_phase_one_decides_failed_and_cancels_after_the_try_settles():
    r = Rig(null_cancel=False)
    r.submit(_tcc(15, r.now, deadline=100))
    r.results(15, {0: Code.OK})
    r.apply([], dt=50)
    assert r.wf(15)["state"] == "RUNNING"
    r.apply([], dt=100)                                     # a tick past the deadline
    wf = r.wf(15)
    assert (wf["state"], wf["code"], wf["overdue"]) == ("ROLLING_BACK", MarkerCode.DEADLINE_EXCEEDED, True)
    # the try on shard 1 is still unsettled: its cancel waits for it (no null cancel in the ledger yet)
    assert r.ready(15) == {1: 1, 5: 0}
    r.results(15, {1: Code.OK})                             # a late try result is still taken
    assert r.ready(15) == {5: 0, 6: 1}
    r.results(15, {5: Code.OK, 6: Code.OK})
    assert (r.wf(15)["state"], r.wf(15)["code"]) == ("FAILED", MarkerCode.DEADLINE_EXCEEDED)
    assert "OVERDUE" in r.event_kinds(15)


def test_deadline_with_null_cancel_abandons_unsettled_tries():
    r = Rig(null_cancel=True)
    r.submit(_tcc(16, r.now, deadline=100))
    r.apply([], dt=200)
    assert r.ready(16) == {5: 0, 6: 1}
    assert [j["state"] for j in r.wf(16)["jobs"][:2]] == ["ABANDONED", "ABANDONED"]


def test_saga_deadline_compensates_the_step_in_flight():
    r = Rig()
    r.submit(saga_spec(17, [transfer_step(A0, B0, 5, "USD"), transfer_step(A1, B1, 5, "USD")],
                       issued_ms=r.now, deadline_ms=r.now + 100))
    r.apply([], dt=200)
    wf = r.wf(17)
    assert [j["state"] for j in wf["jobs"][:2]] == ["ABANDONED", "SKIPPED"]
    assert r.ready(17) == {4: 0}                            # null compensation covers a late original
    r.results(17, {4: Code.NULL_COMPENSATED})
    assert (r.wf(17)["state"], r.wf(17)["code"]) == ("FAILED", MarkerCode.DEADLINE_EXCEEDED)


def test_deadline_in_phase_two_is_overdue_and_goes_on():
    r = Rig()
    r.submit(_tcc(18, r.now, deadline=100))
    r.results(18, {0: Code.OK, 1: Code.OK})
    r.apply([], dt=500)
    wf = r.wf(18)
    assert (wf["state"], wf["overdue"]) == ("COMMITTING", True)
    assert r.m.status()["overdue"] == 1 and r.ready(18) == {3: 0, 4: 1}
    r.results(18, {3: Code.OK, 4: Code.OK})
    assert (r.wf(18)["state"], r.m.status()["overdue"]) == ("SUCCEEDED", 0)


def test_phase_two_business_failure_is_stuck_and_retryable_ones_retry_with_a_new_dedup_id():
    r = Rig()
    r.submit(_tcc(19, r.now))
    r.results(19, {0: Code.OK, 1: Code.OK})
    r.results(19, {3: Code.TXN_ALREADY_CANCELLED})          # a confirm refused: an invariant violation
    assert r.wf(19)["state"] == "STUCK"
    assert r.m.status()["stuck"] == 1 and r.m.status()["stuck_jobs"] == 1
    assert "STUCK" in r.event_kinds(19)
    before = r.wf(19)["jobs"][4]["dedup_id"]
    r.results(19, {4: Code.BALANCE_LIMIT_EXCEEDED})         # upper limit on confirm: retry, new attempt
    j = r.wf(19)["jobs"][4]
    assert (j["state"], j["attempt"]) == ("READY", 1) and j["dedup_id"] != before
    assert [x.not_before_ms > r.now for x in r.m.ready_jobs() if x.job_index == 4] == [True]
    assert r.results(19, {4: Code.OK}).ignored == 1          # a stale result of attempt 0: ignored
    assert r.results(19, {4: Code.OK}, attempt=1).accepted == 1
    assert r.wf(19)["jobs"][4]["state"] == "DONE" and r.wf(19)["state"] == "STUCK"


def test_stale_and_duplicate_results_are_ignored():
    r = Rig()
    r.submit(_tcc(20, r.now))
    out = r.apply([job_results_command([(20, 0, 0, Code.OK, 5), (20, 0, 0, Code.BALANCE_LIMIT_EXCEEDED, 0),
                                        (20, 99, 0, 0, 0), (20, 3, 0, 0, 0), (21, 0, 0, 0, 0)])])[0]
    assert (out.accepted, out.ignored) == (1, 4)
    assert r.wf(20)["jobs"][0]["code"] == Code.OK and r.wf(20)["jobs"][0]["seq"] == 5


@pytest.mark.parametrize("spec_fn, why", [
    (lambda now: tcc_spec(30, [(A0, -5, "USD"), (A1, 4, "USD")], issued_ms=now, deadline_ms=now + 99), "zero"),
    (lambda now: tcc_spec(30, [(A0, -5, "USD")], issued_ms=now, deadline_ms=now + 99), "legs"),
    (lambda now: tcc_spec(30, [(0, -5, "USD"), (A1, 5, "USD")], issued_ms=now, deadline_ms=now + 99), "id 0"),
    (lambda now: tcc_spec(30, [(A0, -5, "US D"), (A1, 5, "US D")], issued_ms=now, deadline_ms=now + 99), "currency"),
    (lambda now: tcc_spec(30, [(A0, -5, "USD"), (A0, 5, "USD")], issued_ms=now, deadline_ms=now + 99), "twice"),
    (lambda now: tcc_spec(0, [(A0, -5, "USD"), (A1, 5, "USD")], issued_ms=now, deadline_ms=now + 99), "workflow id"),
    (lambda now: _tcc(30, now, deadline=-5), "deadline"),
    (lambda now: _tcc(30, now, deadline=10 ** 9), "DEADLINE_AHEAD_MAX_MS"),
    (lambda now: saga_spec(30, [transfer_step(A0, A1, 5, "USD")], issued_ms=now, deadline_ms=now + 99), "shards"),
    (lambda now: saga_spec(30, [transfer_step(A0, B0, 0, "USD")], issued_ms=now, deadline_ms=now + 99), "amount"),
    (lambda now: saga_spec(30, [], issued_ms=now, deadline_ms=now + 99), "steps"),
])
def test_invalid_specs_are_refused_and_create_nothing(spec_fn, why):
    r = Rig()
    out = r.submit(spec_fn(r.now + 1))
    assert (out.status, out.reason) == ("refused", "INVALID_SPEC") and why in out.message, out
    assert r.m.status()["in_flight"] == 0 and r.m.last_seq == 0


def test_issued_in_future_refused():
    r = Rig()
    out = r.submit(_tcc(31, r.now + 10 ** 6, deadline=-10 ** 6 + 500))
    assert (out.status, out.reason) == ("refused", "ISSUED_IN_FUTURE")


def test_malformed_entries_are_refused_without_raising():
    r = Rig()
    good = encode_entry([Submit(_tcc(40, r.now))], r.now + 1)
    rng = random.Random(1)
    blobs = [b"", b"ZMK1", b"ZMK2" + good[4:], good[:-1], good + b"\x00", b"ZMK1\xc1", bytes(1000)]
    blobs += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))) for _ in range(300)]
    blobs += [good[:4] + bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in good[4:])
              for _ in range(300)]
    before = r.m.digest()
    for b in blobs:
        outs = r.m.apply(b)
        assert isinstance(outs, list)
        if outs and outs[0].status == "error":
            assert outs[0].reason == "MALFORMED_ENTRY"
    assert r.m.apply(b"junk")[0].status == "error"
    assert r.m.apply(123)[0].status == "error"               # type: ignore[arg-type]
    del before


def test_snapshot_restore_digest_and_determinism():
    def run(m_events):
        r = Rig()
        r.submit(_tcc(50, r.now))
        r.submit(saga_spec(51, [transfer_step(A0, B0, 5, "USD"), transfer_step(A1, B1, 5, "USD")],
                           issued_ms=r.now, deadline_ms=r.now + 999))
        r.results(50, {0: Code.OK})
        r.results(51, {0: Code.OK})
        m_events.extend(r.events)
        return r
    r1, r2 = run([]), run([])
    assert r1.m.snapshot() == r2.m.snapshot() and r1.m.digest() == r2.m.digest()
    m3 = MarkerMachine(SM)
    m3.restore(r1.m.snapshot())
    assert m3.digest() == r1.m.digest() and m3.snapshot() == r1.m.snapshot()
    assert sorted((j.workflow_id, j.job_index) for j in m3.ready_jobs()) == \
        sorted((j.workflow_id, j.job_index) for j in r1.m.ready_jobs())
    # both continue identically
    entry = encode_entry([job_results_command([(50, 1, 0, Code.OK, 0), (51, 1, 0, Code.OK, 0)])], r1.now + 5)
    assert m3.apply(entry) == r1.m.apply(entry)
    assert m3.digest() == r1.m.digest() and m3.get_workflow(51)["state"] == "SUCCEEDED"
    assert m3.last_seq == r1.m.last_seq
    with pytest.raises(ValueError):
        m3.restore(b"not a snapshot")
    assert m3.digest() == r1.m.digest()


def test_events_are_gap_free_fixed_records():
    r = Rig()
    for w in range(60, 64):
        r.submit(_tcc(w, r.now))
        r.results(w, {0: Code.OK, 1: Code.OK if w % 2 else Code.ACCOUNT_NOT_FOUND})
    evs = np.concatenate(r.events)
    assert evs.dtype == MARKER_EVENT_DTYPE and evs.dtype.itemsize == 128
    assert evs["seq_num"].tolist() == list(range(1, r.m.last_seq + 1))
    assert np.all(np.diff(evs["timestamp"].astype(np.int64)) >= 0)
    assert int(evs["kind"][0]) == EventKind.CREATED and get_u128(evs["workflow_id"][:1]) == [60]


def test_finished_retention_moves_the_horizon():
    r = Rig(finished_retained_max=1)
    first = _tcc(70, r.now)
    r.submit(first)
    r.results(70, {0: Code.ACCOUNT_NOT_FOUND, 1: Code.ACCOUNT_NOT_FOUND})
    r.submit(_tcc(71, r.now))
    r.results(71, {0: Code.ACCOUNT_NOT_FOUND, 1: Code.ACCOUNT_NOT_FOUND})
    assert r.m.get_workflow(70) is None and r.m.status()["horizon_ms"] == first.issued_ms
    out = r.submit(first)                                   # evicted: it may have run, so never again
    assert (out.status, out.reason) == ("refused", "EXPIRED")
    assert r.submit(_tcc(72, r.now)).status == "created"


# -------------------------------------------------------------------------------------------- driver
def _ledgers() -> dict[int, Ledger]:
    out = {}
    for s, ids in ((0, (A0, B0, C0)), (1, (A1, B1, C1))):
        led = Ledger(dedup_retention=1024, event_retention=4096, accounts_max=64)
        for k, a in enumerate(ids):
            assert led.create_account(k + 1, a, "USD", timestamp=T).ok
            assert led.batch_balance_operation(k + 100, [(a, 100, "USD")], timestamp=T).ok
        out[s] = led
    return out


def test_driver_batches_per_shard_retries_unknowns_and_never_decides():
    r = Rig()
    r.submit(_tcc(80, r.now))
    r.submit(tcc_spec(81, [(B0, -5, "USD"), (C0, -5, "USD"), (B1, 10, "USD")], issued_ms=r.now,
                      deadline_ms=r.now + 9999))
    drv = JobDriver(r.m)
    sends = drv.poll(r.now)
    assert sorted(s.shard for s in sends) == [0, 1]         # one array per shard for both workflows
    s0 = next(s for s in sends if s.shard == 0)
    assert s0.records is not None and len(s0.records) == 2 + 3
    assert drv.poll(r.now) == []                            # in flight: nothing new
    drv.on_reply(s0.send_id, None, "timeout", r.now)
    assert drv.poll(r.now) == [] and drv.status()["unknown_outcomes"] == 2
    again = drv.poll(r.now + 1_000)
    assert len(again) == 1 and again[0].records is not None
    assert again[0].records.tobytes() == s0.records.tobytes()           # the SAME records
    led = _ledgers()
    drv.on_reply(again[0].send_id, led[0].apply_batch(again[0].records, timestamp=r.now), None, r.now)
    results = drv.take_results()
    assert sorted((w, k, c) for w, k, _, c, _ in results) == [(80, 0, 0), (81, 0, 0)]
    assert r.wf(80)["jobs"][0]["state"] == "READY"          # state only once the results are applied
    r.apply([job_results_command(results)])
    assert r.wf(80)["jobs"][0]["state"] == "DONE"
    drv.on_reply(again[0].send_id, None, "late", r.now)     # a reply to a send no longer in flight: ignored


def test_driver_dedup_expired_asks_result_of():
    r = Rig()
    r.submit(_tcc(90, r.now))
    drv = JobDriver(r.m)
    s = next(s for s in drv.poll(r.now) if s.shard == 0)
    assert s.records is not None
    res = np.zeros(len(s.records), dtype=RESULT_DTYPE)
    res["dedup_id"] = s.records["dedup_id"]
    res["code"] = Code.DEDUP_EXPIRED
    drv.on_reply(s.send_id, res, None, r.now)
    assert drv.take_results() == []
    (q,) = [x for x in drv.poll(r.now) if x.shard == 0]
    assert q.records is None and q.dedup_ids == [r.wf(90)["jobs"][0]["dedup_id"]] and q.issued_ms == T + 1
    ans = np.zeros(1, dtype=RESULT_DTYPE)
    ans["dedup_id"] = s.records["dedup_id"][:1]
    ans["code"] = NOT_REMEMBERED
    drv.on_reply(q.send_id, ans, None, r.now)               # cannot tell: ask again later
    assert drv.take_results() == []
    (q2,) = [x for x in drv.poll(r.now + 10_000) if x.shard == 0]
    ans["code"], ans["seq_num"] = Code.OK, 42
    drv.on_reply(q2.send_id, ans, None, r.now)
    assert drv.take_results() == [(90, 0, 0, 0, 42)]


def test_driver_bounds_jobs_in_flight_per_shard():
    r = Rig()
    for w in range(100, 110):
        r.submit(_tcc(w, r.now))
    drv = JobDriver(r.m, inflight_jobs_per_shard_max=3)
    sends = drv.poll(r.now)
    assert sorted(len(s.jobs) for s in sends) == [3, 3]
    assert drv.poll(r.now) == []


def test_u128_helpers_refuse_bad_values():
    with pytest.raises(ValueError):
        u128_bytes(-1)
    with pytest.raises(ValueError):
        u128_bytes(1 << 128)


def test_job_records_built_as_bytes_equal_the_ledgers_encoder():
    # the machine builds TCC and compensate records straight as bytes: byte for byte OpEncoder's
    from engine._ledger import OpEncoder
    from marker.workflow import one_op_record, tcc_try_records
    enc = OpEncoder()
    d, x, ts = (1 << 127) + 12345, (1 << 100) + 7, T + 99
    legs = [(A0, -(1 << 90), "USD"), (B0, 5, "EURO1234"), (C0, -1, "X")]
    want = enc.tcc_try(d, x, legs, timestamp=ts).tobytes()
    assert tcc_try_records(d, x, [(u128_bytes(a), m.to_bytes(16, "little", signed=True), c) for a, m, c in legs],
                           ts) == want
    assert one_op_record(11, d, x, ts) == enc.tcc_confirm(d, x, timestamp=ts).tobytes()
    assert one_op_record(12, d, x, ts) == enc.tcc_cancel(d, x, timestamp=ts).tobytes()
    assert one_op_record(13, d, x, ts) == enc.compensate(d, x, timestamp=ts).tobytes()


def test_phase_two_dedup_ids_are_derived_only_when_needed_and_the_same_after_a_restore():
    r = Rig()
    r.submit(_tcc(70, r.now))
    wf = r.m._active[70]
    assert [j.dedup_id != 0 for j in wf.jobs] == [True, True, False, False, False, False, False]
    before = r.m.get_workflow(70)
    assert all(j["dedup_id"] != 0 for j in before["jobs"] if j["kind"] != "DECIDE")     # a query derives them
    assert [j.dedup_id != 0 for j in wf.jobs] == [True, True, False, False, False, False, False]   # unchanged
    r.results(70, {0: int(Code.OK), 1: int(Code.OK)})
    assert [j.dedup_id != 0 for j in wf.jobs] == [True, True, False, True, True, False, False]
    m2 = MarkerMachine(SM)
    m2.restore(r.m.snapshot())
    assert [j.dedup_id for j in m2._active[70].jobs] == [j.dedup_id for j in wf.jobs]
    assert m2.digest() == r.m.digest()
    got = r.m.get_workflow(70)
    assert [j["dedup_id"] for j in got["jobs"]] == [j["dedup_id"] for j in before["jobs"]]
    skipped = [e for e in np.concatenate(r.events) if e["kind"] == EventKind.JOB_SKIPPED]
    assert len(skipped) == 2 and all(get_u128(e["dedup_id"].reshape(1, 2)) == [0] for e in skipped)


def test_driver_bounds_jobs_per_poll_and_results_per_take():
    r = Rig()
    for w in range(100, 110):
        r.submit(_tcc(w, r.now))
    drv = JobDriver(r.m)
    first = drv.poll(r.now, jobs_max=7)                     # 20 tries READY: 7 now, the rest later
    assert sum(len(s.jobs) for s in first) == 7
    rest = drv.poll(r.now, jobs_max=100)
    assert sum(len(s.jobs) for s in rest) == 13
    led = _ledgers()
    for s in first + rest:
        assert s.records is not None
        drv.on_reply(s.send_id, led[s.shard].apply_batch(s.records, timestamp=r.now), None, r.now)
    a, b, c = drv.take_results(8), drv.take_results(8), drv.take_results(8)
    assert (len(a), len(b), len(c)) == (8, 8, 4) and drv.take_results() == []
    assert len({(w, k) for w, k, *_ in a + b + c}) == 20
    with pytest.raises(ValueError):
        drv.take_results(0)


def test_try_expiry_is_configuration_carried_by_every_try():
    """``try_expiry_ms``: every TCC try carries expires_ms = the workflow's creation time + it (the ledger
    cancels a try it still holds by then: a safety net for a lost Marker); off by default; refused if too
    short to outlive phase 1."""
    import numpy as np
    from engine.records import OP_DTYPE
    from engine.shard_map import ShardMap
    from marker.commands import Submit, encode_entry, transfer
    from marker.workflow import TRY_EXPIRY_MIN_MS, JobKind, MarkerMachine
    smap = ShardMap.uniform([1, 2])
    a = next(x for x in range(1, 100) if smap.shard_of(x) == 1)
    b = next(x for x in range(1, 100) if smap.shard_of(x) == 2)
    t0 = 1_700_000_000_000
    for expiry, want in ((0, 0), (TRY_EXPIRY_MIN_MS, t0 + TRY_EXPIRY_MIN_MS)):
        m = MarkerMachine(smap, try_expiry_ms=expiry)
        m.apply(encode_entry([Submit(transfer(7, a, b, 5, "USD", issued_ms=t0, deadline_ms=t0 + 60_000))], t0))
        tries = [k for k, j in enumerate(m.get_workflow(7)["jobs"]) if j["kind"] == JobKind.TRY.name]
        assert len(tries) == 2
        for k in tries:
            recs = np.frombuffer(bytes(m.job_records(7, k)), dtype=OP_DTYPE) if not isinstance(
                m.job_records(7, k), np.ndarray) else m.job_records(7, k)
            assert int(recs["expires_ms"][0]) == want and not recs["expires_ms"][1:].any()
    with pytest.raises(ValueError, match="try_expiry_ms"):
        MarkerMachine(smap, try_expiry_ms=60_000)
