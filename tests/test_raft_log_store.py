"""The Raft log store (segment files for the log, LMDB for hard state and snapshot): round trips, conflict
truncation, compaction under a snapshot, invariants that reject bad writes without changing anything,
checksums that catch corruption, and recovery after kill -9 in the middle of an append loop (nothing
reported durable is ever lost)."""
from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from engine.raft import log_store as ls
from engine.raft import messages as m
from engine.raft.log_store import LogCorruption, LogStore, LogStoreError

MAP_SIZE = 1 << 30


def _kind():
    kind_type = getattr(m, "EntryKind", None)
    return next(iter(kind_type)) if kind_type is not None else 0


def payload(index: int, size: int = 100) -> bytes:
    """Deterministic, index-dependent payload so any misplaced or altered byte is visible."""
    seed = hashlib.blake2b(index.to_bytes(8, "big"), digest_size=16).digest()
    return (seed * (size // 16 + 1))[:size]


def E(index: int, term: int, size: int = 100) -> m.Entry:
    return m.Entry(term=term, index=index, kind=_kind(), data=payload(index, size))


def HS(term: int, vote, commit: int) -> m.HardState:
    return m.HardState(term=term, vote=vote, commit=commit)


def meta(index: int, term: int) -> m.SnapshotMeta:
    fields = {f.name for f in __import__("msgspec").structs.fields(m.SnapshotMeta)}
    assert {"index", "term", "config"} <= fields
    config_type = next(f for f in __import__("msgspec").structs.fields(m.SnapshotMeta) if f.name == "config")
    config = config_type.default if config_type.default is not __import__("msgspec").NODEFAULT else None
    if config is None and config_type.default_factory is not __import__("msgspec").NODEFAULT:
        config = config_type.default_factory()
    return m.SnapshotMeta(index=index, term=term, config=config)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "raft")


def _open(path, **kw):
    kw.setdefault("segment_bytes", 1 << 20)       # spares of zeros are made per store: keep them small here
    return LogStore(path, map_size_bytes=MAP_SIZE, **kw)


def test_empty_store(path):
    with _open(path) as s:
        hs, snap, entries = s.initial_state()
        assert hs.term == 0 and hs.commit == 0 and snap is None and entries == []
        assert (s.first_index, s.last_index, s.last_term) == (1, 0, 0)
        assert s.entries(1, 1) == []
        assert s.snapshot() is None


def test_append_reopen_round_trip(path):
    with _open(path) as s:
        s.save(hard_state=HS(1, 1, 0), entries=[E(i, 1) for i in range(1, 51)])
        s.save(hard_state=HS(2, 2, 40), entries=[E(i, 2, size=5000) for i in range(51, 61)])
        assert (s.first_index, s.last_index, s.last_term) == (1, 60, 2)
    with _open(path) as s:
        hs, snap, entries = s.initial_state()
        assert (hs.term, hs.vote, hs.commit) == (2, 2, 40) and snap is None
        assert [e.index for e in entries] == list(range(1, 61))
        assert all(e.data == payload(e.index, len(e.data)) for e in entries)
        assert [e.term for e in entries] == [1] * 50 + [2] * 10
        assert s.term(50) == 1 and s.term(60) == 2 and s.term(0) == 0
        # bounded reads: stop once size_bytes_max is reached, but always return one entry
        assert len(s.entries(51, 61, size_bytes_max=1)) == 1
        assert len(s.entries(1, 61, size_bytes_max=100 * 10)) == 10


def test_conflicting_suffix_is_replaced(path):
    with _open(path) as s:
        s.save(hard_state=HS(1, 1, 3), entries=[E(i, 1) for i in range(1, 11)])
        s.append([E(6, 2), E(7, 2), E(8, 2)])            # a new leader overwrites 6..10
        assert (s.last_index, s.last_term) == (8, 2)
        assert [e.term for e in s.entries(1, 9)] == [1] * 5 + [2] * 3
        s.truncate_suffix(7)
        assert (s.last_index, s.last_term) == (6, 2)
    with _open(path) as s:
        assert (s.last_index, s.last_term) == (6, 2)


@pytest.mark.parametrize("bad", [
    lambda s: s.append([E(12, 1)]),                             # gap after last index 10
    lambda s: s.append([E(11, 1), E(13, 1)]),                   # not contiguous
    lambda s: s.append([E(11, 3), E(12, 2)]),                   # terms go back inside the batch
    lambda s: s.append([E(11, 0)]),                             # below its predecessor's term
    lambda s: s.save(hard_state=HS(2, 1, 12), entries=[E(11, 2)]),   # commit past the new last index
    lambda s: s.save(hard_state=HS(0, 1, 5)),                   # term goes back
    lambda s: s.truncate_suffix(5),                             # would drop committed entries
    lambda s: s.append([E(3, 2)]),                              # conflict below commit drops committed entries
    lambda s: s.compact(3),                                     # no snapshot covers it
    lambda s: s.entries(0, 5),
    lambda s: s.entries(5, 12),
])
def test_bad_writes_raise_and_change_nothing(path, bad):
    with _open(path) as s:
        s.save(hard_state=HS(1, 1, 5), entries=[E(i, 1) for i in range(1, 11)])
        before = (s.first_index, s.last_index, s.last_term, s.hard_state)
        with pytest.raises(LogStoreError):
            bad(s)
        assert (s.first_index, s.last_index, s.last_term, s.hard_state) == before
    with _open(path) as s:   # and nothing reached the disk either
        assert (s.first_index, s.last_index, s.last_term, s.hard_state) == before
        assert [e.term for e in s.entries(1, 11)] == [1] * 10


def test_entry_size_limit(path, monkeypatch):
    monkeypatch.setattr(ls, "ENTRY_SIZE_BYTES_MAX", 1000)
    with _open(path) as s:
        s.append([E(1, 1, size=1000)])
        with pytest.raises(LogStoreError, match="ENTRY_SIZE_BYTES_MAX"):
            s.append([E(2, 1, size=1001)])
        assert s.last_index == 1


def test_snapshot_compaction_and_install(path):
    with _open(path) as s:
        s.save(hard_state=HS(3, 1, 20), entries=[E(i, 3) for i in range(1, 31)])
        # the app took a snapshot at applied index 20: the suffix after it stays
        s.save_snapshot(meta(20, 3), b"state@20")
        # the prefix it covers is dropped from the index at once (no write: segments go as whole files)
        assert (s.first_index, s.last_index) == (21, 30)
        with pytest.raises(LogStoreError):
            s.compact(25)                                # beyond the snapshot
        s.save(hard_state=HS(3, 1, 25))
        assert (s.first_index, s.last_index) == (21, 30)
        s.compact(20)                                    # no-op, already gone
    with _open(path) as s:
        hs, snap, entries = s.initial_state()
        assert (snap.index, snap.term) == (20, 3) and hs.commit == 25
        assert [e.index for e in entries] == list(range(21, 31))
        assert s.snapshot()[1] == b"state@20"
        assert s.term(20) == 3
        with pytest.raises(LogStoreError):
            s.append([E(20, 3)])                         # at or below the snapshot
        # a leader's snapshot that conflicts with our log (term 5 at 40) replaces the whole log
        s.save(snapshot=(meta(40, 5), b"state@40"), hard_state=HS(5, None if _vote_optional() else 0, 40))
        assert (s.first_index, s.last_index, s.last_term) == (41, 40, 5)
        s.append([E(41, 5)])
    with _open(path) as s:
        hs, snap, entries = s.initial_state()
        assert (snap.index, hs.commit, [e.index for e in entries]) == (40, 40, [41])
        assert s.snapshot() == (snap, b"state@40")


def test_snapshot_keeps_entries_below_it_across_restarts(path):
    with _open(path) as s:
        s.save(hard_state=HS(3, 1, 30), entries=[E(i, 3) for i in range(1, 41)])
        s.save_snapshot(meta(30, 3), b"state@30", keep_from=25)      # snapshot_keep_entries = 5
        assert (s.first_index, s.last_index) == (25, 40)
        assert [e.index for e in s.entries(25, 31)] == list(range(25, 31)) and s.term(25) == 3
    with _open(path) as s:
        _hs, snap, entries = s.initial_state()
        assert snap.index == 30 and s.first_index == 25
        assert [e.index for e in entries] == list(range(25, 41))        # the kept ones first
        assert [bytes(e.data) for e in entries[:6]] == [payload(i) for i in range(25, 31)]
        with pytest.raises(LogStoreError):
            s.append([E(28, 3)])                                        # still at or below the snapshot
        # keep_from only ever keeps what is there; a later snapshot moves the kept window up
        s.save(hard_state=HS(3, 1, 40))
        s.save_snapshot(meta(38, 3), b"state@38", keep_from=10)
        assert s.first_index == 25
        s.save_snapshot(meta(40, 3), b"state@40", keep_from=36)
        assert s.first_index == 36
    with _open(path) as s:
        assert s.first_index == 36 and [e.index for e in s.initial_state()[2]] == list(range(36, 41))
        # without keep_from (a leader's snapshot, or keep 0) nothing stays below it
        s.append([E(i, 3) for i in range(41, 46)])
        s.save(hard_state=HS(3, 1, 45))
        s.save_snapshot(meta(45, 3), b"state@45")
        assert (s.first_index, s.last_index) == (46, 45)
    with _open(path) as s:
        assert (s.first_index, s.initial_state()[2]) == (46, [])


def _vote_optional():
    f = next(f for f in __import__("msgspec").structs.fields(m.HardState) if f.name == "vote")
    return f.default is None


def _segments(path):
    return sorted(glob.glob(os.path.join(path, "log-*.seg")))


def _flip_byte_after(path_of_file, marker, delta=5):
    with open(path_of_file, "rb") as f:
        blob = f.read()
    at = blob.find(marker)
    assert at >= 0
    _flip_at(path_of_file, at + delta)
    return at + delta


def _flip_at(path_of_file, at):
    with open(path_of_file, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


def test_corruption_is_detected(path):
    """A flipped bit is caught by the checksums: at open (in any segment, the last one too: damage is not
    a torn write, so it is never cut off silently) and on a read of a store already open."""
    marker = b"CORRUPT-ME-PLEASE" * 8
    with _open(path) as s:
        s.append([E(1, 1), m.Entry(term=1, index=2, kind=_kind(), data=marker), E(3, 1)])
    with _open(path) as s:
        s.append([E(4, 1)])                               # a second segment: the first is no longer the tail
        flipped = _flip_byte_after(_segments(path)[0], marker)
        assert s.entries(1, 2)[0].index == 1
        with pytest.raises(LogCorruption, match="entry 2: checksum"):
            s.entries(1, 4)
    with pytest.raises(LogCorruption, match="bad record"):
        _open(path)
    _flip_at(_segments(path)[0], flipped)                 # mend it
    marker2 = b"DAMAGE-IN-THE-LAST-SEGMENT" * 4
    with _open(path) as s:
        s.append([m.Entry(term=1, index=5, kind=_kind(), data=marker2), E(6, 1)])
    _flip_byte_after(_segments(path)[-1], marker2)
    with pytest.raises(LogCorruption, match="bad record"):
        _open(path)


_WRITER = textwrap.dedent("""
    import hashlib, sys
    from engine.raft import messages as m
    from engine.raft.log_store import LogStore
    kind_type = getattr(m, "EntryKind", None)
    kind = list(kind_type)[0] if kind_type is not None else 0
    def payload(i, size):
        seed = hashlib.blake2b(i.to_bytes(8, "big"), digest_size=16).digest()
        return (seed * (size // 16 + 1))[:size]
    s = LogStore(sys.argv[1], map_size_bytes=1 << 30, segment_bytes=1 << 18)
    term = s.hard_state.term + 1
    n = 0
    while True:
        n += 1
        lo = s.last_index + 1
        # mix: many small entries, sometimes a big one; every few batches rewrite a short uncommitted suffix
        if n % 7 == 0 and s.last_index - s.hard_state.commit >= 3:
            lo = s.last_index - 1
        count = 1 + (n * 37) % 200
        size = 64 if n % 5 else 20000
        entries = [m.Entry(term=term, index=i, kind=kind, data=payload(i, size)) for i in range(lo, lo + count)]
        commit = max(s.hard_state.commit, lo - 1 - 2)
        s.save(hard_state=m.HardState(term=term, vote=s.hard_state.vote, commit=commit), entries=entries)
        sys.stdout.write(f"{term} {s.last_index} {commit}\\n")
        sys.stdout.flush()
""")


def test_recovery_after_kill9_mid_append(path):
    """Kill a writer with SIGKILL at random points, many times; after each kill the store must reopen with
    a contiguous, checksum-valid log that contains everything the writer reported as saved."""
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = __import__("random").Random(1234)
    kills = 12
    for round_no in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, path], stdout=subprocess.PIPE, env=env)
        try:
            reported = []
            target = rng.randint(1, 40)
            while len(reported) < target:
                line = proc.stdout.readline()
                assert line, f"writer died on its own in round {round_no}"
                reported.append(tuple(int(x) for x in line.split()))
            time.sleep(rng.random() * 0.02)      # land the kill somewhere inside the next save
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        term, _last_reported, commit_reported = reported[-1]
        with _open(path) as s:
            hs, snap, entries = s.initial_state()
            assert snap is None
            assert hs.term >= term and hs.commit >= commit_reported
            # the final line may be a rewrite of a suffix, so compare against the commit point and length
            assert s.last_index >= commit_reported
            assert [e.index for e in entries] == list(range(1, s.last_index + 1))
            for e in entries:
                assert e.data == payload(e.index, len(e.data))
            assert hs.commit <= s.last_index
    assert s.last_index > 0


def test_commit_only_changes_are_deferred_to_the_next_durable_write(path):
    store = LogStore(path, sync=True, map_size_bytes=MAP_SIZE)
    store.save(hard_state=HS(2, 1, 0), entries=[E(1, 2), E(2, 2), E(3, 2)])
    store.defer_commit(HS(2, 1, 2))
    assert store.hard_state.commit == 0 and store.commit_deferred
    with pytest.raises(LogStoreError):
        store.defer_commit(HS(3, 1, 2))                 # a term change is never deferred
    with pytest.raises(LogStoreError):
        store.defer_commit(HS(2, 1, 9))                 # past the last index
    store.save(entries=[E(4, 2)])                       # the deferred commit rides along
    assert store.hard_state.commit == 2 and not store.commit_deferred
    store.defer_commit(HS(2, 1, 4))
    store._close_files()                                # a crash: the deferred commit is lost, nothing else
    again = LogStore(path, sync=True, map_size_bytes=MAP_SIZE)
    hs, _, entries = again.initial_state()
    assert hs.commit == 2 and [e.index for e in entries] == [1, 2, 3, 4]
    again.defer_commit(HS(2, 1, 3))
    again.close()                                       # a clean close writes it
    third = LogStore(path, sync=True, map_size_bytes=MAP_SIZE)
    assert third.hard_state.commit == 3
    third.close()


def test_snapshot_from_a_file_is_moved_in_verified_and_cleaned_up(path, tmp_path):
    import zlib
    store = LogStore(path, sync=True, map_size_bytes=MAP_SIZE)
    store.save(hard_state=HS(1, 1, 5), entries=[E(i, 1) for i in range(1, 11)])
    data = payload(999, 300_000)
    made = tmp_path / "made.bin"
    made.write_bytes(data)
    meta = m.SnapshotMeta(index=6, term=1, config=[1, 2, 3])
    store.save_snapshot(meta, ls.SnapshotFile(str(made), len(data), zlib.crc32(data)))
    assert not made.exists() and os.path.dirname(store.snapshot_file_path) == store.path
    assert store.snapshot() == (meta, data) and store.first_index == 7
    # a stray file (a save that crashed before its transaction) is removed at the next open
    stray = os.path.join(store.path, "snapshot-99-9.bin")
    with open(stray, "wb") as f:
        f.write(b"x")
    store.close()
    again = LogStore(path, sync=True, map_size_bytes=MAP_SIZE)
    assert not os.path.exists(stray) and again.snapshot() == (meta, data)
    # an in-LMDB snapshot (from a leader) replaces it and the file goes
    meta2 = m.SnapshotMeta(index=8, term=1, config=[1, 2, 3])
    again.save_snapshot(meta2, b"small")
    assert again.snapshot_file_path is None and not glob.glob(os.path.join(again.path, "snapshot-*.bin"))
    assert again.snapshot() == (meta2, b"small")
    # a damaged file is detected
    made.write_bytes(data)
    meta3 = m.SnapshotMeta(index=9, term=1, config=[1, 2, 3])
    again.save_snapshot(meta3, ls.SnapshotFile(str(made), len(data), zlib.crc32(data)))
    with open(again.snapshot_file_path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff")
    with pytest.raises(LogCorruption):
        again.snapshot()
    again.close()


def test_compaction_deletes_whole_segments_and_survives_restarts(path):
    """Compaction writes nothing: the index forgets the prefix and the oldest segments whose entries are all
    below it are deleted as files. A leader's snapshot past the log replaces it (a TRUNCATE record first)."""
    with _open(path, segment_bytes=1 << 16) as s:
        for lo in range(1, 101, 5):
            s.save(hard_state=HS(2, 1, lo - 1), entries=[E(i, 2, size=5000) for i in range(lo, lo + 5)])
        made = len(_segments(path))
        assert made >= 6 and s.segment_count == made
        s.save_snapshot(meta(60, 2), b"state@60")
        assert (s.first_index, s.last_index) == (61, 100)
        deadline = time.monotonic() + 10          # the files are deleted by the store's background thread
        while len(_segments(path)) > made - s.segments_removed and time.monotonic() < deadline:
            time.sleep(0.01)
        left = _segments(path)
        assert 2 <= len(left) < made and s.segments_removed == made - len(left) and s.segment_count == len(left)
        assert [e.index for e in s.entries(61, 101)] == list(range(61, 101))
    with _open(path, segment_bytes=1 << 16) as s:
        hs, snap, entries = s.initial_state()
        assert (s.first_index, s.last_index, snap.index, hs.commit) == (61, 100, 60, 95)
        assert [e.index for e in entries] == list(range(61, 101))
        assert all(e.data == payload(e.index, 5000) for e in entries) and s.term(61) == 2
        # a leader's snapshot that our log does not hold: the log goes, and stays gone after a restart
        s.save(snapshot=(meta(150, 3), b"state@150"), hard_state=HS(3, None if _vote_optional() else 0, 150))
        assert (s.first_index, s.last_index, s.last_term) == (151, 150, 3)
        s.append([E(151, 3)])
    with _open(path, segment_bytes=1 << 16) as s:
        hs, snap, entries = s.initial_state()
        assert (s.first_index, s.last_index, snap.index, hs.commit) == (151, 151, 150, 150)
        assert [e.index for e in entries] == [151]
        assert len(_segments(path)) <= 2


def test_a_crash_between_the_truncate_record_and_the_snapshot_leaves_a_valid_log(path):
    with _open(path) as s:
        s.save(hard_state=HS(2, 1, 10), entries=[E(i, 2) for i in range(1, 31)])
        s._write_records([], None, 11)        # what installing a snapshot that replaces the log writes first
        s._close_files()                      # killed before the snapshot's LMDB commit
    with _open(path) as s:
        hs, snap, entries = s.initial_state()
        assert snap is None and hs.commit == 10 and [e.index for e in entries] == list(range(1, 11))


def test_a_torn_tail_is_cut_and_a_bad_record_elsewhere_is_corruption(path):
    with _open(path) as s:
        s.save(hard_state=HS(1, 1, 3), entries=[E(i, 1) for i in range(1, 6)])
        end = s._active.end
    last = _segments(path)[-1]
    record = ls._record(ls.REC_ENTRY, int(_kind()), 6, 1, payload(6, 9000)) + payload(6, 9000)
    cut = (end // 4096 + 1) * 4096 - end      # a kill stops the copy into the page cache at a page boundary
    with open(last, "r+b") as f:              # part of a record: a save killed before its fdatasync returned
        f.seek(end)
        f.write(record[:cut])
    with _open(path) as s:
        assert s.last_index == 5 and os.path.getsize(last) == end
        s.append([E(6, 1)])                   # goes to a new segment; the cut one is now in the middle
    with _open(path) as s:
        assert [e.index for e in s.initial_state()[2]] == list(range(1, 7))
    with open(last, "r+b") as f:              # damage a record header in a segment that is not the last
        f.seek(ls.SEGMENT_HEADER.size + ls.RECORD_HEADER.size + 8)
        f.write(b"\xff")
    with pytest.raises(LogCorruption, match="bad record"):
        _open(path)


def test_a_segment_whose_roll_was_cut_short_is_removed(path):
    with _open(path) as s:
        s.save(hard_state=HS(1, 1, 2), entries=[E(i, 1) for i in range(1, 4)])
    empty = os.path.join(path, "log-00000000000000ff.seg")
    open(empty, "wb").close()                 # created, killed before its header was written
    with _open(path) as s:
        assert not os.path.exists(empty) and s.last_index == 3
        s.append([E(4, 1)])
    with _open(path) as s:
        assert [e.index for e in s.initial_state()[2]] == [1, 2, 3, 4]


def test_segments_are_made_from_zero_filled_spares(path):
    """New segments come from spare files of written zeros made by a background thread (an fdatasync into
    fallocated blocks waits on the filesystem journal); a spare renamed in but killed before its header was
    written is a zero-filled last segment, removed at the next open; no spare outlives the store."""
    with _open(path, segment_bytes=1 << 18) as s:
        for lo in range(1, 200, 10):
            deadline = time.monotonic() + 5
            while not s._spares.has_ready and time.monotonic() < deadline:
                time.sleep(0.005)                       # a spare is written slowly, a chunk at a time
            s.save(hard_state=HS(1, 1, lo - 1), entries=[E(i, 1, size=5000) for i in range(lo, lo + 10)])
        made = _segments(path)
        assert len(made) >= 3 and s.segments_fallocated == 0
        for seg in made:
            assert os.path.getsize(seg) == 1 << 18      # renamed spares, not files that grew
    assert not glob.glob(os.path.join(path, "spare-*.tmp"))
    zeroed = os.path.join(path, "log-00000000000000ff.seg")
    with open(zeroed, "wb") as f:
        f.write(bytes(1 << 18))
    with _open(path, segment_bytes=1 << 18) as s:
        assert not os.path.exists(zeroed) and s.last_index == 200
        assert [e.index for e in s.initial_state()[2]] == list(range(1, 201))


def test_a_store_with_its_log_in_lmdb_is_moved_into_segments(path):
    """Stores written before the segment log kept entries in an LMDB table: the first open moves them."""
    import zlib

    import lmdb
    os.makedirs(path)
    env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=4, subdir=True)
    entries_db, state_db = env.open_db(b"entries"), env.open_db(b"state")
    with env.begin(write=True) as txn:
        for i in range(1, 21):
            data = payload(i)
            crc = zlib.crc32(data, zlib.crc32(__import__("struct").pack("<QQB", i, 2, int(_kind()))))
            txn.put(i.to_bytes(8, "big"), ls.ENTRY_HEADER.pack(crc, 2, int(_kind()), len(data)) + data,
                    db=entries_db)
        hs = __import__("msgspec").msgpack.encode(HS(2, 1, 15))
        txn.put(b"hard_state", ls._wrap(hs), db=state_db)
    env.close()
    for _ in range(2):
        with _open(path) as s:
            hs, snap, entries = s.initial_state()
            assert hs.commit == 15 and snap is None
            assert [(e.index, e.term) for e in entries] == [(i, 2) for i in range(1, 21)]
            assert all(e.data == payload(e.index) for e in entries)
    env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=4, subdir=True)
    with env.begin() as txn:
        assert txn.get(b"entries") is None
    env.close()


class _Model:
    """What the store must hold: the log after the snapshot, the snapshot, and the commit that must survive
    a crash (written with an append, a snapshot or a close) next to the one only in memory (deferred)."""

    def __init__(self):
        self.log = {}                 # index -> (term, size)
        self.snap = (0, 0)
        self.commit = 0
        self.durable_commit = 0
        self.term = 1

    @property
    def last(self):
        return max(self.log) if self.log else self.snap[0]

    def term_at(self, index):
        return self.snap[1] if index == self.snap[0] else self.log[index][0]


def _check(s, model):
    assert s.last_index == model.last, (s.last_index, model.last, s.first_index)
    assert s.last_term == (model.term_at(model.last) if model.last else 0)
    snap = s.snapshot_meta
    assert (snap.index, snap.term) if snap is not None else (0, 0) == model.snap
    assert model.durable_commit <= s.hard_state.commit <= s.last_index
    lo = model.snap[0] + 1
    got = s.entries(lo, model.last + 1, size_bytes_max=None)
    assert [(e.index, e.term, len(e.data)) for e in got] == [(i, *model.log[i]) for i in range(lo, model.last + 1)]
    assert all(e.data == payload(e.index * 7 + e.term, len(e.data)) for e in got)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_crashes_and_torn_tails_match_a_model(path, seed):
    """Random appends (with conflicting suffixes), commits (durable and deferred), own and leaders'
    snapshots, truncations, clean reopens, crashes and crashes in the middle of a write (half a record at
    the tail), over segments of 64 KiB: after every step the store holds exactly what the model says, and
    no commit that was written is ever lost."""
    import random
    rng = random.Random(seed)
    model = _Model()

    def entry(i, t):
        size = rng.choice([8, 100, 3000, 20000])
        return m.Entry(term=t, index=i, kind=_kind(), data=payload(i * 7 + t, size))

    s = _open(path, segment_bytes=1 << 16)
    for _step in range(250):
        op = rng.random()
        floor = max(model.commit, model.snap[0])
        if op < 0.45:                                              # append, maybe over an uncommitted suffix
            lo = rng.randint(floor + 1, model.last + 1)
            if rng.random() < 0.1:
                model.term += 1
            es = [entry(i, model.term) for i in range(lo, lo + rng.randint(1, 6))]
            commit = rng.randint(model.commit, es[-1].index) if rng.random() < 0.5 else None
            hs = HS(model.term, 1, commit) if commit is not None else None
            s.save(hard_state=hs, entries=es)
            for i in [i for i in model.log if i >= lo]:
                del model.log[i]
            for e in es:
                model.log[e.index] = (e.term, len(e.data))
            if commit is not None:
                model.commit = max(model.commit, commit)
            model.durable_commit = max(model.durable_commit, model.commit)   # rides along with entries
        elif op < 0.55 and model.last > model.commit:              # commit only: deferred, no sync
            model.commit = rng.randint(model.commit + 1, model.last)
            s.defer_commit(HS(s.hard_state.term, s.hard_state.vote, model.commit))
        elif op < 0.63 and model.commit > model.snap[0]:           # own snapshot at a committed index
            at = rng.randint(model.snap[0] + 1, model.commit)
            s.save_snapshot(meta(at, model.term_at(at)), b"state@%d" % at)
            model.snap = (at, model.term_at(at))
            for i in [i for i in model.log if i <= at]:
                del model.log[i]
            model.durable_commit = max(model.durable_commit, model.commit)
        elif op < 0.67:                                            # a leader's snapshot past our log
            model.term += 1
            at = model.last + rng.randint(1, 50)
            s.save(snapshot=(meta(at, model.term), b"leader@%d" % at),
                   hard_state=HS(model.term, None if _vote_optional() else 0, at))
            model.log.clear()
            model.snap = (at, model.term)
            model.commit = model.durable_commit = at
        elif op < 0.73 and model.last > floor:                     # drop an uncommitted suffix
            frm = rng.randint(floor + 1, model.last)
            s.truncate_suffix(frm)
            for i in [i for i in model.log if i >= frm]:
                del model.log[i]
            model.durable_commit = model.commit                    # a deferred commit rides along
        elif op < 0.8:                                             # clean reopen: the deferred commit is kept
            s.close()
            model.durable_commit = model.commit
            s = _open(path, segment_bytes=1 << 16)
        elif op < 0.9:                                             # crash: the deferred commit may be lost
            s._close_files()
            s = _open(path, segment_bytes=1 << 16)
            model.commit = s.hard_state.commit
        else:                                                      # crash in the middle of a write
            end = s._active.end if s._active is not None else None
            seg = s._active.path if s._active is not None else None
            s._close_files()
            if end is not None and seg is not None:
                torn = payload(1, 9000)
                rec = ls._record(ls.REC_ENTRY, int(_kind()), model.last + 1, model.term, torn) + torn
                cut = (end // 4096 + 1) * 4096 - end
                with open(seg, "r+b") as f:
                    f.seek(end)
                    f.write(rec[:cut])
            s = _open(path, segment_bytes=1 << 16)
            model.commit = s.hard_state.commit
        _check(s, model)
    s.close()
    with _open(path, segment_bytes=1 << 16) as s:
        model.durable_commit = model.commit
        _check(s, model)
