"""``LightFuture`` behaves as ``concurrent.futures.Future`` wherever the project (and asyncio) uses one."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time

import pytest

from engine.service.futures import LightFuture, _LightFuture


def test_it_is_the_light_one_here_and_a_future():
    assert LightFuture is _LightFuture
    f = LightFuture()
    assert isinstance(f, cf.Future) and not f.done() and f._cond is None


def test_result_exception_and_callbacks_in_order():
    f = LightFuture()
    seen = []
    f.add_done_callback(lambda x: seen.append(("a", x.result())))
    f.add_done_callback(lambda x: seen.append(("b", x.result())))
    f.set_result(7)
    f.add_done_callback(lambda x: seen.append(("c", x.result())))     # already done: at once
    assert seen == [("a", 7), ("b", 7), ("c", 7)] and f.result() == 7 and f.exception() is None
    assert f._cond is None, "nobody waited: no Condition was made"
    with pytest.raises(cf.InvalidStateError):
        f.set_result(8)
    g = LightFuture()
    g.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        g.result()
    assert isinstance(g.exception(), KeyError)
    bad = LightFuture()
    bad.add_done_callback(lambda x: 1 / 0)                  # logged, not raised to the setter
    bad.set_result(1)


def test_a_thread_waiting_is_woken_and_timeouts_hold():
    f = LightFuture()
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.05)
    threading.Timer(0.05, f.set_result, (3,)).start()
    t0 = time.monotonic()
    assert f.result(timeout=5) == 3 and time.monotonic() - t0 < 2
    e = LightFuture()
    threading.Timer(0.05, e.set_exception, (ValueError("v"),)).start()
    assert isinstance(e.exception(timeout=5), ValueError)


def test_wait_as_completed_cancel_and_asyncio():
    fs = [LightFuture() for _ in range(3)]
    threading.Timer(0.05, fs[1].set_result, (1,)).start()
    done, pending = cf.wait(fs, timeout=5, return_when=cf.FIRST_COMPLETED)
    assert done == {fs[1]} and len(pending) == 2
    fs[0].set_result(0)
    fs[2].set_exception(RuntimeError("r"))
    assert set(cf.as_completed(fs, timeout=5)) == set(fs)
    c = LightFuture()
    assert c.cancel() and c.cancelled() and c.done()
    with pytest.raises(cf.CancelledError):
        c.result()

    async def main() -> int:
        f = LightFuture()
        asyncio.get_running_loop().call_later(0.02, lambda: threading.Thread(target=f.set_result,
                                                                             args=(9,)).start())
        return await asyncio.wrap_future(f)
    assert asyncio.run(main()) == 9


def test_many_threads_settle_and_wait_at_once():
    fs = [LightFuture() for _ in range(200)]
    got = []

    def waiter(f: cf.Future) -> None:
        got.append(f.result(timeout=10))
    ws = [threading.Thread(target=waiter, args=(f,)) for f in fs]
    for w in ws:
        w.start()
    setters = [threading.Thread(target=f.set_result, args=(k,)) for k, f in enumerate(fs)]
    for s in setters:
        s.start()
    for t in ws + setters:
        t.join(10)
    assert sorted(got) == list(range(200))
