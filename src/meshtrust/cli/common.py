"""Pieces every command group shares: the --store option and logging."""

from __future__ import annotations

import argparse
import logging
import os

from meshtrust import errors

STORE_ENV = "MESHTRUST_STORE"


def add_store_option(parser: argparse.ArgumentParser, what: str = "the store") -> None:
    parser.add_argument(
        "--store", default=os.environ.get(STORE_ENV),
        help=f"URL of {what}: sqlite:///path/file.db, dir:///path or "
             f"postgresql://user@host/db (default: ${STORE_ENV})")


def store_url(args: argparse.Namespace) -> str:
    if not args.store:
        raise errors.ConfigError(f"no store given: pass --store URL or set {STORE_ENV}")
    return str(args.store)


def add_log_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="how much to log (default %(default)s)")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # gRPC's own logger is chatty about reconnects; our messages say what matters.
    logging.getLogger("grpc").setLevel(logging.WARNING)


def add_key_passphrase_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-passphrase-file", metavar="FILE",
        help="the passphrase the store's CA keys are sealed with (default: "
             "$MESHTRUST_KEY_PASSPHRASE; none: keys are kept plain)")
