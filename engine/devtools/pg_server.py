"""A throwaway PostgreSQL server (the baseline benchmark, the export tests, ``zwallet demo``), started from
the distribution's packages.

    with PostgresServer("/tmp/somewhere") as pg:      # initdb + start; stop (always) on exit
        print(pg.dsn, pg.settings())

What it does, and says so on stdout:

1. ``ensure_installed()`` finds ``initdb``/``pg_ctl``/``postgres`` under ``/usr/lib/postgresql/*/bin``
   (the newest version there). If there are none it runs ``apt-get update`` and
   ``apt-get install -y postgresql`` (Debian's package; needs root) and looks again.
2. ``initdb`` of a fresh cluster (UTF8, C locale, trust authentication: it listens on 127.0.0.1 only).
   As root, initdb and postgres refuse to run, so both run as the ``postgres`` system user (created by the
   Debian package) through ``runuser``; the data directory is then owned by ``postgres``.
3. Starts it with the durability a bank would run with: ``fsync=on``, ``synchronous_commit=on``,
   ``full_page_writes=on`` (``wal_sync_method`` is the platform default, reported by ``settings()``), plus
   ordinary tuning for a 24 GiB machine (``shared_buffers``, a large ``max_wal_size`` so no checkpoint
   storm lands in a short benchmark), on ``127.0.0.1:port`` (a free port if not given) and a unix socket
   in the same temporary directory.
4. ``stop()`` stops it (``pg_ctl stop -m fast``, then immediate, then SIGKILL of the postmaster), also when
   the ``with`` block raises, on SIGTERM (turned into SystemExit while the server runs, unless the program
   has a handler of its own) and at interpreter exit; it is idempotent.

Where the files go: a fresh ``base_dir/pg-XXXX`` (data/, socket/, server.log) when the ``postgres`` user
can reach ``base_dir``; it is left there for the caller to inspect or delete. When it cannot (a directory
below a 0700 parent, such as pytest's ``/tmp/pytest-of-root`` or a ``mkdtemp`` directory of root's), a
private directory is made with ``tempfile.mkdtemp(prefix="zwallet-pg-", dir="/var/tmp")`` (disk-backed,
never a tmpfs: the point is to measure fsync), and that directory, which this class created, is removed
by ``stop()``. Nothing else outside ``base_dir`` is touched.
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

PG_USER = "postgres"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30

# Durability first (these are what the comparison is about), then ordinary tuning.
DEFAULT_SETTINGS: dict[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "300",
    "shared_buffers": "1GB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "wal_buffers": "64MB",
    "work_mem": "16MB",
    "maintenance_work_mem": "256MB",
    "max_locks_per_transaction": "256",
    "jit": "off",                       # OLTP: compiling plans costs more than it saves
    "listen_addresses": "'127.0.0.1'",
    "log_min_messages": "warning",
    "log_checkpoints": "on",
}


def _say(msg: str) -> None:
    print(f"[pg] {msg}", flush=True)


def find_bindir() -> str | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb, pg_ctl and postgres."""
    candidates = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        if all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            try:
                candidates.append((float(d.split("/")[-2]), d))
            except ValueError:
                candidates.append((0.0, d))
    return max(candidates)[1] if candidates else None


def ensure_installed() -> str:
    """The PostgreSQL bin directory; installs Debian's ``postgresql`` package first if there is none."""
    bindir = find_bindir()
    if bindir:
        return bindir
    _say("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
         "running apt-get update && apt-get install -y postgresql")
    if os.geteuid() != 0:
        raise RuntimeError("PostgreSQL is not installed and installing it needs root: "
                           "run `apt-get install -y postgresql` first")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}")
    bindir = find_bindir()
    if not bindir:
        raise RuntimeError("apt-get install postgresql succeeded but no /usr/lib/postgresql/*/bin/initdb was found")
    _say(f"installed PostgreSQL: {bindir}")
    # The package may start a cluster of its own (port 5432); ours uses its own port and directory.
    return bindir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A private PostgreSQL cluster in a temporary directory; a context manager (see the module doc)."""

    def __init__(self, base_dir: str | os.PathLike, port: int | None = None,
                 settings: dict[str, str] | None = None, dbname: str = "zwallet") -> None:
        self.base_dir = os.path.abspath(os.fspath(base_dir))
        self.port = port
        self.extra_settings = dict(settings or {})
        self.dbname = dbname
        self.bindir: str | None = None
        self.root: str | None = None          # directory holding data/, socket/, server.log
        self._own_root = False                # root was made by us outside base_dir: stop() removes it
        self._started = False
        self._as_pg = os.geteuid() == 0
        self._restore_sigterm: Any = None

    # --------------------------------------------------------------------------------- properties
    @property
    def data_dir(self) -> str:
        assert self.root is not None
        return os.path.join(self.root, "data")

    @property
    def socket_dir(self) -> str:
        assert self.root is not None
        return os.path.join(self.root, "socket")

    @property
    def log_path(self) -> str:
        assert self.root is not None
        return os.path.join(self.root, "server.log")

    @property
    def dsn(self) -> str:
        """libpq connection string over TCP loopback (as the zwallet clients use TCP loopback too)."""
        assert self.port is not None
        return f"host=127.0.0.1 port={self.port} user={PG_USER} dbname={self.dbname}"

    @property
    def socket_dsn(self) -> str:
        assert self.port is not None
        return f"host={self.socket_dir} port={self.port} user={PG_USER} dbname={self.dbname}"

    # ------------------------------------------------------------------------------------ helpers
    def _cmd(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", PG_USER, "--", *argv] if self._as_pg else argv

    def _run(self, argv: list[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(self._cmd(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=self.root, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout[-3000:]}{self._log_tail()}")
        return r

    def _log_tail(self) -> str:
        try:
            with open(self.log_path) as f:
                return "\n--- server.log (tail) ---\n" + f.read()[-3000:]
        except OSError:
            return ""

    def _pg_can_reach(self, path: str) -> bool:
        if not self._as_pg:
            return True
        r = subprocess.run(["runuser", "-u", PG_USER, "--", "test", "-w", path, "-a", "-x", path],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return r.returncode == 0

    def _make_root(self) -> None:
        os.makedirs(self.base_dir, exist_ok=True)
        root = tempfile.mkdtemp(prefix="pg-", dir=self.base_dir)      # fresh each time: initdb needs it empty
        if self._as_pg:
            pw = pwd.getpwnam(PG_USER)
            os.chown(root, pw.pw_uid, pw.pw_gid)
            os.chmod(root, 0o700)
            if not self._pg_can_reach(root):
                os.rmdir(root)
                root = tempfile.mkdtemp(prefix="zwallet-pg-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
                os.chown(root, pw.pw_uid, pw.pw_gid)
                self._own_root = True
                _say(f"user {PG_USER!r} cannot reach {self.base_dir} (a parent directory is private): "
                     f"using {root} instead (removed by stop())")
        self.root = root

    # ------------------------------------------------------------------------------- life cycle
    def start(self) -> PostgresServer:
        if self._started:
            return self
        self.bindir = ensure_installed()
        if self._as_pg:
            try:
                pwd.getpwnam(PG_USER)
            except KeyError:
                raise RuntimeError(f"running as root but there is no {PG_USER!r} system user to run PostgreSQL "
                                   "as (the Debian postgresql package creates it)") from None
        self._make_root()
        self._started = True              # from here on stop() must run (and clean up), even if start fails
        try:
            if self.port is None:
                self.port = free_port()
            os.makedirs(self.socket_dir, exist_ok=True)
            if self._as_pg:
                pw = pwd.getpwnam(PG_USER)
                os.chown(self.socket_dir, pw.pw_uid, pw.pw_gid)
            version = subprocess.run([os.path.join(self.bindir, "postgres"), "--version"],
                                     stdout=subprocess.PIPE, text=True).stdout.strip()
            who = f" as user {PG_USER!r} (we are root)" if self._as_pg else ""
            _say(f"{version}: initdb {self.data_dir}{who}")
            self._run([os.path.join(self.bindir, "initdb"), "-D", self.data_dir, "-U", PG_USER, "-E", "UTF8",
                       "--locale=C", "--auth=trust"])
            conf = dict(DEFAULT_SETTINGS)
            conf.update(self.extra_settings)
            conf["port"] = str(self.port)
            if len(self.socket_dir) + len("/.s.PGSQL.65535.lock") < 107:      # sun_path is 108 bytes
                conf["unix_socket_directories"] = f"'{self.socket_dir}'"
            else:
                conf["unix_socket_directories"] = "''"
                _say(f"{self.socket_dir} is too long for a unix socket path: TCP only")
            with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
                f.write("\n# zwallet bench (engine/devtools/pg_server.py)\n")
                for k, v in conf.items():
                    f.write(f"{k} = {v}\n")
            shown = ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "max_connections")
            _say("starting: " + ", ".join(f"{k}={conf[k]}" for k in shown)
                 + f" on 127.0.0.1:{self.port}, socket in {self.socket_dir}")
            self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data_dir, "-l", self.log_path, "-w",
                       "-t", str(START_TIMEOUT_S), "start"], timeout=START_TIMEOUT_S + 30)
            self._create_db()
        except BaseException:
            self.stop()
            raise
        self._trap_sigterm()
        _say(f"ready: {self.dsn}")
        return self

    def _trap_sigterm(self) -> None:
        """SIGTERM (``timeout``, ``kill``) would end Python without unwinding ``with`` blocks and leave the
        server running: turn it into SystemExit while we run (main thread only), and stop at exit."""
        atexit.register(self.stop)
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous not in (signal.SIG_DFL, None):
            return                                   # the program has its own handler: leave it

        def on_sigterm(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, on_sigterm)
        self._restore_sigterm = previous

    def _create_db(self) -> None:
        assert self.bindir is not None
        self._run([os.path.join(self.bindir, "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER,
                   self.dbname])

    def _postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the server (fast, then immediate, then SIGKILL); remove the directory only if we made it
        outside base_dir. Idempotent; safe after a failed start."""
        if not self._started:
            return
        self._started = False
        if self._restore_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._restore_sigterm)
            self._restore_sigterm = None
        pg_ctl = os.path.join(self.bindir or "", "pg_ctl")
        pid = self._postmaster_pid()
        stopped = False
        for mode in ("fast", "immediate"):
            try:
                r = self._run([pg_ctl, "-D", self.data_dir, "-m", mode, "-w", "-t", str(STOP_TIMEOUT_S), "stop"],
                              check=False, timeout=STOP_TIMEOUT_S + 10)
                if r.returncode == 0 or "Is server running?" in r.stdout:
                    stopped = True
                    break
            except subprocess.TimeoutExpired:
                pass
        if not stopped and pid:
            _say(f"pg_ctl stop failed: SIGKILL postmaster {pid}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _say("stopped")
        if self._own_root and self.root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------- reads
    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server: the postmaster, its live children
        (backends, WAL writer, checkpointer, ...) and the children it has reaped. Take the difference
        over a run to see what the server cost."""
        pid = self._postmaster_pid()
        if pid is None:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")

        def stat(p: int) -> list[str] | None:
            try:
                with open(f"/proc/{p}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()
            except OSError:
                return None
        st = stat(pid)
        if st is None:
            return 0.0
        total = sum(int(st[k]) for k in (11, 12, 13, 14))      # utime stime cutime cstime
        for d in os.listdir("/proc"):
            if d.isdigit():
                c = stat(int(d))
                if c is not None and int(c[1]) == pid:            # ppid
                    total += int(c[11]) + int(c[12])
        return total / tick

    def settings(self) -> dict[str, str]:
        """Durability-related settings as the running server reports them (SHOW ...)."""
        import psycopg
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method",
                 "wal_level", "shared_buffers", "max_connections", "commit_delay", "data_checksums")
        out = {}
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for n in names:
                row = conn.execute(f"SHOW {n}").fetchone()
                if row is None:
                    raise RuntimeError(f"SHOW {n} returned no row")
                out[n] = row[0]
        out["data_dir"] = self.data_dir
        return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="start a throwaway PostgreSQL, print its settings, stop it")
    p.add_argument("--dir", default=None)
    p.add_argument("--hold", type=float, default=0, help="seconds to keep it running")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zwallet-pgsrv-") as tmp:
        with PostgresServer(a.dir or tmp) as pg:
            for k, v in pg.settings().items():
                print(f"  {k} = {v}")
            time.sleep(a.hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
