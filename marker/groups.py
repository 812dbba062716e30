"""Which Marker group owns a workflow: rendezvous hashing over the groups of system.toml.

    owner(workflow_id) = the group g maximising blake2b(workflow_id (16 LE) || g (4 LE), 8 bytes)

over every group ever listed, removed ones included. Every client and every group computes the same. With
rendezvous hashing, removing a group moves only that group's workflows (each to the group that ranks next
for it); every other workflow keeps its group, so a retry anywhere finds the workflow where it ran.

A removed group (``removed_ms`` in its ``[[marker.group]]`` table) was drained first (it refused new work
and finished what it had) and then stopped. A workflow it owned that is submitted again goes to the next
group, which does not know it: if it was issued at or before ``removed_ms`` it may have run in the removed
group, so it is refused (WRONG_GROUP, "issued before group g was removed"), never run a second time; one
issued after is new and runs there. A group also refuses a workflow another active group owns (a client
with an older group list), so one workflow id can never run in two groups.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

from engine.system import Group


def _rank(workflow_id: int, group_id: int) -> int:
    h = hashlib.blake2b(workflow_id.to_bytes(16, "little") + group_id.to_bytes(4, "little"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


class GroupMap:
    """The Marker groups of a system: ``groups`` in system.toml order (removed ones have ``removed_ms``)."""

    def __init__(self, groups: Sequence[Group]) -> None:
        self.groups = list(groups)
        self.active = [g.id for g in self.groups if not g.removed_ms]
        self.removed = {g.id: g.removed_ms for g in self.groups if g.removed_ms}
        if not self.active:
            raise ValueError("every Marker group is removed: at least one must serve")
        ids = [g.id for g in self.groups]
        if len(set(ids)) != len(ids):
            raise ValueError(f"Marker group ids must be distinct: {ids}")
        self._all = ids

    @property
    def several(self) -> bool:
        return len(self._all) > 1

    def owner(self, workflow_id: int) -> int:
        """The active group a workflow goes to."""
        if len(self.active) == 1:
            return self.active[0]
        return max(self.active, key=lambda g: _rank(workflow_id, g))

    def refusal(self, workflow_id: int, issued_ms: int, group_id: int) -> str | None:
        """Why group ``group_id`` must not run this workflow (None: it is its own)."""
        if not self.several:
            return None
        first = max(self._all, key=lambda g: _rank(workflow_id, g))
        if first in self.removed:
            if issued_ms <= self.removed[first]:
                return (f"workflow {workflow_id} belonged to Marker group {first}, removed at {self.removed[first]} "
                        f"ms, and was issued before it (issued_ms {issued_ms}): it may have run there; it is "
                        "never run again")
        owner = self.owner(workflow_id)
        if owner != group_id:
            return (f"workflow {workflow_id} belongs to Marker group {owner}, not {group_id}: the client's "
                    "group list is stale (reload system.toml)")
        return None
