"""A local cluster of counter replicas (``engine/devtools/counter_app.py``, the smallest app on the service
machinery) as separate processes on 127.0.0.1, and a small client for them. Used by the multi-process tests
and by ``bench/bench_raft.py``.

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

from engine.devtools.counter_app import OP_PROPOSE, OP_READ
from engine.service import protocol as P

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
        ports = free_ports(3 * size)
        self.ids = list(range(1, size + 1))
        self.raft_addr = {i: f"tcp://127.0.0.1:{ports[k]}" for k, i in enumerate(self.ids)}
        self.client_addr = {i: f"tcp://127.0.0.1:{ports[size + k]}" for k, i in enumerate(self.ids)}
        self.pub_addr = {i: f"tcp://127.0.0.1:{ports[2 * size + k]}" for k, i in enumerate(self.ids)}
        self.procs: dict[int, subprocess.Popen] = {}
        self._args = dict(tick_ms=tick_ms, election_ticks=election_ticks, heartbeat_ticks=heartbeat_ticks,
                          snapshot_threshold=snapshot_threshold, sync=sync, map_size_gib=map_size_gib,
                          log_level=log_level, machine=machine)

    def data_dir(self, node: int) -> str:
        return os.path.join(self.base_dir, f"replica-{node}")

    def raft_log_dir(self, node: int) -> str:
        """Where replica ``node`` keeps its Raft log (the service's ``<data_dir>/raft``)."""
        return os.path.join(self.data_dir(node), "raft")

    def start(self) -> None:
        for i in self.ids:
            self.start_replica(i, wait=False)
        for i in self.ids:
            self._wait_ready(i)

    def command(self, node: int) -> list[str]:
        """The command line that runs replica ``node`` (subclasses run other kinds of replica)."""
        a = self._args
        def joined(addrs: dict[int, str]) -> str:
            return ",".join(f"{i}={addr}" for i, addr in addrs.items())
        if a["machine"] != "counter":
            raise ValueError(f"unknown state machine {a['machine']!r}")
        cmd = [sys.executable, "-m", "engine.devtools.counter_app", "--id", str(node), "--peers",
               joined(self.raft_addr), "--clients", joined(self.client_addr), "--pubs", joined(self.pub_addr),
               "--data-dir", self.data_dir(node),
               "--tick-ms", str(a["tick_ms"]), "--election-ticks", str(a["election_ticks"]),
               "--heartbeat-ticks", str(a["heartbeat_ticks"]), "--snapshot-threshold", str(a["snapshot_threshold"]),
               "--map-size-gib", str(a["map_size_gib"]), "--log-level", str(a["log_level"])]
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
    """One DEALER per replica, speaking the service's header (engine/service/protocol.py) to counter replicas.
    ``send(node, cmd, payloads)`` sends one request per payload (cmd b"P": PROPOSE each; b"S": STATUS;
    b"R": a linearizable READ) and returns a key; ``take_replies(node)`` hands back (key, status, body) for
    every key whose requests are all answered: status b"OK" (body: [[index, counter], ...] for b"P", the
    status dict, the counter), b"NL" (body: the leader id or None) or b"ER" (body: the message)."""

    _OPS = {b"P": OP_PROPOSE, b"S": P.OP_STATUS, b"R": OP_READ}

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
        self._keys: dict[int, tuple[bytes, int]] = {}            # req_id -> (key, position)
        self._gathering: dict[bytes, list[Any]] = {}            # key -> [cmd, answers left, status, bodies]

    def close(self) -> None:
        for s in self.socks.values():
            s.close(linger=0)
        self.ctx.term()

    def send(self, node: int, cmd: bytes, payloads: Sequence[bytes] = ()) -> bytes:
        op = self._OPS[cmd]
        bodies = list(payloads) if cmd == b"P" else [b""]
        key = next(self._ids).to_bytes(8, "big")
        self._gathering[key] = [cmd, len(bodies), b"OK", [None] * len(bodies)]
        sock = self.socks[node]
        for k, body in enumerate(bodies):
            req_id = next(self._ids)
            self._keys[req_id] = (key, k)
            sock.send(P.encode(P.Request(req_id, op)), zmq.SNDMORE)
            sock.send(body, 0, copy=len(body) < 65536)
        return key

    def take_replies(self, node: int) -> list[tuple[bytes, bytes, Any]]:
        """Every (key, status, body) completed by the replies waiting on ``node``'s socket (no blocking)."""
        sock = self.socks[node]
        done: list[tuple[bytes, bytes, Any]] = []
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return done
            try:
                reply = P.decode_reply(frames[0])
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            got = self._keys.pop(reply.req_id, None)
            if got is None:
                continue      # a late reply to an older request
            key, k = got
            g = self._gathering.get(key)
            if g is None:
                continue
            g[1] -= 1
            if reply.status == P.Status.OK:
                g[3][k] = msgspec.msgpack.decode(frames[1]) if len(frames) > 1 and frames[1] else None
            elif g[2] == b"OK":
                g[2] = b"NL" if reply.status == P.Status.NOT_LEADER else b"ER"
                g[3] = reply.leader_id if reply.status == P.Status.NOT_LEADER else reply.message
            if g[1] == 0:
                del self._gathering[key]
                body = g[3] if g[2] != b"OK" or g[0] == b"P" else g[3][0]
                done.append((key, g[2], body))

    def recv(self, node: int, req_id: bytes, timeout_s: float) -> tuple[bytes, Any] | None:
        sock = self.socks[node]
        deadline = time.monotonic() + timeout_s
        while True:
            for key, status, body in self.take_replies(node):
                if key == req_id:
                    return status, body
            left = deadline - time.monotonic()
            if req_id not in self._gathering or left <= 0 or not sock.poll(int(left * 1000) + 1):
                self._forget(req_id)
                return None

    def _forget(self, key: bytes) -> None:
        if self._gathering.pop(key, None) is not None:
            for rid in [r for r, (k, _) in self._keys.items() if k == key]:
                del self._keys[rid]

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
