"""``LightFuture``: a ``concurrent.futures.Future`` that costs less to make and to settle.

Every call through a client makes several futures (the call's, the decoded reply's, the router's, the
gateway's), and the standard Future builds a ``threading.Condition`` (over an RLock) in its constructor:
~2.5 us, an eighth of the gateway's main thread under per-call load (py-spy, bench_client_calls --gateway).
This subclass keeps a plain lock and builds the Condition only when a thread really has to wait
(``result()`` or ``exception()`` before the outcome, ``concurrent.futures.wait``/``as_completed``,
``cancel``): a future settled by an I/O thread and read by callbacks never makes one.

It is a Future (``isinstance``, ``asyncio.wrap_future``, ``concurrent.futures.wait`` keep working) with the
base class's semantics; it reaches into the base class's private attributes (``_state``, ``_waiters``,
``_done_callbacks``, ``_invoke_callbacks``, ``_condition``), so it is checked against them at import: on a
Python whose Future differs, ``LightFuture`` is the plain Future.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import _base as _fb
from typing import Any

_DONE = frozenset({_fb.CANCELLED, _fb.CANCELLED_AND_NOTIFIED, _fb.FINISHED})
_make_condition = threading.Lock()           # two threads asking for it at once get one Condition


class _LightFuture(Future):
    def __init__(self) -> None:             # not the base's: no Condition yet
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None
        self._state = _fb.PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        """The base class's Condition, over this future's lock, made at the first wait."""
        c = self._cond
        if c is None:
            with _make_condition:
                c = self._cond
                if c is None:
                    c = self._cond = threading.Condition(self._lock)
        return c

    def done(self) -> bool:
        return self._state in _DONE

    def add_done_callback(self, fn: Any) -> None:
        with self._lock:
            if self._state not in _DONE:
                self._done_callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:                # noqa: BLE001 - as the base class: a callback's error is logged
            _fb.LOGGER.exception("exception calling callback for %r", self)

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _fb.FINISHED and self._exception is None:
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _fb.FINISHED:
            return self._exception
        return super().exception(timeout)

    def _settle(self, result: Any, exception: BaseException | None) -> None:
        with self._lock:
            state = self._state
            if state not in _DONE:
                self._result = result
                self._exception = exception
                self._state = _fb.FINISHED
                for waiter in self._waiters:
                    if exception is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
                if self._cond is not None:
                    self._cond.notify_all()
        if state in _DONE:               # the message outside the lock: repr takes it (a plain Lock)
            raise InvalidStateError(f"{state}: {self!r}")
        self._invoke_callbacks()        # type: ignore[attr-defined]

    def set_result(self, result: Any) -> None:
        self._settle(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._settle(None, exception)


def _compatible() -> bool:
    """The base class still keeps its state where ``_LightFuture`` expects it."""
    try:
        f: Future = Future()
        return (all(hasattr(f, a) for a in ("_condition", "_state", "_waiters", "_done_callbacks",
                                             "_result", "_exception"))
                and callable(getattr(Future, "_invoke_callbacks", None)))
    except Exception:      # noqa: BLE001 - any surprise: use the plain Future
        return False


LightFuture: type[Future] = _LightFuture if _compatible() else Future
