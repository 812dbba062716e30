"""CURVE + ZAP + rights on a real shard (3 node processes, CURVE on as ``zwallet cluster`` runs it), and the
key files, the keyring and the Raft transport's peer identity in-process (engine/service/security.py).

Refused means: no reply at all for a connection without an allowed key (the CURVE handshake or ZAP fails,
so nothing reaches the node), an UNAUTHORIZED error for an allowed key without the right; and in both
cases nothing applied (checked with the admin key)."""
from __future__ import annotations

import os
import stat
import time

import numpy as np
import pytest
import zmq

from engine.client import Client, RequestRefused, Unavailable
from engine.devtools.cluster import NodeCluster
from engine.raft import messages as m
from engine.raft.transport import WRONG_KEY, Transport, peer_identity
from engine.service import protocol as P
from engine.service import security as S
from engine.service.protocol import ErrorCode

pytestmark = pytest.mark.timeout(90)

INSIDE = (1000, 1999)          # the restricted operate key's range


def keys_of(keys_dir: str, name: str) -> S.ClientKeys:
    return S.ClientKeys.load(os.path.join(keys_dir, name + S.SECRET_SUFFIX),
                             os.path.join(keys_dir, S.SERVER_KEY_NAME + S.PUBLIC_SUFFIX))


def allow(keys_dir: str, name: str, rights: S.Rights, addresses: list[str] | None = None) -> S.ClientKeys:
    """A new client key in the allowed keys; with ``addresses``, returns once every replica there takes
    it (as an operator does before handing a key out: docs/security.md, rotation)."""
    S.keygen(keys_dir, name, rights, public_dir=os.path.join(keys_dir, S.CLIENTS_DIR))
    keys = keys_of(keys_dir, name)
    deadline = time.monotonic() + 10
    for k in range(len(addresses or ())):
        while True:                   # a fresh client each try: a connection ZAP refused is never retried
            with Client(addresses, keys=keys, timeout_s=1.0, attempt_timeout_s=0.5) as probe:
                try:
                    probe.status(node=k)
                    break
                except Unavailable:
                    assert time.monotonic() < deadline, f"{name} not taken within 10 s"
    return keys


def not_applied(r) -> bool:
    return r is None or r.seq_num == 0


def eventually(fn, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except (RequestRefused, Unavailable, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    c = NodeCluster(3, str(tmp_path_factory.mktemp("secure-shard")), verbose=bool(os.environ.get("SEC_DEBUG")))
    try:
        c.start()
        kd = c.keys_dir
        keys = {"admin": c.client_keys,
                "reader": allow(kd, "reader", S.Rights(S.READ, name="reader"), c.client_addresses),
                "ranged": allow(kd, "ranged", S.Rights(S.OPERATE, (INSIDE,), name="ranged"), c.client_addresses)}
        with Client(c.client_addresses, keys=c.client_keys, timeout_s=10) as admin:
            for a in (1000, 1001, 5000):
                assert admin.create_account(a, a, "USD", lower_limit=None).ok
        yield c, keys
    finally:
        if os.environ.get("SEC_DEBUG"):
            for i in c.ids:
                print(i, c.stderr_tail(i, 3000))
        c.close()


def raw_request(addr: str, op: int, payload: bytes = b"", keys: S.ClientKeys | None = None,
                curve_random: bool = False, wait_ms: int = 1500) -> list[bytes] | None:
    """One request over a bare DEALER: the reply's frames, or None if nothing came back."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        if keys is not None:
            keys.configure_client(s)
        elif curve_random:                     # a CURVE client with a key nobody listed
            pub, sec = zmq.curve_keypair()
            s.curve_publickey, s.curve_secretkey = pub, sec
            s.curve_serverkey = zmq.curve_keypair()[0]
        s.connect(addr)
        s.send_multipart([P.encode(P.Request(7, op)), payload])
        if s.poll(wait_ms):
            return s.recv_multipart()
        return None
    finally:
        s.close(0)
        ctx.term()


# ------------------------------------------------------------------------------------------------ key files
def test_keygen_files_are_private_and_never_overwritten(tmp_path):
    pair = S.keygen(str(tmp_path), "k1", S.Rights(S.OPERATE, ((1, 9),), (2,), "k1"))
    secret = tmp_path / "k1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert S.load_secret(str(secret)) == pair
    pub, rights = S.load_public(str(tmp_path / "k1.key"))
    assert pub.public == pair.public and rights == S.Rights(S.OPERATE, ((1, 9),), (2,), "k1")
    with pytest.raises(ValueError, match="never overwritten"):
        S.keygen(str(tmp_path), "k1")
    os.chmod(secret, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        S.load_secret(str(secret))
    (tmp_path / "bad.key").write_text('public_key = "short"\nrights = "admin"\n')
    with pytest.raises(ValueError, match="Z85"):
        S.load_public(str(tmp_path / "bad.key"))


def test_keyring_follows_the_directory(tmp_path):
    d = tmp_path / "clients"
    d.mkdir()
    ring = S.KeyRing(str(d), check_s=0.0)
    a = S.keygen(str(tmp_path), "a", S.Rights(S.READ, name="a"), public_dir=str(d))
    assert ring.rights_of(a.public) is not None and ring.rights_of(a.public).level == S.READ
    (d / "junk.key").write_text("not toml [")          # skipped and logged; the others stay served
    b = S.keygen(str(tmp_path), "b", S.Rights(S.ADMIN, name="b"), public_dir=str(d))
    assert ring.rights_of(b.public).is_admin and ring.rights_of(a.public) is not None
    os.remove(d / "a.key")
    assert ring.rights_of(a.public) is None
    assert ring.rights_of(None) is None and ring.rights_of("x" * 40) is None


def test_rights_checks_on_op_records():
    from engine import records as R
    from engine.node import MANAGEMENT_KINDS
    ops = np.zeros(2, dtype=R.OP_DTYPE)
    ops["kind"] = int(R.Kind.TRANSFER)
    R.put_u128(ops["account_id"], [1000, 1500])
    R.put_u128(ops["other_id"], [1001, 1 << 100])
    ranged = S.Rights(S.OPERATE, (INSIDE,), name="r")
    why = S.ops_outside(ranged, ops, MANAGEMENT_KINDS, int(R.Kind.TRANSFER), 1)
    assert why is not None and f"account {1 << 100} is outside" in why and why.startswith("record 1")
    assert S.ops_outside(ranged, ops[:1], MANAGEMENT_KINDS, int(R.Kind.TRANSFER), 1) is None
    assert "may not write" in S.ops_outside(S.Rights(S.READ), ops, MANAGEMENT_KINDS, int(R.Kind.TRANSFER), 1)
    assert "shard 2" in S.ops_outside(S.Rights(S.OPERATE, shards=(1,)), ops, MANAGEMENT_KINDS, 6, 2)
    ops["kind"] = int(R.Kind.CREATE_ACCOUNT)
    assert "needs admin" in S.ops_outside(S.Rights(S.OPERATE), ops, MANAGEMENT_KINDS, 6, 1)
    assert S.ops_outside(S.Rights(S.ADMIN), ops, MANAGEMENT_KINDS, 6, 1) is None


# ------------------------------------------------------------------------------------------------ the shard
def test_a_plain_socket_gets_nothing_from_any_port(shard):
    c, _ = shard
    for i in c.ids:
        for addr in (c.client_addr[i], c.raft_addr[i]):
            assert raw_request(addr, P.OP_STATUS, wait_ms=700) is None
    # nor from PUB: events flow (admin writes) while a plain SUB listens
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    for a in c.pub_addresses:
        sub.connect(a)
    try:
        time.sleep(0.3)
        with Client(c.client_addresses, keys=c.client_keys, timeout_s=10) as admin:
            assert admin.transfer(9001, 1000, 1001, 1, "USD").ok
        assert not sub.poll(700)
    finally:
        sub.close(0)
        ctx.term()


def test_unauthenticated_and_wrong_key_clients_are_refused_and_nothing_applied(shard):
    c, keys = shard
    from engine import records as R
    from engine.wire import Op
    ops = np.zeros(1, dtype=R.OP_DTYPE)
    ops["kind"] = int(R.Kind.CREATE_ACCOUNT)
    R.put_u128(ops["account_id"], [7777])
    R.put_u128(ops["dedup_id"], [7777])
    for addr in c.client_addresses:
        assert raw_request(addr, int(Op.APPLY), ops.tobytes(), wait_ms=500) is None
        assert raw_request(addr, int(Op.APPLY), ops.tobytes(), curve_random=True, wait_ms=500) is None
    # a key that is well formed, knows the server key, but is not listed: no reply (ZAP refuses it)
    stranger_pub, stranger_sec = zmq.curve_keypair()
    stranger = S.ClientKeys(S.KeyPair("stranger", stranger_pub, stranger_sec), keys["admin"].server_public)
    with Client(c.client_addresses, keys=stranger, timeout_s=1.5, attempt_timeout_s=0.5) as bad:
        with pytest.raises(Unavailable):
            bad.create_account(7777, 7777, "USD")
        with pytest.raises(Unavailable):
            bad.get_account(1000)
    with Client(c.client_addresses, keys=keys["admin"], timeout_s=10) as admin:
        assert admin.get_account(7777) is None and not_applied(admin.result_of(7777))


def test_read_only_key_reads_but_cannot_write(shard):
    c, keys = shard
    with Client(c.client_addresses, keys=keys["reader"], timeout_s=10) as reader:
        assert eventually(lambda: reader.get_account(1000))["account_id"] == 1000
        st = reader.status()
        assert "digest" not in st and "last_seq" in st           # the digest is the admin's
        for call in (lambda: reader.create_account(8001, 8001, "USD"),
                     lambda: reader.transfer(8002, 1000, 1001, 1, "USD")):
            with pytest.raises(RequestRefused) as e:
                call()
            assert e.value.code == ErrorCode.UNAUTHORIZED
    with Client(c.client_addresses, keys=keys["admin"], timeout_s=10) as admin:
        assert admin.get_account(8001) is None and "digest" in admin.status()
        assert not_applied(admin.result_of(8002))


def test_ranged_operate_key_cannot_touch_an_account_outside_its_range(shard):
    c, keys = shard
    with Client(c.client_addresses, keys=keys["ranged"], timeout_s=10) as ranged, \
            Client(c.client_addresses, keys=keys["admin"], timeout_s=10) as admin:
        before = admin.get_account(5000)
        assert eventually(lambda: ranged.transfer(8100, 1000, 1001, 3, "USD")).ok       # inside: applied
        refused = [lambda: ranged.transfer(8101, 1000, 5000, 3, "USD"),                 # to outside
                   lambda: ranged.transfer(8102, 5000, 1000, 3, "USD"),                 # from outside
                   lambda: ranged.get_account(5000),                                    # read outside
                   lambda: ranged.totals("USD"),                                        # every account
                   lambda: ranged.events(1, 2),
                   lambda: ranged.create_account(8103, 1500, "USD")]                    # admin's
        for call in refused:
            with pytest.raises(RequestRefused) as e:
                call()
            assert e.value.code == ErrorCode.UNAUTHORIZED
        assert admin.get_account(5000) == before and admin.get_account(1500) is None
        assert all(not_applied(r) for r in admin.results_of([8101, 8102, 8103]))
        assert sum(admin.status(node=i - 1)["refusals"]["unauthorized"] for i in c.ids) >= len(refused)


def test_the_connection_guard_counts_curve_framing(shard):
    """Under CURVE every frame travels in a MESSAGE command (~35 bytes more): the guard counts it, so an
    honest connection's held bytes do not creep up with every request until it is cut."""
    c, keys = shard
    with Client([c.client_addr[1]], keys=keys["admin"], timeout_s=10) as one:
        for _ in range(1500):
            one.result_of(1)
        time.sleep(0.2)                                   # a guard scan (connection_check_ms = 20)
        st = one.status(node=0)
    assert st["client_connections"]["held_in_bytes"] < 5_000, st["client_connections"]


def test_key_rotation_keeps_the_shard_serving(shard):
    c, keys = shard
    kd = c.keys_dir
    old = allow(kd, "app-v1", S.Rights(S.OPERATE, name="app-v1"), c.client_addresses)
    with Client(c.client_addresses, keys=old, timeout_s=10) as v1:
        assert eventually(lambda: v1.transfer(8200, 1000, 1001, 1, "USD")).ok
        new = allow(kd, "app-v2", S.Rights(S.OPERATE, name="app-v2"), c.client_addresses)   # 1. add the new key
        with Client(c.client_addresses, keys=new, timeout_s=10) as v2:
            assert eventually(lambda: v2.transfer(8201, 1000, 1001, 1, "USD")).ok
            os.remove(os.path.join(kd, S.CLIENTS_DIR, "app-v1.key"))          # 2. drop the old one
            n = 8202

            def v1_refused() -> None:
                nonlocal n
                n += 1
                try:
                    v1.transfer(n, 1000, 1001, 1, "USD")
                except RequestRefused as e:
                    assert e.code == ErrorCode.UNAUTHORIZED
                    return
                raise AssertionError("the dropped key still writes")
            eventually(v1_refused)                  # its open connection is refused from then on
            for k in range(20):                     # the new key (and the shard) never stopped serving
                assert v2.transfer(8300 + k, 1000, 1001, 1, "USD").ok
    with Client(c.client_addresses, keys=old, timeout_s=1.5, attempt_timeout_s=0.5) as again:
        with pytest.raises(Unavailable):            # a new connection with the old key: nothing
            again.get_account(1000)
    import signal
    for i in c.ids:                                 # SIGHUP re-reads the keys (and does not stop a replica)
        c.procs[i].send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert all(c.alive(i) for i in c.ids)
    with Client(c.client_addresses, keys=new, timeout_s=10) as v2:
        assert v2.transfer(8399, 1000, 1001, 1, "USD").ok


def test_forged_raft_message_from_an_unknown_key_never_reaches_the_leader(shard):
    """A DEALER announcing peer 2's routing id, CURVE with a key of its own, sends the leader a higher-term
    AppendEntries: ZAP refuses the connection, so the term, commit and state stay as they were."""
    c, keys = shard
    with Client(c.client_addresses, keys=keys["admin"], timeout_s=10) as admin:
        st = admin.status()
        leader = st["leader"]
        before = {i: admin.status(node=i - 1) for i in c.ids}
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, peer_identity(2 if leader != 2 else 3))
        pub, sec = zmq.curve_keypair()
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, keys["admin"].server_public
        s.connect(c.raft_addr[leader])
        src = 2 if leader != 2 else 3
        forged = m.AppendEntries(src, leader, st["term"] + 5, 0, 0, 10 ** 6, [])
        for _ in range(5):
            s.send_multipart([bytes(f) for f in m.encode_frames(forged)])
        time.sleep(1.0)
        s.close(0)
        ctx.term()
        after = {i: admin.status(node=i - 1) for i in c.ids}
        for i in c.ids:
            assert after[i]["term"] == before[i]["term"]
            assert after[i]["rejected"].get(WRONG_KEY, 0) == before[i]["rejected"].get(WRONG_KEY, 0)
        assert admin.status()["leader"] == leader
        assert admin.transfer(8400, 1000, 1001, 1, "USD").ok


# ------------------------------------------------------------------------------------------------ the transport
def test_raft_peer_identity_is_its_key(tmp_path):
    """In-process transports: a known peer's key under another peer's routing id is dropped (wrong_key)
    before decoding; an unknown key never connects; the real peer is heard."""
    kd = str(tmp_path)
    S.make_system_keys(kd)
    peers = {i: S.peer_key(kd, f"n{i}") for i in (1, 2, 3)}
    pub = {i: p.public for i, p in peers.items()}

    def sec(i: int) -> S.ServerSecurity:
        return S.ServerSecurity.load(kd, peer_keys=pub, own_peer_file=os.path.join(kd, "peers", f"n{i}.key_secret"))
    t1 = Transport(1, "tcp://127.0.0.1:0", {}, security=sec(1), only_peers=False)
    addr = t1.address
    t2 = Transport(2, "tcp://127.0.0.1:0", {1: addr}, security=sec(2))
    ctx = zmq.Context()
    liar = ctx.socket(zmq.DEALER)                   # peer 3's key, routing id of peer 2
    liar.setsockopt(zmq.LINGER, 0)
    liar.setsockopt(zmq.ROUTING_ID, peer_identity(2))
    assert peers[3].secret is not None
    liar.curve_publickey, liar.curve_secretkey = peers[3].public, peers[3].secret
    server_public = S.load_public(os.path.join(kd, "server.key"))[0].public
    liar.curve_serverkey = server_public
    stranger = ctx.socket(zmq.DEALER)               # a key of nobody's
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.setsockopt(zmq.ROUTING_ID, peer_identity(3))
    spub, ssec = zmq.curve_keypair()
    stranger.curve_publickey, stranger.curve_secretkey, stranger.curve_serverkey = spub, ssec, server_public
    try:
        liar.connect(addr)
        stranger.connect(addr)
        forged2 = m.AppendEntries(2, 1, 99, 0, 0, 0, [])
        forged3 = m.AppendEntries(3, 1, 99, 0, 0, 0, [])
        real = m.AppendEntries(2, 1, 1, 0, 0, 0, [])
        got: list = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (got and t1.rejected[WRONG_KEY]):
            for sock, msg in ((liar, forged2), (stranger, forged3)):
                try:
                    sock.send_multipart([bytes(f) for f in m.encode_frames(msg)], zmq.NOBLOCK)
                except zmq.Again:
                    pass                 # (the stranger's connection never completes: nothing is queued)
            t2.send(real)
            time.sleep(0.05)
            got += t1.recv_batch()
        assert got and all(x.term == 1 and x.src == 2 for x in got)      # only the real peer's
        assert t1.rejected[WRONG_KEY] >= 1
        assert all(x.term != 99 for x in got)
    finally:
        liar.close(0)
        stranger.close(0)
        ctx.term()
        t2.close()
        t1.close()
