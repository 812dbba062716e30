"""``zwallet export-pg`` (query/export_pg.py): a real shard's events into a real PostgreSQL, exactly once.

A private PostgreSQL (engine/devtools/pg_server.py, Debian's packages) and a local system of 2 shards x 1 replica
(engine.devtools.up.LocalSystem, no Marker, no gateway, no fsync: light) are shared by the module; each test
gets a database of its own. The exporter runs as the real command in a subprocess (kill -9 of it mid-run),
PostgreSQL is killed with SIGKILL mid-run and restarted on the same data directory; after each, the tables
must equal the shards' events exactly (every row compared), with account_versions' last available per
account equal to the shard's get_account.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

psycopg = pytest.importorskip("psycopg")

from engine import records as R  # noqa: E402
from engine.devtools.local_raft import _child_env, _repo_root  # noqa: E402

ACCOUNTS = 200
CURRENCIES = ("USD", "EURO")         # two currency lengths: the encoder's grouped rows
WAIT_S = 60.0


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pg_server(tmp_path_factory) -> Iterator[Any]:
    from engine.devtools.pg_server import PostgresServer
    server = PostgresServer(tmp_path_factory.mktemp("pg"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _dsn_for(pg: Any, dbname: str) -> str:
    return f"host=127.0.0.1 port={pg.port} user=postgres dbname={dbname} connect_timeout=5"


@pytest.fixture
def dsn(pg_server) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return _dsn_for(pg_server, name)


class Load:
    """Accounts and transfers on every shard of a LocalSystem, through the real client."""

    def __init__(self, system: Any) -> None:
        from engine.client import Client
        self.system = system
        self.clients = {sid: Client(c.client_addresses, timeout_s=30, keys=system.client_keys)
                        for sid, c in system.shards.items()}
        self.next_dedup = 1
        self.rng = np.random.default_rng(7)
        from engine.devtools.checks import accounts_by_shard
        # 128-bit ids: numeric(39, 0) must carry them whole
        self.ids = accounts_by_shard(system.system, ACCOUNTS, start=(1 << 100) + 1)
        for sid, cl in self.clients.items():
            for a in range(1, ACCOUNTS + 1):
                cur = CURRENCIES[a % 2]
                r = cl.create_account(self._dedup(), self.account(sid, a), cur, lower_limit=None)
                assert r.ok, r

    def account(self, sid: int, a: int) -> int:
        return self.ids[sid][a - 1]

    def _dedup(self) -> int:
        self.next_dedup += 1
        return self.next_dedup

    def transfers(self, per_shard: int, batch: int = 4000) -> None:
        for sid, cl in self.clients.items():
            done = 0
            while done < per_shard:
                n = min(batch, per_shard - done)
                cls = int(self.rng.integers(0, 2))       # accounts a with a % 2 == cls share CURRENCIES[cls]
                half = ACCOUNTS // 2
                k = self.rng.integers(0, half, n)
                offset = 2 if cls == 0 else 1
                frm = 2 * k + offset
                to = 2 * ((k + self.rng.integers(1, half, n)) % half) + offset
                ops = R.transfers(np.arange(self.next_dedup + 1, self.next_dedup + 1 + n), frm, to,
                                  self.rng.integers(1, 10_000, n), CURRENCIES[cls])
                self.next_dedup += n
                R.put_u128(ops["account_id"], [self.account(sid, int(x)) for x in frm])
                R.put_u128(ops["other_id"], [self.account(sid, int(x)) for x in to])
                cl.apply_batch(ops)
                done += n

    def heads(self) -> dict[int, int]:
        return {sid: int(cl.status().get("last_seq", 0)) for sid, cl in self.clients.items()}

    def close(self) -> None:
        for cl in self.clients.values():
            cl.close()


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Iterator[tuple[Any, Load]]:
    from engine.devtools.up import LocalSystem
    sysm = LocalSystem(str(tmp_path_factory.mktemp("sys")), shards=2, replicas=1, sync=False, marker=False,
                       gateways=0)
    load = None
    try:
        sysm.start()
        load = Load(sysm)
        load.transfers(10_000)
        yield sysm, load
    finally:
        if load is not None:
            load.close()
        sysm.close()


# ------------------------------------------------------------------------------------------ helpers
class Exporter:
    """``zwallet export-pg`` as a subprocess (stdout and stderr to a file)."""

    def __init__(self, system_path: str, dsn: str, log_path: str, *extra: str) -> None:
        self.log_path = log_path
        cmd = [sys.executable, "-m", "engine.cli", "export-pg", "--system", system_path, "--dsn", dsn,
               "--progress-interval-s", "0.5", *extra]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=_repo_root(),
                                     env=_child_env())

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode

    def wait(self, timeout_s: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.log.close()


def checkpoints(dsn: str) -> dict[int, int]:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return {int(s): int(q) for s, q in conn.execute("SELECT shard_id, last_seq FROM export_checkpoint")}
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return {}


def wait_for(what: str, pred: Any, exporter: Exporter | None = None, timeout_s: float = WAIT_S,
             poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if exporter is not None and exporter.proc.poll() is not None:
            raise AssertionError(f"the exporter exited ({exporter.proc.returncode}) before {what}:\n"
                                 f"{exporter.output()[-3000:]}")
        if time.monotonic() > deadline:
            out = exporter.output()[-3000:] if exporter is not None else ""
            raise AssertionError(f"timed out waiting for {what}\n{out}")
        time.sleep(poll_s)


def assert_export_equals_shards(dsn: str, load: Load) -> None:
    """Every events row equals the shard's event record, no more and no fewer; the checkpoint is the
    shard's head; account_versions is every account part, its last available per account the shard's."""
    heads = load.heads()
    with psycopg.connect(dsn, autocommit=True) as conn:
        cps = {int(s): int(q) for s, q in conn.execute("SELECT shard_id, last_seq FROM export_checkpoint")}
        assert cps == heads
        for sid, cl in load.clients.items():
            evs = cl.events(1, heads[sid])
            rows = conn.execute('SELECT seq_num, part, parts, "timestamp", dedup_id, account_id, other_id, amount, '
                                "available, version, kind, state, code, currency FROM events WHERE shard_id = %s "
                                "ORDER BY seq_num, part", (sid,)).fetchall()
            expect = list(zip(evs["seq_num"].tolist(), evs["part"].tolist(), evs["parts"].tolist(),
                              evs["timestamp"].tolist(), R.get_u128(evs["dedup_id"]), R.get_u128(evs["account_id"]),
                              R.get_u128(evs["other_id"]), R.get_i128(evs["amount"]), R.get_i128(evs["available"]),
                              evs["version"].tolist(), evs["kind"].tolist(), evs["state"].tolist(),
                              evs["code"].tolist(), [bytes(c).decode() for c in evs["currency"]]))
            got = [tuple(int(v) if not isinstance(v, str) else v for v in r) for r in rows]
            assert len(got) == len(expect), f"shard {sid}: {len(got)} rows, {len(expect)} event records"
            assert got == expect, f"shard {sid}: the events table differs from the shard's events"
            nacct = int(np.count_nonzero((evs["account_id"][:, 0] | evs["account_id"][:, 1]) != 0))
            (nver,) = conn.execute("SELECT count(*) FROM account_versions WHERE shard_id = %s", (sid,)).fetchone()
            assert nver == nacct
            last = conn.execute("SELECT DISTINCT ON (account_id) account_id, available, version FROM account_versions "
                                "WHERE shard_id = %s ORDER BY account_id, seq_num DESC, part DESC", (sid,)).fetchall()
            assert len(last) == ACCOUNTS
            for acct, available, version in last:
                acc = cl.get_account(int(acct))
                assert acc is not None
                assert (int(available), int(version)) == (acc["available"], acc["version"]), acct


# ------------------------------------------------------------------------------------------ tests
def test_export_equals_the_shards_events_and_follows_live_writes(system, dsn, tmp_path):
    sysm, load = system
    ex = Exporter(sysm.system_path, dsn, str(tmp_path / "export.log"))
    try:
        wait_for("the backlog exported", lambda: checkpoints(dsn) == load.heads(), ex)
        load.transfers(1_000, batch=250)            # live: through the subscriber's PUB path
        wait_for("the live writes exported", lambda: checkpoints(dsn) == load.heads(), ex)
        assert_export_equals_shards(dsn, load)
    finally:
        code = ex.stop()
    out = ex.output()
    assert code == 0, out
    assert "ready" in out and "records/s" in out and "stopped" in out, out


def _freeze_mid_run(ex: Exporter, dsn: str, load: Load) -> dict[int, int]:
    """Let the exporter commit its first batch, then SIGSTOP it (so the crash that follows is certainly
    mid-run: the shards' backlog is not all exported yet); the checkpoints at that moment."""
    heads = load.heads()
    wait_for("the tables", lambda: checkpoints(dsn) != {}, ex, poll_s=0.005)
    with psycopg.connect(dsn, autocommit=True) as conn:
        def exported() -> int:
            return int(conn.execute("SELECT sum(last_seq) FROM export_checkpoint").fetchone()[0])
        wait_for("a first batch", lambda: exported() > 0, ex, poll_s=0.002)
        ex.proc.send_signal(signal.SIGSTOP)
    cps = checkpoints(dsn)
    assert 0 < sum(cps.values()) < sum(heads.values()), ("not mid-run", cps, heads)
    return cps


def test_kill9_of_the_exporter_mid_run_then_restart_no_duplicate_no_hole(system, dsn, tmp_path):
    sysm, load = system
    log = str(tmp_path / "export.log")
    ex = Exporter(sysm.system_path, dsn, log, "--batch-records", "200", "--flush-interval-ms", "5",
                  "--connections", "1")
    try:
        _freeze_mid_run(ex, dsn, load)
        ex.kill9()
        cps = checkpoints(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:      # what was committed is exactly the checkpoint
            for sid, q in cps.items():
                n, top = conn.execute("SELECT count(DISTINCT seq_num), coalesce(max(seq_num), 0) FROM events "
                                      "WHERE shard_id = %s", (sid,)).fetchone()
                assert (n, top) == (q, q)
        writer = threading.Thread(target=load.transfers, args=(1_000, 250))
        writer.start()
        ex = Exporter(sysm.system_path, dsn, log)
        writer.join()
        wait_for("the export caught up after the restart", lambda: checkpoints(dsn) == load.heads(), ex)
        assert_export_equals_shards(dsn, load)
    finally:
        ex.stop()


def _postmaster_pid(pg: Any) -> int:
    with open(os.path.join(pg.data_dir, "postmaster.pid")) as f:
        return int(f.readline())


def _kill9_postgres(pg: Any) -> None:
    """SIGKILL of the postmaster and every process it started (a crash of the whole server). The
    postmaster is stopped first so that it forks no process we would miss."""
    pid = _postmaster_pid(pg)
    os.kill(pid, signal.SIGSTOP)
    procs = [pid]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        procs.append(int(d))
            except (OSError, ValueError):
                pass
    for p in procs:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def alive(p: int) -> bool:
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.monotonic() + 10
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in procs)
    # The dead postmaster may stay a zombie (its parent, this VM's init, reaps late): a zombie's pid still
    # answers kill(pid, 0), so the new postmaster would take the stale lock file for a running server.
    for stale in (os.path.join(pg.data_dir, "postmaster.pid"),
                  os.path.join(pg.socket_dir, f".s.PGSQL.{pg.port}.lock")):
        if os.path.exists(stale):
            os.unlink(stale)


def _restart_postgres(pg: Any) -> None:
    """Start the same cluster again (crash recovery replays its WAL), same port."""
    pg_ctl = os.path.join(pg.bindir, "pg_ctl")
    cmd = [pg_ctl, "-D", pg.data_dir, "-l", pg.log_path, "-w", "-t", "60", "start"]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=90,
                       cwd=pg.root)
    if r.returncode != 0:
        with open(pg.log_path) as f:
            raise AssertionError(f"{r.stdout}\n{f.read()[-2000:]}")


def test_kill9_of_postgres_mid_run_the_exporter_resumes(system, pg_server, dsn, tmp_path):
    sysm, load = system
    ex = Exporter(sysm.system_path, dsn, str(tmp_path / "export.log"), "--batch-records", "200",
                  "--flush-interval-ms", "5")
    try:
        _freeze_mid_run(ex, dsn, load)
        _kill9_postgres(pg_server)
        ex.proc.send_signal(signal.SIGCONT)          # it finds the database gone and retries with backoff
        writer = threading.Thread(target=load.transfers, args=(1_000, 250))
        writer.start()
        time.sleep(1.0)
        _restart_postgres(pg_server)
        writer.join()
        wait_for("the export caught up after the database came back", lambda: checkpoints(dsn) == load.heads(), ex)
        assert_export_equals_shards(dsn, load)
        out = ex.output()
        assert "database unavailable" in out or "database write failed" in out, out
        assert "database back" in out, out
    finally:
        code = ex.stop()
    assert code == 0, ex.output()


def test_checkpoint_ahead_of_the_shard_is_a_clear_error(system, dsn, tmp_path):
    sysm, load = system
    from query.export_pg import PgExporter
    ex = PgExporter.connect(dsn)
    try:
        ex.create_schema()
        ex.checkpoints([1, 2])
        # a database holding another system's longer export: rows and checkpoint consistent, past the shard
        head = load.heads()[1]
        evs = np.zeros(head + 10, dtype=R.EVENT_DTYPE)
        evs["seq_num"] = np.arange(1, head + 11)
        evs["parts"] = 1
        evs["currency"] = b"USD"
        ex.write({1: evs})
    finally:
        ex.close()
    run = Exporter(sysm.system_path, dsn, str(tmp_path / "export.log"))
    code = run.wait()
    out = run.output()
    assert code == 1, out
    assert f"export_checkpoint is at seq {head + 10} but the shard's events end at seq {head}" in out, out


def test_rows_no_checkpoint_covers_are_a_clear_error_and_a_duplicate_is_never_ignored(dsn):
    from query.export_pg import ExportError, PgExporter
    evs = np.zeros(6, dtype=R.EVENT_DTYPE)
    evs["seq_num"] = [1, 2, 2, 3, 4, 5]
    evs["part"] = [0, 0, 1, 0, 0, 0]
    evs["parts"] = [1, 2, 2, 1, 1, 1]
    evs["currency"] = b"USD"
    R.put_u128(evs["account_id"], [1, 2, 3, 1, 2, 3])
    ex = PgExporter.connect(dsn)
    try:
        ex.create_schema()
        assert ex.checkpoints([1]) == {1: 0}
        assert ex.write({1: evs[:3]}) == 3
        # someone else wrote seq 3 without moving the checkpoint: the primary key refuses the batch
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO events SELECT shard_id, 3, part, parts, \"timestamp\", dedup_id, account_id, "
                         "other_id, amount, available, version, kind, state, code, currency FROM events "
                         "WHERE shard_id = 1 AND seq_num = 1")
        with pytest.raises(psycopg.errors.UniqueViolation):
            ex.write({1: evs[3:]})
        assert checkpoints(dsn) == {1: 2}
        with pytest.raises(ExportError, match="the events table ends at seq 3"):
            ex.checkpoints([1])
    finally:
        ex.close()


def test_a_batch_that_does_not_continue_the_checkpoint_is_refused(dsn):
    from query.export_pg import ExportError, PgExporter
    ex = PgExporter.connect(dsn)

    def batch(seqs: list[int], parts: list[tuple[int, int]] | None = None) -> np.ndarray:
        evs = np.zeros(len(seqs), dtype=R.EVENT_DTYPE)
        evs["seq_num"] = seqs
        pp = parts or [(0, 1)] * len(seqs)
        evs["part"] = [p for p, _ in pp]
        evs["parts"] = [n for _, n in pp]
        evs["currency"] = b"BTC"
        return evs
    try:
        ex.create_schema()
        ex.checkpoints([3])
        assert ex.write({3: batch([1, 2])}) == 2
        for bad, why in [(batch([4, 5]), "a hole"), (batch([2, 3]), "a repeat"), (batch([3, 5]), "a hole or out of"),
                         (batch([3, 4], [(0, 1), (0, 2)]), "not whole"), (batch([3, 3], [(0, 2), (0, 2)]), "not whole"),
                         (batch([3, 4, 4], [(0, 1), (1, 2), (0, 2)]), "not whole")]:
            with pytest.raises(ExportError, match=why):
                ex.write({3: bad})
        wrong = batch([3])
        wrong["reserved2"] = 1
        with pytest.raises(ExportError, match="reserved2"):
            ex.write({3: wrong})
        with pytest.raises(ExportError, match="EVENT_DTYPE"):
            ex.write({3: np.zeros(2, dtype=R.OP_DTYPE)})
        assert checkpoints(dsn) == {3: 2}
        assert ex.write({3: batch([3, 4, 4], [(0, 1), (0, 2), (1, 2)])}) == 3
        assert checkpoints(dsn) == {3: 4}
    finally:
        ex.close()


def test_numeric_encoding_round_trips_128_bit_values(dsn):
    """Ids up to 2**128 - 1 and amounts from -2**127 to 2**127 - 1 come back exactly."""
    from query.export_pg import PgExporter
    values_u = [0, 1, 9_999, 10_000, (1 << 64) - 1, 1 << 64, (1 << 100) + 12345, R.U128_MAX]
    values_i = [0, -1, 1, R.I128_MIN, R.I128_MAX, -(1 << 64), (1 << 63), -(10 ** 30)]
    evs = np.zeros(len(values_u), dtype=R.EVENT_DTYPE)
    evs["seq_num"] = np.arange(1, len(evs) + 1)
    evs["parts"] = 1
    evs["currency"] = [b"A", b"BB", b"CCC", b"DDDD", b"EEEEE", b"FFFFFF", b"GGGGGGG", b"HHHHHHHH"]
    R.put_u128(evs["dedup_id"], values_u)
    R.put_u128(evs["account_id"], values_u[::-1])
    R.put_i128(evs["amount"], values_i)
    R.put_i128(evs["available"], values_i[::-1])
    evs["timestamp"] = 1_700_000_000_123
    ex = PgExporter.connect(dsn)
    try:
        ex.create_schema()
        ex.checkpoints([1])
        ex.write({1: evs})
    finally:
        ex.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT dedup_id, account_id, amount, available, currency FROM events ORDER BY seq_num"
                            ).fetchall()
        assert [tuple(int(v) for v in r[:4]) for r in rows] == list(zip(values_u, values_u[::-1], values_i,
                                                                        values_i[::-1]))
        assert [r[4] for r in rows] == [bytes(c).decode() for c in evs["currency"]]
        (t,) = conn.execute("SELECT DISTINCT extract(epoch FROM \"time\") * 1000 FROM account_versions").fetchone()
        assert int(t) == 1_700_000_000_123
        # account id 0 (the last record's account) is no account change
        (n,) = conn.execute("SELECT count(*) FROM account_versions").fetchone()
        assert n == len(evs) - 1


def test_bad_dsn_and_unreachable_database_are_clear_errors(system, tmp_path):
    sysm, _ = system
    from engine.devtools.pg_server import free_port
    bad = Exporter(sysm.system_path, "this is = not a dsn ==", str(tmp_path / "bad.log"))
    assert bad.wait() == 2
    assert "bad --dsn" in bad.output(), bad.output()
    port = free_port()
    gone = Exporter(sysm.system_path, f"host=127.0.0.1 port={port} dbname=x user=postgres connect_timeout=2",
                    str(tmp_path / "gone.log"))
    assert gone.wait() == 2
    out = gone.output()
    assert "cannot connect to PostgreSQL" in out and f"port={port}" in out, out


def test_events_pruned_from_every_replica_are_a_hole_never_skipped(dsn, tmp_path):
    """A shard whose event stores pruned seqs the export has not reached: the exporter stops with a clear
    error instead of starting after the hole."""
    from engine.client import ClientError
    from engine.devtools.up import LocalSystem
    with LocalSystem(str(tmp_path / "sys"), shards=1, replicas=1, sync=False, marker=False, gateways=0,
                     node_settings={"event_retention_seqs": 1000, "snapshot_threshold_entries": 10,
                                    "snapshot_keep_entries": 2}) as sysm:
        sysm.start()
        load = Load(sysm)
        try:
            deadline = time.monotonic() + WAIT_S
            while True:                                  # write until a snapshot pruned seq 1 away
                load.transfers(2_000, batch=200)
                try:
                    load.clients[1].events(1, 1)
                except ClientError:
                    break
                assert time.monotonic() < deadline, "the event store never pruned"
            ex = Exporter(sysm.system_path, dsn, str(tmp_path / "export.log"))
            code = ex.wait()
        finally:
            load.close()
    out = ex.output()
    assert code == 1, out
    assert "shard 1: events from seq 1 are in no replica's event store" in out and "never skipped" in out, out
    assert checkpoints(dsn) == {1: 0}


def test_bench_export_pg_runs_and_checks_what_it_exported(pg_server, tmp_path):
    """The benchmark's own path (event store -> prepare -> CommitPipeline of 2 connections -> PostgreSQL),
    tiny: it asserts the exported row count and last seq itself."""
    from bench.bench_export_pg import make_store, one_run
    store, last_seq = make_store(str(tmp_path / "events"), 6000, 100)
    try:
        r = one_run(pg_server, store, last_seq, 1000, 2, 0)
    finally:
        store.close()
    assert r["records_s"] > 0 and r["seqs_s"] > 0
