"""The query service's intake: what a client sends is checked and refused with a clear error (never asserted);
the wire keeps integers beyond 64 bits exact; the embedded Ledger.events range fix."""
from __future__ import annotations

import threading

import msgspec
import pytest
import zmq

from engine.devtools.local_raft import free_ports
from engine.service import protocol as P
from engine.shard_map import ShardMap
from engine.system import Group, System
from query import wire as W
from query.server import QueryService
from tests.query_helpers import random_ledger


@pytest.fixture
def service(tmp_path):
    # a system whose one shard is not running: the view is fed here directly, the feed just finds nothing
    port, dead1, dead2 = free_ports(3)
    system = System(ShardMap.uniform([1]), {1: Group(1, (f"tcp://127.0.0.1:{dead1}",), (f"tcp://127.0.0.1:{dead2}",))})
    svc = QueryService(system, str(tmp_path / "q"), f"tcp://127.0.0.1:{port}", sync=False)
    led, ids = random_ledger(51, accounts=6, commands=200, first_account=(1 << 100))
    svc.projector.offer(1, led.events(1, led.last_seq))
    th = threading.Thread(target=svc.serve, daemon=True)
    th.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(f"tcp://127.0.0.1:{port}")
    yield sock, led, ids
    sock.close(0)
    ctx.term()
    svc.stop()
    th.join(20)


def ask(sock, frames):
    sock.send_multipart(frames)
    out = sock.recv_multipart()
    return P.decode_reply(out[0]), out[1:]


def req(op, req_id=7, **kw):
    return P.encode(P.Request(req_id, op, **kw))


def test_queries_and_big_ints_over_the_wire(service):
    sock, led, ids = service
    reply, body = ask(sock, [req(W.OP_BALANCE), W.pack({"account_id": ids[0]})])
    assert reply.status == P.Status.OK and reply.req_id == 7
    got = W.unpack(body[0])
    assert got["account_id"] == ids[0] > 1 << 64 and got["available"] == led.get_account(ids[0])["available"]
    reply, body = ask(sock, [req(P.OP_STATUS), b""])
    assert W.unpack(body[0])["applied"] == {1: led.last_seq}


@pytest.mark.parametrize("frames, code, text", [
    ([b"\x93\x01"], P.ErrorCode.BAD_REQUEST, "two frames"),
    ([b"garbage", b""], P.ErrorCode.BAD_REQUEST, "header"),
    ([req(99), b""], P.ErrorCode.UNKNOWN_OP, "unknown op"),
    ([req(W.OP_BALANCE), b"\xc1"], P.ErrorCode.BAD_REQUEST, "arguments"),
    ([req(W.OP_BALANCE), msgspec.msgpack.encode([1, 2])], P.ErrorCode.BAD_REQUEST, "map"),
    ([req(W.OP_BALANCE), W.pack({"account_id": "x"})], P.ErrorCode.BAD_REQUEST, "integer"),
    ([req(W.OP_BALANCE), W.pack({"account_id": 1, "wait_ms": 10**6})], P.ErrorCode.BAD_REQUEST, "wait_ms"),
    ([req(W.OP_BALANCE), W.pack({"account_id": 1, "min_seqs": {9: 1}})], P.ErrorCode.BAD_REQUEST, "shard"),
    ([req(W.OP_SET_PARENT), W.pack({"node_id": 5})], P.ErrorCode.BAD_REQUEST, "parent_id"),
    ([req(W.OP_HIERARCHY_BALANCE), W.pack({"node_id": 5, "currency": "TOO-LONG-CODE"})], P.ErrorCode.BAD_REQUEST,
     "currency"),
    ([req(W.OP_BALANCE), b"\0" * (W.PAYLOAD_BYTES_MAX + 1)], P.ErrorCode.FRAME_TOO_LARGE, "PAYLOAD_BYTES_MAX"),
])
def test_refusals_say_why(service, frames, code, text):
    sock, _led, _ids = service
    reply, _ = ask(sock, frames)
    assert reply.status == P.Status.ERROR and reply.error == code, reply
    assert text in reply.message


def test_read_your_writes_waits_then_says_how_far(service):
    sock, led, ids = service
    reply, _ = ask(sock, [req(W.OP_BALANCE), W.pack({"account_id": ids[0], "min_seqs": {1: led.last_seq + 5},
                                                     "wait_ms": 50})])
    assert reply.error == P.ErrorCode.NOT_AVAILABLE and f"view {{1: {led.last_seq}}}" in reply.message


def test_wire_round_trips_wide_integers():
    v = {"a": (1 << 127) + 5, "b": -(1 << 100), "c": [1 << 64, (1 << 64) - 1, -(1 << 63)], 7: True}
    assert W.unpack(W.pack(v)) == v
    with pytest.raises(ValueError):
        W.unpack(msgspec.msgpack.encode(msgspec.msgpack.Ext(9, b"1")))


def test_ledger_events_past_the_newest_seq_give_what_exists():
    led, _ids = random_ledger(52, accounts=6, commands=20)
    last = led.last_seq
    assert (led.events(last - 2, last + 100) == led.events(last - 2, last)).all()
    assert len(led.events(last + 1, last + 1)) == 0
    with pytest.raises(ValueError):
        led.events(0, 3)
    with pytest.raises(ValueError):
        led.events(5, 4)


def test_command_line_and_config_file(tmp_path, capsys):
    from query.server import main
    assert main(["--data", str(tmp_path)]) == 2
    assert "missing --system, --client" in capsys.readouterr().err
    cfg = tmp_path / "q.toml"
    cfg.write_text('[query]\nsystem = "x"\nbogus = 1\n')
    assert main(["--config", str(cfg)]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err
    cfg.write_text(f'[query]\nsystem = "{tmp_path}/none.toml"\ndata = "{tmp_path}/d"\nclient = "tcp://127.0.0.1:1"\n')
    assert main(["--config", str(cfg)]) == 2
    assert "cannot read the system file" in capsys.readouterr().err
