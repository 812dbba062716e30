"""``zwallet gateway``: one stateless replica of the gateway service.

    zwallet gateway --system D/system.toml --client tcp://127.0.0.1:7300 [--templates T.toml] [--id 1]

A ZeroMQ ROUTER front-end speaking the service header (``engine/service/protocol.py``; ops in
``gateway/wire.py``) in front of a ``gateway.ops.Gateway`` (the router, the business API, the templates).
It holds no state of its own: every id a request produces is the caller's or derived from the caller's, so
any number of replicas run side by side and a request can be retried at any of them (the same bytes: the
same ids) without anything applying twice. A shard or the Marker that is slow holds up only the requests
that wait on it.

The intake, in the order the shard's (engine/service/server.py) does it, before anything is decoded past
the header: exactly two frames; the header (``decode_request``: at most HEADER_BYTES_MAX, a known version);
the op; the payload's size against CALL_BYTES_MAX; the pending bounds (requests and bytes, in total and per
client). A refusal is an ERROR reply that echoes the req_id whenever it can be read.

Security (docs/security.md): the ROUTER is a CURVE server (the system's server key; only the allowed client
keys connect) and every CALL runs with its caller's rights (``gateway.router.CALLER``, from the key the
connection authenticated with): the router checks each command against them before it leaves, as the shard
or the Marker would, so a client cannot reach through the gateway further than it could directly.
"""
from __future__ import annotations

import argparse
import collections
import contextvars
import functools
import logging
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from engine.service import protocol as P
from engine.service.logs import setup_logging
from engine.service.metrics import Families, RequestMetrics, start_metrics
from engine.service.protocol import ErrorCode, Status
from engine.service.security import (CLIENT_DOMAIN, FULL_RIGHTS, Rights, ServerSecurity, client_keys_of_system,
                                     stop_authenticator, warn_insecure)
from engine.zmq_io import Waker
from gateway import wire as GW
from gateway.ops import Gateway
from gateway.router import CALLER

log = logging.getLogger("zwallet.gateway")

RECV_PER_PASS_MAX = 4096
HOLD_MS_DEFAULT = 2_000          # a call is answered within this: its result, or TIMEOUT (re-send the same
                                 # request: the same ids; the work goes on meanwhile)


class _Item:
    __slots__ = ("ident", "req_id", "nbytes", "future", "hold_until", "answered", "name", "t0")

    def __init__(self, ident: bytes, req_id: int, nbytes: int, future: Future, hold_until: float,
                 name: str = "", t0: float = 0.0) -> None:
        self.name = name                 # the operation (the metrics' op label)
        self.t0 = t0                     # perf_counter() at intake
        self.ident = ident
        self.req_id = req_id
        self.nbytes = nbytes
        self.future = future
        self.hold_until = hold_until
        self.answered = False


@dataclass
class Limits:
    pending_requests_max: int = 100_000          # requests accepted and not yet answered
    pending_bytes_max: int = 256 << 20           # their bytes (header + payload)
    pending_per_client_max: int = 20_000
    pending_bytes_per_client_max: int = 64 << 20
    call_bytes_max: int = GW.CALL_BYTES_MAX

    def validate(self) -> None:
        for k, v in vars(self).items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"gateway limit {k} must be a positive int")
        if self.pending_per_client_max > self.pending_requests_max:
            raise ValueError("pending_per_client_max cannot exceed pending_requests_max")
        if self.pending_bytes_per_client_max > self.pending_bytes_max:
            raise ValueError("pending_bytes_per_client_max cannot exceed pending_bytes_max")
        if self.call_bytes_max > self.pending_bytes_per_client_max:
            raise ValueError("call_bytes_max cannot exceed pending_bytes_per_client_max")


class GatewayServer:
    def __init__(self, gateway: Gateway, client_address: str, *, node_id: int = 1,
                 limits: Limits | None = None, hold_ms: int = HOLD_MS_DEFAULT,
                 security: ServerSecurity | None = None, metrics: str = "") -> None:
        """``security``: the system's server key and allowed client keys (None: insecure, logged loudly)."""
        self.gateway = gateway
        self.hold_s = hold_ms / 1000
        self.node_id = node_id
        self.limits = limits or Limits()
        self.limits.validate()
        self.security = security
        self.ctx = zmq.Context()
        self._auth = security.start_authenticator(self.ctx) if security is not None else None
        if security is None:
            warn_insecure(f"gateway {node_id}")
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        if security is not None:
            security.configure_server(self.sock, CLIENT_DOMAIN)
        self.sock.bind(client_address)
        self.address = client_address
        self._waker = Waker()
        self._done: collections.deque[_Item] = collections.deque()
        self._held: collections.deque[_Item] = collections.deque()     # in arrival order: hold_until ascends
        self._stop = threading.Event()
        self.pending = 0
        self.pending_bytes = 0
        self._by_client: collections.Counter[bytes] = collections.Counter()
        self._bytes_by_client: collections.Counter[bytes] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        self.request_metrics = RequestMetrics({})
        self._metrics_http = start_metrics(metrics, self.render_metrics)

    # ------------------------------------------------------------------------------------ loop
    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(50 if self._held else 200))
                if self._waker.fd in events:
                    self._waker.drain()
                if self.sock in events:
                    self._receive()
                self._send_done()
                self._answer_held()
        finally:
            if self._metrics_http is not None:
                self._metrics_http.close()
            self.sock.close(0)
            stop_authenticator(self._auth)
            self.ctx.term()
            self._waker.close()
            self.gateway.close()

    def stop(self) -> None:
        self._stop.set()
        self._waker.wake()

    def _receive(self) -> None:
        # recv() per frame, not recv_multipart (DESIGN.md: ~3x the messages/s); the identity as bytes, the
        # header and payload as zero-copy Frames
        recv = self.sock.recv
        sec = self.security
        for _ in range(RECV_PER_PASS_MAX):
            try:
                f = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident = f.bytes
            frames: list[Any] = []
            while f.more:
                f = recv(copy=False)
                frames.append(f)
            self.counters["requests"] += 1
            rights = sec.rights_of(frames[0].get("User-Id")) if sec is not None and frames else FULL_RIGHTS
            self._handle(ident, frames, rights)

    def _refuse(self, ident: bytes, req_id: int, code: ErrorCode, message: str) -> None:
        self.counters[f"refused_{code.name.lower()}"] += 1
        self._send(ident, P.encode(P.Reply(req_id, Status.ERROR, code, message, node_id=self.node_id)), b"")

    def _handle(self, ident: bytes, frames: list[Any], rights: Rights | None = FULL_RIGHTS) -> None:
        if len(frames) != 2:
            first = frames[0].bytes if frames else b""
            self._refuse(ident, P.salvage_req_id(first), ErrorCode.BAD_REQUEST,
                         f"a request is exactly two frames [header, payload]: got {len(frames)}")
            return
        head = frames[0].bytes
        try:
            req = P.decode_request(head)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            self._refuse(ident, P.salvage_req_id(head), ErrorCode.BAD_REQUEST, f"bad request header: {exc}")
            return
        if rights is None:
            self._refuse(ident, req.req_id, ErrorCode.UNAUTHORIZED, "this client key is not (or no longer) allowed")
            return
        body = frames[1]
        size = len(body)
        lim = self.limits
        if req.op == GW.OP_STATUS:
            if size:
                self._refuse(ident, req.req_id, ErrorCode.BAD_REQUEST, "STATUS takes an empty payload frame")
                return
            self._reply(ident, req.req_id, msgspec.msgpack.encode(self.status()))
            return
        if req.op != GW.OP_CALL:
            self._refuse(ident, req.req_id, ErrorCode.UNKNOWN_OP, f"unknown op {req.op}")
            return
        if size > lim.call_bytes_max:
            self._refuse(ident, req.req_id, ErrorCode.FRAME_TOO_LARGE,
                         f"a CALL payload of {size} bytes exceeds call_bytes_max={lim.call_bytes_max}")
            return
        nbytes = len(head) + size
        reason = ""
        if self.pending >= lim.pending_requests_max:
            reason = "pending_requests_max"
        elif self._by_client[ident] >= lim.pending_per_client_max:
            reason = "pending_per_client_max"
        elif self.pending_bytes + nbytes > lim.pending_bytes_max:
            reason = "pending_bytes_max"
        elif self._bytes_by_client[ident] + nbytes > lim.pending_bytes_per_client_max:
            reason = "pending_bytes_per_client_max"
        if reason:
            self._refuse(ident, req.req_id, ErrorCode.OVERLOADED,
                         f"{reason} reached; retry later with the same ids")
            return
        try:
            name, args, kwargs = GW.decode_call(body.buffer)
        except ValueError as exc:
            self._refuse(ident, req.req_id, ErrorCode.BAD_REQUEST, str(exc))
            return
        if name not in self.gateway.ops:
            self._refuse(ident, req.req_id, ErrorCode.UNKNOWN_OP, f"no gateway operation {name!r}")
            return
        self.pending += 1
        self.pending_bytes += nbytes
        self._by_client[ident] += 1
        self._bytes_by_client[ident] += nbytes
        t0 = time.perf_counter()
        fut = contextvars.copy_context().run(self._call_as, rights, name, args, kwargs)
        item = _Item(ident, req.req_id, nbytes, fut, time.monotonic() + self.hold_s, name, t0)
        self._held.append(item)
        fut.add_done_callback(functools.partial(self._completed, item))

    def _call_as(self, rights: Rights, name: str, args: Any, kwargs: dict[str, Any]) -> Future:
        CALLER.set(rights)                  # in this call's own context (copy_context().run)
        return self.gateway.call(name, args, kwargs)

    def _completed(self, item: _Item, _fut: Future) -> None:
        self._done.append(item)          # any thread; the main thread replies
        self._waker.wake()

    def _answer_held(self) -> None:
        """Calls still running past hold_s are answered TIMEOUT (retryable: the client re-sends the same
        bytes, here or at another replica, and gets the outcome then); the work goes on, and the call keeps
        its share of the pending bounds until it ends."""
        now = time.monotonic()
        held = self._held
        while held and (held[0].answered or held[0].future.done() or held[0].hold_until <= now):
            item = held.popleft()
            if item.answered or item.future.done():
                continue
            item.answered = True
            self.counters["held_timeout"] += 1
            self._refuse(item.ident, item.req_id, ErrorCode.TIMEOUT,
                         f"still running after {self.hold_s:.1f} s; re-send the same request for its outcome")

    def _send_done(self) -> None:
        while self._done:
            item = self._done.popleft()
            ident, req_id, nbytes, fut = item.ident, item.req_id, item.nbytes, item.future
            self.pending -= 1
            self.pending_bytes -= nbytes
            for counter, n in ((self._by_client, 1), (self._bytes_by_client, nbytes)):
                left = counter[ident] - n
                if left > 0:
                    counter[ident] = left
                else:
                    del counter[ident]
            exc = fut.exception()
            metrics = self.request_metrics
            metrics.observe(item.name, time.perf_counter() - item.t0)
            if exc is not None:
                metrics.error(item.name, type(exc).__name__)
            else:
                code = getattr(fut.result(), "code", None)
                if code is not None:
                    metrics.results[getattr(code, "name", str(code))] += 1
            try:
                if exc is None:
                    payload = GW.encode(["ok", fut.result()])
                else:
                    fields = {k: getattr(exc, k) for k in ("workflow_id", "state", "reason", "code")
                              if isinstance(getattr(exc, k, None), (int, str))}
                    payload = GW.encode(["err", type(exc).__name__, str(exc), fields])
            except (TypeError, ValueError, OverflowError) as e:
                payload = GW.encode(["err", "ClientError", f"the gateway cannot encode the answer: {e}"])
            if item.answered:
                continue                 # answered TIMEOUT already: the re-sent request gets the outcome
            item.answered = True
            self.counters["answered"] += 1
            self._reply(ident, req_id, payload)

    def _reply(self, ident: bytes, req_id: int, payload: bytes) -> None:
        self._send(ident, P.encode(P.Reply(req_id, Status.OK, node_id=self.node_id)), payload)

    def _send(self, ident: bytes, header: bytes, payload: bytes) -> None:
        send = self.sock.send
        try:
            send(ident, zmq.SNDMORE | zmq.NOBLOCK)
            send(header, zmq.SNDMORE)
            send(payload, 0, copy=len(payload) < 65536)
        except zmq.Again:
            self.counters["reply_dropped"] += 1     # the client's queue is full: it re-sends (same ids)

    def status(self) -> dict[str, Any]:
        r = self.gateway.router
        return {"role": "gateway", "node_id": self.node_id, "address": self.address, "pending": self.pending,
                "pending_bytes": self.pending_bytes, "shard_epoch": r.shard_map.epoch, "reloads": r.reloads,
                "shards": list(r.shard_map.shards), "templates": sorted(self.gateway.templates),
                "counters": dict(self.counters),
                "metrics_address": self._metrics_http.address if self._metrics_http is not None else ""}


    def render_metrics(self) -> bytes:
        """``GET /metrics`` (the metrics HTTP thread): calls by operation, their latency (intake to
        answer), outcomes by code, errors by kind, the pending bounds, refusals (docs/metrics.md)."""
        fam = Families(service="gateway", node=self.node_id)
        st = self.status()
        fam.gauge("zwallet_pending_requests", "calls accepted and not yet answered", st["pending"])
        fam.gauge("zwallet_pending_bytes", "bytes of those calls", st["pending_bytes"])
        fam.gauge("zwallet_shard_map_epoch", "the shard map epoch the gateway routes by", st["shard_epoch"])
        fam.counter("zwallet_gateway_map_reloads_total", "shard map reloads (stale epoch, wrong shard)",
                    st["reloads"])
        for name, n in st["counters"].items():
            fam.counter("zwallet_gateway_events_total", "the gateway's counters (refusals, timeouts, answers)",
                        n, event=name)
        self.request_metrics.add_to(fam)
        return fam.render()


def gateway_security(system: Any) -> ServerSecurity | None:
    """The gateway's server security from system.toml's [security] table (None: insecure)."""
    from engine.service.security import server_security_of_system
    return server_security_of_system(system)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zwallet gateway", description="one stateless replica of the gateway service")
    p.add_argument("--system", required=True, help="the system file (system.toml, as zwallet up writes)")
    p.add_argument("--client", required=True, help="the address to serve clients on, e.g. tcp://127.0.0.1:7300")
    p.add_argument("--templates", help="an operator's templates file (TOML, docs/gateway.md)")
    p.add_argument("--id", type=int, default=1, help="this replica's id (in replies and logs)")
    p.add_argument("--metrics", default="", help="host:port for Prometheus metrics (GET /metrics); empty: off")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(f"gateway-{args.id}", args.verbose, ("zwallet", "gateway"))
    from gateway.business import TemplateError, load_templates
    from gateway.router import Router
    from engine.system import System
    try:
        templates = load_templates(args.templates) if args.templates else None
        system = System.load(args.system)
        security = gateway_security(system)
        keys = client_keys_of_system(system, "gateway_key") if security is not None else None
        gw = Gateway(Router(system, keys=keys, enforce_callers=security is not None), templates)
        server = GatewayServer(gw, args.client, node_id=args.id, security=security, metrics=args.metrics)
    except (ValueError, OSError, TemplateError, zmq.ZMQError, RuntimeError) as exc:
        print(f"zwallet gateway: {exc}", file=sys.stderr)
        return 2

    def on_signal(_sig: int, _frm: Any) -> None:
        server.stop()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if security is not None:                     # key rotation: re-read the allowed client keys now
        signal.signal(signal.SIGHUP, lambda _s, _f: security.keyring.reload())
    print(f"zwallet gateway {args.id}: serving {args.client} for {args.system}; ready", flush=True)
    t0 = time.monotonic()
    server.serve()
    print(f"zwallet gateway {args.id}: stopped after {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
