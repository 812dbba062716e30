"""The ``zwallet`` command: one entry point, a subcommand per process or tool.

Each command's module is imported only when that command runs, so the product commands never import the
benchmark package ``bench`` (nor its dependencies: PostgreSQL's driver, matplotlib). ``zwallet bench``
imports it then, and says how to get it when it cannot be imported.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

COMMANDS = {
    "node": ("engine.node", "run one replica of a shard from a TOML config (--config, --id, --verbose)"),
    "cluster": ("engine.devtools.cluster", "run N local replicas on loopback until Ctrl-C (--replicas 3)"),
    "status": ("engine.status", "leader, terms, applied index and digests of every replica (--nodes)"),
    "up": ("engine.devtools.up", "a whole local system: S shards x R replicas + a Marker group, system.toml"),
    "gateway": ("gateway.server", "run one stateless gateway replica (--system D/system.toml --client tcp://...)"),
    "query": ("query.server", "run the query service: projectors, read API, hierarchy (--system, --data, --client)"),
    "marker": ("marker.server", "run one replica of a Marker group from a TOML config (--config, --id)"),
    "demo": ("engine.devtools.demo", "the whole local system (2 shards x 3, Marker, gateway) at work, with kills"),
    "bench": ("bench.suite", "zwallet beside PostgreSQL: throughput, latency, failover, scaling; report + plots"),
    "export-pg": ("query.export_pg", "export every shard's events into PostgreSQL exactly once (--system, --dsn)"),
    "sim": ("engine.raft.sim", "seeded Raft simulations (--seeds N --jobs 0)"),
    "keygen": ("engine.service.security", "make a CURVE key pair (0600 secret); --rights allows it as a client"),
    "replica": ("engine.devtools.counter_app", "run one replica of the counter app (Raft tests/benchmark)"),
}
BENCH_COMMANDS = frozenset({"bench"})     # tools from the source tree's bench/ package, not the product

BENCH_MISSING = ("zwallet {command}: the benchmark suite cannot be imported ({error}).\n"
                 "It is the bench/ package of a zwallet source checkout, with its own dependencies; from the "
                 "checkout run:\n    python3 -m pip install -e '.[bench]'")


def load_command(command: str) -> ModuleType | None:
    """The module of ``command``; None (after saying why on stderr) if it is a bench tool that cannot be
    imported here."""
    name = COMMANDS[command][0]
    if command not in BENCH_COMMANDS:
        return importlib.import_module(name)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "engine":
            raise                                  # the product itself is broken: not bench's business
        print(BENCH_MISSING.format(command=command, error=exc), file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"zwallet: unknown command {argv[0]!r}\n", file=sys.stderr)
        print("usage: zwallet <command> [options]   (zwallet <command> --help for its options)\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = load_command(argv[0])
    if module is None:
        return 2
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
