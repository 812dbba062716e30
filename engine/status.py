"""``zwallet status``: leader, terms, applied index, event seq and state digest of every replica.

    zwallet status --nodes tcp://127.0.0.1:7103,tcp://127.0.0.1:7104,tcp://127.0.0.1:7105
    zwallet status --config node-1.toml        # the replicas listed in a node config
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from engine.client import Client, ClientError
from engine.stalls import stall_text


def collect(addresses: list[str], with_digest: bool = True, timeout_s: float = 2.0,
            keys: Any = None) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    with Client(addresses, timeout_s=timeout_s, attempt_timeout_s=timeout_s, keys=keys) as client:
        for k in range(len(addresses)):
            try:
                out.append(client.status(k, with_digest=with_digest))
            except ClientError:
                out.append(None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zwallet status", description="status of every replica of a shard")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--nodes", help="comma-separated client addresses of the replicas")
    group.add_argument("--config", help="a node's TOML config: its [[replica]] client addresses are asked")
    p.add_argument("--no-digest", action="store_true", help="skip the state digest (cheaper on big ledgers)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each replica")
    p.add_argument("--key", help="CURVE: the client key's secret file (an admin key shows the digest)")
    p.add_argument("--server-key", help="CURVE: the servers' public key file (KEYS/server.key)")
    args = p.parse_args(argv)
    keys = None
    if args.config:
        from engine.node import NodeConfig
        cfg = NodeConfig.from_toml(args.config)
        addresses = [cfg.replicas[i]["client"] for i in sorted(cfg.replicas)]
        if not cfg.insecure and not args.key:      # a node's config: the system's admin key beside it
            import os

            from engine.service.security import PUBLIC_SUFFIX, SECRET_SUFFIX, SERVER_KEY_NAME, ClientKeys
            keys = ClientKeys.load(os.path.join(cfg.keys_dir, "admin" + SECRET_SUFFIX),
                                   os.path.join(cfg.keys_dir, SERVER_KEY_NAME + PUBLIC_SUFFIX))
    else:
        addresses = [a for a in args.nodes.split(",") if a]
    if args.key:
        from engine.service.security import ClientKeys
        if not args.server_key:
            p.error("--key needs --server-key")
        keys = ClientKeys.load(args.key, args.server_key)
    statuses = collect(addresses, not args.no_digest, args.timeout, keys)
    if args.json:
        print(json.dumps([dict(s, address=a) if s else {"address": a, "down": True}
                          for a, s in zip(addresses, statuses)], indent=2, default=str))
        return 0 if all(statuses) else 1
    print(f"{'replica':>7} {'address':<24} {'role':<10} {'term':>5} {'leader':>6} {'commit':>8} {'applied':>8} "
          f"{'last_seq':>10} {'digest':<16}")
    for addr, s in zip(addresses, statuses):
        if s is None:
            print(f"{'?':>7} {addr:<24} {'DOWN':<10}")
            continue
        print(f"{s['node_id']:>7} {addr:<24} {s['role']:<10} {s['term']:>5} {str(s['leader']):>6} {s['commit']:>8} "
              f"{s['applied']:>8} {s['last_seq']:>10} {s.get('digest', '-')[:16]:<16}")
    for s in statuses:
        if s and s.get("stalls", {}).get("by_cause"):
            print(f"replica {s['node_id']} stalls >= {s['stalls']['threshold_ms']:g} ms since start: "
                  + stall_text(s["stalls"]["by_cause"]))
    alive = [s for s in statuses if s]
    leaders = {s["leader"] for s in alive}
    digests = {(s["sm_applied"], s.get("digest")) for s in alive}
    print(f"leader: {leaders.pop() if len(leaders) == 1 else 'disagreement ' + str(leaders)}; "
          + ("replicas at the same applied index agree" if len({d for a, d in digests}) == len({a for a, d in digests})
             else "DIGESTS DIFFER at the same applied index"))
    return 0 if all(statuses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
