"""The base config of every replicated service: who the replicas are, where the data lives, the generic
limits of the client intake and the event stream, and Raft. An app subclasses ``ServiceConfig`` (a
dataclass) with its own fields, its own TOML sections and its own checks (the shard: ``engine.node.NodeConfig``).

TOML layout (docs/operations.md)::

    [node]      id, data_dir, verbose, stall_probe_ms, metrics    (this replica)
    [limits]    the generic limits below, and the app's           (``TOML_LIMITS``)
    [raft]      tick_ms, election_ticks, ..., sync, snapshot_in_child
    [<app>]     the app's own sections                            (``TOML_APP_SECTIONS``)
    [security]  keys_dir, peer_key, client_key, insecure          (engine/service/security.py)
    [[replica]] id, raft, client, pub, key                        (every member, this one included;
                                                                   key: its Raft peer public key)

Every key of a known section names a field; an unknown key or section is an error.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from engine.raft.driver import DriverConfig
from engine.service.event_store import EVENT_RETENTION_SEQS_DEFAULT
from engine.service.metrics import parse_address
from engine.service.protocol import HEADER_BYTES_MAX

FRAME_BYTES_MAX_DEFAULT = (1 << 20) + HEADER_BYTES_MAX   # a client frame larger than this drops the connection

_C = TypeVar("_C", bound="ServiceConfig")

# the generic [limits], as to_toml writes them
SERVICE_LIMITS = ("frame_bytes_max", "inflight_entries_max", "pending_requests_max", "pending_per_client_max",
                  "pending_bytes_max", "pending_bytes_per_client_max", "connection_held_bytes_max",
                  "held_bytes_max", "connection_check_ms", "expensive_read_ms_per_s", "follower_read_wait_ms",
                  "read_waiting_max", "event_retention_seqs", "pub_queue_messages_max")
RAFT_SETTINGS = ("tick_ms", "election_ticks", "heartbeat_ticks", "snapshot_threshold_entries",
                 "snapshot_threshold_bytes", "snapshot_keep_entries", "snapshot_keep_bytes", "snapshot_bytes_max",
                 "leader_snapshot_defer", "map_size_gib")


@dataclass
class ServiceConfig:
    """Everything the machinery needs. ``replicas`` maps every member id to its three addresses."""
    node_id: int
    replicas: dict[int, dict[str, str]]          # id -> {"raft": ..., "client": ..., "pub": ...}
    data_dir: str
    # limits of the client intake (engine/service/server.py)
    frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT  # a client frame larger than this drops the connection
    inflight_entries_max: int = 1                 # proposed but not yet applied log entries of requests
    pending_requests_max: int = 100_000           # requests accepted and not yet answered, all clients
    pending_per_client_max: int = 8_192           # ... per client connection
    pending_bytes_max: int = 256 << 20            # bytes (header + payload) of those requests, all clients
    pending_bytes_per_client_max: int = 32 << 20  # ... per client connection
    connection_held_bytes_max: int = 64 << 20     # bytes one connection may hold inside ZeroMQ either way
                                                  # (received, not yet taken; replies not yet acknowledged)
                                                  # before the server cuts it (engine/conn_guard.py)
    held_bytes_max: int = 512 << 20               # ... all connections together (the largest are cut first)
    connection_check_ms: int = 20                 # how often the guard looks (0: no guard)
    expensive_read_ms_per_s: int = 50             # lock time per second for O(state) reads (the app's:
                                                  # ``ReadBudget``); over it: RATE_LIMITED
    follower_read_wait_ms: int = 2_000            # FOLLOWER read waiting for min_seq, then TIMEOUT
    read_waiting_max: int = 10_000                # parked follower reads
    event_retention_seqs: int = EVENT_RETENTION_SEQS_DEFAULT
    pub_queue_messages_max: int = 100_000         # SNDHWM of the PUB socket (slow subscribers lose, then fetch)
    # raft
    tick_ms: int = 10
    election_ticks: int = 30
    heartbeat_ticks: int = 3
    snapshot_threshold_entries: int = 200_000      # a snapshot forks and writes the state: not often (docs)
    snapshot_threshold_bytes: int = 256 << 20     # log payload since the last snapshot (held in memory)
    snapshot_keep_entries: int = 2_000
    snapshot_keep_bytes: int = 64 << 20           # ... but at most this many bytes of them (held in memory)
    snapshot_bytes_max: int = 4 << 30            # an incoming snapshot larger than this is refused
    leader_snapshot_defer: int = 4               # the leader snapshots this many times less often (by entries)
    snapshot_in_child: bool = True                # serialize snapshots in a forked child (no Raft stall)
    sync: bool = True
    map_size_gib: int = 64
    verbose: bool = False
    stall_probe_ms: int = 0                       # > 0: a thread measures scheduling delay (engine/stalls.py)
    metrics: str = ""                             # host:port of the Prometheus endpoint ("": off; port 0: any)
    # security (engine/service/security.py, docs/security.md): CURVE on every socket unless insecure
    keys_dir: str = ""                            # server.key_secret + clients/ (the allowed keys, rights)
    peer_key: str = ""                            # this replica's Raft peer key (.key_secret)
    client_key: str = ""                          # the key this service calls other services with (Marker)
    insecure: bool = False                        # CURVE off (loudly logged): only to measure its cost

    TOML_LIMITS: ClassVar[tuple[str, ...]] = SERVICE_LIMITS           # the [limits] to_toml writes
    TOML_APP_SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {}      # the app's sections -> their fields

    def validate(self) -> None:
        """The generic checks; an app's ``validate`` calls this first, then checks its own fields."""
        if self.node_id not in self.replicas:
            raise ValueError(f"node id {self.node_id} is not one of the replicas {sorted(self.replicas)}")
        for rid, addrs in self.replicas.items():
            missing = {"raft", "client", "pub"} - set(addrs)
            if missing:
                raise ValueError(f"replica {rid} lacks address(es) {sorted(missing)}")
        if self.frame_bytes_max < HEADER_BYTES_MAX:
            raise ValueError("frame_bytes_max must hold a request header (HEADER_BYTES_MAX)")
        largest_request = self.frame_bytes_max + HEADER_BYTES_MAX
        if not largest_request <= self.pending_bytes_per_client_max <= self.pending_bytes_max:
            raise ValueError("need frame_bytes_max + HEADER_BYTES_MAX <= pending_bytes_per_client_max <= "
                             "pending_bytes_max (one largest request must fit)")
        if not 2 * largest_request <= self.connection_held_bytes_max <= self.held_bytes_max:
            raise ValueError("need 2 x (frame_bytes_max + HEADER_BYTES_MAX) <= connection_held_bytes_max <= "
                             "held_bytes_max")
        if self.connection_check_ms < 0:
            raise ValueError("connection_check_ms must be >= 0 (0: no connection guard)")
        if self.expensive_read_ms_per_s < 1:
            raise ValueError("expensive_read_ms_per_s must be >= 1")
        for name in ("inflight_entries_max", "pending_requests_max", "pending_per_client_max",
                     "follower_read_wait_ms", "read_waiting_max", "event_retention_seqs",
                     "pub_queue_messages_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.stall_probe_ms < 0:
            raise ValueError("stall_probe_ms must be >= 0 (0: off)")
        if self.pending_per_client_max > self.pending_requests_max:
            raise ValueError("pending_per_client_max exceeds pending_requests_max")
        if self.metrics:
            parse_address(self.metrics)
        try:
            self.driver_config().validate()          # the [raft] settings, checked here with the rest
        except ValueError as exc:
            raise ValueError(f"[raft] {exc}") from None
        if not self.insecure:
            if not self.keys_dir:
                raise ValueError("[security] keys_dir is not set: CURVE needs the system's keys (zwallet keygen, "
                                 "docs/security.md); insecure = true turns CURVE off (tests that measure it only)")
            if not self.peer_key:
                raise ValueError("[security] peer_key is not set: the replica's Raft peer key file")
            keyless = sorted(rid for rid, a in self.replicas.items() if not a.get("key"))
            if keyless:
                raise ValueError(f"replica(s) {keyless} have no key (their Raft peer public key)")

    def client_keys(self) -> Any:
        """The CURVE client keys this service calls other services with (``client_key`` and the system's
        server key in ``keys_dir``); None when insecure."""
        if self.insecure:
            return None
        import os

        from engine.service.security import PUBLIC_SUFFIX, SERVER_KEY_NAME, ClientKeys
        if not self.client_key:
            raise ValueError("[security] client_key is not set: the key this service calls others with")
        return ClientKeys.load(self.client_key, os.path.join(self.keys_dir, SERVER_KEY_NAME + PUBLIC_SUFFIX))

    def driver_config(self) -> DriverConfig:
        return DriverConfig(tick_interval_ms=self.tick_ms, election_ticks=self.election_ticks,
                            heartbeat_ticks=self.heartbeat_ticks,
                            snapshot_threshold_entries=self.snapshot_threshold_entries,
                            snapshot_threshold_bytes=self.snapshot_threshold_bytes,
                            snapshot_keep_entries=self.snapshot_keep_entries,
                            snapshot_keep_bytes=self.snapshot_keep_bytes, snapshot_bytes_max=self.snapshot_bytes_max,
                            leader_snapshot_defer=self.leader_snapshot_defer, sync=self.sync,
                            map_size_bytes=self.map_size_gib << 30)

    @classmethod
    def from_toml(cls: type[_C], path: str, **overrides: Any) -> _C:
        """Read a config file; keyword overrides (None: not given) win over the file."""
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        return cls.from_dict(doc, **overrides)

    @classmethod
    def from_dict(cls: type[_C], doc: dict[str, Any], **overrides: Any) -> _C:
        known = {f.name for f in fields(cls)}
        sections = ("node", "limits", "raft", "security", *cls.TOML_APP_SECTIONS)
        values: dict[str, Any] = {}
        node = dict(doc.get("node", {}))
        if "id" in node:
            values["node_id"] = node.pop("id")
        types = {f.name: f.type for f in fields(cls)}
        for section in sections:
            for k, v in (node if section == "node" else doc.get(section, {})).items():
                if k not in known:
                    raise ValueError(f"unknown setting [{section}] {k}")
                _check_type(section, k, v, types[k])
                values[k] = v
        replicas = {}
        for r in doc.get("replica", []):
            rid = int(r["id"])
            replicas[rid] = {k: str(r[k]) for k in ("raft", "client", "pub", "key") if k in r}
        values["replicas"] = replicas
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(doc) - {*sections, "replica"}
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_toml(self) -> str:
        lines = ["[node]", f"id = {self.node_id}", f'data_dir = "{self.data_dir}"',
                 f"verbose = {str(self.verbose).lower()}", f"stall_probe_ms = {self.stall_probe_ms}",
                 f"metrics = {_toml_value(self.metrics)}", "", "[limits]"]
        lines += [f"{name} = {_toml_value(getattr(self, name))}" for name in self.TOML_LIMITS]
        lines += ["", "[raft]"]
        lines += [f"{name} = {getattr(self, name)}" for name in RAFT_SETTINGS]
        lines.append(f"sync = {str(self.sync).lower()}")
        lines.append(f"snapshot_in_child = {str(self.snapshot_in_child).lower()}")
        for section, names in self.TOML_APP_SECTIONS.items():
            lines += ["", f"[{section}]"] + [f"{name} = {_toml_value(getattr(self, name))}" for name in names]
        lines += ["", "[security]"] + [f"{name} = {_toml_value(getattr(self, name))}"
                                       for name in ("keys_dir", "peer_key", "client_key", "insecure")]
        for rid, a in sorted(self.replicas.items()):
            lines += ["", "[[replica]]", f"id = {rid}", f'raft = "{a["raft"]}"', f'client = "{a["client"]}"',
                      f'pub = "{a["pub"]}"']
            if a.get("key"):
                lines.append(f'key = "{a["key"]}"')
        return "\n".join(lines) + "\n"


_TYPE_NAMES = {"int": "an integer", "bool": "true or false", "str": "a string"}


def _check_type(section: str, key: str, v: Any, declared: Any) -> None:
    """A setting of the wrong TOML type is refused by name (not a TypeError from deep in a check)."""
    t = declared if isinstance(declared, str) else getattr(declared, "__name__", "")
    ok = {"int": isinstance(v, int) and not isinstance(v, bool), "bool": isinstance(v, bool),
          "str": isinstance(v, str)}.get(t, True)
    if not ok:
        raise ValueError(f"[{section}] {key} must be {_TYPE_NAMES[t]}, not {v!r}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(v)
