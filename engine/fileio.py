"""Page-cache control for the node's files (Linux ``sync_file_range``), so that one writer's dirty pages do not
pile up and then make every fsync on the disk wait behind their writeback.

- ``start_writeback(fd)``: start writing back every dirty page of a file, without waiting (the event store,
  which is not fsynced per entry, every WRITEBACK_INTERVAL_S); a no-op where unavailable.
- ``write_back(fd, offset, nbytes)``: write that range back and wait for it, without a journal commit (the
  snapshot child, chunk by chunk); ``os.fdatasync`` where ``sync_file_range`` is unavailable.
- ``write_paced(fd, size, chunk_at, chunk_bytes, pause_s)``: write a file's first ``size`` bytes a chunk at a
  time, each written back before the next, pausing in between (the snapshot child's file, the Raft log's
  spare segments): at most one chunk ever waits ahead of another writer's fsync.
- ``unlink_quietly(path)``: delete a file that may already be gone (leftovers, compacted log segments).
"""
from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4          # SYNC_FILE_RANGE_* flags


def _load() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load()
AVAILABLE = _SYNC_FILE_RANGE is not None


def start_writeback(fd: int) -> None:
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, WRITE)           # the whole file; an error only means no help


def write_back(fd: int, offset: int, nbytes: int) -> None:
    if _SYNC_FILE_RANGE is None:
        os.fdatasync(fd)
        return
    if _SYNC_FILE_RANGE(fd, offset, nbytes, WAIT_BEFORE | WRITE | WAIT_AFTER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_paced(fd: int, size: int, chunk_at: Callable[[int, int], Any], chunk_bytes: int, pause_s: float,
                cancelled: Callable[[], bool] = lambda: False) -> None:
    """Write ``size`` bytes at the start of ``fd``, ``chunk_bytes`` at a time (``chunk_at(offset, n)`` gives
    each chunk's bytes), each written back before the next, pausing ``pause_s`` in between. Raises
    InterruptedError once ``cancelled()`` is true. The caller still fsyncs."""
    offset = 0
    while offset < size:
        if cancelled():
            raise InterruptedError
        n = min(chunk_bytes, size - offset)
        chunk = memoryview(chunk_at(offset, n))
        done = 0
        while done < n:
            done += os.pwrite(fd, chunk[done:], offset + done)
        write_back(fd, offset, n)
        offset += n
        if offset < size:
            time.sleep(pause_s)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
