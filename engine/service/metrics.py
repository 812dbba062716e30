"""Prometheus metrics of every zwallet process, over HTTP (``GET /metrics``, text format 0.0.4).

What a process measures itself (``RequestMetrics``: request counts and latencies by op, error replies by
code; written by the one thread that answers requests, read by the HTTP thread) and what it already reports
in STATUS (Raft, the log, stalls, queues, refusals, the app's own fields) become metric families at scrape
time: nothing is computed on the request path beyond one bucket increment a request. docs/metrics.md lists
every family with example alerts.

The HTTP server answers each connection on its own thread, at most ``CONNECTIONS_MAX`` at once (more are
closed at once); a connection that does not send its request within ``TIMEOUT_S`` is dropped, so idle or
slow connections can neither pile up threads nor hold a scrape back. Only ``GET /metrics`` and
``GET /healthz`` are served; the address comes from the process's config (``[node] metrics`` for a
replica, ``--metrics`` for the gateway), off when empty. A port of 0 takes any free port (``address``
says which).
"""
from __future__ import annotations

import bisect
import collections
import glob
import logging
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from collections.abc import Callable

LOG = logging.getLogger("zwallet.metrics")

# request latency buckets, seconds (le): 100 us .. 10 s
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)
TIMEOUT_S = 5.0
CONNECTIONS_MAX = 8
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``http://host:port``) -> (host, port); a clear ValueError otherwise."""
    a = address.strip()
    if a.startswith("http://"):
        a = a[len("http://"):]
    host, sep, port = a.rpartition(":")
    if not sep or not host:
        raise ValueError(f"metrics address {address!r} is not host:port")
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"metrics address {address!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"metrics address {address!r}: port {p} is not 0..65535")
    return host.strip("[]"), p


class RequestMetrics:
    """Counts and latencies of the requests one process answered, by op, and its error replies by code.
    One writer thread (the one that answers); the HTTP thread reads. Plain ints and lists: a read from
    another thread sees each counter whole (the GIL), which is all a scrape needs."""

    def __init__(self, op_names: dict[Any, str]) -> None:
        self.op_names = dict(op_names)                 # op (an int, or a name) -> its name in the labels
        self.buckets: dict[Any, list[int]] = {}        # op -> counts per bucket (not cumulative), +Inf last
        self.sums: dict[Any, float] = {}
        self.errors: collections.Counter[tuple[Any, str]] = collections.Counter()   # (op, code name)
        self.results: collections.Counter[str] = collections.Counter()   # app result codes (e.g. per record)

    def observe(self, op: Any, seconds: float) -> None:
        b = self.buckets.get(op)
        if b is None:
            b = self.buckets[op] = [0] * (len(LATENCY_BUCKETS_S) + 1)
            self.sums[op] = 0.0
        b[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sums[op] += seconds

    def error(self, op: Any, code: str) -> None:
        self.errors[(op, code)] += 1

    def op_name(self, op: Any) -> str:
        return self.op_names.get(op, str(op))

    def add_to(self, fam: Families) -> None:
        for op, b in list(self.buckets.items()):
            fam.histogram("zwallet_request_seconds", "time from receiving a request to its reply, by op",
                          list(b), self.sums.get(op, 0.0), op=self.op_name(op))
            fam.counter("zwallet_requests_total", "requests answered, by op", sum(b), op=self.op_name(op))
        fam.declare("zwallet_request_errors_total", "counter", "error replies, by op and error code")
        for (op, code), n in list(self.errors.items()):
            fam.counter("zwallet_request_errors_total", "", n, op=self.op_name(op), code=code)
        if self.results:
            for code, n in list(self.results.items()):
                fam.counter("zwallet_results_total", "outcomes of the commands applied here, by result code",
                            n, code=code)


def _escape(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Families:
    """Metric families being rendered: each family's HELP and TYPE once, then its samples. ``const``
    labels (service, group, node) go on every sample."""

    def __init__(self, **const: Any) -> None:
        self.const = {k: v for k, v in const.items() if v is not None}
        self._fams: dict[str, tuple[str, str, list[str]]] = {}

    def declare(self, name: str, kind: str, help_text: str) -> list[str]:
        f = self._fams.get(name)
        if f is None:
            f = self._fams[name] = (kind, help_text, [])
        return f[2]

    def _labels(self, labels: dict[str, Any]) -> str:
        allv = {**self.const, **labels}
        if not allv:
            return ""
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in allv.items()) + "}"

    def _sample(self, name: str, kind: str, help_text: str, value: Any, labels: dict[str, Any]) -> None:
        if value is None or isinstance(value, (str, dict, list)):
            return
        self.declare(name, kind, help_text).append(f"{name}{self._labels(labels)} {_num(value)}")

    def gauge(self, name: str, help_text: str, value: Any, **labels: Any) -> None:
        self._sample(name, "gauge", help_text, value, labels)

    def counter(self, name: str, help_text: str, value: Any, **labels: Any) -> None:
        self._sample(name, "counter", help_text, value, labels)

    def histogram(self, name: str, help_text: str, counts: list[int], total: float, **labels: Any) -> None:
        lines = self.declare(name, "histogram", help_text)
        acc = 0
        for le, n in zip((*LATENCY_BUCKETS_S, math.inf), counts):
            acc += n
            lines.append(f"{name}_bucket{self._labels({**labels, 'le': _num(le)})} {acc}")
        lines.append(f"{name}_sum{self._labels(labels)} {_num(total)}")
        lines.append(f"{name}_count{self._labels(labels)} {acc}")

    def render(self) -> bytes:
        out: list[str] = []
        for name, (kind, help_text, lines) in self._fams.items():
            if not lines:
                continue
            if help_text:
                out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)
        return ("\n".join(out) + "\n").encode()


def replica_status_metrics(fam: Families, st: dict[str, Any]) -> None:
    """The families every replica of a replicated service has, from its STATUS (engine/service/server.py)."""
    g, c = fam.gauge, fam.counter
    role = st.get("role", "")
    for r in ("leader", "follower", "candidate"):
        g("zwallet_raft_role", "1 for this replica's Raft role", int(role == r), role=r)
    g("zwallet_raft_term", "current Raft term", st.get("term"))
    g("zwallet_raft_leader", "the replica id this one takes for leader (0: none known)", st.get("leader") or 0)
    g("zwallet_raft_commit_index", "highest log index known committed", st.get("commit"))
    g("zwallet_raft_applied_index", "highest log index applied to the state machine", st.get("applied"))
    g("zwallet_raft_last_index", "highest log index held", st.get("last_index"))
    g("zwallet_raft_snapshot_index", "log index of the latest snapshot", st.get("snapshot_index"))
    g("zwallet_raft_pending_proposals", "proposals not yet committed", st.get("pending_proposals"))
    g("zwallet_raft_snapshot_in_progress", "1 while a snapshot is being made", st.get("snapshot_in_progress"))
    c("zwallet_raft_snapshots_installed_total", "snapshots installed from the leader", st.get("snapshots_installed"))
    for reason, n in (st.get("rejected") or {}).items():
        c("zwallet_raft_rejected_total", "peer messages refused, by reason", n, reason=reason)
    ls = st.get("log_store") or {}
    g("zwallet_raft_log_segments", "log segment files", ls.get("segments"))
    c("zwallet_raft_log_bytes_written_total", "bytes written to the Raft log", ls.get("bytes_written"))
    g("zwallet_raft_log_first_index", "oldest log index held", ls.get("first_index"))
    g("zwallet_last_seq", "newest event seq applied here", st.get("last_seq"))
    g("zwallet_events_first_seq", "oldest event seq the event store holds", st.get("events_first_seq"))
    g("zwallet_events_last_seq", "newest event seq the event store holds", st.get("events_last_seq"))
    for name, n in (st.get("counters") or {}).items():
        c(f"zwallet_server_{name}_total", f"server counter {name}", n)
    g("zwallet_inflight_entries", "log entries of requests proposed and not yet applied", st.get("inflight_entries"))
    g("zwallet_pending_requests", "requests accepted and not yet answered", st.get("pending_requests"))
    g("zwallet_pending_bytes", "bytes of the requests accepted and not yet answered", st.get("pending_bytes"))
    for reason, n in (st.get("refusals") or {}).items():
        c("zwallet_refusals_total", "requests refused or connections cut, by reason", n, reason=reason)
    cc = st.get("client_connections") or {}
    g("zwallet_client_connections", "client connections", cc.get("connections"))
    g("zwallet_client_held_bytes", "bytes held inside ZeroMQ for clients, by direction", cc.get("held_in_bytes"),
      direction="in")
    g("zwallet_client_held_bytes", "", cc.get("held_out_bytes"), direction="out")
    stall_metrics(fam, st.get("stalls") or {})


def stall_metrics(fam: Families, stalls: dict[str, Any]) -> None:
    for cause, s in (stalls.get("by_cause") or {}).items():
        fam.counter("zwallet_stalls_total", "stalls over the threshold (engine/stalls.py), by cause",
                    s.get("count"), cause=cause)
        fam.counter("zwallet_stall_seconds_total", "time spent in those stalls, by cause",
                    (s.get("total_ms") or 0) / 1000.0, cause=cause)
        fam.gauge("zwallet_stall_max_seconds", "longest stall seen, by cause", (s.get("max_ms") or 0) / 1000.0,
                  cause=cause)


def disk_metrics(fam: Families, data_dir: str) -> None:
    """Sizes of what a replica keeps on disk: the Raft log segments, snapshots, LMDB files."""
    parts = {"raft_log": "raft/log-*.seg", "raft_snapshot": "raft/snapshot-*", "raft_meta": "raft/*.mdb",
             "events": "events/*.mdb"}
    for part, pattern in parts.items():
        total = 0
        for path in glob.glob(os.path.join(data_dir, pattern)):
            try:
                total += os.stat(path).st_size
            except OSError:
                pass                                     # removed between the glob and the stat
        fam.gauge("zwallet_disk_bytes", "bytes of this replica's files, by part", total, part=part)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHTTPServer
    timeout = TIMEOUT_S

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = self._collect()
            except Exception as exc:                     # noqa: BLE001 - a scrape must not end the thread
                LOG.warning("metrics collection failed: %r", exc)
                self._send(500, b"metrics collection failed\n", "text/plain")
                return
            self._send(200, body, CONTENT_TYPE)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        else:
            self._send(404, b"only /metrics and /healthz\n", "text/plain")

    def _collect(self) -> bytes:
        # the STATUS it reads is the serving thread's, copied without its lock: a dict that grew while it
        # was copied raises RuntimeError; the next try sees it whole
        for attempt in range(3):
            try:
                return self.server.collect()
            except RuntimeError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:     # no access log on stderr
        pass


class MetricsHTTPServer(ThreadingHTTPServer):
    """``GET /metrics`` answered with ``collect()`` (bytes of the text format), on daemon threads."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: str, collect: Callable[[], bytes]) -> None:
        host, port = parse_address(address)
        self.collect = collect
        self._slots = threading.BoundedSemaphore(CONNECTIONS_MAX)
        self.refused = 0
        super().__init__((host, port), _Handler)
        self.timeout = TIMEOUT_S
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1                            # CONNECTIONS_MAX busy: close this one now
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> MetricsHTTPServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()


def start_metrics(address: str, collect: Callable[[], bytes]) -> MetricsHTTPServer | None:
    """The process's metrics endpoint, or None when ``address`` is empty (off). A port in use is a clear
    error at start, not a silent absence."""
    if not address:
        return None
    try:
        srv = MetricsHTTPServer(address, collect)
    except OSError as exc:
        raise RuntimeError(f"cannot serve metrics on {address}: {exc}") from None
    LOG.info("metrics on http://%s/metrics", srv.address)
    return srv.start()
