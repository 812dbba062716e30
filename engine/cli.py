"""The ``zwallet`` command: ``zwallet demo``, ``zwallet sim``, ``zwallet replica``."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": ("engine.demo", "a local 3-replica cluster doing real work, with a failover"),
        "sim": ("engine.raft.sim", "seeded Raft simulations (--seeds N --jobs 0)"),
        "replica": ("engine.raft.replica_main", "run one Raft replica (--machine ledger|counter)"),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: zwallet <command> [options]\n\ncommands:")
        for name, (_, text) in commands.items():
            print(f"  {name:<8} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib
    module = importlib.import_module(commands[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
