"""A local shard: N node processes (``engine.node``) on 127.0.0.1, each with its own data directory and
TOML config under ``base_dir``. Used by ``zwallet cluster``, ``zwallet demo``, the tests and the benchmarks.

    zwallet cluster [--replicas 3] [--base-dir DIR] [--base-port 7100]   # runs until Ctrl-C

Process management (start, kill -9, SIGSTOP/SIGCONT, stop, close) is ``LocalCluster``'s; this class only
says how a node is configured and started. ``close()`` always ends every process it started.

CURVE is on by default: the keys are made under ``keys_dir`` (default ``base_dir/keys``; made only if
missing: engine/service/security.py), every replica gets a Raft peer key, and ``client_keys`` is the admin
client key to connect with. ``insecure=True`` turns CURVE off (loudly logged; for tests that measure it).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from typing import Any

from engine.devtools.local_raft import LocalCluster, free_ports
from engine.service import security as S


class ServiceCluster(LocalCluster):
    """N replicas of a service app (``module`` run with ``--config``, its config a ``config_cls``)."""
    module = "engine.node"
    file_prefix = "node"
    client_key_name = ""              # the system client key the service calls others with (the Marker's)

    def config_class(self) -> Any:
        from engine.node import NodeConfig
        return NodeConfig

    def __init__(self, size: int, base_dir: str, *, base_port: int | None = None, verbose: bool = False,
                 ports: list[int] | None = None, metrics_ports: list[int] | None = None, insecure: bool = False,
                 keys_dir: str | None = None, **settings: Any) -> None:
        """``settings`` are config fields for every replica (``tick_ms``, ``snapshot_threshold_entries``,
        ``sync``, limits ...). Ports: three per replica (raft, client, pub): ``ports`` if given, else from
        ``base_port``, else free ones. ``metrics_ports``: one per replica for its Prometheus endpoint
        (none: no metrics)."""
        config_cls = self.config_class()
        self.size = size
        self.base_dir = base_dir
        self.ids = list(range(1, size + 1))
        if ports is None:
            ports = list(range(base_port, base_port + 3 * size)) if base_port else free_ports(3 * size)
        if len(ports) != 3 * size:
            raise ValueError(f"{size} replicas need {3 * size} ports, not {len(ports)}")
        self.raft_addr = {i: f"tcp://127.0.0.1:{ports[k]}" for k, i in enumerate(self.ids)}
        self.client_addr = {i: f"tcp://127.0.0.1:{ports[size + k]}" for k, i in enumerate(self.ids)}
        self.pub_addr = {i: f"tcp://127.0.0.1:{ports[2 * size + k]}" for k, i in enumerate(self.ids)}
        if metrics_ports is not None and len(metrics_ports) != size:
            raise ValueError(f"{size} replicas need {size} metrics ports, not {len(metrics_ports)}")
        self.metrics_addr = ({i: f"127.0.0.1:{metrics_ports[k]}" for k, i in enumerate(self.ids)}
                             if metrics_ports is not None else {})
        self.procs = {}
        self.verbose = verbose
        replicas = {i: {"raft": self.raft_addr[i], "client": self.client_addr[i], "pub": self.pub_addr[i]}
                    for i in self.ids}
        os.makedirs(base_dir, exist_ok=True)
        self.insecure = insecure
        self.keys_dir = os.path.abspath(keys_dir or os.path.join(base_dir, "keys"))
        self.client_keys: S.ClientKeys | None = None
        if not insecure:
            S.make_system_keys(self.keys_dir)
            group = os.path.basename(os.path.abspath(base_dir))
            for i in self.ids:
                name = f"{group}-{self.file_prefix}-{i}"
                replicas[i]["key"] = S.peer_key(self.keys_dir, name).public.decode()
            settings.update(keys_dir=self.keys_dir)
            if self.client_key_name:
                settings.update(client_key=os.path.join(self.keys_dir, self.client_key_name + S.SECRET_SUFFIX))
            self.client_keys = S.ClientKeys.load(os.path.join(self.keys_dir, "admin" + S.SECRET_SUFFIX),
                                                 os.path.join(self.keys_dir, S.SERVER_KEY_NAME + S.PUBLIC_SUFFIX))
        else:
            settings.update(insecure=True)
        self.configs = {}
        for i in self.ids:
            if i in self.metrics_addr:
                settings["metrics"] = self.metrics_addr[i]
            own = {} if insecure else {"peer_key": os.path.join(
                self.keys_dir, S.PEERS_DIR, f"{os.path.basename(os.path.abspath(base_dir))}-{self.file_prefix}-{i}"
                + S.SECRET_SUFFIX)}
            cfg = config_cls(node_id=i, replicas=replicas, data_dir=self.data_dir(i), verbose=verbose, **settings,
                             **own)
            cfg.validate()
            self.configs[i] = cfg
            with open(self.config_path(i), "w") as f:
                f.write(cfg.to_toml())

    def config_path(self, node: int) -> str:
        return os.path.join(self.base_dir, f"{self.file_prefix}-{node}.toml")

    def data_dir(self, node: int) -> str:
        return os.path.join(self.base_dir, f"{self.file_prefix}-{node}")

    def command(self, node: int) -> list[str]:
        return [sys.executable, "-m", self.module, "--config", self.config_path(node)]

    @property
    def client_addresses(self) -> list[str]:
        return [self.client_addr[i] for i in self.ids]

    @property
    def metrics_urls(self) -> list[str]:
        """``http://host:port/metrics`` of every replica (empty when metrics are off)."""
        return [f"http://{self.metrics_addr[i]}/metrics" for i in self.ids if i in self.metrics_addr]

    @property
    def pub_addresses(self) -> list[str]:
        return [self.pub_addr[i] for i in self.ids]

    def peak_rss_bytes(self, node: int) -> int | None:
        """VmHWM of a running replica (Linux), for memory reports."""
        try:
            with open(f"/proc/{self.procs[node].pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, KeyError):
            return None
        return None


class NodeCluster(ServiceCluster):
    """A local shard: N ``zwallet node`` replicas."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zwallet cluster", description="run N local replicas of a shard until Ctrl-C")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--base-dir", help="data and configs (default: a new temporary directory)")
    p.add_argument("--base-port", type=int, default=7100, help="raft ports from here, then client, then pub")
    p.add_argument("--no-sync", action="store_true", help="skip fsync (NOT durable; experiments only)")
    p.add_argument("--insecure", action="store_true", help="CURVE off: open sockets (measuring its cost only)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    base = args.base_dir or tempfile.mkdtemp(prefix="zwallet-cluster-")
    cluster = NodeCluster(args.replicas, base, base_port=args.base_port, verbose=args.verbose,
                          sync=not args.no_sync, insecure=args.insecure)
    stop = {"now": False}

    def on_signal(_sig: int, _frm: Any) -> None:
        stop["now"] = True
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        print(f"zwallet cluster: {args.replicas} replicas, data and configs in {base}")
        for i in cluster.ids:
            print(f"  replica {i}: client {cluster.client_addr[i]}  pub {cluster.pub_addr[i]}  "
                  f"raft {cluster.raft_addr[i]}  config {cluster.config_path(i)}")
        print(f"  status: zwallet status --nodes {','.join(cluster.client_addresses)}")
        if not args.insecure:
            print(f"  CURVE on: keys in {cluster.keys_dir} (admin client key: admin.key_secret)")
        print("  Ctrl-C stops every replica", flush=True)
        while not stop["now"]:
            for i in cluster.ids:
                if not cluster.alive(i):
                    print(f"  replica {i} exited: {cluster.stderr_tail(i, 800)}", flush=True)
                    stop["now"] = True
            time.sleep(0.2)
    finally:
        cluster.close()
        print("  stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
