"""The README's main job, small: a 3-replica shard with the leader killed part-way."""
from engine.devtools import demo


def test_demo_conserves_money_converges_and_streams_every_event(capsys):
    assert demo.main(["--accounts", "200", "--batches", "12", "--batch-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "new leader" in out and "duplicate=True" in out
    assert "with no gap (OK)" in out and "owes 200,000,000 (OK)" in out
