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

Connections are found by scanning this process's descriptors for TCP sockets whose local address is the
ROUTER's bound one (only that ROUTER accepts on it), keyed by (descriptor, peer address). A message's
connection is learnt once per ROUTER identity from ZMQ_SRCFD. Every race in this (a descriptor closed and
reused between a message and its lookup, a late scan) can only make the guard count a connection as
holding *less* than it does, never more, so an honest connection is not cut by it.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import struct
import threading
from typing import Any

import zmq

log = logging.getLogger("zwallet.guard")

TCP_INFO_BYTES = 232                    # struct tcp_info up to tcpi_bytes_received (Linux >= 4.1)
_TCPI_BYTES_ACKED = 120                 # u64 offsets in struct tcp_info
_TCPI_BYTES_RECEIVED = 128
HANDSHAKE_ALLOWANCE = 1024              # ZMTP greeting and READY command (~100-300 bytes), not messages
KNOWN_IDENTITIES_MAX = 100_000        # identity -> connection entries kept (gone ones are dropped per scan)
_SRCFD = int(getattr(zmq, "SRCFD", 2))

Key = tuple[int, Any]                   # (descriptor, peer address)


def frame_overhead(n: int) -> int:
    """ZMTP 3 framing of one frame of ``n`` bytes: a flags byte and a 1- or 8-byte size."""
    return 2 if n <= 255 else 9


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

    @property
    def enabled(self) -> bool:
        return self.bound is not None and self.interval_s > 0

    # ------------------------------------------------------------------------------------ main thread
    def key_of(self, ident: bytes, frame: zmq.Frame) -> Key | None:
        """The connection a message of ``ident`` came on (learnt from the message's frame, once)."""
        key = self._key_of.get(ident, False)
        if key is not False:
            return key  # type: ignore[return-value]
        key = None
        try:
            fd = int(frame.get(_SRCFD))
            s = socket.socket(fileno=fd)
            try:
                key = (fd, s.getpeername())
            finally:
                s.detach()
        except (OSError, zmq.ZMQError, ValueError, TypeError):
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
    def start(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="connection-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:               # never let the guard take the node down
                log.exception("connection guard scan failed")

    def _connections(self) -> dict[Key, tuple[int, int]]:
        """Every accepted connection of the bound endpoint: key -> (bytes received, bytes acked)."""
        assert self.bound is not None
        host, port = self.bound
        out: dict[Key, tuple[int, int]] = {}
        try:
            names = os.listdir("/proc/self/fd")
        except OSError:
            return out
        for name in names:
            try:
                fd = int(name)
                s = socket.socket(fileno=fd)
            except (OSError, ValueError):
                continue                    # not a socket (a file, an eventfd, the listdir itself)
            try:
                if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                local = s.getsockname()
                if local[1] != port or (host not in ("*", "0.0.0.0", "::") and local[0] != host):
                    continue
                peer = s.getpeername()      # the listening socket has none: skipped
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
                if len(info) < _TCPI_BYTES_RECEIVED + 8:
                    continue
                acked, received = struct.unpack_from("<QQ", info, _TCPI_BYTES_ACKED)
                out[(fd, peer)] = (received, acked)
            except OSError:
                continue
            finally:
                s.detach()
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
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            return
        try:
            if s.getpeername() == peer and self.bound is not None and s.getsockname()[1] == self.bound[1]:
                s.shutdown(socket.SHUT_RDWR)   # ZeroMQ's I/O thread sees the hang-up and drops it
                log.warning("cut client connection %s: it held more than its share of buffered bytes", peer)
        except OSError:
            pass
        finally:
            s.detach()
