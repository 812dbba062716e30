"""Authenticated, encrypted, authorized sockets: ZeroMQ CURVE with a ZAP authenticator, and rights per
client key. ONE mechanism every service uses (the shard and the Marker through ``engine/service/server.py``,
the Raft peers through ``engine/raft/transport.py``, the gateway, the clients through
``engine/service/client_core.py`` and ``engine/service/stream.py``). docs/security.md is the operator's page.

A service adopts it in a few lines::

    sec = ServerSecurity.load(keys_dir)            # or None: insecure (logged loudly)
    auth = sec.start_authenticator(ctx)            # before any bind on ctx
    sec.configure_server(router, CLIENT_DOMAIN)    # then bind
    ...
    rights = sec.rights_of(frame.get("User-Id"))   # per request: None = refuse (UNAUTHORIZED)
    auth.stop()                                    # before ctx.term()

and a client: ``keys = ClientKeys.load(secret_file, server_public_file); keys.configure_client(dealer)``.

Keys. A key is a CURVE key pair in two TOML files: ``<name>.key`` (the public part, safe to share; in a
server's allowed-clients directory it also says the key's rights) and ``<name>.key_secret`` (both parts,
mode 0600; a secret file readable by group or others is refused). The layout a system's key directory
has (``make_system_keys``, ``zwallet keygen``)::

    keys/server.key, keys/server.key_secret     the key every server socket of the system binds with
    keys/clients/<name>.key                     the allowed client keys and their rights (rotation: add
                                                the new file, remove the old; reloaded within
                                                KEYS_RELOAD_CHECK_S, or at once on SIGHUP)
    keys/<name>.key_secret                      the client keys' secret halves (admin, gateway, marker)
    keys/peers/<group>-<id>.key(_secret)        one per Raft replica: its identity to its peers

ZAP domains: CLIENT_DOMAIN (client ROUTERs: any allowed key), EVENTS_DOMAIN (PUB: keys allowed to read
every account's events), RAFT_DOMAIN (Raft ROUTERs: only the group's peer keys).
"""
from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("zwallet.security")

CLIENT_DOMAIN = "zwallet-client"
EVENTS_DOMAIN = "zwallet-events"
RAFT_DOMAIN = "zwallet-raft"

READ, OPERATE, ADMIN = "read", "operate", "admin"
LEVELS = {READ: 1, OPERATE: 2, ADMIN: 3}
KEYS_RELOAD_CHECK_S = 1.0             # how often the allowed-keys directory is looked at for changes
KEYS_MISS_CHECK_S = 0.05              # ... and at most this often when ZAP meets an unknown key (a key just
                                      # added works at once: libzmq never retries a connection ZAP refused)
REFUSAL_LOG_INTERVAL_S = 10.0         # at most one log line per interval (and ZAP domain) about refused keys
KEY_FILE_BYTES_MAX = 64 << 10         # a key file larger than this is refused before it is parsed
ACCOUNT_RANGES_MAX = 1024             # account id ranges one key may list
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Z85_KEY_LEN = 40

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
SERVER_KEY_NAME = "server"
CLIENTS_DIR = "clients"
PEERS_DIR = "peers"
SYSTEM_CLIENT_KEYS = {"admin": ADMIN, "gateway": ADMIN, "marker": OPERATE, "query": READ}   # make_system_keys

INSECURE_WARNING = ("INSECURE MODE: CURVE is off for %s: every socket is open; anyone who can reach a port "
                    "can read and move money. Only for tests that measure the cost of CURVE.")


class KeyFileError(ValueError):
    """A key file that is missing, malformed or unsafe (the message says which file and why)."""


# ------------------------------------------------------------------------------------------------ rights
@dataclass(frozen=True)
class Rights:
    """What one client key may do. ``level``: READ (reads), OPERATE (reads and balance operations), ADMIN
    (everything: account management, config, STATUS with the digest, the Marker's DRAIN). ``accounts``:
    inclusive (first, last) account id ranges the key may name (empty: any); ``shards``: the shard ids it
    may reach (empty: any). A restricted key (either list set) cannot use ops that see every account."""
    level: str
    accounts: tuple[tuple[int, int], ...] = ()
    shards: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"rights must be one of {sorted(LEVELS)}, not {self.level!r}")

    def has(self, level: str) -> bool:
        return LEVELS[self.level] >= LEVELS[level]

    @property
    def restricted(self) -> bool:
        return bool(self.accounts or self.shards)

    @property
    def is_admin(self) -> bool:
        return self.level == ADMIN and not self.restricted

    def allows_shard(self, shard_id: int) -> bool:
        return not self.shards or shard_id in self.shards

    def allows_account(self, account_id: int) -> bool:
        if not self.accounts:
            return True
        return any(a <= account_id <= b for a, b in self.accounts)

    def outside(self, ids: Iterable[int]) -> int | None:
        """The first of ``ids`` outside the key's account ranges (None: all inside)."""
        if not self.accounts:
            return None
        for i in ids:
            if not self.allows_account(int(i)):
                return int(i)
        return None

    def describe(self) -> str:
        out = f"key {self.name or '?'} ({self.level}"
        if self.accounts:
            out += ", accounts " + ", ".join(f"{a}..{b}" for a, b in self.accounts[:4])
            out += ", ..." if len(self.accounts) > 4 else ""
        if self.shards:
            out += f", shards {list(self.shards)}"
        return out + ")"


FULL_RIGHTS = Rights(ADMIN, name="insecure")       # what every caller has in insecure mode


def _u128_column(col: np.ndarray) -> np.ndarray:
    """A (n, 2) <u8 view of a u128 column (lo, hi) as the records store it."""
    return np.ascontiguousarray(col).view("<u8").reshape(-1, 2)


def ops_outside(rights: Rights, ops: np.ndarray, management_kinds: Sequence[int], transfer_kind: int,
                shard_id: int | None) -> str | None:
    """Why ``rights`` may not apply the op records ``ops`` (engine.records.OP_DTYPE) on ``shard_id``, or
    None. The one check the shard node and the gateway both make (the gateway passes its callers' rights
    on by refusing exactly what the shard would refuse them): writes need OPERATE; the account-management
    kinds need ADMIN; every named ``account_id`` (and a transfer's ``other_id``) must lie in the key's
    ranges; the shard must be one of the key's."""
    if not rights.has(OPERATE):
        return f"{rights.describe()} may not write"
    if shard_id is not None and not rights.allows_shard(shard_id):
        return f"{rights.describe()} may not reach shard {shard_id}"
    kinds = ops["kind"]
    if not rights.has(ADMIN) and np.isin(kinds, np.asarray(management_kinds, dtype=kinds.dtype)).any():
        k = int(np.argmax(np.isin(kinds, np.asarray(management_kinds, dtype=kinds.dtype))))
        return f"record {k}: account management (kind {int(kinds[k])}) needs admin; {rights.describe()}"
    if rights.accounts:
        acc = _u128_column(ops["account_id"])
        other = _u128_column(ops["other_id"])
        named = (acc[:, 0] | acc[:, 1]) != 0
        is_transfer = kinds == transfer_kind
        for k in range(len(ops)):
            ids = []
            if named[k]:
                ids.append(int(acc[k, 0]) | (int(acc[k, 1]) << 64))
            if is_transfer[k]:
                ids.append(int(other[k, 0]) | (int(other[k, 1]) << 64))
            bad = rights.outside(ids)
            if bad is not None:
                return f"record {k}: account {bad} is outside the ranges of {rights.describe()}"
    return None


# ------------------------------------------------------------------------------------------------ key files
@dataclass(frozen=True)
class KeyPair:
    name: str
    public: bytes                  # z85, 40 bytes
    secret: bytes | None = None    # z85, 40 bytes (None: only the public part is known)


def _check_z85(v: Any, what: str, path: str) -> bytes:
    if not isinstance(v, str) or len(v) != Z85_KEY_LEN:
        raise KeyFileError(f"{path}: {what} must be a {Z85_KEY_LEN}-character Z85 string")
    try:
        zmq.utils.z85.decode(v.encode("ascii"))
    except (ValueError, UnicodeEncodeError, KeyError) as exc:
        raise KeyFileError(f"{path}: {what} is not Z85: {exc}") from None
    return v.encode("ascii")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        size = os.path.getsize(path)
        if size > KEY_FILE_BYTES_MAX:
            raise KeyFileError(f"{path}: a key file of {size} bytes exceeds KEY_FILE_BYTES_MAX={KEY_FILE_BYTES_MAX}")
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeyFileError(f"{path}: not a key file (TOML): {exc}") from None


def _parse_rights(doc: dict[str, Any], name: str, path: str) -> Rights:
    level = doc.get("rights")
    if level not in LEVELS:
        raise KeyFileError(f"{path}: rights must be one of {sorted(LEVELS)}, not {level!r}")
    ranges: list[tuple[int, int]] = []
    raw = doc.get("accounts", [])
    if not isinstance(raw, list) or len(raw) > ACCOUNT_RANGES_MAX:
        raise KeyFileError(f"{path}: accounts must be a list of at most {ACCOUNT_RANGES_MAX} [first, last] ranges")
    for r in raw:
        if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) for x in r)
                or not 0 <= r[0] <= r[1] < 1 << 128):
            raise KeyFileError(f"{path}: account range {r!r} is not [first, last] with 0 <= first <= last < 2**128")
        ranges.append((r[0], r[1]))
    shards = doc.get("shards", [])
    if not isinstance(shards, list) or not all(isinstance(s, int) and s > 0 for s in shards):
        raise KeyFileError(f"{path}: shards must be a list of positive shard ids")
    return Rights(level, tuple(ranges), tuple(shards), name)


def load_public(path: str) -> tuple[KeyPair, Rights | None]:
    """A ``.key`` file: the public key, and the rights it lists (None if it lists none)."""
    doc = _read_toml(path)
    name = str(doc.get("name", os.path.basename(path).removesuffix(PUBLIC_SUFFIX)))
    pair = KeyPair(name, _check_z85(doc.get("public_key"), "public_key", path))
    return pair, (_parse_rights(doc, name, path) if "rights" in doc else None)


def load_secret(path: str) -> KeyPair:
    """A ``.key_secret`` file; refused if anyone but its owner may read it (the mode must be 0600 or 0400)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read the secret key file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: a secret key file must be readable by its owner only (chmod 600), "
                        f"not mode {stat.S_IMODE(mode):o}")
    doc = _read_toml(path)
    name = str(doc.get("name", os.path.basename(path).removesuffix(SECRET_SUFFIX)))
    public = _check_z85(doc.get("public_key"), "public_key", path)
    secret = _check_z85(doc.get("secret_key"), "secret_key", path)
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: public_key is not the public half of secret_key")
    return KeyPair(name, public, secret)


def _write_private(path: str, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)                  # whatever the umask
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def public_key_text(name: str, public: bytes, rights: Rights | None = None) -> str:
    lines = ["# zwallet CURVE public key: safe to share. In a server's clients/ directory the rights below are",
             "# what it grants this key (docs/security.md).", f'name = "{name}"',
             f'public_key = "{public.decode()}"']
    if rights is not None:
        lines.append(f'rights = "{rights.level}"')
        if rights.accounts:
            lines.append("accounts = [" + ", ".join(f"[{a}, {b}]" for a, b in rights.accounts) + "]")
        if rights.shards:
            lines.append(f"shards = {list(rights.shards)}")
    return "\n".join(lines) + "\n"


def keygen(directory: str, name: str, rights: Rights | None = None, *, public_dir: str | None = None) -> KeyPair:
    """A new key pair: ``directory/name.key_secret`` (0600) and ``(public_dir or directory)/name.key``
    (0644, with ``rights`` if given). Never overwrites a key file (a rotation makes a new name)."""
    if not KEY_NAME_RE.match(name):
        raise ValueError(f"key name {name!r}: letters, digits, '_', '.', '-' (at most 64, not starting with a dot)")
    public_dir = public_dir or directory
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.makedirs(public_dir, exist_ok=True)
    secret_path = os.path.join(directory, name + SECRET_SUFFIX)
    public_path = os.path.join(public_dir, name + PUBLIC_SUFFIX)
    for p in (secret_path, public_path):
        if os.path.exists(p):
            raise ValueError(f"{p} exists: a key is never overwritten (rotate: make a new name, then remove the old)")
    public, secret = zmq.curve_keypair()
    _write_private(secret_path, "# zwallet CURVE secret key: never share it, never log it.\n"
                   f'name = "{name}"\npublic_key = "{public.decode()}"\nsecret_key = "{secret.decode()}"\n', 0o600)
    tmp = public_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(public_key_text(name, public, rights))
    os.chmod(tmp, 0o644)
    os.replace(tmp, public_path)
    return KeyPair(name, public, secret)


def make_system_keys(keys_dir: str) -> None:
    """The keys of a local system under ``keys_dir`` (``zwallet up``, local clusters, the demo): the server
    key and the admin, gateway and marker client keys, each made only if it is missing."""
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    if not os.path.exists(os.path.join(keys_dir, SERVER_KEY_NAME + SECRET_SUFFIX)):
        keygen(keys_dir, SERVER_KEY_NAME)
    for name, level in SYSTEM_CLIENT_KEYS.items():
        if not os.path.exists(os.path.join(keys_dir, name + SECRET_SUFFIX)):
            keygen(keys_dir, name, Rights(level, name=name), public_dir=os.path.join(keys_dir, CLIENTS_DIR))


def peer_key(keys_dir: str, name: str) -> KeyPair:
    """A Raft replica's key (``keys_dir/peers/name``), made if missing."""
    d = os.path.join(keys_dir, PEERS_DIR)
    path = os.path.join(d, name + SECRET_SUFFIX)
    if os.path.exists(path):
        return load_secret(path)
    return keygen(d, name)


# ------------------------------------------------------------------------------------------------ the keyring
class KeyRing:
    """The allowed client keys and their rights: every ``*.key`` file of ``directory``. Reloaded when the
    directory's listing or a file's mtime changes (looked at no more often than ``KEYS_RELOAD_CHECK_S``, on
    any lookup), or at once by ``reload()`` (SIGHUP). A file that does not load is skipped and logged (the
    other keys stay served); a removed file's key is refused from the next lookup on. Thread-safe: the ZAP
    thread and the server's main thread both look up."""

    def __init__(self, directory: str, *, check_s: float = KEYS_RELOAD_CHECK_S) -> None:
        self.directory = directory
        self.check_s = check_s
        self._lock = threading.RLock()          # (reload may run in a signal handler: SIGHUP)
        self._keys: dict[str, Rights] = {}
        self._seen: tuple[Any, ...] = ()
        self._next_check = 0.0
        self._next_miss_check = 0.0
        self.reloads = 0
        if not os.path.isdir(directory):
            raise KeyFileError(f"the allowed client keys directory {directory} does not exist")
        self.reload()

    def _listing(self) -> tuple[Any, ...]:
        out = []
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return ()
        for n in names:
            if n.endswith(PUBLIC_SUFFIX):
                try:
                    st = os.stat(os.path.join(self.directory, n))
                except OSError:
                    continue
                out.append((n, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def reload(self) -> None:
        with self._lock:
            listing = self._listing()
            keys: dict[str, Rights] = {}
            for n, _m, _s in listing:
                path = os.path.join(self.directory, n)
                try:
                    pair, rights = load_public(path)
                except KeyFileError as exc:
                    log.error("skipping a client key: %s", exc)
                    continue
                if rights is None:
                    log.error("skipping the client key %s: it lists no rights", path)
                    continue
                keys[pair.public.decode()] = rights
            changed = listing != self._seen
            self._keys = keys
            self._seen = listing
            self._next_check = time.monotonic() + self.check_s
            if changed:
                self.reloads += 1
                log.info("allowed client keys from %s: %d (%s)", self.directory, len(keys),
                         ", ".join(sorted(r.name for r in keys.values())))

    def _maybe_reload(self) -> None:
        if time.monotonic() >= self._next_check:
            if self._listing() != self._seen:
                self.reload()
            else:
                self._next_check = time.monotonic() + self.check_s

    def rights_of(self, z85_public: str | bytes | None, *, recheck_on_miss: bool = False) -> Rights | None:
        """The key's rights (None: not allowed). ``recheck_on_miss`` (the ZAP handler): an unknown key makes
        the directory be looked at again, at most every KEYS_MISS_CHECK_S."""
        if not z85_public:
            return None
        if isinstance(z85_public, bytes):
            z85_public = z85_public.decode("ascii", "replace")
        self._maybe_reload()
        r = self._keys.get(z85_public)
        if r is None and recheck_on_miss:
            now = time.monotonic()
            if now >= self._next_miss_check:
                self._next_miss_check = now + KEYS_MISS_CHECK_S
                if self._listing() != self._seen:
                    self.reload()
                    r = self._keys.get(z85_public)
        return r

    def __len__(self) -> int:
        return len(self._keys)


class _Provider:
    """A ZAP credentials provider (pyzmq's ``configure_curve_callback``): ``allow(rights)`` says which."""

    def __init__(self, lookup: Any, allow: Any) -> None:
        self.lookup = lookup
        self.allow = allow
        self.denied = 0
        self._logged_at = -REFUSAL_LOG_INTERVAL_S
        self._unlogged = 0

    def callback(self, domain: str, key: bytes) -> bool:
        r = self.lookup(key)
        ok = r is not None and self.allow(r)
        if not ok:
            self.denied += 1
            now = time.monotonic()
            if now - self._logged_at < REFUSAL_LOG_INTERVAL_S:
                self._unlogged += 1            # a flood of refused keys never floods the log
                return False
            log.warning("ZAP %s: refused a CURVE client key (fingerprint %s: %s)%s", domain, fingerprint(key),
                        "not allowed here" if r is not None else "unknown",
                        f"; {self._unlogged} more refused since the last line" if self._unlogged else "")
            self._logged_at, self._unlogged = now, 0
        return ok


def fingerprint(public_z85: bytes | str) -> str:
    """What logs name a key by: 12 hex digits of its SHA-256 (logs never carry keys, not even public ones)."""
    import hashlib
    raw = public_z85.encode() if isinstance(public_z85, str) else public_z85
    return hashlib.sha256(raw).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ sockets
@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the servers' public key: what a DEALER or SUB needs to connect."""
    keys: KeyPair
    server_public: bytes

    @classmethod
    def load(cls, secret_path: str, server_public_path: str) -> ClientKeys:
        pair = load_secret(secret_path)
        server, _ = load_public(server_public_path)
        return cls(pair, server.public)

    def configure_client(self, sock: zmq.Socket) -> None:
        assert self.keys.secret is not None
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = self.server_public


class ServerSecurity:
    """A server process's security: the server key, the allowed client keys (a ``KeyRing``), the peer keys
    of its Raft group and its own peer key (replica id -> z85 public key)."""

    def __init__(self, server: KeyPair, keyring: KeyRing, *, peer_keys: dict[int, bytes] | None = None,
                 own_peer: KeyPair | None = None) -> None:
        if server.secret is None:
            raise KeyFileError("the server key needs its secret half")
        self.server = server
        self.keyring = keyring
        self.peer_keys = dict(peer_keys or {})
        self.own_peer = own_peer
        self._peer_by_key = {v.decode(): k for k, v in self.peer_keys.items()}
        self.providers: dict[str, _Provider] = {}

    @classmethod
    def load(cls, keys_dir: str, *, peer_keys: dict[int, bytes] | None = None,
             own_peer_file: str = "") -> ServerSecurity:
        server = load_secret(os.path.join(keys_dir, SERVER_KEY_NAME + SECRET_SUFFIX))
        ring = KeyRing(os.path.join(keys_dir, CLIENTS_DIR))
        own = load_secret(own_peer_file) if own_peer_file else None
        return cls(server, ring, peer_keys=peer_keys, own_peer=own)

    def rights_of(self, user_id: str | bytes | None) -> Rights | None:
        return self.keyring.rights_of(user_id)

    def peer_of_key(self, user_id: str | None) -> int | None:
        """The Raft replica whose key authenticated a connection (its ZAP User-Id), or None."""
        return self._peer_by_key.get(user_id) if user_id else None

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """The ZAP handler of ``ctx`` (one per context; start it before binding a server socket on it):
        CLIENT_DOMAIN admits every allowed client key, EVENTS_DOMAIN the keys that may read every account,
        RAFT_DOMAIN only the group's peer keys. A plain socket (no CURVE) gets nothing: the handshake fails."""
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("zwallet.security.zap"))
        auth.start()
        ring = self.keyring

        def by_client(key: bytes) -> Rights | None:
            return ring.rights_of(key, recheck_on_miss=True)

        def by_peer(key: bytes) -> Rights | None:
            return FULL_RIGHTS if self.peer_of_key(key.decode("ascii", "replace")) is not None else None

        self.providers = {CLIENT_DOMAIN: _Provider(by_client, lambda r: True),
                          EVENTS_DOMAIN: _Provider(by_client, lambda r: not r.restricted),
                          RAFT_DOMAIN: _Provider(by_peer, lambda r: True)}
        for domain, provider in self.providers.items():
            auth.configure_curve_callback(domain, credentials_provider=provider)
        return auth

    def configure_server(self, sock: zmq.Socket, domain: str) -> None:
        assert self.server.secret is not None
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_secretkey = self.server.secret
        sock.curve_publickey = self.server.public

    def configure_peer_client(self, sock: zmq.Socket) -> None:
        """A Raft DEALER to a peer: authenticates with this replica's own peer key."""
        if self.own_peer is None or self.own_peer.secret is None:
            raise KeyFileError("this replica has no peer key (config [security] peer_key)")
        sock.curve_secretkey = self.own_peer.secret
        sock.curve_publickey = self.own_peer.public
        sock.curve_serverkey = self.server.public


def stop_authenticator(auth: ThreadAuthenticator | None) -> None:
    if auth is not None:
        try:
            auth.stop()
        except zmq.ZMQError:
            pass


def warn_insecure(what: str) -> None:
    log.warning(INSECURE_WARNING, what)
    import sys
    print("zwallet: WARNING: " + INSECURE_WARNING % what, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ system.toml
def client_keys_of_system(system: Any, which: str = "client_key") -> ClientKeys | None:
    """The client keys a process of the system at ``system`` (an engine.system.System) connects with: its
    ``[security]`` table's ``server_key`` and ``which`` (``client_key``: the local system's admin key; the
    gateway's is ``gateway_key``), paths relative to system.toml's directory. None when the table says
    ``insecure = true`` or there is no [security] table at all (an insecure system, logged loudly)."""
    sec = system.extra.get("security")
    if not isinstance(sec, dict) or sec.get("insecure") is True:
        warn_insecure(f"the clients of {system.path or 'the system'}")
        return None
    base = os.path.dirname(system.path) if system.path else "."

    def path_of(key: str) -> str:
        v = sec.get(key)
        if not isinstance(v, str) or not v:
            raise KeyFileError(f"{system.path}: [security] {key} must name a key file")
        return v if os.path.isabs(v) else os.path.join(base, v)
    return ClientKeys.load(path_of(which), path_of("server_key"))


def server_security_of_system(system: Any) -> ServerSecurity | None:
    """A server process of the system (the gateway, the query service): the server key and the allowed
    client keys from system.toml's [security] ``keys_dir`` (None: the system is insecure)."""
    sec = system.extra.get("security")
    if not isinstance(sec, dict) or sec.get("insecure") is True:
        return None
    keys_dir = sec.get("keys_dir")
    if not isinstance(keys_dir, str) or not keys_dir:
        raise ValueError(f"{system.path}: [security] keys_dir must name the keys directory")
    if not os.path.isabs(keys_dir):
        keys_dir = os.path.join(os.path.dirname(system.path or "."), keys_dir)
    return ServerSecurity.load(keys_dir)


def reader_keys_of_system(system: Any) -> ClientKeys | None:
    """The keys a reader of every shard's events connects with (the query service, the PostgreSQL export):
    the system's ``query_key`` (read rights, every account), else its admin ``client_key``."""
    sec = system.extra.get("security")
    which = "query_key" if isinstance(sec, dict) and sec.get("query_key") else "client_key"
    return client_keys_of_system(system, which)


def system_security_table(keys_dir: str, insecure: bool = False) -> dict[str, Any]:
    """The ``[security]`` table ``zwallet up`` writes into system.toml (absolute paths: a copy of the file
    elsewhere still finds the keys; relative ones, which operators may write, are read from its directory)."""
    if insecure:
        return {"insecure": True}
    d = os.path.abspath(keys_dir)
    return {"insecure": False, "keys_dir": d, "server_key": os.path.join(d, SERVER_KEY_NAME + PUBLIC_SUFFIX),
            "client_key": os.path.join(d, "admin" + SECRET_SUFFIX),
            "gateway_key": os.path.join(d, "gateway" + SECRET_SUFFIX),
            "marker_key": os.path.join(d, "marker" + SECRET_SUFFIX),
            "query_key": os.path.join(d, "query" + SECRET_SUFFIX)}


# ------------------------------------------------------------------------------------------------ zwallet keygen
def _parse_ranges(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        a, sep, b = part.partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"account range {part!r} is not FIRST-LAST (integers)") from None
        if not 0 <= lo <= hi < 1 << 128:
            raise ValueError(f"account range {part!r}: need 0 <= FIRST <= LAST < 2**128")
        out.append((lo, hi))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    """``zwallet keygen NAME --dir KEYS [--rights R] [--accounts 1-999,...] [--shards 1,2]``."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="zwallet keygen", description=(
        "make a CURVE key pair: KEYS/NAME.key_secret (mode 0600) and its public NAME.key. With --rights the "
        "public file goes to KEYS/clients/ and the servers that use KEYS allow it (within a second, or at "
        "once on SIGHUP): rotation is keygen a new name, hand out its secret, remove the old .key file "
        "(docs/security.md)"))
    p.add_argument("name", help="the key's name (letters, digits, _ . -)")
    p.add_argument("--dir", required=True, help="the keys directory (zwallet up: D/keys)")
    p.add_argument("--rights", choices=sorted(LEVELS), help="allow this key as a client with these rights")
    p.add_argument("--accounts", default="", help="restrict it to account id ranges: FIRST-LAST[,FIRST-LAST...]")
    p.add_argument("--shards", default="", help="restrict it to shard ids: 1,2,...")
    p.add_argument("--public-dir", help="where the public .key goes (default: KEYS/clients with --rights, else KEYS)")
    args = p.parse_args(argv)
    try:
        rights = None
        if args.rights:
            shards = tuple(int(s) for s in args.shards.split(",") if s.strip())
            rights = Rights(args.rights, _parse_ranges(args.accounts), shards, args.name)
        elif args.accounts or args.shards:
            raise ValueError("--accounts and --shards restrict a client key: give --rights too")
        public_dir = args.public_dir or (os.path.join(args.dir, CLIENTS_DIR) if rights else args.dir)
        pair = keygen(args.dir, args.name, rights, public_dir=public_dir)
    except (ValueError, OSError) as exc:
        print(f"zwallet keygen: {exc}", file=sys.stderr)
        return 2
    print(f"zwallet keygen: {args.name}: secret {os.path.join(args.dir, args.name + SECRET_SUFFIX)} (0600), "
          f"public {os.path.join(public_dir, args.name + PUBLIC_SUFFIX)} = {pair.public.decode()}"
          + (f"; allowed as {rights.describe()}" if rights else ""))
    return 0
