"""The shard's event store: the service's ``EventStore`` (engine/service/event_store.py) of the ledger's
128-byte ``records.EVENT_DTYPE`` events, with the durable dedup index RESULT_OF uses past the window."""
from __future__ import annotations

from typing import Any

from engine.records import EVENT_DTYPE
from engine.service import event_store as _store
from engine.service.event_store import (EVENT_RETENTION_SEQS_DEFAULT, EVENT_STORE_MAP_SIZE_BYTES_DEFAULT,
                                        LOOKUP_BLOCKS_MAX, PENDING_BYTES_MAX, PENDING_CHUNKS_MAX, PRUNE_PASS_CHUNKS,
                                        WRITEBACK_INTERVAL_S, EventsUnavailable, IndexedEvents, dedup_hashes)

__all__ = ["EVENT_RETENTION_SEQS_DEFAULT", "EVENT_STORE_MAP_SIZE_BYTES_DEFAULT", "LOOKUP_BLOCKS_MAX",
           "PENDING_BYTES_MAX", "PENDING_CHUNKS_MAX", "PRUNE_PASS_CHUNKS", "WRITEBACK_INTERVAL_S", "EventStore",
           "EventsUnavailable", "IndexedEvents", "dedup_hashes"]


class EventStore(_store.EventStore):
    """The service's store with the ledger's event records (and so its dedup index)."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", EVENT_DTYPE)
        super().__init__(path, **kwargs)
