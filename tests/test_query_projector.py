"""The projector: the view equals the ledger whatever the delivery (chunks, repeats, reorderings, gaps), after
kill -9 at random points, and a rebuild from seq 1 equals the incremental view; reconciliation stops it."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.records import EVENT_DTYPE, put_i128
from query.projector import Projector, rebuild
from query.view import ViewError
from tests.query_helpers import chunks_of, random_ledger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_view_is_ledger(p: Projector, led, ids) -> None:
    for a in ids:
        g = led.get_account(a)
        r = p.table.get(a)
        assert r is not None
        got = (int(r["available"]), int(r["reserved"]), int(r["pending_in"]), int(r["pending_out"]),
               int(r["version"]), int(r["state"]))
        want = (g["available"], g["reserved"], sum(g["pending_in"].values()), sum(g["pending_out"].values()),
                g["version"], int(g["state"]))
        assert got == want, (a, got, want)


def all_versions(p: Projector, shard: int = 1) -> np.ndarray:
    with p.env.begin(db=p.dbs["versions"]) as txn:
        parts = [np.frombuffer(v, dtype=p.table.rows.dtype).copy() for _k, v in txn.cursor()]
    return np.concatenate(parts)


def test_duplicates_reorders_and_gaps_give_the_ledger(tmp_path):
    led, ids = random_ledger(11, commands=1500)
    evs = led.events(1, led.last_seq)
    rnd = random.Random(5)
    chunks = chunks_of(evs, rnd)
    deliveries = chunks + [rnd.choice(chunks) for _ in range(len(chunks) // 2)]    # repeats
    rnd.shuffle(deliveries)                                                           # any order
    dropped = set(rnd.sample(range(len(deliveries)), len(deliveries) // 5))           # lost: a gap to fetch
    p = Projector(str(tmp_path / "v"), sync=False)
    fetched = 0
    for k, c in enumerate(deliveries):
        if k not in dropped:
            p.offer(1, c)
    while p.applied_seq(1) < led.last_seq:
        gap = p.missing(1) or (p.applied_seq(1) + 1, led.last_seq)
        p.offer(1, led.events(gap[0], gap[1]))                                      # the range fetch
        fetched += 1
    assert fetched >= 1
    assert p.applied_seq(1) == led.last_seq
    assert_view_is_ledger(p, led, ids)
    # rebuild equals incremental: one pass from seq 1, side by side, then swapped in
    inc = all_versions(p)
    table = p.table
    p.close()
    rebuild(str(tmp_path / "v"), {1: led.events}, {1: lambda: led.last_seq}, sync=False)
    q = Projector(str(tmp_path / "v"), sync=False)
    assert (all_versions(q) == inc).all()
    assert (q.table.rows == table.rows).all() and (q.table.keys == table.keys).all()
    q.close()


def test_a_gap_is_waited_for_not_skipped(tmp_path):
    led, _ids = random_ledger(2, commands=100)
    evs = led.events(1, led.last_seq)
    p = Projector(str(tmp_path / "v"), sync=False)
    ahead = evs[evs["seq_num"] > 10]
    assert p.offer(1, ahead) == 0
    assert p.applied_seq(1) == 0 and p.missing(1) == (1, 10)
    assert p.offer(1, evs[evs["seq_num"] <= 10]) == led.last_seq       # the gap filled: everything applies
    assert p.missing(1) is None
    p.close()


def test_reconciliation_mismatch_stops_the_projector(tmp_path):
    led, _ids = random_ledger(4, commands=200)
    evs = led.events(1, led.last_seq).copy()
    bad_at = int(np.flatnonzero(evs["kind"] == 6)[3])                   # a transfer's record
    put_i128(evs["available"][bad_at:bad_at + 1], [12345678])
    p = Projector(str(tmp_path / "v"), sync=False)
    seq = int(evs["seq_num"][bad_at])
    p.offer(1, evs[evs["seq_num"] < seq])
    with pytest.raises(ViewError, match=f"reconciliation: seq {seq} .*available"):
        p.offer(1, evs[evs["seq_num"] >= seq])
    assert p.applied_seq(1) == seq - 1                                  # nothing of the bad batch committed
    with pytest.raises(ViewError):
        p.offer(1, led.events(seq, led.last_seq))                       # stopped until fixed (rebuild)
    assert "reconciliation" in (p.status()["error"] or "")
    p.close()


def test_malformed_chunks_are_refused(tmp_path):
    led, _ids = random_ledger(6, commands=50)
    evs = led.events(1, led.last_seq)
    p = Projector(str(tmp_path / "v"), sync=False)
    two = np.flatnonzero(evs["parts"] == 2)[0]
    with pytest.raises(ViewError, match="parts"):
        p.offer(1, evs[two + 1:two + 5])                                  # starts mid-seq
    holes = np.concatenate([evs[evs["seq_num"] <= 3], evs[evs["seq_num"] == 5]])
    with pytest.raises(ViewError, match="consecutive"):
        p.offer(1, holes)
    with pytest.raises(ViewError, match="EVENT_DTYPE"):
        p.offer(1, np.zeros(3, dtype=np.uint8))
    assert p.applied_seq(1) == 0 and p.error is None                      # refused, not stopped
    p.offer(1, evs)
    assert p.applied_seq(1) == led.last_seq
    p.close()


CHILD = r"""
import random, sys, time
sys.path.insert(0, sys.argv[1])
from query.projector import Projector
from tests.query_helpers import random_ledger, chunks_of
led, ids = random_ledger(21, commands=6000)
p = Projector(sys.argv[2], sync=True)
print("start", p.applied_seq(1), flush=True)
if p.applied_seq(1) < led.last_seq:
    evs = led.events(p.applied_seq(1) + 1, led.last_seq)
    for c in chunks_of(evs, random.Random(int(sys.argv[3])), max_seqs=8):
        p.offer(1, c)
print("done", p.applied_seq(1), flush=True)
"""


def test_kill_9_at_random_points_resumes_exactly_once(tmp_path):
    path = str(tmp_path / "v")
    rnd = random.Random(9)
    starts = []
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, path, str(attempt)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=ROOT)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("start"), proc.stderr.read().decode() if proc.stderr else line
        starts.append(int(line.split()[1]))
        if attempt < 4:
            time.sleep(rnd.uniform(0.02, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close() if proc.stderr else None
            continue
        # read on through the same buffered pipe: readline() may already hold the "done" line (a view that
        # was nearly complete prints both at once), which communicate() would bypass
        out = proc.stdout.read()
        err = proc.stderr.read() if proc.stderr else b""
        proc.wait(120)
        assert proc.returncode == 0, err.decode()
        assert "done" in out.decode()
        break
    led, ids = random_ledger(21, commands=6000)
    p = Projector(path, sync=False)
    assert p.applied_seq(1) == led.last_seq
    assert_view_is_ledger(p, led, ids)
    # every (account, seq) version exactly once, in order, equal to a one-pass projection
    got = all_versions(p)
    p.close()
    ref = Projector(str(tmp_path / "ref"), sync=False)
    ref.offer(1, led.events(1, led.last_seq))
    want = all_versions(ref)
    ref.close()
    assert len(got) == len(want) and (got == want).all()
    assert any(0 < s < led.last_seq for s in starts), starts               # some restart resumed mid-stream


def test_event_dtype_is_the_ledgers():
    assert EVENT_DTYPE.itemsize == 128


def test_account_ids_beyond_64_bits(tmp_path):
    led, ids = random_ledger(13, accounts=8, commands=400, first_account=(1 << 64) + 3)
    led2, ids2 = random_ledger(14, accounts=4, commands=100, first_account=7)
    p = Projector(str(tmp_path / "v"), sync=False)
    p.offer(2, led2.events(1, led2.last_seq))            # a narrow table first, then wide ids join it
    for c in chunks_of(led.events(1, led.last_seq), random.Random(2)):
        p.offer(1, c)
    assert_view_is_ledger(p, led, ids)
    assert_view_is_ledger(p, led2, ids2)


def test_reopen_from_a_table_snapshot_plus_the_chunks_after_it(tmp_path, monkeypatch):
    import query.projector as PJ
    monkeypatch.setattr(PJ, "SNAPSHOT_VERSIONS_MIN", 50)             # snapshots every ~50 versions here
    led, ids = random_ledger(15, accounts=10, commands=900)
    p = Projector(str(tmp_path / "v"), sync=False)
    for c in chunks_of(led.events(1, led.last_seq), random.Random(4), max_seqs=20):
        p.offer(1, c)
    keys, rows = p.table.keys.copy(), p.table.rows.copy()
    with p.env.begin(db=p.dbs["meta"]) as txn:
        snap_seq = int.from_bytes(bytes(txn.get(b"table_seqs"))[2:10], "little")
    assert 0 < snap_seq < led.last_seq                                   # a snapshot, and chunks after it
    p.close()
    q = Projector(str(tmp_path / "v"), sync=False)
    assert (q.table.keys == keys).all() and (q.table.rows == rows).all()
    assert_view_is_ledger(q, led, ids)
    q.close()
