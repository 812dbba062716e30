"""The README's main job, small: a 3-replica ledger cluster with a leader killed part-way."""
from engine import demo


def test_demo_conserves_money_and_converges(capsys):
    assert demo.main(["--accounts", "200", "--batches", "12", "--batch-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "(OK)" in out and "new leader" in out
