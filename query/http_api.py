"""The query service's HTTP/JSON read API (stdlib ``http.server`` in a thread), for dashboards and BI tools.

    GET /v1/status
    GET /v1/accounts/{account_id}?at_seq=&at_ms=
    GET /v1/accounts/{account_id}/history?first_seq=&last_seq=&since_ms=&until_ms=&limit=
    GET /v1/hierarchy/{node_id}?currency=&at_ms=
    GET /openapi.json

Answers are the ZeroMQ API's values as JSON (integers are exact, however large: a JavaScript client should
parse them as BigInt). Only GET; a request line or query string beyond the server's limits is refused.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from query.hierarchy import HierarchyError
from query.queries import Queries, QueryError

URL_BYTES_MAX = 4096

_INT = {"type": "integer"}
_VERSION = {"type": "object", "properties": {
    "account_id": _INT, "currency": {"type": "string"}, "state": {"type": "string"}, "available": _INT,
    "reserved": _INT, "pending_in": _INT, "pending_out": _INT, "version": _INT, "seq": _INT, "timestamp_ms": _INT,
    "shard": _INT, "kind": {"type": "string"}, "amount": _INT, "counterparty": _INT, "dedup_id": _INT}}


def _q(name: str, desc: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": _INT, "description": desc}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _INT}


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "zwallet query API", "version": "1",
             "description": "Read models built from the shards' event streams (docs/query.md)."},
    "paths": {
        "/v1/status": {"get": {"summary": "the view's progress per shard, lag and throughput",
                               "responses": {"200": {"description": "status"}}}},
        "/v1/accounts/{account_id}": {"get": {
            "summary": "an account now, at a seq of its shard, or at a time (point-in-time)",
            "parameters": [_path("account_id"), _q("at_seq", "the account's last version with seq <= at_seq"),
                           _q("at_ms", "the account's last version with timestamp <= at_ms")],
            "responses": {"200": {"description": "the version",
                                  "content": {"application/json": {"schema": _VERSION}}},
                          "404": {"description": "no such account (then)"}}}},
        "/v1/accounts/{account_id}/history": {"get": {
            "summary": "the account's versions in a seq or time range, newest first, paginated",
            "parameters": [_path("account_id"), _q("first_seq", ""), _q("last_seq", "also: the next page's, "
                                                                          "from next_last_seq"),
                           _q("since_ms", ""), _q("until_ms", ""), _q("limit", "at most 10000")],
            "responses": {"200": {"description": "a page", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"versions": {"type": "array", "items": _VERSION},
                                                 "next_last_seq": _INT, "as_of_seq": _INT}}}}}}}},
        "/v1/hierarchy/{node_id}": {"get": {
            "summary": "a hierarchy node's balance in one currency (the sum over its subtree) and the seq per "
                       "shard it reflects",
            "parameters": [_path("node_id"),
                           {"name": "currency", "in": "query", "required": True, "schema": {"type": "string"}},
                           _q("at_ms", "as of a time: the tree and the balances as they were then")],
            "responses": {"200": {"description": "the sums"}}}},
    },
}


def start_http(queries: Queries, host: str, port: int, status: Callable[[], dict[str, Any]]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        server_version = "zwallet-query/1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body, default=str).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if len(self.path) > URL_BYTES_MAX:
                self._send(414, {"error": f"URL longer than {URL_BYTES_MAX} bytes"})
                return
            u = urlsplit(self.path)
            args = {k: v[-1] for k, v in parse_qs(u.query, max_num_fields=16).items()}
            parts = [p for p in u.path.split("/") if p]
            try:
                if parts == ["openapi.json"]:
                    self._send(200, OPENAPI)
                elif parts == ["v1", "status"]:
                    self._send(200, status())
                elif len(parts) == 3 and parts[:2] == ["v1", "accounts"]:
                    b = queries.balance(parts[2], args.get("at_seq"), args.get("at_ms"))
                    self._send(200, b) if b is not None else self._send(404, {"error": "no such account (then)"})
                elif len(parts) == 4 and parts[:2] == ["v1", "accounts"] and parts[3] == "history":
                    self._send(200, queries.history(parts[2], args.get("first_seq"), args.get("last_seq"),
                                                    args.get("since_ms"), args.get("until_ms"), args.get("limit")))
                elif len(parts) == 3 and parts[:2] == ["v1", "hierarchy"]:
                    self._send(200, queries.hierarchy_balance(parts[2], args.get("currency"), args.get("at_ms")))
                else:
                    self._send(404, {"error": f"no route {u.path}; see /openapi.json"})
            except (QueryError, HierarchyError, ValueError) as exc:
                self._send(400, {"error": str(exc)})

    srv = ThreadingHTTPServer((host, port), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, name="zwallet-query-http", daemon=True).start()
    return srv
