"""The ``meshtrust`` command: parse arguments, dispatch, turn errors into exit codes.

Each command group lives in its own module with a ``register(subparsers)``
function; a handler takes the parsed arguments and an ``Output`` and returns
the exit code. This is the only code that prints or exits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshtrust import __version__, errors
from meshtrust.cli import (
    agent_cmd,
    audit_cmd,
    backup_cmd,
    cluster_cmd,
    demo_cmd,
    init_cmd,
    output,
    pki_cmd,
    server_cmd,
    status_cmd,
    store_cmd,
    trust_cmd,
)

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshtrust",
        description=(
            "Certificate management for multi-cluster service meshes: a management "
            "server that is the CA for a fleet of clusters, agents that bootstrap over "
            "a gRPC mTLS relay, and federated Istio trust whose intermediate keys never "
            "leave their cluster."
        ),
    )
    parser.add_argument("--version", action="version", version=f"meshtrust {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


_COMMANDS = (demo_cmd, init_cmd, pki_cmd, server_cmd, agent_cmd, cluster_cmd, trust_cmd, status_cmd,
             store_cmd, backup_cmd, audit_cmd)


def main(argv: Sequence[str] | None = None, out: output.Output | None = None) -> int:
    """Run the command line with ``argv``; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out or output.Output()
    handler = getattr(args, "handler", None)
    if handler is None:
        # A command group given without its subcommand: show its help.
        help_parser = getattr(args, "help_parser", parser)
        help_parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(handler(args, out))
    except errors.MeshTrustError as exc:
        out.error(str(exc))
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        out.error("interrupted")
        return 130


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
