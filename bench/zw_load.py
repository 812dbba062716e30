"""zwallet's load drivers for the side-by-side benchmark: the same command streams, the same modes and the same
result dicts as ``bench.pg_ledger.run_batched`` / ``run_unbatched``, so the two systems are measured alike.

- ``run_batched``: ``connections`` ``engine.client.Client`` objects, one thread each, each keeping ``inflight``
  batches in flight (zwallet's protocol pipelines; PostgreSQL's connection runs one transaction at a time, so
  its driver has no such knob). Batch i of the stream is sent once; the replies' result records are checked.
- ``run_unbatched``: one TRANSFER record per request from ``connections`` concurrent clients in ``processes``
  processes, closed loop (each client sends its next request when its previous one is answered) or open loop
  at a fixed rate (``bench.loadgen``). The clients of a process share one bare DEALER socket (the wire
  protocol of docs/protocol.md; requests are matched to replies by req_id), as the threads of an application
  share one ``Client``: zwallet's protocol multiplexes, while a PostgreSQL connection runs one transaction at
  a time, so its driver needs a connection per client. A bare socket, not ``Client``: the load generator
  shares the machine's cores with the three replicas, and the Client's I/O thread and futures would cost a
  third of a core at 10K requests/s (the PostgreSQL driver likewise uses asyncio psycopg, its lightest
  client). Requests go to the leader's address; a NOT_LEADER or ERROR reply counts as a failed request
  (``loadgen.CODE_NO_RESULT``).
"""
from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import zmq

from bench import loadgen
from engine import records as R
from engine import wire as W
from engine.client import Client
from engine.zmq_io import recv_message


def field_offset(dtype: np.dtype, name: str) -> int:
    """Byte offset of field ``name`` in the structured record ``dtype`` (to read it from raw reply bytes)."""
    fields = dtype.fields
    if fields is None or name not in fields:
        raise TypeError(f"{dtype} has no field {name!r}")
    return fields[name][1]


REPLY_WAIT_S = 30.0            # run_batched: how long a batch's reply is waited for
ATTEMPT_TIMEOUT_S = 5.0        # run_batched: a batch unanswered this long is re-sent (same bytes) elsewhere
_CODE_AT = field_offset(R.RESULT_DTYPE, "code")
_FLAGS_AT = field_offset(R.RESULT_DTYPE, "flags")
_RESULT_BYTES = R.RESULT_DTYPE.itemsize
_OK = int(W.Status.OK)
_DUPLICATE = int(R.ResultFlag.DUPLICATE)


def run_batched(addresses: Sequence[str], batches: Sequence[np.ndarray], *, connections: int = 4, inflight: int = 4,
                duration_s: float | None = None, attempt_timeout_s: float = ATTEMPT_TIMEOUT_S) -> dict[str, Any]:
    """Send each batch of ``batches`` once (until ``duration_s`` if given: no batch is sent after it), keeping
    ``inflight`` per connection; a batch unanswered for ``attempt_timeout_s`` is re-sent (the same bytes: never
    applied twice) to the next replica. Returns ``{"latency_s", "done_s", "sizes"}`` per completed batch in stream
    order, and ``"t0"`` (perf_counter at the start), ``"wall_s", "records", "batches", "not_ok", "duplicates",
    "errors"``."""
    n = len(batches)
    lock = threading.Lock()
    nxt = [0]
    lat: dict[int, float] = {}
    done: dict[int, float] = {}
    sizes: dict[int, int] = {}
    counts = {"not_ok": 0, "duplicates": 0}
    errors: list[str] = []
    stop_at = float("inf")                 # set when the clients start, read by take()

    def take() -> int | None:
        with lock:
            j = nxt[0]
            if j >= n or time.perf_counter() >= stop_at:
                return None
            nxt[0] += 1
            return j

    def worker(client: Client) -> None:
        pending: list[tuple[int, float, Future]] = []
        try:
            while True:
                while len(pending) < inflight and (j := take()) is not None:
                    ops = batches[j]
                    pending.append((j, time.perf_counter(), client.apply_batch_async(ops)))
                if not pending:
                    return
                j, sent, fut = pending.pop(0)
                results = fut.result(REPLY_WAIT_S)
                t = time.perf_counter()
                bad = int(np.count_nonzero(results["code"] != R.Code.OK))
                dup = int(np.count_nonzero(results["flags"] & R.ResultFlag.DUPLICATE))
                with lock:
                    lat[j], done[j], sizes[j] = t - sent, t, len(results)
                    counts["not_ok"] += bad
                    counts["duplicates"] += dup
        except Exception as exc:  # noqa: BLE001 - a reply that never came, a refused batch: the run reports it
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")

    # deep pipelines queue for a while at the leader: re-sending after the default 1 s attempt timeout would
    # only double the work (the copy comes back as duplicates)
    clients = [Client(list(addresses), timeout_s=REPLY_WAIT_S, attempt_timeout_s=attempt_timeout_s)
               for _ in range(connections)]
    try:
        threads = [threading.Thread(target=worker, args=(c,), name=f"zw-batched-{k}", daemon=True)
                   for k, c in enumerate(clients)]
        start = time.perf_counter()
        stop_at = start + duration_s if duration_s else float("inf")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        for c in clients:
            c.close()
    order = sorted(done)
    return {"latency_s": np.array([lat[j] for j in order]), "done_s": np.array([done[j] for j in order]),
            "sizes": np.array([sizes[j] for j in order], dtype=np.int64), "t0": start, "wall_s": wall,
            "records": int(sum(sizes.values())), "batches": len(order), "errors": errors, **counts}


_ISSUED = struct.Struct("<Q")
_ISSUED_AT = R.field_offset(R.OP_DTYPE, "issued_ms")     # a single-record payload: the record's issued_ms


def _unbatched_child(rows: bytes, positions: bytes, connections: int, rate: float | None,
                     duration_s: float | None, drain_s: float, address: str, ready: Any, go: Any, t0_shared: Any,
                     out: Any) -> None:
    """A ``bench.loadgen`` child: ``connections`` closed-loop clients, or an open loop, over one DEALER."""
    ops, pos = loadgen.child_slice(rows, positions)
    m = len(ops)
    payloads = [bytearray(ops[k:k + 1].tobytes()) for k in range(m)]     # issued_ms stamped when sent
    o = loadgen.Outcomes(m)
    lat, svc, lag, done, codes, dups, finished = (o.latency_s, o.service_s, o.send_lag_s, o.done_s, o.codes,
                                                  o.duplicate, o.finished)
    sent_at, due_at = np.zeros(m), np.zeros(m)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)                  # one connection, shared by this process's clients
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    sock.connect(address)
    encode, request, apply_op = W.encode, W.Request, W.Op.APPLY
    perf = time.perf_counter
    state = {"inflight": 0}

    def send(j: int) -> None:
        sock.send(encode(request(j + 1, apply_op)), zmq.SNDMORE)
        _ISSUED.pack_into(payloads[j], _ISSUED_AT, int(time.time() * 1000))
        sock.send(payloads[j])
        sent_at[j] = perf()
        state["inflight"] += 1

    def receive() -> int:
        """Every reply waiting; returns how many requests they answered."""
        got = 0
        while True:
            try:
                frames = recv_message(sock)          # (recv_multipart pays pyzmq's enum per frame)
            except zmq.Again:
                return got
            now = perf()
            reply = W.decode_reply(frames[0])
            j = reply.req_id - 1
            if not 0 <= j < m or finished[j]:
                continue
            if reply.status == _OK and len(frames) > 1 and len(frames[1]) >= _RESULT_BYTES:
                body = frames[1].bytes                  # a zmq.Frame (recv_message: zero-copy after the first)
                codes[j] = int.from_bytes(body[_CODE_AT:_CODE_AT + 2], "little")
                dups[j] = 1 if body[_FLAGS_AT] & _DUPLICATE else 0
            done[j] = now
            lat[j] = now - (due_at[j] if rate else sent_at[j])
            svc[j] = now - sent_at[j]
            finished[j] = True
            state["inflight"] -= 1
            got += 1

    time.sleep(0.2)                                    # let the connection come up
    ready.put(os.getpid())
    go.wait()
    t0 = loadgen.start_time(t0_shared)
    stop_at = t0 + duration_s if duration_s else float("inf")
    start, cpu0 = perf(), time.process_time()
    if rate is None:            # closed loop: ``connections`` clients, each sends again when it is answered
        k = 0
        while k < min(connections, m):
            send(k)
            k += 1
        while state["inflight"]:
            if not sock.poll(int(drain_s * 1000)):
                break                                  # no reply for that long: the rest stay unanswered
            for _ in range(receive()):
                if k < m and perf() < stop_at:
                    send(k)
                    k += 1
    else:                                              # open loop: record k is due at t0 + pos[k] / rate
        due_at[:] = t0 + pos / rate
        k = 0
        while k < m and due_at[k] < stop_at:
            now = perf()
            while k < m and due_at[k] <= now and due_at[k] < stop_at:
                send(k)                                # everything due goes now, even if late
                lag[k] = sent_at[k] - due_at[k]
                k += 1
            receive()
            if k < m and loadgen.wait_for_reply_or(sock, due_at[k]):
                receive()
        reply_deadline = max(perf(), stop_at) + drain_s
        while state["inflight"] and perf() < reply_deadline:
            if sock.poll(50):
                receive()
    end, cpu = perf(), time.process_time() - cpu0
    sock.close(0)
    ctx.term()
    out.put(o.result(pos, start, end, 0, cpu, int(np.count_nonzero(sent_at))))


def run_unbatched(address: str, ops: np.ndarray, connections: int = 64, processes: int = 2,
                  rate: float | None = None, duration_s: float | None = None,
                  drain_s: float = loadgen.DRAIN_S_DEFAULT) -> dict[str, Any]:
    """One record of ``ops`` per request to the node at ``address`` (the leader), closed loop with
    ``connections`` clients or open loop at ``rate`` (one socket per process), as ``bench.loadgen`` says.
    Records never answered (a lost leader) are missing from the result: compare ``count`` with what was
    sent. Returns ``bench.loadgen.run_processes``'s dict."""
    if ops.dtype != R.OP_DTYPE:
        raise ValueError("run_unbatched takes op records (engine.records.OP_DTYPE)")
    return loadgen.run_processes(_unbatched_child, ops, connections=connections, processes=processes, rate=rate,
                                 duration_s=duration_s, drain_s=drain_s, extra=(address,))
