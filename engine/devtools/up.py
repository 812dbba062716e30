"""``zwallet up``: a whole local zwallet system on loopback, until Ctrl-C.

    zwallet up --shards 2 --replicas 3 --dir D [--base-port 7100] [--no-sync]

starts S shards of R ``zwallet node`` replicas each (shard ids 1..S, the slots split evenly between them)
and a Marker group of R replicas, and ``--gateways`` G (default 1) gateway replicas (``zwallet gateway``),
and the query service (``zwallet query``: its ROUTER and HTTP addresses are ``[query] clients`` and ``http``),
writes ``D/system.toml`` (engine/system.py: every address and the shard
map), prints a line containing ``ready`` once every group has a leader that answers, and stops everything
on SIGINT or SIGTERM. Data and per-process configs live under ``D/shard-<id>/`` and ``D/marker/``; running
``zwallet up`` again on the same directory restarts the same system with its data.

Ports, from ``--base-port`` P: shard s (1-based) uses P + (s-1)*3R .. P + s*3R - 1 (raft, client, pub per
replica), the Marker group the next 3R, the gateways the next G (``[gateway] clients`` in system.toml), the
query service the next 2 (ROUTER, HTTP).

CURVE is on (docs/security.md): the keys are made under ``D/keys`` (only those missing), system.toml's
``[security]`` table points to them, and ``Client.from_system`` of marker and gateway authenticates with the
admin client key found there. ``--insecure`` (``LocalSystem(insecure=True)``) turns it off, loudly.

``LocalSystem`` is the same thing as a class, for tests, the demo and the benchmarks.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

from engine.devtools.cluster import NodeCluster
from engine.devtools.local_raft import _child_env, _repo_root, free_ports
from engine.service import security as S
from engine.shard_map import ShardMap
from engine.system import Group, System

READY_TIMEOUT_S = 60.0


def _spawn_until_ready(cmd: list[str], stderr_path: str, what: str) -> subprocess.Popen:
    """A service process (the gateway, the query service) whose stdout's first line says ``ready``."""
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=_repo_root(), env=_child_env())
    assert proc.stdout is not None
    if b"ready" not in proc.stdout.readline():
        _kill(proc)                             # nothing is left running behind a failed start
        raise RuntimeError(f"{what} failed to start: {LocalSystem._tail(stderr_path)}")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    """kill -9, then reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


def _stop(proc: subprocess.Popen, wait_s: float) -> None:
    """SIGTERM, ``wait_s`` for it to end, then kill -9."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


class LocalSystem:
    """S shards x R replicas plus a Marker group of R replicas, as local processes under ``base_dir``."""

    def __init__(self, base_dir: str, shards: int = 2, replicas: int = 3, *, base_port: int | None = None,
                 sync: bool = True, verbose: bool = False, marker: bool = True, marker_groups: int = 1,
                 gateways: int = 1, metrics: bool = True, query: bool = True, insecure: bool = False,
                 node_settings: dict[str, Any] | None = None, marker_settings: dict[str, Any] | None = None) -> None:
        if not 1 <= shards <= 64:
            raise ValueError("shards must be 1..64")
        if replicas not in (1, 3, 5):
            raise ValueError("replicas must be 1, 3 or 5")
        if not 0 <= gateways <= 8:
            raise ValueError("gateways must be 0..8")
        self.base_dir = os.path.abspath(base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        self.shard_ids = list(range(1, shards + 1))
        self.replicas = replicas
        self.shard_map = ShardMap.uniform(self.shard_ids, epoch=1)
        block = 3 * replicas
        if not 1 <= marker_groups <= 16:
            raise ValueError("marker_groups must be 1..16")
        groups = shards + (marker_groups if marker else 0)
        nports = block * groups + gateways + (2 if query else 0)
        nmetrics = (replicas * groups + gateways + int(query)) if metrics else 0   # one endpoint a process
        ports = (list(range(base_port, base_port + nports + nmetrics)) if base_port
                 else free_ports(nports + nmetrics))
        mports = ports[nports:]
        ports = ports[:nports]

        def metrics_ports(k: int) -> list[int] | None:      # the k-th group's replicas'
            return mports[k * replicas:(k + 1) * replicas] if metrics else None
        self.shards: dict[int, NodeCluster] = {}
        self.system_path = os.path.join(self.base_dir, "system.toml")
        settings = dict(node_settings or {})
        self.insecure = insecure
        self.keys_dir = os.path.join(self.base_dir, "keys")
        sec: dict[str, Any] = {"insecure": insecure, "keys_dir": self.keys_dir}
        for k, sid in enumerate(self.shard_ids):
            self.shards[sid] = NodeCluster(replicas, os.path.join(self.base_dir, f"shard-{sid}"),
                                           ports=ports[k * block:(k + 1) * block], verbose=verbose, sync=sync,
                                           metrics_ports=metrics_ports(k),
                                           shard_id=sid, system=self.system_path, **sec, **settings)
        self.client_keys = self.shards[self.shard_ids[0]].client_keys   # the admin key (None: insecure)
        self.marker = None
        self.markers: dict[int, Any] = {}          # Marker group id -> its MarkerCluster
        groups_desc = {sid: Group(sid, tuple(c.client_addresses), tuple(c.pub_addresses),
                                  tuple(c.raft_addr[i] for i in c.ids)) for sid, c in self.shards.items()}
        markers: list[Group] = []
        if marker:
            from marker.cluster import MarkerCluster
            for gid in range(1, marker_groups + 1):
                at = (shards + gid - 1) * block
                mc = MarkerCluster(replicas, os.path.join(self.base_dir, "marker" if gid == 1 else f"marker-{gid}"),
                                   self.system_path, ports=ports[at:at + block], verbose=verbose, sync=sync,
                                   metrics_ports=metrics_ports(shards + gid - 1),
                                   group_id=gid, **sec, **dict(marker_settings or {}))
                self.markers[gid] = mc
                markers.append(Group(gid, tuple(mc.client_addresses), tuple(mc.pub_addresses),
                                     tuple(mc.raft_addr[i] for i in mc.ids)))
            self.marker = self.markers[1]
        self.gateway_addresses = [f"tcp://127.0.0.1:{p}" for p in ports[block * groups:block * groups + gateways]]
        self.gateways: dict[int, subprocess.Popen] = {}
        self.gateway_metrics = ([f"127.0.0.1:{p}" for p in mports[replicas * groups:replicas * groups + gateways]]
                                if metrics else [])
        self.query_metrics = f"127.0.0.1:{mports[replicas * groups + gateways]}" if metrics and query else ""
        extra: dict[str, Any] = {"gateway": {"clients": self.gateway_addresses}} if gateways else {}
        if metrics:
            table = {f"shard_{sid}": c.metrics_urls for sid, c in self.shards.items()}
            table.update({f"marker_{gid}": mc.metrics_urls for gid, mc in self.markers.items()})
            if gateways:
                table["gateway"] = [f"http://{a}/metrics" for a in self.gateway_metrics]
            if query:
                table["query"] = [f"http://{self.query_metrics}/metrics"]
            extra["metrics"] = table
        self.query_address = self.query_http = None
        self.query_proc: subprocess.Popen | None = None
        self.query_sync = sync
        if query:
            at = block * groups + gateways
            self.query_address = f"tcp://127.0.0.1:{ports[at]}"
            self.query_http = f"127.0.0.1:{ports[at + 1]}"
            extra["query"] = {"clients": [self.query_address], "http": f"http://{self.query_http}"}
        extra["security"] = S.system_security_table(self.keys_dir, insecure)
        self.system = System(self.shard_map, groups_desc, tuple(markers), extra)
        self.system.write(self.system_path)

    @property
    def groups(self) -> dict[str, NodeCluster]:
        out: dict[str, Any] = {f"shard {sid}": c for sid, c in self.shards.items()}
        for gid, mc in self.markers.items():
            out["marker" if gid == 1 else f"marker {gid}"] = mc
        return out

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        for c in self.shards.values():
            for i in c.ids:
                c.start_replica(i, wait=False)
        for mc in self.markers.values():
            for i in mc.ids:
                mc.start_replica(i, wait=False)
        for c in self.groups.values():
            for i in c.ids:
                c._wait_ready(i)
        self.wait_leaders(timeout_s)
        for k in range(len(self.gateway_addresses)):
            self.start_gateway(k + 1)
        if self.query_address:
            self.start_query()

    # ------------------------------------------------------------------------------ the query service
    def query_stderr(self) -> str:
        return os.path.join(self.base_dir, "query.stderr")

    def start_query(self) -> None:
        """Start the query service (its view under ``base_dir/query``) and wait for its ready line."""
        assert self.query_address and self.query_http
        assert self.query_proc is None or self.query_proc.poll() is not None, "the query service is running"
        cmd = [sys.executable, "-m", "engine.cli", "query", "--system", self.system_path,
               "--data", os.path.join(self.base_dir, "query"), "--client", self.query_address,
               "--http", self.query_http] + ([] if self.query_sync else ["--no-sync"])
        if self.query_metrics:
            cmd += ["--metrics", self.query_metrics]
        self.query_proc = _spawn_until_ready(cmd, self.query_stderr(), "the query service")

    def kill_query(self) -> None:
        """kill -9 of the query service."""
        if self.query_proc is not None:
            _kill(self.query_proc)

    def stop_query(self) -> None:
        if self.query_proc is not None:
            _stop(self.query_proc, 15)

    # ------------------------------------------------------------------------------ gateways
    def gateway_stderr(self, gid: int) -> str:
        return os.path.join(self.base_dir, f"gateway-{gid}.stderr")

    def start_gateway(self, gid: int) -> None:
        """Start gateway replica ``gid`` (1-based; its address is ``gateway_addresses[gid - 1]``) and wait
        until it prints its ready line."""
        assert gid not in self.gateways or self.gateways[gid].poll() is not None, f"gateway {gid} is running"
        cmd = [sys.executable, "-m", "engine.cli", "gateway", "--system", self.system_path,
               "--client", self.gateway_addresses[gid - 1], "--id", str(gid)]
        if self.gateway_metrics:
            cmd += ["--metrics", self.gateway_metrics[gid - 1]]
        self.gateways[gid] = _spawn_until_ready(cmd, self.gateway_stderr(gid), f"gateway {gid}")

    def kill_gateway(self, gid: int) -> None:
        """kill -9 of gateway replica ``gid``."""
        _kill(self.gateways[gid])

    def stop_gateway(self, gid: int) -> None:
        _stop(self.gateways[gid], 10)

    @staticmethod
    def _tail(path: str, size: int = 600) -> str:
        try:
            with open(path, "rb") as f:
                return f.read()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def wait_leaders(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, int]:
        """Wait until every group has a leader that answers STATUS; ``{group name: leader replica id}``."""
        from engine.client import Client, ClientError
        deadline = time.monotonic() + timeout_s
        leaders: dict[str, int] = {}
        for name, c in self.groups.items():
            with Client(c.client_addresses, timeout_s=1.0, attempt_timeout_s=0.5, keys=self.client_keys) as client:
                while name not in leaders:
                    for k, node in enumerate(c.ids):
                        try:
                            st = client.status(k)
                        except ClientError:
                            continue
                        if st.get("role") == "leader":
                            leaders[name] = node
                            break
                    else:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{name}: no leader within {timeout_s:.0f} s")
                        time.sleep(0.05)
        return leaders

    def alive(self) -> list[str]:
        """What died: ``["shard 1 replica 2: <stderr tail>", ...]`` (empty: everything runs)."""
        dead = []
        for name, c in self.groups.items():
            for i in c.ids:
                if not c.alive(i):
                    dead.append(f"{name} replica {i}: {c.stderr_tail(i, 600)}")
        for gid, proc in self.gateways.items():
            if proc.poll() is not None:
                dead.append(f"gateway {gid}: {self._tail(self.gateway_stderr(gid))}")
        if self.query_proc is not None and self.query_proc.poll() is not None:
            dead.append(f"query service: {self._tail(self.query_stderr())}")
        return dead

    def close(self) -> None:
        self.stop_query()
        for gid in list(self.gateways):
            self.stop_gateway(gid)
        for c in self.groups.values():
            c.close()

    def __enter__(self) -> LocalSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zwallet up", description="a whole local zwallet system until Ctrl-C")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--dir", required=True, help="data, configs and system.toml go here")
    p.add_argument("--base-port", type=int, default=7100)
    p.add_argument("--marker-groups", type=int, default=1, help="Marker groups (workflows by rendezvous hash)")
    p.add_argument("--gateways", type=int, default=1, help="gateway replicas (0: none)")
    p.add_argument("--no-query", action="store_true", help="do not start the query service")
    p.add_argument("--no-sync", action="store_true", help="skip fsync (NOT durable; experiments only)")
    p.add_argument("--insecure", action="store_true",
                   help="CURVE off on every socket (loudly logged; only to measure what CURVE costs)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    stop = {"now": False}

    def on_signal(_sig: int, _frm: Any) -> None:
        stop["now"] = True
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        system = LocalSystem(args.dir, args.shards, args.replicas, base_port=args.base_port,
                             sync=not args.no_sync, verbose=args.verbose, marker_groups=args.marker_groups,
                             gateways=args.gateways, query=not args.no_query, insecure=args.insecure)
    except (ValueError, OSError) as exc:
        print(f"zwallet up: {exc}", file=sys.stderr)
        return 2
    code = 0
    try:
        system.start()
        print(f"zwallet up: {args.shards} shard(s) x {args.replicas} replicas + a Marker group of "
              f"{args.replicas}; system file {system.system_path}")
        for name, c in system.groups.items():
            print(f"  {name}: clients {','.join(c.client_addresses)}")
        if system.gateway_addresses:
            print(f"  gateway: clients {','.join(system.gateway_addresses)}")
        if system.query_address:
            print(f"  query: clients {system.query_address}, http http://{system.query_http}")
        if not args.insecure:
            print(f"  CURVE on: keys in {system.keys_dir} (admin client key: admin.key_secret)")
        print("zwallet up: ready (Ctrl-C stops everything)", flush=True)
        while not stop["now"]:
            dead = system.alive()
            if dead:
                print("zwallet up: a process exited; stopping everything:\n  " + "\n  ".join(dead),
                      file=sys.stderr, flush=True)
                code = 1
                break
            time.sleep(0.2)
    except (TimeoutError, RuntimeError) as exc:
        print(f"zwallet up: {exc}", file=sys.stderr)
        code = 1
    finally:
        system.close()
        print("zwallet up: stopped", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
