"""Small ZeroMQ and wake-up helpers shared by the node, the client and the Raft driver."""
from __future__ import annotations

import os

import zmq

_RCVMORE = zmq.RCVMORE


def recv_message(sock: zmq.Socket) -> list:
    """One whole multipart message without blocking (raises zmq.Again if none): the first frame as bytes,
    the others as zero-copy ``zmq.Frame``. Faster than ``recv_multipart`` for a server's hot loop
    (``getsockopt(RCVMORE)`` is cheaper than the ``rcvmore`` property)."""
    first = sock.recv(zmq.NOBLOCK)
    frames = [first]
    getsockopt = sock.getsockopt
    recv = sock.recv
    while getsockopt(_RCVMORE):
        frames.append(recv(copy=False))
    return frames


class Waker:
    """An eventfd another thread writes to wake a zmq.Poller loop (register ``fd`` for POLLIN)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def wake(self) -> None:
        fd = self.fd
        if fd >= 0:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass          # closed meanwhile, or the counter is saturated: a wake-up is pending anyway

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
