"""``meshtrust cluster``: register, list and deregister workload clusters, mint tokens."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import settings
from meshtrust.authority import enrollment, registry
from meshtrust.cli import common
from meshtrust.cli.output import Output
from meshtrust.server import config as server_config
from meshtrust.store import opened_store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("cluster", help="register, list and deregister workload clusters")
    parser.set_defaults(help_parser=parser)
    cmds = parser.add_subparsers(dest="cluster_command", metavar="COMMAND")

    reg = cmds.add_parser(
        "register", help="register a cluster and print what its agent needs",
        description="Register a cluster in the management store and print what its agent "
                    "needs: the relay address, the relay root (ca.crt) and a bootstrap token. "
                    "The token is single-use and expires (default 1h) unless --shared-token. "
                    "With --write-to, the root and token are also written into the cluster's "
                    "store, where the agent reads them.")
    _token_options(reg)
    reg.set_defaults(handler=_register)

    token = cmds.add_parser("token", help="mint a new bootstrap token for a cluster",
                            description="Mint a new single-use bootstrap token for a "
                                        "registered cluster, e.g. after its certificate expired.")
    _token_options(token)
    token.set_defaults(handler=_register)

    lst = cmds.add_parser("list", help="list clusters with last seen and client cert expiry")
    common.add_store_option(lst, "the management store")
    lst.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    lst.set_defaults(handler=_list)

    dereg = cmds.add_parser("deregister", help="remove a cluster; its certificate is refused",
                            description="Remove a cluster. The relay refuses its client "
                                        "certificate from the next call on and ends its "
                                        "open streams.")
    dereg.add_argument("name")
    common.add_store_option(dereg, "the management store")
    dereg.set_defaults(handler=_deregister)


def _token_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="cluster name, such as cluster-1")
    common.add_store_option(parser, "the management store")
    parser.add_argument("--server", default=server_config.DEFAULT_LISTEN,
                        help="relay address agents dial (default %(default)s)")
    parser.add_argument("--bootstrap-server",
                        help="bootstrap address (default: relay port + 1)")
    parser.add_argument("--token-ttl", default="1h",
                        help="how long the token stays valid (default %(default)s)")
    parser.add_argument("--shared-token", action="store_true",
                        help="hand out the shared relay-identity-token-secret instead")
    parser.add_argument("--write-to", metavar="URL",
                        help="also write root and token into this cluster store")
    parser.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")


def _register(args: argparse.Namespace, out: Output) -> int:
    ttl = settings.parse_duration(args.token_ttl, "--token-ttl")
    registry.check_cluster_name(args.name)
    bootstrap = args.bootstrap_server or settings.bootstrap_address(args.server)

    async def go() -> enrollment.Enrollment:
        async with opened_store(common.store_url(args)) as store:
            clock = clock_module.SystemClock()
            if args.cluster_command == "token":
                await registry.Registry(store, clock).get(args.name)
            result = await enrollment.enroll(store, clock, args.name,
                                             server=args.server, bootstrap_server=bootstrap,
                                             shared_token=args.shared_token, token_ttl=ttl)
        if args.write_to:
            async with opened_store(args.write_to) as target:
                await enrollment.install(target, result)
        return result

    result = asyncio.run(go())
    out.document(result.document(), args.output)
    return 0


def _list(args: argparse.Namespace, out: Output) -> int:
    async def go() -> list[registry.Cluster]:
        async with opened_store(common.store_url(args)) as store:
            return await registry.Registry(store, clock_module.SystemClock()).list()

    clusters = asyncio.run(go())
    items: list[dict[str, Any]] = [{
        "name": c.name, "registered": _iso(c.registered), "connected": c.connected,
        "lastSeen": _iso(c.last_seen), "clientSerial": c.client_serial,
        "clientNotAfter": _iso(c.client_not_after)} for c in clusters]
    if args.output != "table":
        out.document(items, args.output)
        return 0
    now = dt.datetime.now(dt.UTC)
    rows = [[c.name, "yes" if c.connected else "no", _ago(c.last_seen, now),
             c.client_serial or "-", _iso(c.client_not_after) or "-"] for c in clusters]
    out.table(["cluster", "connected", "last seen", "client serial", "client not after"], rows)
    return 0


def _deregister(args: argparse.Namespace, out: Output) -> int:
    async def go() -> None:
        async with opened_store(common.store_url(args)) as store:
            await registry.Registry(store, clock_module.SystemClock()).deregister(args.name)

    asyncio.run(go())
    out.line(f"cluster {args.name} deregistered; its certificate is refused from now on")
    return 0


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _ago(value: dt.datetime | None, now: dt.datetime) -> str:
    if value is None:
        return "never"
    seconds = int((now - value).total_seconds())
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"
