"""zwallet access layer: the whole system (every shard and the Marker) as one ledger.

``gateway.Client`` / ``gateway.AsyncClient`` have the embedded Ledger's methods plus the business API
(``pay``, ``refund``, ``split``, holds, templates); ``gateway.router.Router`` is the routing library they
use in-process; ``zwallet gateway`` (``gateway/server.py``) is the stateless service. docs/gateway.md.
"""
from __future__ import annotations

from gateway.client import AsyncClient, Client, RemoteError, WorkflowPending, WorkflowRefused
from gateway.result import Result
from gateway.router import Router, derive_id

__all__ = ["AsyncClient", "Client", "RemoteError", "Result", "Router", "WorkflowPending", "WorkflowRefused",
           "derive_id"]
