"""Snapshots of an app's state machine made by a forked child (``ForkedSnapshot``): no Raft stall."""
from __future__ import annotations

import os
import signal
import struct
import time
import zlib
from collections.abc import Callable, Sequence

from engine import fileio
from engine.raft.log_store import SnapshotFile

SNAPSHOT_CHILD_NICE = 10             # the snapshot child's niceness: the replicas' threads preempt it
SNAPSHOT_CHILD_BOOST_S = 10.0         # ... until it has run this long; then it gets normal priority back
SNAPSHOT_WRITE_CHUNK_BYTES = 1 << 20  # the child writes its file back this much at a time ...
SNAPSHOT_WRITE_PAUSE_S = 0.002        # ... pausing this long in between (~300 MB/s at most)


class ForkedSnapshot:
    """An app's snapshot (the shard's: its ledger's) made by a forked child (copy-on-write: the child sees
    the state exactly as it was at the fork, while this process goes on applying). Serializing and hashing a
    large ledger takes hundreds of milliseconds, and writing it again into LMDB with an fsync as much;
    the Raft driver thread either would stall heartbeats into elections. The child first fsyncs ``fsync_first``
    (the event store: the page cache is shared, so the parent's writes made before the fork become durable), then
    writes the snapshot to a file in the data directory, fsyncs it, puts its size and crc32 beside it and
    exits; ``poll`` hands the file over (``SnapshotFile``) and the Raft log store moves it in: the driver
    never writes or reads the snapshot's bytes. The child touches nothing but the ledger's memory and its
    own files (no sockets, no LMDB) and leaves with ``os._exit``.

    The child stays out of the replicas' way (measured: a 90 MB snapshot is ~1-2 s of CPU, and written in
    one go it queues every Raft fsync behind ~90 MB of writeback; both made the 10K/s latency's tail): it
    runs at nice ``SNAPSHOT_CHILD_NICE`` (the replicas' threads preempt it; if it has not finished after
    ``SNAPSHOT_CHILD_BOOST_S`` the parent lifts it back to normal priority, so a saturated machine cannot
    starve it while the log since the last snapshot is held in memory), and writes the file in chunks of
    ``SNAPSHOT_WRITE_CHUNK_BYTES``, each written back (``sync_file_range``) before the next, with a pause
    between them: at most one chunk is ever queued ahead of a Raft fsync."""

    def __init__(self, produce: Callable[[], bytes], directory: str, fsync_first: Sequence[str] = ()) -> None:
        self.path = os.path.join(directory, f"snapshot-{os.getpid()}-{time.monotonic_ns()}.tmp")
        self.started = time.monotonic()
        self._boosted = False
        pid = os.fork()
        if pid == 0:                                   # the child
            code = 1
            try:
                _detach_from_parent()
                try:
                    os.nice(SNAPSHOT_CHILD_NICE)
                except OSError:
                    pass
                for path in fsync_first:               # the page cache is shared: this makes the parent's
                    fd = os.open(path, os.O_RDONLY)    # writes made before the fork durable
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                data = produce()
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    view = memoryview(data).cast("B")
                    fileio.write_paced(fd, len(view), lambda at, n: view[at:at + n], SNAPSHOT_WRITE_CHUNK_BYTES,
                                       SNAPSHOT_WRITE_PAUSE_S)
                    os.fsync(fd)                       # durable before the store refers to it
                finally:
                    os.close(fd)
                with open(self.path + ".meta", "wb") as f:
                    f.write(struct.pack("<QI", len(data), zlib.crc32(data)))
                code = 0
            finally:
                os._exit(code)
        self.pid = pid

    def poll(self) -> SnapshotFile | None:
        """The snapshot as a durable file once the child is done (the log store moves it in), else None."""
        if self.pid < 0:
            raise RuntimeError("snapshot already collected or cancelled")
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            if not self._boosted and time.monotonic() - self.started > SNAPSHOT_CHILD_BOOST_S:
                self._boosted = True           # starved (a saturated machine): let it finish at normal priority
                try:
                    os.setpriority(os.PRIO_PROCESS, self.pid, os.getpriority(os.PRIO_PROCESS, 0))
                except OSError:
                    pass                       # no permission to raise a priority: it finishes niced
            return None
        self.pid = -1
        try:
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                raise RuntimeError(f"the snapshot child failed (wait status {status})")
            with open(self.path + ".meta", "rb") as f:
                size, crc = struct.unpack("<QI", f.read())
        except BaseException:
            fileio.unlink_quietly(self.path)
            raise
        finally:
            fileio.unlink_quietly(self.path + ".meta")
        return SnapshotFile(self.path, size, crc)

    def cancel(self) -> None:
        if self.pid > 0:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = -1
        fileio.unlink_quietly(self.path)
        fileio.unlink_quietly(self.path + ".meta")


def _detach_from_parent() -> None:
    """In a snapshot child: close every inherited descriptor (the client ROUTER's and the PUB's listening
    sockets, the Raft transport's, LMDB's files: a child that outlived a killed parent kept the ports bound,
    and the restarted replica failed with "Address already in use"), and die with the parent (Linux
    PR_SET_PDEATHSIG: a snapshot nobody will collect is not worth finishing; its .tmp file is removed when
    the replica starts again). The child only reads the ledger's memory and opens its own files by path."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:                          # the parent died before the line above took effect
        os._exit(1)
