"""The ``zwallet`` command: one entry point, a subcommand per process or tool."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "node": ("engine.node", "run one replica of a shard from a TOML config (--config, --id, --verbose)"),
    "cluster": ("engine.cluster", "run N local replicas on loopback until Ctrl-C (--replicas 3)"),
    "status": ("engine.status", "leader, terms, applied index and digests of every replica (--nodes)"),
    "demo": ("engine.demo", "a local 3-replica shard doing real work, with a failover"),
    "bench": ("bench.suite", "zwallet beside PostgreSQL: throughput, latency, failover, scaling; report + plots"),
    "sim": ("engine.raft.sim", "seeded Raft simulations (--seeds N --jobs 0)"),
    "replica": ("engine.raft.replica_main", "run one bare Raft replica of a counter (Raft tests/benchmark)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"zwallet: unknown command {argv[0]!r}\n", file=sys.stderr)
        print("usage: zwallet <command> [options]   (zwallet <command> --help for its options)\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
