"""zwallet storage layer: one shard.

``from engine import Ledger`` gives the embedded, single-threaded Cython ledger. The compiled extension
is required: there is no pure-Python fallback, so a missing build fails loudly here instead of running
slowly or differently. Subpackages that do not need the ledger (``engine.raft``) import without it.
"""
from __future__ import annotations

from typing import Any

_LEDGER_EXPORTS = ("Ledger", "Result", "Code", "Kind", "State")


def __getattr__(name: str) -> Any:
    if name in _LEDGER_EXPORTS:
        try:
            from engine import _ledger
        except ImportError as exc:  # pragma: no cover - exercised only on a broken install
            raise ImportError(
                "engine._ledger is not compiled. Build it with `pip install -e '.[test]'` "
                "(needs gcc, Cython and numpy); zwallet has no pure-Python fallback."
            ) from exc
        value = getattr(_ledger, name, None)
        if value is None:
            from engine import records
            value = getattr(records, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = list(_LEDGER_EXPORTS)
