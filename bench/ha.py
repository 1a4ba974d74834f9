"""Failover of the management server: replicas on PostgreSQL, the leader SIGKILLed again and again.

What it runs: ``--replicas`` ``meshtrust server`` processes on one PostgreSQL
database with a leader lease of ``--ttl`` seconds, and ``--clusters`` agents,
each given every replica's address with a different replica first. Every
cycle it:

1. applies a changed trust policy, so every cluster gets a new Istio
   intermediate round, under way while the leader dies;
2. SIGKILLs the replica holding the leader lease, and meanwhile registers a
   new cluster, bootstraps it on a surviving replica and renews its client
   certificate there;
3. waits until another replica holds the lease: the failover time is from the
   SIGKILL to the successor's ``acquireTime`` in the lease;
4. starts the killed slot again on the same ports under a new name;
5. waits until every cluster FINISHED the new round and its agent's
   ``cacerts`` holds the intermediate the store says was issued.

At the end it counts the audit log's records of Istio intermediates issued per
work item: every one must be exactly one.

PostgreSQL is a throwaway server started from the Debian packages the tests use
(``tests/pgserver.py``), with ``fsync=on``.

Run it from the repository root:

    .venv/bin/python bench/ha.py                     # 100 cycles, 2 s lease, a few minutes
    .venv/bin/python bench/ha.py --cycles 10 --ttl 10   # the default lease
    .venv/bin/python bench/ha.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import hafleet  # noqa: E402  (the tests' server replicas)
import pgserver  # noqa: E402  (the tests' throwaway PostgreSQL server)
import relayfleet as rf  # noqa: E402


@dataclasses.dataclass
class Cycle:
    failover: float          # SIGKILL to the successor's acquireTime, seconds
    since_renewal: float     # the killed leader's last renewal to the SIGKILL, seconds
    served: float            # register + bootstrap + renew on a survivor, seconds
    converged: float         # SIGKILL to every cluster finished the new round, seconds


async def run(args: argparse.Namespace, url: str, folder: pathlib.Path) -> dict[str, Any]:
    ha = hafleet.HAFleet(folder, url, ttl=args.ttl, replicas=args.replicas)
    cycles: list[Cycle] = []
    try:
        await asyncio.to_thread(ha.start)
        for index in range(args.clusters):
            await asyncio.to_thread(ha.add_cluster, f"cluster-{index + 1}",
                                    index % args.replicas)
        async with rf.opened(url) as mgmt:
            await asyncio.to_thread(ha.apply, hafleet.policy(0))
            rounds = {c: r.status["round"]
                      for c, r in (await ha.wait_converged(mgmt, {}, timeout=60)).items()}
            for cycle in range(1, args.cycles + 1):
                await asyncio.to_thread(ha.apply, hafleet.policy(cycle))
                leader = await ha.wait_leader(mgmt)
                slot = ha.slot_of(leader)
                serving = asyncio.create_task(hafleet.serve_during_failover(
                    ha, ha.survivor(besides=slot), f"extra-{cycle}"))
                killed = time.monotonic()
                failover = await ha.fail_leader(mgmt, timeout=3 * args.ttl + 10)
                served = await serving
                await asyncio.to_thread(ha.restart, slot)
                rounds = {c: r.status["round"] for c, r in
                          (await ha.wait_converged(mgmt, rounds, timeout=60)).items()}
                cycles.append(Cycle(failover=failover.seconds,
                                    since_renewal=failover.since_renewal, served=served,
                                    converged=time.monotonic() - killed))
                if not args.json:
                    print(f"cycle {cycle:3d}: {failover.killed} -> {failover.successor} in "
                          f"{failover.seconds:.2f} s", flush=True)
            counts = await ha.issuances(mgmt)
    finally:
        ha.close()
    return {
        "cycles": len(cycles), "ttl": args.ttl, "replicas": args.replicas,
        "clusters": args.clusters,
        "failover_s": hafleet.summary([c.failover for c in cycles]),
        "since_renewal_s": hafleet.summary([c.since_renewal for c in cycles]),
        "within_ttl": sum(c.failover <= args.ttl for c in cycles),
        "served_s": hafleet.summary([c.served for c in cycles]),
        "converged_s": hafleet.summary([c.converged for c in cycles]),
        "work_items": len(counts),
        "issued_more_than_once": sum(n > 1 for n in counts.values()),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100, help="leaders killed")
    parser.add_argument("--ttl", type=int, default=2, help="leader lease, whole seconds")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    server = pgserver.Server(durable=True)
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="meshtrust-bench-") as folder:
            result = asyncio.run(run(args, server.create_database("bench"),
                                     pathlib.Path(folder)))
    finally:
        server.stop()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print()
    print(f"{result['cycles']} failovers, {args.replicas} replicas, {args.clusters} agents, "
          f"lease {args.ttl} s")
    for name, label in (("failover_s", "SIGKILL to new leader"),
                        ("since_renewal_s", "last renewal to SIGKILL"),
                        ("served_s", "bootstrap + renew on a survivor"),
                        ("converged_s", "SIGKILL to every agent converged")):
        values = result[name]
        print(f"  {label:34s} min {values['min']:.2f}  p50 {values['p50']:.2f}  "
              f"p95 {values['p95']:.2f}  max {values['max']:.2f} s")
    print(f"  failovers within the TTL: {result['within_ttl']} of {result['cycles']}")
    print(f"  Istio work items issued: {result['work_items']}, more than once: "
          f"{result['issued_more_than_once']}")


if __name__ == "__main__":
    main()
