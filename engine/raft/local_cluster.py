"""A local cluster of counter replicas (``engine.raft.replica_main``) as separate processes on 127.0.0.1, and
a small client for them. Used by the multi-process tests and by ``bench/bench_raft.py``.

Every process is started with its own data directory under ``base_dir/replica-<id>`` and killed by pid
(``kill`` = SIGKILL, ``stop`` = SIGTERM then SIGKILL); ``close()`` always ends every process it started.
"""
from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any
from collections.abc import Sequence

import msgspec
import zmq

REQUEST_TIMEOUT_S_DEFAULT = 2.0
START_TIMEOUT_S = 30.0


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    def __init__(self, size: int, base_dir: str, *, tick_ms: int = 10, election_ticks: int = 30,
                 heartbeat_ticks: int = 3, snapshot_threshold: int = 50_000, sync: bool = True,
                 map_size_gib: int = 4, log_level: str = "WARNING", machine: str = "counter") -> None:
        self.size = size
        self.base_dir = base_dir
        ports = free_ports(2 * size)
        self.ids = list(range(1, size + 1))
        self.raft_addr = {i: f"tcp://127.0.0.1:{ports[k]}" for k, i in enumerate(self.ids)}
        self.client_addr = {i: f"tcp://127.0.0.1:{ports[size + k]}" for k, i in enumerate(self.ids)}
        self.procs: dict[int, subprocess.Popen] = {}
        self._args = dict(tick_ms=tick_ms, election_ticks=election_ticks, heartbeat_ticks=heartbeat_ticks,
                          snapshot_threshold=snapshot_threshold, sync=sync, map_size_gib=map_size_gib,
                          log_level=log_level, machine=machine)

    def data_dir(self, node: int) -> str:
        return os.path.join(self.base_dir, f"replica-{node}")

    def start(self) -> None:
        for i in self.ids:
            self.start_replica(i, wait=False)
        for i in self.ids:
            self._wait_ready(i)

    def command(self, node: int) -> list[str]:
        """The command line that runs replica ``node`` (subclasses run other kinds of replica)."""
        a = self._args
        peers = ",".join(f"{i}={addr}" for i, addr in self.raft_addr.items())
        cmd = [sys.executable, "-m", "engine.raft.replica_main", "--id", str(node), "--peers", peers,
               "--client", self.client_addr[node], "--data-dir", self.data_dir(node),
               "--tick-ms", str(a["tick_ms"]), "--election-ticks", str(a["election_ticks"]),
               "--heartbeat-ticks", str(a["heartbeat_ticks"]), "--snapshot-threshold", str(a["snapshot_threshold"]),
               "--map-size-gib", str(a["map_size_gib"]), "--log-level", str(a["log_level"]),
               "--machine", str(a["machine"])]
        if not a["sync"]:
            cmd.append("--no-sync")
        return cmd

    def start_replica(self, node: int, wait: bool = True) -> None:
        assert node not in self.procs or self.procs[node].poll() is not None, f"replica {node} is running"
        cmd = self.command(node)
        os.makedirs(self.base_dir, exist_ok=True)
        stderr = open(os.path.join(self.base_dir, f"replica-{node}.stderr"), "ab")
        self.procs[node] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr,
                                            cwd=_repo_root(), env=_child_env())
        stderr.close()
        if wait:
            self._wait_ready(node)

    def _wait_ready(self, node: int) -> None:
        proc = self.procs[node]
        assert proc.stdout is not None
        line = proc.stdout.readline()    # the replica prints READY once its driver runs
        if line.strip() != b"READY":
            raise RuntimeError(f"replica {node} failed to start: {self.stderr_tail(node)}")

    def stderr_tail(self, node: int, size: int = 4000) -> str:
        try:
            with open(os.path.join(self.base_dir, f"replica-{node}.stderr"), "rb") as f:
                return f.read()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self, node: int) -> None:
        """kill -9: no clean-up, no flush."""
        proc = self.procs[node]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()

    def pause(self, node: int) -> None:
        """SIGSTOP: the process is frozen (a long GC pause, a stalled VM) until ``resume``."""
        os.kill(self.procs[node].pid, signal.SIGSTOP)

    def resume(self, node: int) -> None:
        os.kill(self.procs[node].pid, signal.SIGCONT)

    def stop(self, node: int, timeout_s: float = 10.0) -> None:
        proc = self.procs[node]
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)     # a paused replica cannot handle SIGTERM
            except ProcessLookupError:
                pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout:
            proc.stdout.close()

    def alive(self, node: int) -> bool:
        return node in self.procs and self.procs[node].poll() is None

    def close(self) -> None:
        for node in list(self.procs):
            try:
                self.stop(node, timeout_s=5.0)
            except Exception:  # noqa: BLE001 - whatever stopping it failed on, it is killed
                self.procs[node].kill()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClusterClient:
    """One DEALER per replica; requests carry an 8-byte id and replies are matched to it."""

    def __init__(self, client_addr: dict[int, str]) -> None:
        self.ctx = zmq.Context()
        self.socks: dict[int, zmq.Socket] = {}
        for node, addr in client_addr.items():
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.setsockopt(zmq.RCVHWM, 100_000)
            s.connect(addr)
            self.socks[node] = s
        self._ids = itertools.count(1)
        self.leader: int | None = None

    def close(self) -> None:
        for s in self.socks.values():
            s.close(linger=0)
        self.ctx.term()

    def send(self, node: int, cmd: bytes, payloads: Sequence[bytes] = ()) -> bytes:
        req_id = next(self._ids).to_bytes(8, "big")
        self.socks[node].send_multipart([req_id, cmd, *payloads], copy=len(payloads) < 2)
        return req_id

    def recv(self, node: int, req_id: bytes, timeout_s: float) -> tuple[bytes, Any] | None:
        sock = self.socks[node]
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                return None
            frames = sock.recv_multipart()
            if frames[0] != req_id:
                continue      # a late reply to an older request
            status, body = frames[1], frames[2]
            return status, (msgspec.msgpack.decode(body) if status in (b"OK", b"NL") else body.decode())

    def request(self, node: int, cmd: bytes, payloads: Sequence[bytes] = (),
                timeout_s: float = REQUEST_TIMEOUT_S_DEFAULT) -> tuple[bytes, Any] | None:
        return self.recv(node, self.send(node, cmd, payloads), timeout_s)

    def status(self, node: int, timeout_s: float = 1.0) -> dict[str, Any] | None:
        got = self.request(node, b"S", timeout_s=timeout_s)
        return got[1] if got is not None and got[0] == b"OK" else None

    def find_leader(self, nodes: Sequence[int] | None = None, timeout_s: float = 10.0) -> int:
        deadline = time.monotonic() + timeout_s
        nodes = list(nodes or self.socks)
        while time.monotonic() < deadline:
            for node in nodes:
                st = self.status(node, timeout_s=0.3)
                if st is not None and st["role"] == "leader":
                    self.leader = node
                    return node
            time.sleep(0.02)
        raise TimeoutError("no leader elected")

    def propose(self, entries: Sequence[bytes], timeout_s: float = REQUEST_TIMEOUT_S_DEFAULT
                ) -> list[list[int]] | None:
        """Propose at the known leader. Returns [[index, result], ...] if acknowledged; None if the outcome
        is unknown or refused (the caller decides whether to retry)."""
        if self.leader is None:
            return None
        got = self.request(self.leader, b"P", entries, timeout_s)
        if got is None:
            return None
        status, body = got
        if status == b"OK":
            return body
        if status == b"NL":
            self.leader = body if body in self.socks else None
        return None


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = _repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
