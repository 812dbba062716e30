"""The subscriber side of a service's seq-numbered event stream (the publisher is the server's PUB socket,
the golden copy its event store: ``engine/service/server.py``, ``engine/service/event_store.py``).

``StreamSubscriber`` yields the records in seq order with no gap and no repeat, whatever the record type
(``dtype``: fixed-size records with a u64 ``seq_num`` first). It subscribes to every replica's PUB socket
(any one alive is enough); when what arrives skips ahead of the next expected seq (a lost message, a slow
start, a failover), or nothing arrives for ``idle_check_s`` while the service is ahead, the missing range
is fetched from the replicas' event stores (``fetch(first, last)``; ``head()`` says how far the service
is). A gap is never skipped: it is fetched. The shard's ``engine.client.Subscriber`` and the Marker's
``marker.client.Subscriber`` are this with their client's EVENTS and STATUS.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Self

import msgspec
import numpy as np
import zmq

from engine.records import records_concat
from engine.service import protocol as P


def fetch_range(read: Callable[[int, int], Future], first_seq: int, last_seq: int, dtype: np.dtype) -> np.ndarray:
    """Records of seqs first_seq..last_seq (inclusive) through ``read(first, last)`` (an EVENTS call: a
    Future of the reply payload); long ranges come in pieces, each reply at most EVENTS_PER_REPLY_MAX."""
    out = []
    seq = first_seq
    while seq <= last_seq:
        evs = np.frombuffer(read(seq, last_seq).result(), dtype=dtype)
        if not len(evs):
            break
        out.append(evs)
        seq = int(evs["seq_num"][-1]) + 1
    return records_concat(out, dtype)


class StreamSubscriber:
    def __init__(self, pub_addresses: Sequence[str], fetch: Callable[[int, int], np.ndarray],
                 head: Callable[[], int], dtype: np.dtype, from_seq: int = 1, *, idle_check_s: float = 0.5,
                 keys: Any = None) -> None:
        """``keys``: an engine.service.security.ClientKeys (CURVE; the key must be allowed to read every
        account's events) or None (an insecure system)."""
        if from_seq < 1:
            raise ValueError("from_seq starts at 1")
        self.dtype = np.dtype(dtype)
        self.next_seq = from_seq
        self._fetch_range = fetch
        self._head = head
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.sub.setsockopt(zmq.SUBSCRIBE, P.EVENTS_TOPIC)
        if keys is not None:
            keys.configure_client(self.sub)
        for a in pub_addresses:
            self.sub.connect(a)
        self.idle_check_s = idle_check_s
        self._last_progress = time.monotonic()
        self.fetched_ranges = 0

    client: Any = None                      # the app's client behind fetch/head, closed with the subscriber

    def close(self) -> None:
        self.sub.close(0)
        self.ctx.term()
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self, evs: np.ndarray) -> np.ndarray | None:
        seqs = evs["seq_num"]
        keep = evs[seqs >= self.next_seq]
        if not len(keep):
            return None
        if int(keep["seq_num"][0]) != self.next_seq:
            return None
        self.next_seq = int(keep["seq_num"][-1]) + 1
        self._last_progress = time.monotonic()
        return keep

    def _fetch(self, last_seq: int) -> np.ndarray | None:
        evs = self._fetch_range(self.next_seq, last_seq)
        self.fetched_ranges += 1
        return self._take(evs) if len(evs) else None

    def poll(self, timeout_ms: int = 1000) -> np.ndarray | None:
        """The next chunk of records (whole seqs, continuing the stream), or None."""
        if self.sub.poll(timeout_ms):
            topic = self.sub.recv()
            frames = []
            while self.sub.rcvmore:
                frames.append(self.sub.recv())
            if topic != P.EVENTS_TOPIC or len(frames) != 2 or len(frames[1]) % self.dtype.itemsize:
                return None
            try:
                head = P.decode_events_header(frames[0])
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None
            if head.last_seq < self.next_seq:
                return None                        # already delivered (another replica's copy)
            if head.first_seq > self.next_seq:
                return self._fetch(head.first_seq - 1)   # a gap: fill it from an event store first
            return self._take(np.frombuffer(frames[1], dtype=self.dtype))
        if time.monotonic() - self._last_progress >= self.idle_check_s:
            self._last_progress = time.monotonic()
            head_seq = self._head()
            if head_seq >= self.next_seq:
                return self._fetch(head_seq)
        return None

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            evs = self.poll(1000)
            if evs is not None:
                yield evs
