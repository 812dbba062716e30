"""What a gateway call returns for a command: the embedded Ledger's ``Result`` shape, for one shard or many.

A command the gateway sent to one shard comes back as that shard's result (``shard`` says which, ``seq_num``
is the shard's seq: read-your-writes per shard). A command that became a Marker workflow (a transfer between
accounts on two shards, a multi-leg movement) comes back with the workflow's outcome: ``code`` OK or the
business code that made it fail as a whole (nothing moved then), ``workflow_state`` SUCCEEDED / FAILED /
STUCK, ``seq_num`` 0 (no single seq spans shards) and ``accounts`` empty (read them with get_accounts).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine.records import SUCCESS_CODES, Code, Kind


def as_code(c: int) -> Any:
    """``Code`` (the ledger's), ``marker.workflow.MarkerCode`` (>= 1000), or the plain int."""
    try:
        return Code(c)
    except ValueError:
        pass
    from marker.workflow import MarkerCode
    try:
        return MarkerCode(c)
    except ValueError:
        return c


class Result:
    """``code``, ``duplicate``, ``seq_num``, ``dedup_id``, ``kind``, ``ok``, ``accounts`` as the embedded
    ``Result``; plus ``shard`` (the shard that applied it, None for a workflow) and ``workflow_state``
    (None unless it ran as a Marker workflow)."""
    __slots__ = ("code", "duplicate", "seq_num", "dedup_id", "kind", "shard", "workflow_state", "_accounts",
                 "_remote", "_events")

    def __init__(self, code: int, duplicate: bool, seq_num: int, dedup_id: int, kind: int,
                 shard: int | None = None, workflow_state: str | None = None,
                 accounts: dict[int, dict[str, Any]] | None = None) -> None:
        self.code = as_code(int(code))
        self.duplicate = bool(duplicate)
        self.seq_num = int(seq_num)
        self.dedup_id = int(dedup_id)
        self.kind: Kind | int = Kind(kind) if kind in Kind._value2member_map_ else int(kind)
        self.shard = shard
        self.workflow_state = workflow_state
        self._accounts = accounts
        self._remote: Any = None
        self._events: Any = None             # the command's event records, its accounts decoded when asked for

    @classmethod
    def of_shard(cls, remote: Any, shard: int) -> Result:
        """From an ``engine.client.RemoteResult`` of shard ``shard`` (its accounts decoded when asked for)."""
        r = cls(int(remote.code), remote.duplicate, remote.seq_num, remote.dedup_id, int(remote.kind), shard)
        r._remote = remote
        return r

    @classmethod
    def of_workflow(cls, wf: Any, kind: int) -> Result:
        """From a finished ``marker.client.WorkflowResult`` (``kind``: what the caller asked for)."""
        return cls(int(wf.code), wf.duplicate, 0, wf.workflow_id, kind, None, wf.state, {})

    @property
    def ok(self) -> bool:
        if self.workflow_state is not None:
            return self.code == Code.OK and self.workflow_state == "SUCCEEDED"
        return self.code in SUCCESS_CODES

    @property
    def accounts(self) -> dict[int, dict[str, Any]]:
        if self._accounts is None:
            if self._remote is not None:
                self._accounts = self._remote.accounts
            elif self._events is not None:
                from engine.records import accounts_from_events
                self._accounts = accounts_from_events(self._events) if self.seq_num else {}
        return self._accounts or {}

    def _event_records(self) -> Any:
        """The command's event records when the accounts are still only that (a shard's result not yet
        looked into): what goes on the wire instead of the decoded accounts (~40 us less a call at the
        gateway, and the caller decodes them only if it reads ``accounts``)."""
        if self._accounts is not None:
            return None
        if self._events is not None:
            return self._events
        return getattr(self._remote, "_events", None) if self._remote is not None else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": int(self.code), "duplicate": self.duplicate, "seq_num": self.seq_num,
             "dedup_id": self.dedup_id, "kind": int(self.kind), "shard": self.shard,
             "workflow_state": self.workflow_state}
        evs = self._event_records()
        if evs is not None:
            d["events"] = evs
        else:
            d["accounts"] = self.accounts
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        evs = d.get("events")
        r = cls(d["code"], d["duplicate"], d["seq_num"], d["dedup_id"], d["kind"], d.get("shard"),
                d.get("workflow_state"), None if evs is not None else (d.get("accounts") or {}))
        if evs is not None:
            from engine.records import EVENT_DTYPE
            if not isinstance(evs, np.ndarray) or evs.dtype != EVENT_DTYPE:
                raise ValueError("a Result's events are event records")
            r._events = evs
        return r

    def __repr__(self) -> str:
        name = getattr(self.code, "name", str(self.code))
        where = f"workflow {self.workflow_state}" if self.workflow_state is not None else f"shard {self.shard}"
        return (f"Result(code={name}, duplicate={self.duplicate}, seq_num={self.seq_num}, "
                f"dedup_id={self.dedup_id}, {where})")
