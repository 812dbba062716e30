"""The whole local system with CURVE on, as ``zwallet up`` runs it (2 shards x 1, a Marker, a gateway): the
contract (``from_system`` authenticates with the admin key found under the data directory; a plain socket
gets nothing from any port) and the gateway passing its callers' rights on: a key cannot reach through the
gateway further than it could directly."""
from __future__ import annotations

import itertools
import os
import time

import pytest
import zmq

import gateway
import marker
from engine.client import Client, RequestRefused, Unavailable
from engine.devtools.up import LocalSystem
from engine.service import protocol as P
from engine.service import security as S
from engine.service.protocol import ErrorCode
from engine.system import System

pytestmark = pytest.mark.timeout(120)

CUR = "USD"
_ids = itertools.count(50_000)


def allow(ls: LocalSystem, name: str, rights: S.Rights) -> S.ClientKeys:
    kd = ls.keys_dir
    S.keygen(kd, name, rights, public_dir=os.path.join(kd, S.CLIENTS_DIR))
    keys = S.ClientKeys.load(os.path.join(kd, name + S.SECRET_SUFFIX), os.path.join(kd, "server.key"))
    deadline = time.monotonic() + 10
    while True:                           # every gateway replica takes it (fresh client per try)
        with gateway.Client(ls.gateway_addresses, keys=keys, timeout_s=1.0, attempt_timeout_s=0.5) as g:
            try:
                g.shard_of(1)
                return keys
            except Unavailable:
                assert time.monotonic() < deadline


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    with LocalSystem(str(tmp_path_factory.mktemp("secure-sys")), shards=2, replicas=1, gateways=1) as s:
        s.start()
        yield s


def on_shard(system: System, shard: int, lo: int, hi: int) -> list[int]:
    return [a for a in range(lo, hi) if system.shard_map.shard_of(a) == shard]


def test_up_makes_the_keys_and_from_system_uses_the_admin_key(ls):
    system = System.load(ls.system_path)
    sec = system.extra["security"]
    assert sec["insecure"] is False and os.path.isfile(sec["client_key"])
    for name in ("server", "admin", "gateway", "marker"):
        assert oct(os.stat(os.path.join(ls.keys_dir, name + S.SECRET_SUFFIX)).st_mode & 0o777) == "0o600"
    with gateway.Client.from_system(ls.system_path) as g, marker.Client.from_system(ls.system_path) as m:
        a = on_shard(system, 1, 10, 200)[0]
        assert g.create_account(next(_ids), a, CUR, lower_limit=None).ok
        assert g.get_account(a)["account_id"] == a
        assert m.status()["role"] in ("leader", "follower")


def test_a_plain_socket_gets_nothing_from_any_port(ls):
    system = System.load(ls.system_path)
    addrs = list(ls.gateway_addresses) + list(system.extra["query"]["clients"])
    for g in [*system.shards.values(), *system.markers]:
        addrs += [*g.clients, *g.raft]
    ctx = zmq.Context()
    try:
        socks = []
        for a in addrs:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(a)
            s.send_multipart([P.encode(P.Request(1, P.OP_STATUS)), b""], zmq.NOBLOCK)
            socks.append(s)
        subs = []
        for g in [*system.shards.values(), *system.markers]:
            for a in g.pubs:
                sub = ctx.socket(zmq.SUB)
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(a)
                subs.append(sub)
        time.sleep(0.3)
        with gateway.Client.from_system(ls.system_path) as gw:       # events flow meanwhile
            a = on_shard(system, 2, 10, 200)[0]
            assert gw.create_account(next(_ids), a, CUR, lower_limit=None).ok
        poller = zmq.Poller()
        for s in socks + subs:
            poller.register(s, zmq.POLLIN)
        assert poller.poll(800) == []
    finally:
        for s in socks + subs:
            s.close(0)
        ctx.term()


def test_ranged_key_cannot_reach_outside_its_range_through_the_gateway(ls):
    system = System.load(ls.system_path)
    inside = on_shard(system, 1, 20_000, 30_000)[:2]
    outside = on_shard(system, 1, 40_000, 50_000)[0]
    other_shard = on_shard(system, 2, 20_000, 30_000)[0]
    outside_other = on_shard(system, 2, 40_000, 50_000)[0]
    with gateway.Client.from_system(ls.system_path) as admin:
        for a in (*inside, outside, other_shard, outside_other):
            assert admin.create_account(next(_ids), a, CUR, lower_limit=None).ok
        before = admin.get_account(outside)
    ranged = allow(ls, "gw-ranged", S.Rights(S.OPERATE, ((20_000, 29_999),), name="gw-ranged"))
    with gateway.Client(ls.gateway_addresses, keys=ranged, timeout_s=10) as g:
        assert g.transfer(next(_ids), inside[0], inside[1], 5, CUR).ok          # inside: applied
        assert g.transfer(next(_ids), inside[0], other_shard, 5, CUR).ok        # inside, across shards
        refused = [
            lambda: g.transfer(next(_ids), inside[0], outside, 5, CUR),           # same shard, outside
            lambda: g.get_account(outside),
            lambda: g.create_account(next(_ids), inside[0] + 1, CUR),            # account management
            lambda: g.transfer(next(_ids), inside[0], outside_other, 5, CUR),     # a workflow, outside
            lambda: g.totals(CUR),                                                # every account
        ]
        for call in refused:
            with pytest.raises(RequestRefused) as e:
                call()
            assert e.value.code == ErrorCode.UNAUTHORIZED
    # directly, the same key gets the same answers from the shard
    with Client(list(system.shards[1].clients), keys=ranged, timeout_s=10) as direct:
        with pytest.raises(RequestRefused) as e:
            direct.transfer(next(_ids), inside[0], outside, 5, CUR)
        assert e.value.code == ErrorCode.UNAUTHORIZED
        assert direct.transfer(next(_ids), inside[1], inside[0], 1, CUR).ok
    with marker.Client(list(system.markers[0].clients), keys=ranged, timeout_s=10) as m:   # the Marker too
        with pytest.raises(RequestRefused) as e:
            m.transfer(next(_ids), inside[0], outside_other, 5, CUR)
        assert e.value.code == ErrorCode.UNAUTHORIZED
        assert m.transfer(next(_ids), other_shard, inside[1], 1, CUR).code == 0
    with gateway.Client.from_system(ls.system_path) as admin:
        assert admin.get_account(outside) == before
        assert admin.get_account(outside_other)["available"] == 0


def test_read_only_key_cannot_write_through_the_gateway_or_the_marker(ls):
    system = System.load(ls.system_path)
    a, b = on_shard(system, 2, 60_000, 70_000)[:2]
    with gateway.Client.from_system(ls.system_path) as admin:
        for x in (a, b):
            assert admin.create_account(next(_ids), x, CUR, lower_limit=None).ok
    reader = allow(ls, "gw-reader", S.Rights(S.READ, name="gw-reader"))
    with gateway.Client(ls.gateway_addresses, keys=reader, timeout_s=10) as g:
        assert g.get_account(a)["account_id"] == a
        with pytest.raises(RequestRefused) as e:
            g.transfer(next(_ids), a, b, 1, CUR)
        assert e.value.code == ErrorCode.UNAUTHORIZED
    with marker.Client(list(system.markers[0].clients), keys=reader, timeout_s=5) as m:
        with pytest.raises(RequestRefused) as e2:
            m.transfer(next(_ids), a, b, 1, CUR)
        assert e2.value.code == ErrorCode.UNAUTHORIZED
    with gateway.Client.from_system(ls.system_path) as admin:
        assert admin.get_account(a)["available"] == 0


def test_the_query_service_serves_only_allowed_keys_within_their_rights(ls):
    """The query service's ROUTER is CURVE too: its own reads of the shards use the system's query key; an
    admin key reads and edits the hierarchy; a read-only key restricted to a range reads its own accounts
    only (no other account, no hierarchy sums, no edits); a key not allowed gets no answer."""
    import query
    system = System.load(ls.system_path)
    mine = on_shard(system, 1, 60_000, 61_000)[0]
    other = on_shard(system, 2, 70_000, 71_000)[0]
    with gateway.Client.from_system(ls.system_path) as g:
        for a in (mine, other):
            assert g.create_account(next(_ids), a, CUR, lower_limit=None).ok
    heads = {}
    for sid, grp in system.shards.items():
        with Client(grp.clients, keys=ls.client_keys) as c:
            heads[sid] = int(c.status()["last_seq"])
    with query.Client.from_system(ls.system_path) as q:
        assert q.balance(other, min_seqs=heads, wait_ms=5000)["account_id"] == other
        assert q.set_parent(mine, 1 << 90)["leaf"] is True
        assert q.hierarchy_balance(1 << 90, CUR)["found"] is True
    kd = ls.keys_dir
    S.keygen(kd, "q-ranged", S.Rights(S.READ, accounts=((60_000, 60_999),), name="q-ranged"),
             public_dir=os.path.join(kd, S.CLIENTS_DIR))
    ranged = S.ClientKeys.load(os.path.join(kd, "q-ranged" + S.SECRET_SUFFIX), os.path.join(kd, "server.key"))
    addrs = system.extra["query"]["clients"]
    with query.Client(addrs, keys=ranged) as rq:
        deadline = time.monotonic() + 10
        while True:                              # the keyring takes the new key (re-read on a miss)
            try:
                assert rq.balance(mine, wait_ms=5000)["account_id"] == mine
                break
            except Unavailable:
                assert time.monotonic() < deadline
        for call in (lambda: rq.balance(other), lambda: rq.hierarchy_balance(1 << 90, CUR),
                     lambda: rq.set_parent(mine, None), lambda: rq.balances([mine, other])):
            with pytest.raises(query.QueryRefused) as e:
                call()
            assert e.value.code == ErrorCode.UNAUTHORIZED, e.value
    stranger = S.keygen(os.path.join(kd, "elsewhere"), "stranger")          # never listed under clients/
    sk = S.ClientKeys(stranger, S.load_public(os.path.join(kd, "server.key"))[0].public)
    with query.Client(addrs, keys=sk, timeout_s=2.0) as nq:
        with pytest.raises(Unavailable):
            nq.balance(mine)
