"""``meshtrust audit``: read the audit log kept in the management store, oldest first."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt

from meshtrust import errors, settings
from meshtrust.authority import audit
from meshtrust.cli import common
from meshtrust.cli.output import Output
from meshtrust.store import manifest, opened_store

_COLUMNS = ["time", "event", "outcome", "actor", "cluster", "what", "message"]
_STYLES = {audit.Outcome.REFUSED.value: "yellow", audit.Outcome.ERROR.value: "red"}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "audit", help="who bootstrapped, was issued, renewed, registered, rotated: the audit log",
        description="Print the audit log the management store keeps, oldest first: every "
                    "bootstrap (accepted or refused), certificate issued or renewed, cluster "
                    "registered or deregistered, token minted (never the token), policy "
                    "applied and root-rotation step, with who did it (the cluster its "
                    "certificate names, the operator, or the server) and the certificate's "
                    "profile, serial and SHA-256 fingerprint.",
        epilog="-o jsonl prints one JSON object per line, the format of the server's "
               "--audit-log file, for piping into other tools.")
    common.add_store_option(parser, "the management store")
    parser.add_argument("--since", metavar="DURATION|TIME",
                        help="only records from the last DURATION (such as 1h or 7d) or "
                             "from an RFC 3339 TIME on (such as 2025-01-01T00:00:00Z)")
    parser.add_argument("--cluster", metavar="NAME", help="only records about this cluster")
    parser.add_argument("--event", choices=[k.value for k in audit.Kind],
                        help="only records of this kind")
    parser.add_argument("--outcome", choices=[o.value for o in audit.Outcome],
                        help="only records with this outcome")
    parser.add_argument("-o", "--output", choices=["table", "json", "yaml", "jsonl"],
                        default="table")
    parser.set_defaults(handler=_audit)


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """An RFC 3339 time, or ``now`` less a duration such as ``1h``."""
    try:
        return manifest.load_time(text)
    except ValueError:
        pass
    try:
        return now - settings.parse_duration(text, "--since")
    except errors.ConfigError:
        raise errors.ConfigError(
            f"--since: {text!r} is neither a duration such as 1h or 7d nor an RFC 3339 time "
            "such as 2025-01-01T00:00:00Z") from None


def _audit(args: argparse.Namespace, out: Output) -> int:
    since = parse_since(args.since, dt.datetime.now(dt.UTC)) if args.since else None

    async def go() -> audit.Reading:
        async with opened_store(common.store_url(args)) as store:
            return await audit.read(
                store, since=since, cluster=args.cluster,
                event=audit.Kind(args.event) if args.event else None,
                outcome=audit.Outcome(args.outcome) if args.outcome else None)

    reading = asyncio.run(go())
    documents = [record.document() for record in reading.records]
    if args.output == "jsonl":
        for record in reading.records:
            out.line(record.line())
    elif args.output != "table":
        out.document(documents, args.output)
    else:
        rows = [[_time(d["time"]), d["event"], d["outcome"], _actor(d), d["cluster"] or "-",
                 _what(d), d["message"]] for d in documents]
        styles = {n: _STYLES[d["outcome"]] for n, d in enumerate(documents)
                  if d["outcome"] in _STYLES}
        out.table(_COLUMNS, rows, styles=styles)
    if reading.damaged:
        out.warn(f"{len(reading.damaged)} damaged audit record(s) not shown: "
                 f"{', '.join(reading.damaged[:10])}")
    return 0


def _time(value: str) -> str:
    return value.replace("T", " ")[:19]


def _actor(document: dict[str, str | None]) -> str:
    actor = str(document["actor"])
    return f"{actor} ({document['user']})" if document.get("user") else actor


def _what(document: dict[str, str | None]) -> str:
    """The object of the record: a certificate, a policy, a rotation step."""
    parts = []
    if document.get("profile"):
        serial = document.get("serial") or ""
        parts.append(f"{document['profile']} {serial[:16]}{'…' if len(serial) > 16 else ''}")
    if document.get("policy"):
        parts.append(f"policy {document['policy']}")
    if document.get("step"):
        parts.append(str(document["step"]))
    if document.get("peer"):
        parts.append(f"from {document['peer']}")
    return ", ".join(part.strip() for part in parts) or "-"
