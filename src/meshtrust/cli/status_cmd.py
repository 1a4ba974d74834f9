"""``meshtrust status``: every certificate of the fleet, and whether any needs attention.

The exit status makes it usable from cron or a monitoring check: 0 when all is
well, ``EXIT_ATTENTION`` when a certificate is expired, past its renewal time,
missing, unreadable or its Istio issuance failed. It is not 2, which the
command line uses for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt

from meshtrust import clock as clock_module
from meshtrust.authority import inventory
from meshtrust.cli import common
from meshtrust.cli.output import Output
from meshtrust.store import opened_store

EXIT_ATTENTION = 3

_COLUMNS = ["kind", "cluster", "secret", "subject", "issuer", "serial", "not-after",
            "days left", "renewal due", "managed by", "state"]
_STYLES = {inventory.State.RENEWAL_DUE: "yellow"}  # every other state needing attention: red


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "status", help="every certificate of the fleet: expiry, renewal, state",
        description="List every certificate of the fleet as the management store records "
                    "it: the relay root, signing CA and server certificate, each trust "
                    "policy's Istio root, and for each registered cluster its relay client "
                    "certificate and its Istio intermediate. Renewal is due at notAfter − "
                    "ratio × lifetime (the policy's ratio for intermediates, the agent's for "
                    "client certificates, 0.1 otherwise). "
                    "Expired certificates are shown in red, those past their renewal time "
                    "in yellow.",
        epilog=f"exit status: 0 when nothing needs attention; {EXIT_ATTENTION} when a "
               "certificate is expired, past its renewal time, missing or unreadable, or an "
               "Istio intermediate failed; 1 when the store cannot be read.")
    common.add_store_option(parser, "the management store")
    parser.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace, out: Output) -> int:
    async def go() -> list[inventory.Item]:
        async with opened_store(common.store_url(args)) as store:
            return await inventory.collect(store, clock_module.SystemClock())

    items = asyncio.run(go())
    attention = [item for item in items if item.needs_attention]
    if args.output != "table":
        out.document({"items": [item.document() for item in items]}, args.output)
    else:
        rows = [[item.kind, item.cluster, _where(item),
                 item.subject or "-", item.issuer or "-", _serial(item.serial),
                 _time(item.not_after), "-" if item.days_left is None else str(item.days_left),
                 _time(item.renew_at), item.managed_by or "-", item.state.value]
                for item in items]
        styles = {n: _STYLES.get(item.state, "red")
                  for n, item in enumerate(items) if item.needs_attention}
        out.table(_COLUMNS, rows, styles=styles)
        for item in attention:
            if item.message:
                out.line(f"{item.kind} {item.cluster} {_where(item)}: {item.message}")
        if attention:
            out.line(f"{len(attention)} of {len(items)} certificates need attention")
    return EXIT_ATTENTION if attention else 0


def _where(item: inventory.Item) -> str:
    return f"{item.namespace}/{item.secret}" if item.secret else "-"


def _serial(serial: str) -> str:
    return serial[:16] + "…" if len(serial) > 16 else serial or "-"


def _time(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"
