"""The client protocol as a client in another language meets it: docs/protocol.md and docs/ledger.md only.

The first test parses the docs' numeric tables (result codes, account states, kinds, error codes, ops,
statuses, consistency levels, record offsets) and compares them with the code, so they cannot drift: it
names every missing or mismatching entry. The others speak to a real 3-replica shard from raw frames: a
plain zmq DEALER, msgpack headers built by hand as the doc lists their fields, op records packed with
``struct`` at the doc's offsets, replies unpacked the same way (engine.wire and engine.records are used
only to check, never to build or parse)."""
from __future__ import annotations

import json
import os
import re
import struct
import time
from enum import IntEnum
from typing import Any

import msgspec
import numpy as np
import pytest

from engine import records as R
from engine import wire as W
from engine._ledger import OpEncoder
from engine.devtools.cluster import NodeCluster
from tests.node_helpers import RawPeer

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs")


def _doc(name: str) -> str:
    with open(os.path.join(DOCS, name)) as f:
        return f.read()


def _table_after(text: str, marker: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table after the first line containing ``marker``."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if marker in line), None)
    assert start is not None, f"the docs have no line with {marker!r}"
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            break
    assert rows, f"no table after {marker!r}"
    return rows[1:]                                   # without the column names


def _enum_problems(text: str, marker: str, enum: type[IntEnum]) -> list[str]:
    rows = _table_after(text, marker)
    doc: dict[int, str] = {}
    problems = []
    for cells in rows:
        try:
            doc[int(cells[0])] = cells[1]
        except (ValueError, IndexError):
            problems.append(f"{enum.__name__}: doc row {cells} has no integer value")
    for m in enum:
        if m.value not in doc:
            problems.append(f"{enum.__name__}.{m.name} = {m.value} is missing from the doc table after {marker!r}")
        elif doc[m.value] != m.name:
            problems.append(f"{enum.__name__}: the doc says {m.value} is {doc[m.value]}, the code says {m.name}")
    for v, name in doc.items():
        if v not in enum._value2member_map_:
            problems.append(f"{enum.__name__}: the doc lists {v} {name}, which the code does not have")
    return problems


_TYPE_BYTES = {"u128": 16, "i128": 16, "u64": 8, "u32": 4, "u16": 2, "u8": 1, "8 bytes": 8}


def _record_problems(text: str, marker: str, dtype: np.dtype, title: str) -> list[str]:
    problems = []
    m = re.search(re.escape(marker) + r"`?, (\d+) bytes", text)
    if m is None or int(m.group(1)) != dtype.itemsize:
        problems.append(f"{title}: the doc does not say {marker} is {dtype.itemsize} bytes")
    doc = {}
    for cells in _table_after(text, marker):
        fm = re.match(r"`(\w+)` (.+)", cells[1])
        if not fm:
            problems.append(f"{title}: bad field cell {cells[1]!r}")
            continue
        doc[fm.group(1)] = (int(cells[0]), fm.group(2).strip())
    for name in dtype.names:
        off = dtype.fields[name][1]
        size = dtype.fields[name][0].itemsize
        if name not in doc:
            problems.append(f"{title}: field {name} (offset {off}, {size} bytes) is missing from the doc")
            continue
        d_off, d_type = doc[name]
        if d_off != off:
            problems.append(f"{title}: {name} is at offset {off}, the doc says {d_off}")
        if _TYPE_BYTES.get(d_type) != size:
            problems.append(f"{title}: {name} is {size} bytes, the doc says {d_type!r}")
    for name in doc.keys() - set(dtype.names):
        problems.append(f"{title}: the doc lists field {name}, which the record does not have")
    return problems


def test_doc_tables_match_the_code():
    proto, ledger = _doc("protocol.md"), _doc("ledger.md")
    problems = []
    for marker, enum in (("(`records.Code`)", R.Code), ("(`records.State`)", R.State),
                         ("(`records.Kind`)", R.Kind), ("(`wire.ErrorCode`)", W.ErrorCode),
                         ("(`wire.Op`)", W.Op), ("(`wire.Status`)", W.Status),
                         ("(`wire.Consistency`)", W.Consistency)):
        problems += _enum_problems(proto, marker, enum)
    problems += _record_problems(proto, "**Result record, `RESULT_DTYPE", R.RESULT_DTYPE, "RESULT_DTYPE")
    problems += _record_problems(proto, "**Event record, `EVENT_DTYPE", R.EVENT_DTYPE, "EVENT_DTYPE")
    problems += _record_problems(ledger, "**Op record, `OP_DTYPE", R.OP_DTYPE, "OP_DTYPE")
    assert str(W.FRAME_BYTES_MAX_DEFAULT) in proto.replace(",", ""), "the doc's default frame_bytes_max is stale"
    assert not problems, "docs and code disagree:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------ a raw client, per the doc
REQUEST_FIELDS = ["req_id", "op", "consistency", "min_seq", "first_seq", "last_seq", "want_events", "currency",
                  "with_digest", "version", "issued_ms"]
REQUEST_DEFAULTS = [None, None, 0, 0, 0, 0, False, "", False, 1, 0]
REPLY_FIELDS = ["req_id", "status", "error", "message", "leader_id", "leader_address", "last_seq", "node_id",
                "results_complete_since_ms"]
APPLY, GET_ACCOUNTS, EVENTS, RESULT_OF, STATUS, TOTALS = 1, 2, 3, 4, 5, 6
OK_STATUS, NOT_LEADER, ERROR = 0, 1, 2
BAD_REQUEST, UNKNOWN_OP = 1, 4
CREATE_ACCOUNT, TRANSFER = 1, 6
HAS_A, HAS_B, LOWER_UNBOUNDED, UPPER_UNBOUNDED = 1, 2, 4, 8
DUPLICATE = 1
OP_BYTES, RESULT_BYTES, EVENT_BYTES = 128, 32, 128


def header(req_id: int, op: int, **fields: Any) -> bytes:
    values = [fields.get(n, d) for n, d in zip(REQUEST_FIELDS, REQUEST_DEFAULTS)]
    values[0], values[1] = req_id, op
    return msgspec.msgpack.encode(values)


def u128(v: int) -> bytes:
    return (v % (1 << 128)).to_bytes(16, "little")


def op_record(kind: int, dedup_id: int, account_id: int = 0, other_id: int = 0, amount: int = 0,
              expected_a: int = 0, expected_b: int = 0, currency: bytes = b"", flags: int = 0,
              group_size: int = 1, issued_ms: int | None = None) -> bytes:
    issued = int(time.time() * 1000) if issued_ms is None else issued_ms       # the first attempt's time
    rec = (u128(dedup_id) + u128(account_id) + u128(other_id) + u128(amount) + u128(expected_a) + u128(expected_b)
           + currency.ljust(8, b"\0") + struct.pack("<BBHIQQ", kind, flags, group_size, 0, issued, 0))
    assert len(rec) == OP_BYTES
    return rec


def results(payload: bytes) -> list[dict[str, int]]:
    out = []
    for at in range(0, len(payload), RESULT_BYTES):
        r = payload[at:at + RESULT_BYTES]
        seq, code, flags, kind, _ = struct.unpack_from("<QHBBI", r, 16)
        out.append({"dedup_id": int.from_bytes(r[:16], "little"), "seq_num": seq, "code": code, "flags": flags,
                    "kind": kind})
    return out


def events(payload: bytes) -> list[dict[str, int]]:
    out = []
    for at in range(0, len(payload), EVENT_BYTES):
        e = payload[at:at + EVENT_BYTES]
        u = [int.from_bytes(e[o:o + 16], "little") for o in (16, 32, 48, 64, 80)]
        seq, ts = struct.unpack_from("<QQ", e, 0)
        version, = struct.unpack_from("<Q", e, 96)
        kind, state, part, parts = struct.unpack_from("<BBHH", e, 112)
        signed = [v - (1 << 128) if v >> 127 else v for v in u[3:]]
        out.append({"seq_num": seq, "timestamp": ts, "dedup_id": u[0], "account_id": u[1], "other_id": u[2],
                    "amount": signed[0], "available": signed[1], "version": version,
                    "currency": e[104:112].rstrip(b"\0"), "kind": kind, "state": state, "part": part, "parts": parts})
    return out


class Raw(RawPeer):
    """A DEALER that reads reply headers by the doc's field names, not through engine.wire."""

    def ask(self, *frames: bytes, timeout_s: float = 10.0) -> tuple[dict[str, Any], list[bytes]]:
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(int(timeout_s * 1000)), f"no reply to {frames[:1]}"
        head, *rest = self.sock.recv_multipart()
        values = msgspec.msgpack.decode(head)
        assert isinstance(values, list), values
        return dict(zip(REPLY_FIELDS, values)), rest


def no_unsafe_numbers(payload: bytes) -> Any:
    """json.loads, failing on any integer a JavaScript JSON.parse would round (above 2**53)."""
    def parse_int(s: str) -> int:
        assert abs(int(s)) <= 1 << 53, f"JSON number {s} is not exact in JavaScript"
        return int(s)
    return json.loads(payload, parse_int=parse_int)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    c = NodeCluster(3, str(tmp_path_factory.mktemp("conformance")), insecure=True)   # plain ZeroMQ, as documented
    raws: list[Raw] = []
    try:
        c.start()
        raws = [Raw(a) for a in c.client_addresses]
        deadline = time.monotonic() + 20
        leader = None
        while leader is None and time.monotonic() < deadline:
            for i, r in enumerate(raws):
                rep, body = r.ask(header(1, STATUS), b"")
                if rep["status"] == OK_STATUS and msgspec.msgpack.decode(body[0])["role"] == "leader":
                    leader = i
            time.sleep(0.05)
        assert leader is not None, "no leader"
        yield c, raws, leader
    finally:
        for r in raws:
            r.close()
        c.close()


A, B = (1 << 100) + 7, (1 << 90) + 3              # ids beyond 64 bits
BIG = (1 << 100) + 12345                          # an amount beyond 2**53 and 2**64


def test_create_transfer_duplicate_read_and_events_from_raw_frames(shard):
    cluster, raws, leader = shard
    raw = raws[leader]
    now = int(time.time() * 1000)
    creates = (op_record(CREATE_ACCOUNT, 501, A, currency=b"BTC",
                         flags=HAS_A | HAS_B | LOWER_UNBOUNDED | UPPER_UNBOUNDED, issued_ms=now)
               + op_record(CREATE_ACCOUNT, 502, B, currency=b"BTC", flags=HAS_A | HAS_B | UPPER_UNBOUNDED,
                           issued_ms=now))
    enc = OpEncoder()
    assert creates == (enc.create_account(501, A, "BTC", lower_limit=None, timestamp=now).tobytes()
                       + enc.create_account(502, B, "BTC", timestamp=now).tobytes())
    rep, body = raw.ask(header(10, APPLY), creates)
    assert (rep["req_id"], rep["status"], rep["node_id"]) == (10, OK_STATUS, cluster.ids[leader]), rep
    assert [r["code"] for r in results(body[0])] == [0, 0]

    transfer = op_record(TRANSFER, 503, A, B, BIG, currency=b"BTC")
    rep, body = raw.ask(header(11, APPLY, want_events=True), transfer)
    assert rep["status"] == OK_STATUS, rep
    (res,) = results(body[0])
    assert res["code"] == 0 and res["flags"] == 0 and res["kind"] == TRANSFER and res["dedup_id"] == 503
    assert rep["last_seq"] >= res["seq_num"] > 0
    evs = events(body[1])
    assert [(e["account_id"], e["amount"], e["available"], e["part"], e["parts"]) for e in evs] == \
        [(A, -BIG, -BIG, 0, 2), (B, BIG, BIG, 1, 2)]
    assert all(abs(e["timestamp"] - time.time() * 1000) < 120_000 for e in evs), "timestamp: ms since the epoch"
    assert {e["seq_num"] for e in evs} == {res["seq_num"]} and evs[0]["other_id"] == B

    rep, body = raw.ask(header(12, APPLY), transfer)                     # the same bytes again
    (dup,) = results(body[0])
    assert dup["flags"] & DUPLICATE and (dup["code"], dup["seq_num"]) == (0, res["seq_num"])

    rep, body = raw.ask(header(13, RESULT_OF), u128(503) + u128(999_999))
    known, unknown = results(body[0])
    assert known["seq_num"] == res["seq_num"] and unknown["code"] == 0xFFFF

    rep, body = raw.ask(header(14, GET_ACCOUNTS), u128(A) + u128(B) + u128(12345))
    assert rep["status"] == OK_STATUS, rep
    a, b, missing = no_unsafe_numbers(body[0])
    assert missing is None
    assert (a["account_id"], a["available"], a["lower_limit"], a["upper_limit"], a["state"]) == \
        (str(A), str(-BIG), None, None, 0)
    assert (b["account_id"], b["available"], b["lower_limit"], b["version"]) == (str(B), str(BIG), "0", "2")

    rep, body = raw.ask(header(15, TOTALS, currency="BTC"), b"")
    assert no_unsafe_numbers(body[0]) == {"available": "0", "reserved": "0", "pending_in": "0", "pending_out": "0"}

    rep, body = raw.ask(header(16, EVENTS, first_seq=res["seq_num"], last_seq=res["seq_num"]), b"")
    assert events(body[0]) == evs


def _settled_leader(raws: list[Raw], timeout_s: float = 20.0) -> int:
    """The replica every replica agrees leads now (an election under a loaded CI machine may have moved
    it since the fixture looked, or be under way)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        views = []
        for r in raws:
            rep, body = r.ask(header(2, STATUS), b"")
            views.append(msgspec.msgpack.decode(body[0]) if rep["status"] == OK_STATUS else None)
        leaders = {v["leader"] for v in views if v is not None}
        roles = [v["role"] for v in views if v is not None]
        if len(views) == 3 and None not in views and len(leaders) == 1 and None not in leaders \
                and roles.count("leader") == 1:
            return roles.index("leader")
        time.sleep(0.05)
    raise AssertionError("the replicas did not agree on a leader")


def test_a_follower_redirects_writes_with_a_matchable_reply(shard):
    cluster, raws, _ = shard
    leader = _settled_leader(raws)
    follower = (leader + 1) % 3
    rep, _ = raws[follower].ask(header(20, APPLY), op_record(TRANSFER, 601, A, B, 1, currency=b"BTC"))
    assert rep["status"] == NOT_LEADER and rep["req_id"] == 20, rep
    assert rep["leader_address"] == cluster.client_addresses[leader]
    assert rep["leader_id"] == cluster.ids[leader] and rep["node_id"] == cluster.ids[follower]


def test_every_malformed_request_gets_a_matchable_error_with_the_real_seq_and_node(shard):
    cluster, raws, leader = shard
    raw = raws[leader]
    rep, _ = raw.ask(header(30, STATUS), b"")
    seq_now = rep["last_seq"]
    assert seq_now > 0
    enc = msgspec.msgpack.encode
    cases = [
        ("protocol version 2", [header(31, STATUS, version=2), b""], BAD_REQUEST, 31),
        ("three frames", [header(32, STATUS), b"", b""], BAD_REQUEST, 32),
        ("one frame", [header(33, STATUS)], BAD_REQUEST, 33),
        ("a field of the wrong type", [enc([34, "STATUS"]), b""], BAD_REQUEST, 34),
        ("too many fields", [enc([35, 5, 0, 0, 0, 0, False, "", False, 1, "extra"]), b""], BAD_REQUEST, 35),
        ("truncated msgpack", [header(2**40, STATUS)[:-1], b""], BAD_REQUEST, 2**40),
        ("a header over 4096 bytes", [header(36, TOTALS, currency="X" * 5000), b""], BAD_REQUEST, 36),
        ("not an array", [enc({"req_id": 37}), b""], BAD_REQUEST, 0),
        ("unknown op", [header(38, 99), b""], UNKNOWN_OP, 38),
        ("ids not whole", [header(39, GET_ACCOUNTS), b"\1" * 17], BAD_REQUEST, 39),
        ("too many ids", [header(40, GET_ACCOUNTS), b"\1" * 16 * 8191], 2, 40),
        ("a payload where none is taken", [header(41, STATUS), b"x"], BAD_REQUEST, 41),
        ("APPLY not whole records", [header(42, APPLY), b"\0" * (OP_BYTES + 1)], BAD_REQUEST, 42),
        ("APPLY of a SPEC outside a group", [header(43, APPLY), op_record(14, 1, A, amount=1, currency=b"BTC")],
         BAD_REQUEST, 43),
    ]
    for name, frames, code, req_id in cases:
        rep, _ = raw.ask(*frames)
        assert (rep["status"], rep["error"], rep["req_id"]) == (ERROR, code, req_id), (name, rep)
        assert rep["last_seq"] >= seq_now and rep["node_id"] == cluster.ids[leader], (name, rep)
    # a frame over frame_bytes_max: no reply, the connection is dropped, and the DEALER comes back
    big = Raw(cluster.client_addresses[leader])
    try:
        big.sock.send_multipart([header(50, STATUS), b"\0" * (W.FRAME_BYTES_MAX_DEFAULT + 1)])
        assert not big.sock.poll(1000)
        rep, _ = big.ask(header(51, STATUS), b"")
        assert rep["req_id"] == 51 and rep["status"] == OK_STATUS
    finally:
        big.close()


def test_status_keys_are_all_documented(shard):
    _, raws, leader = shard
    rep, body = raws[leader].ask(header(60, STATUS, with_digest=True), b"")
    assert rep["status"] == OK_STATUS, rep
    st = msgspec.msgpack.decode(body[0])
    rows = _table_after(_doc("protocol.md"), "## STATUS")
    documented = {cells[0].strip("`") for cells in rows}
    seen = set()
    for k, v in st.items():
        seen.add(k)
        if isinstance(v, dict) and k != "transport":
            for sub in v:
                if k == "stalls" and sub == "by_cause":
                    seen.add("stalls.by_cause")
                    continue
                seen.add(f"{k}.{sub}")
    assert not seen - documented, f"STATUS keys missing from docs/protocol.md: {sorted(seen - documented)}"
    assert not documented - seen, f"docs/protocol.md lists STATUS keys it does not return: {sorted(documented - seen)}"
    assert set(st["refusals"]) >= {"frames", "header", "version", "connection_held_in"}


def test_the_read_budget_refuses_until_it_refills():
    from engine.node import _ReadBudget
    budget = _ReadBudget(10)                     # 10 ms of lock time a second
    assert budget.admit()
    budget.charge(0.05)                          # a 50 ms read
    assert not budget.admit() and 4000 <= budget.retry_after_ms <= 5100
