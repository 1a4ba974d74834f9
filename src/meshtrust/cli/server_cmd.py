"""``meshtrust server``: run the management server."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import yaml

from meshtrust import errors
from meshtrust.cli import common
from meshtrust.cli.output import Output
from meshtrust.server import app, config


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "server", help="run the management server (the relay CA)",
        description="Run the management server. On first start it generates the relay PKI "
                    "(root, signing CA, server certificate, identity token) in the store; "
                    "existing secrets are used as they are. Agents bootstrap on the bootstrap "
                    "listener (server-authenticated TLS) and then use the relay listener "
                    "(mutual TLS). Settings come from --config (YAML) and flags; flags win.")
    common.add_store_option(parser, "the management store")
    parser.add_argument("--config", type=Path, help="YAML file of settings (keys as the flags)")
    parser.add_argument("--listen", help=f"relay listener, mTLS (default "
                                         f"{config.DEFAULT_LISTEN})")
    parser.add_argument("--bootstrap-listen",
                        help=f"bootstrap listener, server TLS (default "
                             f"{config.DEFAULT_BOOTSTRAP_LISTEN})")
    parser.add_argument("--client-lifetime",
                        help="lifetime of issued client certificates, e.g. 365d, 12h, 90s "
                             "(default 365d)")
    parser.add_argument("--server-lifetime",
                        help="lifetime of the server certificate meshtrust makes and renews "
                             "(default 365d)")
    parser.add_argument("--signing-lifetime",
                        help="lifetime of the relay signing CA meshtrust makes and renews "
                             "(default 1825d)")
    parser.add_argument("--ca-grace-ratio", metavar="RATIO",
                        help="renew the server certificate and signing CA meshtrust made when "
                             "this share of their lifetime is left (default 0.1); brought or "
                             "external ones are only warned about")
    parser.add_argument("--server-name", action="append", dest="server_names",
                        help="extra SAN of a generated server certificate (repeatable; "
                             "default localhost and 127.0.0.1)")
    parser.add_argument("--key-type", help="key type of generated relay keys "
                                           "(default ecdsa-p256)")
    parser.add_argument("--token-mode", choices=["shared", "cluster", "any"],
                        help="tokens bootstrap accepts: the shared relay-identity-token-secret, "
                             "per-cluster single-use tokens, or either (default any)")
    parser.add_argument("--heartbeat",
                        help="how often an idle work stream sends its agent a heartbeat "
                             "(default 30s; gRPC keepalive pings keep connections checked)")
    parser.add_argument("--reconcile-interval",
                        help="how often trust policies are checked for renewals (default 5s)")
    parser.add_argument("--max-issuances", metavar="N",
                        help="certificates signed at once (bootstraps, renewals, Istio "
                             "intermediates, which may hold a quarter of them); callers past "
                             "that wait their turn (see --max-issuance-wait) or get "
                             "RESOURCE_EXHAUSTED with a time to retry (default 64)")
    parser.add_argument("--max-issuance-wait", metavar="DURATION",
                        help="how long a caller past --max-issuances may wait for its turn "
                             "before it is told when to retry; 0 refuses at once (default 1s)")
    parser.add_argument("--max-bootstrap-wait", metavar="DURATION",
                        help="the same for a bootstrap: its agent has nothing to do until it "
                             "is answered, and waiting costs the server less than a call "
                             "made again (default 10s; less than the agents' 15 s deadline)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics, the "
                             "read-only expiry dashboard at /ui and its JSON at "
                             "/api/inventory (port 0: any free port, written to the ready "
                             "file)")
    parser.add_argument("--ready-file", help="write the bound ports as JSON here once serving")
    parser.add_argument("--key-passphrase-file", metavar="FILE",
                        help="keep the CA private keys in the store encrypted with the "
                             "passphrase in FILE (or $MESHTRUST_KEY_PASSPHRASE): plain ones are "
                             "sealed at start, and a wrong or missing passphrase stops the "
                             "server with a clear error")
    parser.add_argument("--audit-log", metavar="FILE",
                        help="also append every audit record the server writes to FILE, one "
                             "JSON line each, fsynced (the store always holds them)")
    parser.add_argument("--audit-retention", metavar="DURATION",
                        help="delete audit records older than this (default 90d)")
    parser.add_argument("--audit-max-events", metavar="N",
                        help="keep at most the newest N audit records (default 100000)")
    parser.add_argument("--leader-lease-ttl", metavar="DURATION",
                        help="replicas on one store (PostgreSQL) elect a leader, which alone "
                             "runs the timed loops (trust reconcile, root rotations, relay CA "
                             "renewal, audit pruning); it renews its lease every third of "
                             "this, and a stopped leader is replaced within it (default 10s)")
    parser.add_argument("--replica", metavar="NAME",
                        help="this replica's name in leases and connection records, a DNS "
                             "label (default: host name and process id)")
    parser.add_argument("--gc-threshold", metavar="N",
                        help="Python collects its youngest objects after N allocations; "
                             "Python's own 700 makes a server holding thousands of agents "
                             "spend several times longer collecting (default "
                             f"{config.DEFAULT_GC_THRESHOLD})")
    parser.add_argument("--mmap-threshold", metavar="BYTES",
                        help="allocations of at least BYTES get memory pages of their own, "
                             "given back when freed (glibc's M_MMAP_THRESHOLD): the TLS "
                             "buffers of each agent's connection then take memory only where "
                             "written, about 17 KB less per agent; 0 leaves the C library's "
                             f"own (default {config.DEFAULT_MMAP_THRESHOLD}; glibc only)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="plaintext relay with no certificates, for demos only (only "
                             "this flag turns it on; a --config file cannot)")
    common.add_log_option(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace, out: Output) -> int:
    values: dict[str, Any] = {}
    if args.config:
        try:
            loaded = yaml.safe_load(args.config.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise errors.ConfigError(f"cannot read {args.config}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise errors.ConfigError(f"{args.config} must hold a mapping of settings")
        values.update(loaded or {})
    for name in ("store", "listen", "bootstrap_listen", "client_lifetime", "server_lifetime",
                 "signing_lifetime", "ca_grace_ratio", "server_names",
                 "key_type", "token_mode", "heartbeat", "ready_file", "insecure", "metrics",
                 "reconcile_interval", "max_issuances", "max_issuance_wait", "max_bootstrap_wait",
                 "audit_log",
                 "audit_retention",
                 "audit_max_events",
                 "key_passphrase_file", "leader_lease_ttl", "replica", "gc_threshold",
                 "mmap_threshold"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    settings = config.from_mapping(values)
    if settings.insecure and not args.insecure:
        raise errors.ConfigError(
            f"insecure mode needs the --insecure flag on the command line; {args.config} "
            "sets insecure: true, but a config file alone cannot turn off TLS")
    common.setup_logging(args.log_level)
    if settings.insecure:
        out.warn("insecure mode: the relay is plaintext and agents are not authenticated")
    asyncio.run(app.run(settings))
    return 0
