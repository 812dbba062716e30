"""A byte bound on what each client connection holds inside ZeroMQ, in both directions (Linux, tcp://).

ZeroMQ bounds a ROUTER's queues in *messages* (RCVHWM/SNDHWM), and ZMQ_MAXMSGSIZE bounds one *frame*;
nothing bounds the bytes. Measured: one DEALER sending a single multipart message of 900 KB frames (each
under MAXMSGSIZE) grew the receiving process by ~1 GB in 5 s, because libzmq buffers every part of a
message until its last one arrives and the high-water mark counts only whole messages; a peer that sends
requests and never reads its replies makes them pile up the same way on the way out.

The guard measures instead. The main thread tells it, per message, the bytes it took from a connection
(``note_in``) and, per reply, the bytes it handed to ZeroMQ for it (``note_out``); a thread looks every
``interval_s`` at the kernel's counters of every accepted client connection (``TCP_INFO``:
``tcpi_bytes_received``, ``tcpi_bytes_acked``) and computes

    held in   = bytes the connection's TCP received - bytes the main thread took from it (+ framing)
    held out  = bytes of replies handed to ZeroMQ - bytes the client's TCP acknowledged

A connection holding more than ``per_connection_max`` either way, or the connections holding the most
while all of them together hold more than ``total_max`` (both directions), is cut: ``shutdown(2)`` on its socket, which
ZeroMQ's I/O thread sees as the peer hanging up; it drops the connection and everything buffered for it
(a partial message, queued requests and replies). The client's DEALER reconnects by itself; what it had
in flight on that connection gets no reply (it times out and retries, with the same dedup ids).

Connections are learnt from the ROUTER's monitor (ZMQ_EVENT_ACCEPTED gives the descriptor; a scan of
``/proc/self/fd`` instead cost 2 ms at 120 descriptors) and checked on every look to still be a TCP
socket whose local address is the ROUTER's bound one (only that ROUTER accepts on it), keyed by
(descriptor, peer address). A message's
connection is learnt once per ROUTER identity from ZMQ_SRCFD. Every race in this (a descriptor closed and
reused between a message and its lookup, a late scan) can only make the guard count a connection as
holding *less* than it does, never more, so an honest connection is not cut by it.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import socket
import struct
import threading
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("zwallet.guard")

TCP_INFO_BYTES = 232                    # struct tcp_info up to tcpi_bytes_received (Linux >= 4.1)
_TCPI_BYTES_ACKED = 120                 # u64 offsets in struct tcp_info
_TCPI_BYTES_RECEIVED = 128
HANDSHAKE_ALLOWANCE = 1024              # ZMTP greeting and READY command (~100-300 bytes), not messages
KNOWN_IDENTITIES_MAX = 100_000        # identity -> connection entries kept (gone ones are dropped per scan)
_SRCFD = int(getattr(zmq, "SRCFD", 2))

Key = tuple[int, bytes]                 # (descriptor, peer address as a raw sockaddr)

# the socket calls straight through libc: a Python socket object per descriptor and look cost ~30 us, and
# one must never be collected while it owns a descriptor ZeroMQ's I/O thread is using
_libc = ctypes.CDLL(None, use_errno=True)
_SOCKADDR_BYTES = 128
_SHUT_RDWR = 2


def _sockaddr(call: Any, fd: int) -> bytes | None:
    buf = ctypes.create_string_buffer(_SOCKADDR_BYTES)
    n = ctypes.c_uint32(_SOCKADDR_BYTES)
    if call(fd, buf, ctypes.byref(n)) != 0:
        return None
    return buf.raw[:n.value]


def peer_of(fd: int) -> bytes | None:
    """The raw sockaddr of a connected socket's peer, else None."""
    return _sockaddr(_libc.getpeername, fd)


def local_port(fd: int) -> int | None:
    addr = _sockaddr(_libc.getsockname, fd)
    if addr is None or len(addr) < 4:
        return None
    return int.from_bytes(addr[2:4], "big")         # sin_port / sin6_port, network order


def tcp_counters(fd: int) -> tuple[int, int] | None:
    """(tcpi_bytes_received, tcpi_bytes_acked) of a TCP socket, else None."""
    buf = ctypes.create_string_buffer(TCP_INFO_BYTES)
    n = ctypes.c_uint32(TCP_INFO_BYTES)
    if _libc.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, buf, ctypes.byref(n)) != 0 \
            or n.value < _TCPI_BYTES_RECEIVED + 8:
        return None
    acked, received = struct.unpack_from("<QQ", buf.raw, _TCPI_BYTES_ACKED)
    return received, acked


def frame_overhead(n: int) -> int:
    """ZMTP 3 framing of one frame of ``n`` bytes: a flags byte and a 1- or 8-byte size."""
    return 2 if n <= 255 else 9


CURVE_MESSAGE_BYTES = 33                # CURVE's MESSAGE command around a frame: name 8, nonce 8, MAC 16, flags 1


def curve_frame_overhead(n: int) -> int:
    """What one frame of ``n`` bytes costs on the wire under CURVE (docs/security.md): its MESSAGE command,
    framed as a command of ``n + 33`` bytes. Counting plain framing instead would make every connection seem
    to hold ~35 bytes more per frame, until an honest long-lived connection was cut."""
    return CURVE_MESSAGE_BYTES + (2 if n + CURVE_MESSAGE_BYTES <= 255 else 9)


def tcp_endpoint(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://host:port`` endpoint, else None (the guard covers TCP only)."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[6:].rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


class ConnectionGuard:
    def __init__(self, endpoint: str, per_connection_max: int, total_max: int, interval_s: float) -> None:
        self.bound = tcp_endpoint(endpoint)
        self.per_connection_max = per_connection_max
        self.total_max = total_max
        self.interval_s = interval_s
        self._key_of: dict[bytes, Key | None] = {}   # ROUTER identity -> its connection (main thread)
        self.taken: collections.Counter[Key] = collections.Counter()     # main thread writes
        self.handed: collections.Counter[Key] = collections.Counter()    # main thread writes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held_in = 0                             # the last scan's totals (reported in STATUS)
        self.held_out = 0
        self.connections = 0
        self.cuts: collections.Counter[str] = collections.Counter()     # by reason; the guard thread writes
        self.fds: set[int] = set()                   # accepted connections' descriptors (guard thread)
        self._monitor: Any = None
        self._router: Any = None

    @property
    def enabled(self) -> bool:
        return self.bound is not None and self.interval_s > 0

    # ------------------------------------------------------------------------------------ main thread
    def key_of(self, ident: bytes, frame: zmq.Frame) -> Key | None:
        """The connection a message of ``ident`` came on (learnt from the message's frame, once)."""
        known = self._key_of.get(ident, False)
        if known is not False:
            return known  # type: ignore[return-value]
        key: Key | None = None
        try:
            fd = int(frame.get(_SRCFD))
            peer = peer_of(fd)
            if peer is not None:
                key = (fd, peer)
        except (zmq.ZMQError, ValueError, TypeError):
            pass
        if len(self._key_of) >= KNOWN_IDENTITIES_MAX:
            self._key_of.clear()            # identities whose connection was never found: start afresh
        self._key_of[ident] = key
        return key

    def note_in(self, key: Key | None, nbytes: int) -> None:
        if key is not None:
            self.taken[key] += nbytes

    def note_out(self, ident: bytes, nbytes: int) -> None:
        key = self._key_of.get(ident)
        if key is not None:
            self.handed[key] += nbytes

    # ----------------------------------------------------------------------------------- guard thread
    def start(self, router: zmq.Socket) -> None:
        """Watch ``router``'s accepted connections (call from the thread that owns it, before it serves)."""
        if not self.enabled:
            return
        self._router = router
        self._monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self._thread = threading.Thread(target=self._run, name="connection-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (from the thread that owns the router, before it is closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            # the monitor is stopped while its PAIR socket is still open, and only then closed: libzmq's
            # disable (it sends MONITOR_STOPPED to the monitor's inproc pipe) hung, rarely, when the PAIR
            # had been closed first (seen in tests/test_service.py's in-process shutdown)
            try:
                self._router.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)         # the guard thread has exited: this thread may close it

    def _run(self) -> None:
        # the monitor socket is this thread's while it runs; stop() closes it, after the disable
        while not self._stop.wait(self.interval_s):
            try:
                self._drain_monitor()
                self.check()
            except Exception:               # never let the guard take the node down
                log.exception("connection guard scan failed")

    def _drain_monitor(self) -> None:
        mon = self._monitor
        while True:
            try:
                ev = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(ev["value"])
            if ev["event"] == zmq.EVENT_ACCEPTED:
                self.fds.add(fd)
            # DISCONNECTED / CLOSED: left to check(), which drops a descriptor that is no longer ours (it
            # may already be another accepted connection's, whose ACCEPTED came first in this drain)

    def _connections(self) -> dict[Key, tuple[int, int]]:
        """Every accepted connection of the bound endpoint: key -> (bytes received, bytes acked)."""
        assert self.bound is not None
        port = self.bound[1]
        out: dict[Key, tuple[int, int]] = {}
        for fd in list(self.fds):
            peer = peer_of(fd) if local_port(fd) == port else None
            counters = tcp_counters(fd) if peer is not None else None
            if counters is None or peer is None:
                self.fds.discard(fd)        # closed, reused for something else, or not connected any more
                continue
            out[(fd, peer)] = counters
        return out

    def check(self) -> list[tuple[Key, str, int]]:
        """One scan: cut what holds too much; forget connections that are gone. Returns the cuts."""
        conns = self._connections()
        taken, handed = dict(self.taken), dict(self.handed)
        held: list[tuple[int, Key, str]] = []
        total_in = total_out = 0
        for key, (received, acked) in conns.items():
            held_in = received - HANDSHAKE_ALLOWANCE - taken.get(key, 0)
            held_out = handed.get(key, 0) - acked
            total_in += max(0, held_in)
            total_out += max(0, held_out)
            if held_in >= held_out:
                held.append((held_in, key, "connection_held_in"))
            else:
                held.append((held_out, key, "connection_held_out"))
        self.held_in, self.held_out, self.connections = total_in, total_out, len(conns)
        cuts: list[tuple[Key, str, int]] = []
        held.sort(reverse=True)
        total = total_in + total_out
        for amount, key, reason in held:
            if amount > self.per_connection_max:
                cuts.append((key, reason, amount))
            elif total > self.total_max and amount > 0:
                cuts.append((key, "held_total", amount))
            else:
                continue
            total -= amount
        for key, reason, _amount in cuts:
            self._cut(key)
            self.cuts[reason] += 1
        gone = [k for k in taken.keys() | handed.keys() if k not in conns]
        for k in gone:
            self.taken.pop(k, None)
            self.handed.pop(k, None)
        if gone:
            stale = set(gone)
            for ident, key_of in list(self._key_of.items()):
                if key_of in stale:
                    self._key_of.pop(ident, None)
        return cuts

    def _cut(self, key: Key) -> None:
        fd, peer = key
        if self.bound is not None and local_port(fd) == self.bound[1] and peer_of(fd) == peer:
            _libc.shutdown(fd, _SHUT_RDWR)     # ZeroMQ's I/O thread sees the hang-up and drops it
            log.warning("cut a client connection (descriptor %d): it held more than its share of buffered bytes", fd)
