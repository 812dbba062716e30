"""The README's main job, small: the whole system (2 shards x 3, the Marker, the gateway, the query service
and, where PostgreSQL is installed, the export) with a shard leader and the Marker leader killed part-way;
and the older one-shard demo."""
from engine.devtools import checks, demo, shard_demo


def test_whole_system_demo_passes_every_check(capsys):
    assert demo.main(["--seconds", "6", "--accounts", "20", "--concurrency", "24"]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out
    from engine.devtools.pg_server import find_bindir
    n = 14 if find_bindir() is not None else 13            # the PostgreSQL export runs when it is installed
    assert f"{n} of {n} checks passed" in out
    assert "[OK] hierarchy: the merchants group over both shards" in out
    assert ("[OK] PostgreSQL export: shard 1" in out) == (n == 14)
    assert "fault: shard 1 leader" in out and "fault: Marker leader" in out
    assert "duplicate=True" in out and "transfer (two shards)" in out and "pay with fee" in out


def test_whole_system_demo_fails_when_its_book_disagrees(capsys, monkeypatch):
    """The balance check is real: a book that counts one leg of every split twice (as a double apply would
    show) makes the demo fail and exit 1."""
    real = demo.Book.apply

    def doubled(self, legs):
        real(self, legs)
        if len(legs) == 4:                 # a split: payer and three shares
            real(self, legs[1:2])
    monkeypatch.setattr(demo.Book, "apply", doubled)
    assert demo.main(["--seconds", "3", "--accounts", "8", "--concurrency", "8", "--no-export"]) == 1
    out = capsys.readouterr().out
    assert "[FAILED] every one of" in out and "-- FAILED" in out


def test_converged_needs_every_replica_and_one_digest():
    st = {"digest": "ab", "commit": 5, "applied": 5, "sm_applied": 4, "last_seq": 9}
    assert checks.converged({0: st, 1: dict(st), 2: dict(st)})
    assert not checks.converged({0: st, 1: dict(st), 2: None})
    assert not checks.converged({0: st, 1: dict(st, digest="cd"), 2: dict(st)})
    assert not checks.converged({0: st, 1: dict(st, applied=4), 2: dict(st)})
    assert not checks.converged({0: st, 1: dict(st, digest=""), 2: dict(st, digest="")})


def test_shard_demo_conserves_money_converges_and_streams_every_event(capsys):
    assert shard_demo.main(["--accounts", "200", "--batches", "12", "--batch-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "new leader" in out and "duplicate=True" in out
    assert "with no gap (OK)" in out and "owes 200,000,000 (OK)" in out
