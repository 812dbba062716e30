"""``system.toml``: where every process of a zwallet system listens, and the shard map.

Written by ``zwallet up`` (and by operators for a real deployment); read by every client that talks to the
whole system (``marker.Client.from_system``, ``gateway.Client.from_system``, the query side) and by the
Marker, which must know every shard. The format:

    [system]
    epoch = 1                          # the shard map's epoch (also in [shard_map])

    [shard_map]                        # engine.shard_map.ShardMap.to_dict()
    epoch = 1
    shards = [1, 2]
    slots = [[0, 8191, 1], [8192, 16383, 2]]

    [[shard]]
    id = 1
    clients = ["tcp://127.0.0.1:7103", ...]   # the client ROUTER of each replica
    pubs = ["tcp://127.0.0.1:7106", ...]      # the event PUB of each replica
    raft = ["tcp://127.0.0.1:7100", ...]

    [marker]                           # the Marker group (workflows by hash of their id when several)
    clients = [...]
    pubs = [...]
    raft = [...]

A ``[[marker.group]]`` list of tables (``id``, ``clients``, ``pubs``) may replace the single group's keys when
there are several Marker groups; ``[gateway]`` (``clients``) and ``[query]`` (``clients``, ``http``: docs/query.md)
tables are added by those layers.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from engine.shard_map import ShardMap


@dataclass(frozen=True)
class Group:
    """One replicated group (a shard or a Marker group): the addresses of its replicas, in replica order."""
    id: int
    clients: tuple[str, ...]
    pubs: tuple[str, ...] = ()
    raft: tuple[str, ...] = ()
    removed_ms: int = 0                 # a Marker group taken out of service at this time (marker/groups.py)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], what: str, default_id: int = 1) -> Group:
        try:
            gid = int(doc.get("id", default_id))
            clients = tuple(str(a) for a in doc["clients"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{what}: needs id and clients: {exc}") from None
        if not clients:
            raise ValueError(f"{what} {gid}: clients is empty")
        try:
            removed_ms = int(doc.get("removed_ms", 0))
        except (TypeError, ValueError):
            raise ValueError(f"{what} {gid}: removed_ms must be an integer (ms since the Unix epoch)") from None
        return cls(gid, clients, tuple(str(a) for a in doc.get("pubs", ())),
                   tuple(str(a) for a in doc.get("raft", ())), removed_ms)

    def toml_lines(self) -> list[str]:
        out = [f"id = {self.id}", f"clients = {_toml_list(self.clients)}"]
        if self.pubs:
            out.append(f"pubs = {_toml_list(self.pubs)}")
        if self.raft:
            out.append(f"raft = {_toml_list(self.raft)}")
        if self.removed_ms:
            out.append(f"removed_ms = {self.removed_ms}")
        return out


@dataclass(frozen=True)
class System:
    shard_map: ShardMap
    shards: dict[int, Group]
    markers: tuple[Group, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)     # [gateway], [query], ... kept as read
    path: str | None = None

    def __post_init__(self) -> None:
        missing = set(self.shard_map.shards) - set(self.shards)
        if missing:
            raise ValueError(f"the shard map names shard(s) {sorted(missing)} with no [[shard]] table")

    # ------------------------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str) -> System:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ValueError(f"cannot read the system file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        try:
            return cls.from_dict(doc, path=os.path.abspath(path))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, doc: dict[str, Any], path: str | None = None) -> System:
        if "shard_map" not in doc:
            raise ValueError("no [shard_map] table")
        smap = ShardMap.from_dict(doc["shard_map"])
        shards: dict[int, Group] = {}
        for t in doc.get("shard", []):
            g = Group.from_dict(t, "[[shard]]")
            if g.id in shards:
                raise ValueError(f"shard {g.id} is listed twice")
            shards[g.id] = g
        markers: list[Group] = []
        mk = doc.get("marker")
        if mk is not None:
            if "group" in mk:
                markers = [Group.from_dict(t, "[[marker.group]]", k + 1) for k, t in enumerate(mk["group"])]
            else:
                markers = [Group.from_dict(mk, "[marker]")]
        extra = {k: v for k, v in doc.items() if k not in ("system", "shard_map", "shard", "marker")}
        return cls(smap, shards, tuple(markers), extra, path)

    # ------------------------------------------------------------------------------------ writing
    def to_toml(self) -> str:
        m = self.shard_map.to_dict()
        lines = ["# zwallet system: every address and the shard map (docs/operations.md)", "",
                 "[system]", f"epoch = {self.shard_map.epoch}", "",
                 "[shard_map]", f"epoch = {m['epoch']}", f"shards = {m['shards']}",
                 "slots = [" + ", ".join(f"[{a}, {b}, {s}]" for a, b, s in m["slots"]) + "]"]
        for sid in sorted(self.shards):
            lines += ["", "[[shard]]", *self.shards[sid].toml_lines()]
        if len(self.markers) == 1 and not self.markers[0].removed_ms and self.markers[0].id == 1:
            g = self.markers[0]
            lines += ["", "[marker]", *g.toml_lines()]
        elif self.markers:
            for g in self.markers:
                lines += ["", "[[marker.group]]", *g.toml_lines()]
        for name, table in self.extra.items():
            lines += ["", f"[{name}]"]
            for k, v in table.items():
                lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    def write(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.to_toml())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------------ lookups
    def shard_clients(self, shard_id: int) -> tuple[str, ...]:
        try:
            return self.shards[shard_id].clients
        except KeyError:
            raise ValueError(f"no shard {shard_id} in the system (shards: {sorted(self.shards)})") from None


def _toml_list(items: Any) -> str:
    return "[" + ", ".join(_toml_value(v) for v in items) + "]"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return _toml_list(v)
    raise ValueError(f"cannot write {v!r} to system.toml")
