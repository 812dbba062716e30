"""The record arrays' fast copies (engine/records.py: copies as opaque records, since numpy copies these
structured dtypes field by field) give exactly what numpy's own operations give; OpEncoder's records (built
by one memcpy) are what the embedded ledger applies."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from engine import records as R
from engine._ledger import Ledger, OpEncoder


def _random_records(dtype: np.dtype, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.frombuffer(rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).tobytes(), dtype=dtype).copy()


@pytest.mark.parametrize("dtype", [R.OP_DTYPE, R.EVENT_DTYPE, R.RESULT_DTYPE])
def test_copy_take_concat_equal_numpys(dtype):
    a = _random_records(dtype, 1000, 1)
    b = _random_records(dtype, 7, 2)
    c = R.records_copy(a)
    assert c.dtype == dtype and c.tobytes() == a.copy().tobytes() and c.flags.writeable
    c[0:1].view(np.uint8)[:] = 0                        # a copy, not a view
    assert a[0:1].tobytes() != c[0:1].tobytes() or not a[0:1].view(np.uint8).any()
    idx = np.array([5, 0, 999, 5])
    assert R.records_take(a, idx).tobytes() == a[idx].tobytes()
    mask = np.zeros(1000, bool)
    mask[::3] = True
    assert R.records_take(a, mask).tobytes() == a[mask].tobytes()
    assert R.records_take(a, mask).dtype == dtype
    assert R.records_copy(a[10:20]).tobytes() == a[10:20].tobytes()       # a slice (a view) too
    assert R.records_concat([a, b, a[3:4]], dtype).tobytes() == np.concatenate([a, b, a[3:4]]).tobytes()
    assert R.records_concat([b], dtype).tobytes() == b.tobytes()
    assert len(R.records_concat([], dtype)) == 0 and R.records_concat([], dtype).dtype == dtype
    with pytest.raises(TypeError):
        R.records_concat([a, np.zeros(3, np.uint64)], dtype)


def test_op_encoder_records_are_what_the_ledger_applies_and_leak_nothing():
    e = OpEncoder()
    led = Ledger()
    r = e.create_account(1, 10, "USD", lower_limit=None, timestamp=5)
    assert r.dtype == R.OP_DTYPE and r.shape == (1,) and r.flags.writeable and r.flags.c_contiguous
    assert int(r["issued_ms"][0]) == 5 and int(r["kind"][0]) == 1
    assert led.apply_batch(r)["code"][0] == 0
    led.create_account(2, 11, "USD", timestamp=5)
    t = e.transfer(3, 10, 11, 7, "USD", timestamp=6)
    assert led.apply_batch(t)["code"][0] == 0 and led.get_account(11)["available"] == 7
    g = e.batch_balance_operation(4, [(10, -2, "USD"), (11, 2, "USD")], timestamp=7)
    assert g.shape == (3,) and list(g["group_size"]) == [3, 0, 0]
    assert led.apply_batch(g)["code"][0] == 0 and led.get_account(11)["available"] == 9
    t2 = e.transfer(3, 10, 11, 7, "USD", timestamp=6)
    assert t2.tobytes() == t.tobytes(), "the same command, the same bytes"
    before = sys.getrefcount(R.OP_DTYPE)
    made = [e.transfer(100 + k, 10, 11, 1, "USD") for k in range(500)]
    assert sys.getrefcount(R.OP_DTYPE) >= before + 500
    del made
    after = sys.getrefcount(R.OP_DTYPE)
    assert after == before, f"each array holds one reference to the dtype, released: {before} -> {after}"
