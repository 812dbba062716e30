"""``zwallet query``: the query service. Projects every shard of a system into the view and answers on a ROUTER
(the common request/reply header of ``engine/service/protocol.py``; ops and payloads: ``query/wire.py``) and,
if asked, on HTTP/JSON (``query/http_api.py``).

    zwallet query --system D/system.toml --data D/query --client tcp://127.0.0.1:7190 [--http 127.0.0.1:7191]
                  [--no-sync] [--rebuild]

Threads: the main thread serves the ROUTER (queries are quick: no subtree walks, bounded pages); the feed thread
subscribes to every shard (``engine.client.Subscriber``: PUB plus range fetch, gap-free) and applies what
arrives through the projector, several chunks per LMDB transaction; the HTTP server's threads call the same
``Queries``. A read-your-writes request (``min_seqs``) waits, parked, until the view has reached the seqs or its
``wait_ms`` (at most ``WAIT_MS_MAX``) has passed: then NOT_AVAILABLE says how far the view is.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import zmq

from engine.records import EVENT_DTYPE, records_concat
from engine.service import security as S
from engine.service.logs import setup_logging
from engine.service.metrics import Families, RequestMetrics, start_metrics
from engine.service import protocol as P
from engine.service.protocol import ErrorCode, Status
from engine.system import System
from engine.zmq_io import recv_message
from query import wire as W
from query.hierarchy import Hierarchy, HierarchyError
from query.projector import Projector, rebuild
from query.queries import Queries, QueryError
from query.view import ViewError

log = logging.getLogger("zwallet.query")

PARKED_MAX = 10_000                 # read-your-writes requests waiting at once
PARKED_BYTES_MAX = 64 << 20
FEED_RECORDS_MAX = 65_536           # records applied in one projector transaction
FEED_COALESCE_S = 0.005             # gather chunks this long before one transaction
LAG_SAMPLES_MAX = 10_000
SUB_TIMEOUT_S = 2.0


@dataclass
class Parked:
    ident: bytes
    req: P.Request
    args: dict[str, Any]
    min_seqs: dict[int, int]
    deadline: float
    nbytes: int
    t0: float = 0.0                # perf_counter() at intake (the latency metrics)


class QueryService:
    def __init__(self, system: System, data_dir: str, client_address: str, http_address: str | None = None,
                 *, sync: bool = True, metrics: str = "", security: Any = None, keys: Any = None) -> None:
        """``security``: the system's server key and allowed client keys (engine.service.security.
        ServerSecurity; None: insecure, logged loudly); ``keys``: what the service reads the shards with."""
        self.system = system
        self.security = security
        self.keys = keys
        self.projector = Projector(os.path.join(data_dir, "view"), sync=sync)
        self.hierarchy = Hierarchy(self.projector)
        self.queries = Queries(self.projector, self.hierarchy)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, W.PAYLOAD_BYTES_MAX + P.HEADER_BYTES_MAX)
        self._auth = None
        if security is not None:
            self._auth = security.start_authenticator(self.ctx)
            security.configure_server(self.router, S.CLIENT_DOMAIN)
        else:
            S.warn_insecure("the query service")
        self.router.bind(client_address)
        self.client_address = client_address
        self._stop = threading.Event()
        self._parked: list[Parked] = []
        self._parked_bytes = 0
        self.lag_ms: collections.deque[int] = collections.deque(maxlen=LAG_SAMPLES_MAX)
        self.feed_error: str | None = None
        self._shard_clients: dict[int, Any] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.request_metrics = RequestMetrics({**W.QUERY_OPS, P.OP_STATUS: "STATUS"})
        self._metrics_http = start_metrics(metrics, self.render_metrics)
        self._feed = threading.Thread(target=self._feed_loop, name="zwallet-query-feed", daemon=True)
        self.http = None
        if http_address:
            from query.http_api import start_http
            host, _, port = http_address.rpartition(":")
            self.http = start_http(self.queries, host or "127.0.0.1", int(port), self.status)

    # ------------------------------------------------------------------------------ feeding
    def _feed_loop(self) -> None:
        from engine.client import ClientError, Subscriber
        p = self.projector
        subs = {sid: Subscriber(g.pubs, g.clients, from_seq=p.applied_seq(sid) + 1, timeout_s=SUB_TIMEOUT_S,
                                keys=self.keys) for sid, g in self.system.shards.items()}
        try:
            while not self._stop.is_set():
                for sid, sub in subs.items():
                    got: list[np.ndarray] = []
                    n = 0
                    end = time.monotonic() + FEED_COALESCE_S
                    while n < FEED_RECORDS_MAX:
                        try:
                            evs = sub.poll(1 if got else 2)
                        except ClientError as exc:
                            log.warning("shard %d: %s", sid, exc)
                            break
                        if evs is None:
                            if not got or time.monotonic() > end:
                                break
                            continue
                        got.append(evs)
                        n += len(evs)
                    if got:
                        evs = records_concat(got, EVENT_DTYPE) if len(got) > 1 else got[0]
                        try:
                            p.offer(sid, evs)
                        except ViewError as exc:
                            self.feed_error = str(exc)
                            log.error("projector stopped: %s", exc)
                            return
                        self.lag_ms.append(max(0, int(time.time() * 1000) - int(evs["timestamp"][-1])))
        finally:
            for sub in subs.values():
                sub.close()

    # ------------------------------------------------------------------------------ serving
    def status(self) -> dict[str, Any]:
        st = self.queries.status()
        st["applied"] = {sid: self.projector.applied_seq(sid) for sid in sorted(self.system.shards)}
        lags = np.array(self.lag_ms) if self.lag_ms else np.zeros(1)
        st.update({"role": "query", "view_lag_ms_p50": float(np.percentile(lags, 50)),
                   "view_lag_ms_p99": float(np.percentile(lags, 99)), "feed_error": self.feed_error,
                   "parked": len(self._parked), "requests": self.counters["requests"],
                   "bad_requests": self.counters["bad_requests"], "not_available": self.counters["not_available"]})
        if self._metrics_http is not None:
            st["metrics_address"] = self._metrics_http.address
        return st

    def render_metrics(self) -> bytes:
        """``GET /metrics`` (the metrics HTTP thread): the projectors' progress and lag, the queries by op
        (docs/metrics.md)."""
        fam = Families(service="query")
        st = self.status()
        for sid, seq in st["applied"].items():
            fam.gauge("zwallet_query_applied_seq", "the newest seq of a shard the view has applied", seq,
                      shard=sid)
        for sid, lag in (st.get("view_time_lag_ms") or {}).items():
            fam.gauge("zwallet_query_view_lag_seconds", "now minus the time of the newest event applied, by shard",
                      lag / 1000.0, shard=sid)
        fam.gauge("zwallet_query_feed_lag_p99_seconds", "p99 of the lag of the recent batches the feed applied",
                  st["view_lag_ms_p99"] / 1000.0)
        fam.gauge("zwallet_query_projector_stopped", "1 once a projector stopped (reconciliation mismatch, a "
                  "malformed chunk: STATUS says why)", int(bool(st.get("feed_error") or st.get("error"))))
        fam.gauge("zwallet_query_accounts", "accounts in the view", st.get("accounts"))
        fam.counter("zwallet_query_records_applied_total", "event records applied to the view",
                    st.get("records_applied"))
        fam.gauge("zwallet_query_hierarchy_nodes", "nodes in the account hierarchy", st.get("hierarchy_nodes"))
        fam.gauge("zwallet_pending_requests", "read-your-writes requests parked until the view reaches them",
                  st["parked"])
        fam.counter("zwallet_query_not_available_total", "requests answered NOT_AVAILABLE", st["not_available"])
        self.request_metrics.add_to(fam)
        return fam.render()

    def _reply(self, ident: bytes, req_id: int, payload: bytes = b"", error: ErrorCode | None = None,
               message: str = "", op: int = -1, t0: float = 0.0) -> None:
        if t0:
            self.request_metrics.observe(op, time.perf_counter() - t0)
        if error is None:
            head = P.Reply(req_id, Status.OK)
        else:
            self.request_metrics.error(op, error.name)
            head = P.Reply(req_id, Status.ERROR, error, message)
            if error is ErrorCode.NOT_AVAILABLE:
                self.counters["not_available"] += 1
            else:
                self.counters["bad_requests"] += 1
        self.router.send(ident, zmq.SNDMORE)
        self.router.send(P.encode(head), zmq.SNDMORE)
        self.router.send(payload)

    def _run(self, op: int, a: dict[str, Any]) -> Any:
        q = self.queries
        if op == W.OP_BALANCE:
            return q.balance(a.get("account_id"), a.get("at_seq"), a.get("at_ms"))
        if op == W.OP_HISTORY:
            return q.history(a.get("account_id"), a.get("first_seq"), a.get("last_seq"), a.get("since_ms"),
                             a.get("until_ms"), a.get("limit"))
        if op == W.OP_BALANCES:
            return q.balances(a.get("account_ids"))
        if op == W.OP_SET_PARENT:
            if "node_id" not in a or "parent_id" not in a:
                raise QueryError("SET_PARENT takes node_id and parent_id (nil: detach)")
            return q.set_parent(a["node_id"], a["parent_id"])
        if op == W.OP_HIERARCHY_BALANCE:
            return q.hierarchy_balance(a.get("node_id"), a.get("currency"), a.get("at_ms"), a.get("at_seqs"))
        if op == W.OP_EVENTS_RANGE:
            return self._events_range(a)
        raise QueryError(f"unknown op {op}")

    def _events_range(self, a: dict[str, Any]) -> dict[str, Any]:
        """A shard's event records by seq or time range, up to the view's applied seq, from the shard's event
        stores (the view keeps versions, not records), at most EVENTS_RANGE_RECORDS_MAX records of whole
        seqs; ``next_seq`` continues (None: the range is done)."""
        from engine.client import Client, ClientError
        shard = a.get("shard")
        if not isinstance(shard, int) or shard not in self.system.shards:
            raise QueryError(f"shard must be one of {sorted(self.system.shards)}")
        first, last, ms = self.queries.seq_range(shard, a.get("first_seq"), a.get("last_seq"), a.get("since_ms"),
                                                 a.get("until_ms"))
        out: list[np.ndarray] = []
        n = 0
        seq = first
        client = self._shard_clients.get(shard)
        if client is None:
            client = self._shard_clients[shard] = Client(self.system.shards[shard].clients, timeout_s=5.0,
                                                         keys=self.keys)
        try:
            while seq <= last and n < W.EVENTS_RANGE_RECORDS_MAX:
                evs = client.events(seq, min(last, seq + 255))
                if not len(evs):
                    break
                out.append(evs)
                n += len(evs)
                seq = int(evs["seq_num"][-1]) + 1
        except ClientError as exc:
            raise QueryError(f"shard {shard}'s event stores did not answer: {exc}") from None
        evs = records_concat(out, EVENT_DTYPE)
        if len(evs) > W.EVENTS_RANGE_RECORDS_MAX:
            cut = int(evs["seq_num"][W.EVENTS_RANGE_RECORDS_MAX])
            evs = evs[:int(np.searchsorted(evs["seq_num"], cut))]
            seq = cut
        return {"shard": shard, "first_seq": first, "last_seq": last, "records": evs.tobytes(),
                "next_seq": seq if seq <= last else None, "as_of_ms": ms}

    def _answer(self, ident: bytes, req: P.Request, args: dict[str, Any], t0: float) -> None:
        try:
            out = self._run(req.op, args)
        except (QueryError, HierarchyError, ViewError) as exc:
            self._reply(ident, req.req_id, error=ErrorCode.BAD_REQUEST, message=str(exc), op=req.op, t0=t0)
            return
        self._reply(ident, req.req_id, W.pack(out), op=req.op, t0=t0)

    def _refusal(self, rights: Any, op: int, args: dict[str, Any]) -> str:
        """Why ``rights`` may not run this query ("": it may): reads need READ; an account-range or shard
        restricted key reads only its own accounts (no hierarchy sums, no event ranges: they span others');
        a hierarchy edit is account management (ADMIN)."""
        if op == W.OP_SET_PARENT:
            return "" if rights.is_admin else f"{rights.describe()}: changing the hierarchy needs an admin key"
        if not rights.has(S.READ):
            return f"{rights.describe()} cannot read"
        if op in (W.OP_HIERARCHY_BALANCE, W.OP_EVENTS_RANGE) and rights.restricted:
            return (f"{rights.describe()}: hierarchy sums and event ranges span other accounts; a key restricted "
                    "to accounts or shards cannot read them")
        if rights.restricted:
            ids = args.get("account_ids") if op == W.OP_BALANCES else [args.get("account_id")]
            for a in ids or ():
                if not isinstance(a, int) or isinstance(a, bool):
                    continue                     # the query itself refuses it, as for any key
                if not rights.allows_account(a) or not rights.allows_shard(self.system.shard_map.shard_of(a)):
                    return f"{rights.describe()} may not read account {a}"
        return ""

    def _reached(self, min_seqs: dict[int, int]) -> bool:
        applied = self.projector.applied
        return all(applied.get(s, 0) >= q for s, q in min_seqs.items())

    def _handle(self, frames: list[Any]) -> None:
        self.counters["requests"] += 1
        t0 = time.perf_counter()
        ident = frames[0]
        head = b"" if len(frames) < 2 else frames[1] if isinstance(frames[1], bytes) else frames[1].bytes
        if len(frames) != 3:
            self._reply(ident, P.salvage_req_id(head), error=ErrorCode.BAD_REQUEST,
                        message=f"a request is exactly two frames [header, payload]: got {len(frames) - 1}")
            return
        try:
            req = P.decode_request(head)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            self._reply(ident, P.salvage_req_id(head), error=ErrorCode.BAD_REQUEST,
                        message=f"bad request header: {exc}")
            return
        body = frames[2].buffer
        if len(body) > W.PAYLOAD_BYTES_MAX:
            self._reply(ident, req.req_id, error=ErrorCode.FRAME_TOO_LARGE,
                        message=f"payload of {len(body)} bytes exceeds PAYLOAD_BYTES_MAX={W.PAYLOAD_BYTES_MAX}")
            return
        if req.op == P.OP_STATUS:
            self._reply(ident, req.req_id, W.pack(self.status()), op=req.op, t0=t0)
            return
        if req.op not in W.QUERY_OPS:
            self._reply(ident, req.req_id, error=ErrorCode.UNKNOWN_OP, message=f"unknown op {req.op}")
            return
        rights = S.FULL_RIGHTS
        if self.security is not None:
            # the key the connection authenticated with (ZAP User-Id) -> its rights, now (a removed key: none)
            got = self.security.rights_of(frames[1].get("User-Id") if not isinstance(frames[1], bytes) else None)
            if got is None:
                self._reply(ident, req.req_id, error=ErrorCode.UNAUTHORIZED, op=req.op, t0=t0,
                            message="this connection's key is not (or no longer) an allowed client key")
                return
            rights = got
        try:
            args = W.unpack(body) if len(body) else {}
            if not isinstance(args, dict):
                raise ValueError("the payload is a msgpack map of arguments")
            min_seqs = {int(k): int(v) for k, v in (args.get("min_seqs") or {}).items()}
            wait_ms = int(args.get("wait_ms", W.WAIT_MS_DEFAULT))
            if not 0 <= wait_ms <= W.WAIT_MS_MAX:
                raise ValueError(f"wait_ms must be 0..{W.WAIT_MS_MAX}")
            unknown = set(min_seqs) - set(self.system.shards)
            if unknown:
                raise ValueError(f"min_seqs names shard(s) {sorted(unknown)} not in the system")
        except (msgspec.DecodeError, ValueError, TypeError, AttributeError) as exc:
            self._reply(ident, req.req_id, error=ErrorCode.BAD_REQUEST, message=f"bad arguments: {exc}",
                        op=req.op, t0=t0)
            return
        refused = self._refusal(rights, req.op, args)
        if refused:
            self._reply(ident, req.req_id, error=ErrorCode.UNAUTHORIZED, message=refused, op=req.op, t0=t0)
            return
        if self._reached(min_seqs):
            self._answer(ident, req, args, t0)
            return
        n = len(body)
        if len(self._parked) >= PARKED_MAX or self._parked_bytes + n > PARKED_BYTES_MAX:
            self._reply(ident, req.req_id, error=ErrorCode.OVERLOADED,
                        message="too many read-your-writes requests waiting; retry later", op=req.op, t0=t0)
            return
        self._parked.append(Parked(ident, req, args, min_seqs, time.monotonic() + wait_ms / 1000, n, t0))
        self._parked_bytes += n

    def _serve_parked(self) -> None:
        if not self._parked:
            return
        now = time.monotonic()
        still = []
        for pk in self._parked:
            if self._reached(pk.min_seqs):
                self._answer(pk.ident, pk.req, pk.args, pk.t0)
            elif now >= pk.deadline:
                applied = {s: self.projector.applied_seq(s) for s in pk.min_seqs}
                self._reply(pk.ident, pk.req.req_id, error=ErrorCode.NOT_AVAILABLE,
                            message=f"the view has not reached the asked seqs: view {applied}, asked {pk.min_seqs}",
                            op=pk.req.op, t0=pk.t0)
            else:
                still.append(pk)
                continue
            self._parked_bytes -= pk.nbytes
        self._parked = still

    def serve(self) -> None:
        self._feed.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(2 if self._parked else 50):
                    for _ in range(1000):
                        try:
                            frames = recv_message(self.router)
                        except zmq.Again:
                            break
                        try:
                            self._handle(frames)
                        except Exception:        # our bug on one request must not stop the service
                            log.exception("query service: a request failed")
                self._serve_parked()
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._feed.is_alive():
            self._feed.join(10)
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
        for c in self._shard_clients.values():
            c.close()
        self.router.close(0)
        S.stop_authenticator(self._auth)
        self.ctx.term()
        self.projector.close()


def _rebuild(system: System, path: str, sync: bool) -> None:
    from engine.client import Client
    keys = S.reader_keys_of_system(system)
    clients = {sid: Client(g.clients, timeout_s=10.0, keys=keys) for sid, g in system.shards.items()}

    def fetch_of(c: Client) -> Callable[[int, int], np.ndarray]:
        return lambda first, last: c.events(first, last)

    def head_of(c: Client) -> Callable[[], int]:
        return lambda: int(c.status().get("last_seq", 0))
    try:
        rebuild(path, {sid: fetch_of(c) for sid, c in clients.items()}, {sid: head_of(c) for sid, c in clients.items()},
                sync=sync)
    finally:
        for c in clients.values():
            c.close()


CONFIG_KEYS = frozenset({"system", "data", "client", "http", "sync", "metrics"})


def _apply_config(args: argparse.Namespace) -> None:
    """Fill what the flags left unset from ``--config``'s [query] table; refuse unknown keys."""
    if args.config:
        import tomllib
        try:
            with open(args.config, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read {args.config}: {exc}") from None
        table = doc.get("query", {})
        unknown = set(doc) - {"query"} | set(table) - CONFIG_KEYS
        if unknown:
            raise ValueError(f"{args.config}: unknown keys {sorted(unknown)} "
                             f"(a [query] table of {sorted(CONFIG_KEYS)})")
        for k in ("system", "data", "client", "http", "metrics"):
            if getattr(args, k) is None and k in table:
                setattr(args, k, str(table[k]))
        if table.get("sync") is False:
            args.no_sync = True
    missing = [k for k in ("system", "data", "client") if getattr(args, k) is None]
    if missing:
        raise ValueError("missing " + ", ".join(f"--{k}" for k in missing))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zwallet query", description="the query service: projectors and read API")
    ap.add_argument("--config", default=None, help="a TOML file with a [query] table of these options "
                                                   "(system, data, client, http, sync); flags override it")
    ap.add_argument("--system", default=None, help="system.toml (zwallet up writes it)")
    ap.add_argument("--data", default=None, help="the view's directory (LMDB)")
    ap.add_argument("--client", default=None, help="ROUTER address, e.g. tcp://127.0.0.1:7190")
    ap.add_argument("--http", default=None, help="HTTP/JSON read API host:port (optional)")
    ap.add_argument("--metrics", default=None, help="host:port for Prometheus metrics (GET /metrics); empty: off")
    ap.add_argument("--no-sync", action="store_true", help="skip fsync of the view (it can be rebuilt)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the view from seq 1 (side by side) first")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    try:
        _apply_config(args)
    except ValueError as exc:
        print(f"zwallet query: {exc}", file=sys.stderr)
        return 2
    setup_logging("query", args.verbose, ("zwallet", "query"))
    try:
        system = System.load(args.system)
        if args.rebuild:
            _rebuild(system, os.path.join(args.data, "view"), not args.no_sync)
        security = S.server_security_of_system(system)
        svc = QueryService(system, args.data, args.client, args.http, sync=not args.no_sync,
                           metrics=args.metrics or "", security=security,
                           keys=S.reader_keys_of_system(system) if security is not None else None)
    except (ValueError, OSError, zmq.ZMQError, ViewError, RuntimeError) as exc:
        print(f"zwallet query: {exc}", file=sys.stderr)
        return 2

    def on_signal(_sig: int, _frm: Any) -> None:
        svc.stop()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"zwallet query: ready on {args.client}" + (f", http {args.http}" if args.http else ""), flush=True)
    svc.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
