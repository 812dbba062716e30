"""zwallet's read side (CQRS): projectors from the shards' event streams into LMDB views (account versions,
point-in-time balances, history, a hierarchy of accounts), the query service ``zwallet query`` and its
clients, and the exactly-once PostgreSQL export (``zwallet export-pg``, ``query.export_pg``).

``query.Client`` / ``query.AsyncClient`` talk to the service (``Client.from_system(path)``); the embedded
pieces are ``query.projector.Projector``, ``query.hierarchy.Hierarchy`` and ``query.queries.Queries``.
docs/query.md describes it all.
"""
from __future__ import annotations

from query.client import AsyncClient, Client, NotAvailable, QueryRefused

__all__ = ["AsyncClient", "Client", "NotAvailable", "QueryRefused"]
