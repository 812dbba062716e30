"""The stall log (engine/stalls.py): what it records, the deltas the benchmarks print, the scheduler probe."""
import sys
import time

from engine.stalls import SchedulerProbe, StallLog, stall_delta, stall_text


def test_only_pauses_past_the_threshold_are_recorded():
    log = StallLog(threshold_s=0.005, recent=2)
    log.add("raft-persist", 0.004)
    assert log.report()["by_cause"] == {}
    log.add("raft-persist", 0.012)
    log.add("raft-persist", 0.007)
    log.add("raft-apply", 0.050)
    rep = log.report()
    assert rep["threshold_ms"] == 5
    assert rep["by_cause"]["raft-persist"] == {"count": 2, "total_ms": 19.0, "max_ms": 12.0}
    assert rep["by_cause"]["raft-apply"]["count"] == 1
    assert [r[1] for r in rep["recent"]] == ["raft-persist", "raft-apply"]     # the last two kept


def test_delta_between_reports_and_its_text():
    log = StallLog(threshold_s=0.005)
    log.add("raft-persist", 0.010)
    before = log.report()
    log.add("raft-persist", 0.020)
    log.add("main-pass", 0.030)
    d = stall_delta(before, log.report())
    assert d == {"raft-persist": {"count": 1, "total_ms": 20.0},
                 "main-pass": {"count": 1, "total_ms": 30.0, "max_ms": 30.0}}
    assert stall_text(d) == "main-pass 1 (max 30 ms), raft-persist 1 (20 ms total)"
    assert stall_delta(log.report(), log.report()) == {} and stall_text({}) == "none"


def test_scheduler_probe_sees_a_held_gil():
    # a pure-Python loop with a 50 ms switch interval keeps the GIL from the probe for tens of ms
    log = StallLog(threshold_s=0.005)
    probe = SchedulerProbe(log, 0.001)
    interval = sys.getswitchinterval()
    probe.start()
    try:
        time.sleep(0.02)
        sys.setswitchinterval(0.05)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.2:
            pass
    finally:
        sys.setswitchinterval(interval)
        probe.stop()
    late = log.report()["by_cause"]["not-scheduled"]
    assert late["count"] >= 1 and late["max_ms"] >= 10
