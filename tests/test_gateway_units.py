"""Units of the access layer with no system running: the gateway's wire codec, derived ids, templates (what
a template file may and may not say), and the gateway service's intake (refusals before decoding, the
pending bounds) against a router whose shards do not answer."""
from __future__ import annotations

import threading
import time

import msgspec
import numpy as np
import pytest
import zmq

from engine import records as R
from engine._ledger import UNCHANGED
from engine.devtools.local_raft import free_ports
from engine.service import protocol as P
from engine.service.protocol import ErrorCode, Status
from engine.shard_map import ShardMap
from engine.system import Group, System
from gateway import wire as GW
from gateway.business import Template, TemplateError, load_templates
from gateway.ops import Gateway
from gateway.result import Result
from gateway.router import Router, derive_id
from gateway.server import GatewayServer, Limits


@pytest.mark.parametrize("v", [0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, 2**128 - 1, -(2**127),
                               {2**100: 5, 3: -(2**90)}, {"a": [1, {2**65: {"x": 2**127}}]}, [None, True, "s", b"b"]])
def test_wire_values_round_trip(v):
    assert GW.decode(GW.encode(v)) == v


def test_wire_special_values():
    assert GW.decode(GW.encode(UNCHANGED)) is UNCHANGED
    ev = np.zeros(3, dtype=R.EVENT_DTYPE)
    ev["seq_num"] = [1, 2, 3]
    back = GW.decode(GW.encode(ev))
    assert back.dtype == R.EVENT_DTYPE and back.tobytes() == ev.tobytes()
    r = Result(0, True, 7, 2**128 - 1, int(R.Kind.TRANSFER), 2, None, {5: {"account_id": 5, "available": -3}})
    got = GW.decode(GW.encode(r))
    assert isinstance(got, Result) and got.ok and got.duplicate and got.dedup_id == 2**128 - 1 and got.shard == 2
    assert got.accounts == {5: {"account_id": 5, "available": -3}}
    with pytest.raises(TypeError):
        GW.encode(object())


def test_a_shard_result_crosses_the_wire_as_its_event_records():
    """A shard's result goes out as the command's event records, not decoded accounts; the far side
    decodes the same accounts from them, only when asked; records of another shape are refused."""
    ev = np.zeros(2, dtype=R.EVENT_DTYPE)
    ev["seq_num"] = 9
    R.put_u128(ev["account_id"], [2**70, 5])
    R.put_i128(ev["available"], [-40, 40])
    ev["currency"] = b"USD"
    ev["version"] = [3, 1]
    r = Result(0, False, 9, 77, int(R.Kind.TRANSFER), 1)
    r._events = ev
    d = r.to_dict()
    assert "events" in d and "accounts" not in d
    got = GW.decode(GW.encode(r))
    assert got._accounts is None and got.accounts == R.accounts_from_events(ev)
    assert set(got.accounts) == {2**70, 5} and got.accounts[2**70]["available"] == -40
    bad = dict(d, events=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError):
        Result.from_dict(bad)


@pytest.mark.parametrize("payload", [b"\xc1", GW.encode([1, [], {}]), GW.encode(["x", {}, {}]),
                                     GW.encode(["x", [], {1: 2}]), GW.encode(["x", []])])
def test_a_bad_call_payload_is_a_value_error(payload):
    with pytest.raises(ValueError):
        GW.decode_call(payload)


def test_derived_ids_are_stable_and_distinct():
    assert derive_id(7, b"pay") == derive_id(7, b"pay")
    ids = {derive_id(7, b"pay"), derive_id(8, b"pay"), derive_id(7, b"split"), derive_id(7, b"hold.try", 1),
           derive_id(7, b"hold.try", 2)}
    assert len(ids) == 5 and all(0 < i < 2**128 for i in ids)


# ------------------------------------------------------------------------------------ templates
def tpl(**over):
    doc = {"params": {"a": "account", "b": "account", "amount": "amount", "currency": "currency"},
           "checks": [["amount <= 1000", "at most 1000"]],
           "legs": [{"account": "a", "amount": "-amount", "currency": "currency"},
                    {"account": "b", "amount": "amount", "currency": "currency"}]}
    doc.update(over)
    return Template.from_dict("t", doc)


def test_a_template_computes_its_legs_and_checks():
    t = tpl()
    assert t.legs_for({"a": 1, "b": 2, "amount": 5, "currency": "USD"}) == [(1, -5, "USD"), (2, 5, "USD")]
    with pytest.raises(TemplateError, match="at most 1000"):
        t.legs_for({"a": 1, "b": 2, "amount": 5000, "currency": "USD"})
    with pytest.raises(TemplateError, match="must be an int"):
        t.legs_for({"a": 1, "b": 2, "amount": "5", "currency": "USD"})
    with pytest.raises(TemplateError, match=">= 0"):
        t.legs_for({"a": 1, "b": 2, "amount": -5, "currency": "USD"})
    with pytest.raises(TemplateError, match="unknown"):
        t.legs_for({"a": 1, "b": 2, "amount": 5, "currency": "USD", "c": 1})


@pytest.mark.parametrize("expr", ["__import__('os')", "a.real", "(lambda: 1)()", "open('x')", "[1][0]",
                                  "unknown + 1", "1 if a else 2", "a ** 99999"])
def test_a_template_expression_outside_the_whitelist_is_refused(expr):
    with pytest.raises(TemplateError):
        tpl(checks=[expr])


@pytest.mark.parametrize("over", [{"params": {}}, {"params": {"a": "float"}}, {"legs": []},
                                  {"legs": [{"account": "a", "amount": "1"}] * 2},
                                  {"checks": [["amount > 0"]]}])
def test_a_malformed_template_is_refused(over):
    with pytest.raises(TemplateError):
        tpl(**over)


def test_templates_file(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text('[template.x]\nparams = { a = "account", b = "account", n = "amount", c = "currency" }\n'
                 'legs = [{ account = "a", amount = "-n", currency = "c" }, '
                 '{ account = "b", amount = "n", currency = "c" }]\n')
    assert list(load_templates(str(p))) == ["x"]
    p.write_text("not toml [")
    with pytest.raises(TemplateError, match="TOML"):
        load_templates(str(p))


# ------------------------------------------------------------------------------------ the service's intake
@pytest.fixture
def server(request):
    """A gateway service whose shards are addresses nobody listens on (calls to them wait)."""
    hold_ms = getattr(request, "param", 2_000)
    ports = free_ports(3)
    dead = {1: Group(1, (f"tcp://127.0.0.1:{ports[0]}",)), 2: Group(2, (f"tcp://127.0.0.1:{ports[1]}",))}
    system = System(ShardMap.uniform([1, 2]), dead)
    router = Router(system, timeout_s=30.0)
    addr = f"tcp://127.0.0.1:{ports[2]}"
    srv = GatewayServer(Gateway(router), addr, limits=Limits(pending_requests_max=4, pending_per_client_max=2,
                                                             pending_bytes_max=1 << 20,
                                                             pending_bytes_per_client_max=1 << 19,
                                                             call_bytes_max=1 << 16), hold_ms=hold_ms)
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(addr)
    yield srv, sock
    sock.close(0)
    ctx.term()
    srv.stop()
    t.join(10)


def ask(sock, *frames):
    sock.send_multipart(list(frames))
    head, *rest = sock.recv_multipart()
    return P.decode_reply(head), rest


def header(req_id, op=GW.OP_CALL):
    return P.encode(P.Request(req_id, op))


def test_the_intake_refuses_before_decoding(server):
    _, sock = server
    rep, _ = ask(sock, header(5))
    assert rep.status == Status.ERROR and rep.error == ErrorCode.BAD_REQUEST and rep.req_id == 5   # one frame
    rep, _ = ask(sock, b"\x93\x07garbage", b"")
    assert rep.error == ErrorCode.BAD_REQUEST and rep.req_id == 7
    rep, _ = ask(sock, header(8, op=9), b"")
    assert rep.error == ErrorCode.UNKNOWN_OP
    rep, _ = ask(sock, header(9), b"\x00" * ((1 << 16) + 1))
    assert rep.error == ErrorCode.FRAME_TOO_LARGE and "call_bytes_max" in rep.message
    rep, _ = ask(sock, header(10), b"\xc1")
    assert rep.error == ErrorCode.BAD_REQUEST
    rep, _ = ask(sock, header(11), GW.encode_call("no_such_method", [], {}))
    assert rep.error == ErrorCode.UNKNOWN_OP
    rep, body = ask(sock, header(12, op=GW.OP_STATUS), b"")
    assert rep.status == Status.OK and msgspec.msgpack.decode(body[0])["role"] == "gateway"


def test_a_bad_call_is_an_error_answer_and_a_good_one_waits(server):
    srv, sock = server
    rep, body = ask(sock, header(1), GW.encode_call("transfer", [1, 2], {}))       # missing arguments
    assert rep.status == Status.OK and GW.decode(body[0])[:2] == ["err", "TypeError"]
    rep, body = ask(sock, header(2), GW.encode_call("events", [1, 2], {}))
    assert GW.decode(body[0])[:2] == ["err", "ValueError"]                         # events are per shard
    # two calls to shards that do not answer stay pending; a third from this client is refused OVERLOADED
    sock.send_multipart([header(3), GW.encode_call("get_account", [1], {})])
    sock.send_multipart([header(4), GW.encode_call("get_account", [2], {})])
    deadline = time.monotonic() + 5
    while srv.pending < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    rep, _ = ask(sock, header(5), GW.encode_call("get_account", [3], {}))
    assert rep.error == ErrorCode.OVERLOADED and "pending_per_client_max" in rep.message


@pytest.mark.parametrize("server", [150], indirect=True)
def test_a_call_still_running_is_answered_timeout_and_keeps_its_pending_share(server):
    srv, sock = server
    t0 = time.monotonic()
    rep, _ = ask(sock, header(1), GW.encode_call("get_account", [1], {}))
    assert rep.status == Status.ERROR and rep.error == ErrorCode.TIMEOUT and rep.req_id == 1
    assert 0.1 <= time.monotonic() - t0 < 3
    assert srv.pending == 1 and srv.counters["held_timeout"] == 1          # the work goes on
