"""Helpers for the whole-system tests (tests/test_system*.py, test_marker_groups.py)."""
from __future__ import annotations

from engine.devtools.checks import accounts_by_shard

__all__ = ["accounts_by_shard"]
