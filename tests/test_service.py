"""The service machinery's app hooks, on a one-replica counter app in this process: leadership edges,
tick, a registered socket and propose, all delivered on the server's main thread."""
import threading
import time

import msgspec
import zmq

from engine.devtools.counter_app import OP_PROPOSE, OP_READ, CounterConfig, CounterServer, counter_entry
from engine.devtools.local_raft import free_ports
from engine.service import protocol as P


class Probe(CounterServer):
    def __init__(self, config):
        super().__init__(config)
        self.seen = []                  # (what, thread ident, ...)
        self.tick_interval_ms = 20
        self.ticks = 0

    def on_role_change(self, is_leader, term):
        self.seen.append(("role", threading.get_ident(), is_leader, term))
        if is_leader:
            self.propose(counter_entry([5]), lambda f: self.seen.append(("proposed", threading.get_ident(),
                                                                          f.result())))

    def tick(self, now_ms):
        self.ticks += 1


def _wait(pred, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


def test_app_hooks_run_on_the_main_thread(tmp_path):
    ports = free_ports(4)
    replicas = {1: {"raft": f"tcp://127.0.0.1:{ports[0]}", "client": f"tcp://127.0.0.1:{ports[1]}",
                    "pub": f"tcp://127.0.0.1:{ports[2]}"}}
    server = Probe(CounterConfig(node_id=1, replicas=replicas, insecure=True, data_dir=str(tmp_path), tick_ms=5,
                                 election_ticks=10, heartbeat_ticks=2))
    ctx = zmq.Context()
    side = ctx.socket(zmq.PULL)                      # an app socket in the server's poller
    side.bind(f"tcp://127.0.0.1:{ports[3]}")
    got = []

    def on_side(sock):
        while sock.poll(0):
            got.append((threading.get_ident(), sock.recv()))
    server.register_socket(side, on_side)
    server.start()
    main = threading.Thread(target=server.serve, daemon=True)
    main.start()
    try:
        assert _wait(lambda: any(s[0] == "proposed" for s in server.seen))
        role = [s for s in server.seen if s[0] == "role"]
        assert role[0][2:] == (True, role[0][3]) and role[0][3] >= 1
        proposed = next(s for s in server.seen if s[0] == "proposed")
        assert proposed[2][1] == 5                   # (index, counter)
        assert {s[1] for s in server.seen} == {main.ident}
        push = ctx.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{ports[3]}")
        push.send(b"hello")
        assert _wait(lambda: got) and got[0] == (main.ident, b"hello")
        assert _wait(lambda: server.ticks >= 5)
        dealer = ctx.socket(zmq.DEALER)              # the service's header, the counter's ops
        dealer.connect(replicas[1]["client"])
        dealer.send_multipart([P.encode(P.Request(7, OP_PROPOSE)), counter_entry([2, 3])])
        dealer.send_multipart([P.encode(P.Request(8, OP_READ)), b""])
        dealer.send_multipart([P.encode(P.Request(9, 99)), b""])
        replies = {}
        while len(replies) < 3 and dealer.poll(5000):
            head, body = dealer.recv_multipart()
            r = P.decode_reply(head)
            replies[r.req_id] = (r, body)
        assert msgspec.msgpack.decode(replies[7][1])[1] == 10
        assert msgspec.msgpack.decode(replies[8][1]) == 10
        assert replies[9][0].error == P.ErrorCode.UNKNOWN_OP
        st = server.status()
        assert st["counter"] == 10 and st["refusals"]["unknown_op"] == 1
        push.close(0)
        dealer.close(0)
    finally:
        server.stop()
        main.join(10)
        side.close(0)
        ctx.term()
    assert [s[2] for s in server.seen if s[0] == "role"][-1] is False      # the loss when it stopped
