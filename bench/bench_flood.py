"""Flood benchmark: hostile clients against every replica of a local 3-replica shard, honest ones beside them.

    python -m bench.bench_flood                 # 20 s of flood (about 40 s in all)
    python -m bench.bench_flood --seconds 5     # shorter

Setup: ``NodeCluster(3, tmpdir)`` (engine/devtools/cluster.py) with its defaults, ``--accounts`` USD accounts. Then
for ``--seconds`` one flooder process per attack below sends to every replica at once, bounded in rate and
time, while an honest ``Client`` runs a closed loop of one transfer, one linearizable read (GET_ACCOUNTS
of both accounts) and one FOLLOWER read, pausing ``--honest-pause-ms`` between calls. The attacks:

- ``oversized``: GET_ACCOUNTS with a 16 MiB id list, ``--oversized-per-s`` frames a second to each replica
  (the reproduced attack: it OOM-killed a replica when the node took 16 MiB frames and decoded them);
- ``multipart``: one message that never ends, of 900 KB frames (each under the frame limit), at
  ``--multipart-mb-per-s`` to each replica, written as raw ZMTP on a plain TCP socket (libzmq buffers a
  message until its last part, on the receiving side too); reconnects when cut;
- ``malformed``: as fast as ``--malformed-per-s`` allows, a cycle of bad requests of up to the frame limit:
  undecodable headers, 1 and 3 frames, protocol version 2, GET_ACCOUNTS of 57,586 ids, APPLY of 8190
  garbage records, payloads for ops that take none; its replies are never read.

Sampled every 0.25 s: each replica's resident set (VmRSS; the peak VmHWM at the end). Reported: peak RSS per
replica, honest latency p50/p99/max per call kind and failures, each replica's STATUS "refusals" (by
reason), and whether every replica is still up. Bar (exit status 1 if missed): every replica up, each
under 3 GB RSS, the honest calls answered with no failure and p99 < 250 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import msgspec
import numpy as np
import zmq

from engine import records as R
from engine import wire as W
from engine.client import Client, ClientError
from engine.devtools.cluster import NodeCluster

RSS_BAR_BYTES = 3 << 30
P99_BAR_MS = 250.0
KINDS = ("oversized", "multipart", "malformed")
CURRENCY = "USD"


# ----------------------------------------------------------------------------------------- flooders
def _dealer(ctx: zmq.Context, address: str, sndhwm: int = 100) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, sndhwm)
    s.setsockopt(zmq.RCVHWM, 10)               # never read: the replica's replies back up (its problem)
    s.setsockopt(zmq.RECONNECT_IVL, 10)        # come back at once after being dropped
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 10)
    s.setsockopt(zmq.IMMEDIATE, 1)             # no queueing while disconnected: a send fails instead
    s.connect(address)
    return s


def _hdr(req_id: int, op: int, **kw: Any) -> bytes:
    return W.encode(W.Request(req_id, op, **kw))


def zmtp_open(address: str) -> socket.socket:
    """A plain TCP connection that has done a ZMTP 3.0 NULL handshake as a DEALER (greeting, READY)."""
    host, _, port = address[len("tcp://"):].rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=2.0)
    s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31)
    got = b""
    while len(got) < 64:
        chunk = s.recv(64 - len(got))
        if not chunk:
            raise OSError("closed during the greeting")
        got += chunk
    body = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
    s.sendall(b"\x04" + bytes([len(body)]) + body)
    return s


def malformed_requests(frame_bytes_max: int) -> list[list[bytes]]:
    big_ids = frame_bytes_max - frame_bytes_max % W.ID_BYTES
    garbage = np.frombuffer(np.random.default_rng(1).bytes(R.BATCH_SIZE_MAX * R.OP_DTYPE.itemsize), dtype="u1")
    enc = msgspec.msgpack.encode
    return [
        [b"\xc1" * 64, b"x" * 1024],                                       # not msgpack
        [enc([1, "five"]), b""],                                           # wrong field type
        [_hdr(2, W.Op.STATUS)],                                            # one frame
        [_hdr(3, W.Op.STATUS), b"", b"x" * 4096],                          # three frames
        [_hdr(4, W.Op.STATUS, version=2), b""],                            # another version
        [_hdr(5, W.Op.GET_ACCOUNTS), b"\1" * big_ids],                     # 57,586 ids
        [_hdr(6, W.Op.GET_ACCOUNTS), b"\1" * 17],                          # not whole ids
        [_hdr(7, W.Op.APPLY), garbage.tobytes()],                          # 8190 garbage records
        [_hdr(8, W.Op.EVENTS, first_seq=1, last_seq=2), b"\0" * (frame_bytes_max // 2)],  # payload where none
        [_hdr(9, 77), b"\0" * 1000],                                       # unknown op
        [b"\x91" + b"\xff" * (W.HEADER_BYTES_MAX + 10), b""],              # header too large
    ]


def flood(kind: str, addresses: list[str], seconds: float, rate: float, frame_bytes_max: int) -> dict[str, int]:
    """One attack against every address for ``seconds``; returns what was sent."""
    ctx = zmq.Context()
    socks = [_dealer(ctx, a, 2 if kind == "oversized" else 100) for a in addresses]
    sent = {"messages": 0, "frames": 0, "bytes": 0, "refused_locally": 0}
    t0 = time.monotonic()
    deadline = t0 + seconds
    try:
        if kind == "oversized":
            big = b"\1" * (16 << 20)
            head = _hdr(1, W.Op.GET_ACCOUNTS)
            k = 0
            while time.monotonic() < deadline:
                for s in socks:
                    try:
                        s.send(head, zmq.SNDMORE | zmq.NOBLOCK)
                        s.send(big, copy=False)
                        sent["messages"] += 1
                        sent["bytes"] += len(big)
                    except zmq.Again:
                        sent["refused_locally"] += 1
                k += 1
                time.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        elif kind == "multipart":
            # raw ZMTP over plain TCP: libzmq itself holds back a message's parts until its last one, so
            # an attacker that streams one endless message writes the frames by hand
            part = b"\2" * 900_000
            per_s = rate * 1e6 / len(part)               # rate: MB/s per replica
            streams: list[socket.socket | None] = [None] * len(addresses)
            k = 0
            while time.monotonic() < deadline:
                for i, a in enumerate(addresses):
                    try:
                        tcp = streams[i]
                        if tcp is None:
                            tcp = streams[i] = zmtp_open(a)
                            sent["messages"] += 1        # connections opened
                        tcp.sendall(b"\x03" + len(part).to_bytes(8, "big") + part)  # MORE | LONG
                        sent["frames"] += 1
                        sent["bytes"] += len(part)
                    except OSError:
                        tcp = streams[i]
                        if tcp is not None:
                            tcp.close()
                        streams[i] = None
                        sent["refused_locally"] += 1    # cut by the replica (or not reachable)
                k += 1
                time.sleep(max(0.0, t0 + k / per_s - time.monotonic()))
            for st in streams:
                if st is not None:
                    st.close()
        else:
            reqs = malformed_requests(frame_bytes_max)
            k = 0
            while time.monotonic() < deadline:
                frames = reqs[k % len(reqs)]
                for s in socks:
                    try:
                        for f in frames[:-1]:
                            s.send(f, zmq.SNDMORE | zmq.NOBLOCK, copy=len(f) < 65536)
                        s.send(frames[-1], zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
                        sent["messages"] += 1
                        sent["bytes"] += sum(len(f) for f in frames)
                    except zmq.Again:
                        sent["refused_locally"] += 1
                k += 1
                time.sleep(max(0.0, t0 + k / rate - time.monotonic()))
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    return sent


# --------------------------------------------------------------------------------------- measuring
def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


class Honest:
    """A closed loop of transfer / GET_ACCOUNTS (linearizable) / GET_ACCOUNTS (follower), timed per call."""

    def __init__(self, addresses: list[str], accounts: list[int], pause_s: float) -> None:
        self.client = Client(addresses, timeout_s=10.0)
        self.accounts = accounts
        self.pause_s = pause_s
        self.latencies: dict[str, list[float]] = {"transfer": [], "read": [], "follower_read": []}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._dedup = 10_000_000

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def _timed(self, kind: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            out = fn(*args, **kw)
        except ClientError as exc:
            self.failures.append(f"{kind}: {exc}")
            return None
        self.latencies[kind].append((time.perf_counter() - t) * 1000)
        return out

    def _run(self) -> None:
        k = 0
        n = len(self.accounts)
        while not self._stop.is_set():
            a, b = self.accounts[k % n], self.accounts[(k + 1) % n]
            self._dedup += 1
            r = self._timed("transfer", self.client.transfer, self._dedup, a, b, 1, CURRENCY)
            if r is not None and r.code != R.Code.OK:
                self.failures.append(f"transfer: {r.code.name}")
            got = self._timed("read", self.client.get_accounts, [a, b])
            if got is not None and (got[0] is None or got[1] is None):
                self.failures.append("read: an account is missing")
            self._timed("follower_read", self.client.get_accounts, [a, b], consistency="follower")
            k += 1
            self._stop.wait(self.pause_s)


def run_flood(cluster: NodeCluster, seconds: float, *, accounts: int = 100, kinds: tuple[str, ...] = KINDS,
              oversized_per_s: float = 20, multipart_mb_per_s: float = 200, malformed_per_s: float = 2000,
              honest_pause_ms: float = 5) -> dict[str, Any]:
    """Flood every replica of a running ``cluster`` and measure (see the module doc)."""
    addresses = cluster.client_addresses
    frame_max = cluster.configs[cluster.ids[0]].frame_bytes_max
    ids = list(range(1, accounts + 1))
    with Client(addresses, timeout_s=30) as c:
        for i in ids:
            assert c.create_account(i, i, CURRENCY, lower_limit=None).code in (R.Code.OK,)
    pids = {n: cluster.procs[n].pid for n in cluster.ids}
    rates = {"oversized": oversized_per_s, "multipart": multipart_mb_per_s, "malformed": malformed_per_s}
    flooders = {kind: subprocess.Popen([sys.executable, "-m", "bench.bench_flood", "flooder", kind, ",".join(addresses),
                                        str(seconds), str(rates[kind]), str(frame_max)],
                                       stdout=subprocess.PIPE, text=True, env=dict(os.environ))
                for kind in kinds}
    honest = Honest(addresses, ids, honest_pause_ms / 1000)
    honest.start()
    peak = dict.fromkeys(cluster.ids, 0)
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end:
            for n, pid in pids.items():
                peak[n] = max(peak[n], rss_bytes(pid))
            time.sleep(0.25)
    finally:
        honest.stop()
        sent = {}
        for kind, p in flooders.items():
            out, _ = p.communicate(timeout=60)
            sent[kind] = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    hwm = {n: rss_bytes(pid, "VmHWM") for n, pid in pids.items()}
    alive = {n: cluster.alive(n) for n in cluster.ids}
    refusals: dict[int, Any] = {}
    with Client(addresses, timeout_s=5, attempt_timeout_s=2) as c:
        for k, n in enumerate(cluster.ids):
            try:
                st = c.status(k)
                refusals[n] = {r: v for r, v in st["refusals"].items() if v}
            except ClientError as exc:
                refusals[n] = f"no STATUS: {exc}"
    lat = {kind: {"count": len(v), "p50_ms": round(pct(v, 0.5), 2), "p99_ms": round(pct(v, 0.99), 2),
                  "max_ms": round(max(v), 2) if v else None} for kind, v in honest.latencies.items()}
    all_lat = [x for v in honest.latencies.values() for x in v]
    ok = bool(all(alive.values()) and all(v < RSS_BAR_BYTES for v in peak.values())
              and all(v < RSS_BAR_BYTES for v in hwm.values()) and not honest.failures
              and all(v["count"] and (v["p99_ms"] or 0.0) < P99_BAR_MS for v in lat.values()))
    return {"seconds": seconds, "alive": alive, "peak_rss_bytes": peak, "vmhwm_bytes": hwm, "honest": lat,
            "honest_p99_ms": round(pct(all_lat, 0.99), 2), "honest_failures": honest.failures[:20],
            "honest_failure_count": len(honest.failures), "refusals": refusals, "sent": sent, "bar_met": ok}


def report(res: dict[str, Any]) -> str:
    lines = [f"flood of {res['seconds']:g} s against every replica"]
    for n in res["alive"]:
        lines.append(f"  replica {n}: {'up' if res['alive'][n] else 'DOWN'}, peak RSS "
                     f"{res['peak_rss_bytes'][n] / 2**20:,.0f} MiB (VmHWM {res['vmhwm_bytes'][n] / 2**20:,.0f} MiB); "
                     f"refusals {res['refusals'][n]}")
    for kind, v in res["honest"].items():
        lines.append(f"  honest {kind:<13} n={v['count']:>6}  p50 {v['p50_ms']:>7} ms  p99 {v['p99_ms']:>7} ms  "
                     f"max {v['max_ms']} ms")
    lines.append(f"  honest failures: {res['honest_failure_count']} {res['honest_failures'][:3]}")
    for kind, v in res["sent"].items():
        lines.append(f"  flooder {kind}: {v}")
    lines.append(f"  bar (all up, RSS < 3 GB, no honest failure, p99 of each call kind < {P99_BAR_MS:g} ms; all "
                 f"calls: p99 {res['honest_p99_ms']} ms): {'MET' if res['bar_met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["flooder"]:                                  # a flooder child process
        kind, addresses, seconds, rate, frame_max = argv[1:6]
        print(json.dumps(flood(kind, addresses.split(","), float(seconds), float(rate), int(frame_max))), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.bench_flood", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--accounts", type=int, default=100)
    p.add_argument("--kinds", default=",".join(KINDS), help="attacks, comma-separated: " + ", ".join(KINDS))
    p.add_argument("--oversized-per-s", type=float, default=20.0, help="16 MiB frames a second, per replica")
    p.add_argument("--multipart-mb-per-s", type=float, default=200.0, help="MB/s of one endless message, per replica")
    p.add_argument("--malformed-per-s", type=float, default=2000.0, help="bad requests a second, per replica")
    p.add_argument("--honest-pause-ms", type=float, default=5.0)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a NodeConfig field for every replica (e.g. connection_check_ms=0 to see the flood "
                        "without the connection guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="zwallet-flood-")
    settings = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    cluster = NodeCluster(3, base, insecure=True, **settings)  # type: ignore[arg-type]  # NodeConfig fields, checked there
    try:
        cluster.start()
        res = run_flood(cluster, args.seconds, accounts=args.accounts, kinds=tuple(args.kinds.split(",")),
                        oversized_per_s=args.oversized_per_s, multipart_mb_per_s=args.multipart_mb_per_s,
                        malformed_per_s=args.malformed_per_s, honest_pause_ms=args.honest_pause_ms)
    finally:
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(res, indent=1, default=str) if args.json else report(res))
    return 0 if res["bar_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
