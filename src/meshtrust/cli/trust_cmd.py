"""``meshtrust apply`` and ``meshtrust trust``: federated Istio trust policies and their state."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.authority import istio, registry
from meshtrust.cli import common
from meshtrust.cli.output import Output
from meshtrust.store import open_store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    apply = sub.add_parser(
        "apply", help="apply RootTrustPolicy or VirtualMesh documents",
        description="Check and store trust policies: admin.gloo.solo.io/v2 RootTrustPolicy "
                    "or the older networking.mesh.gloo.solo.io/v1 VirtualMesh (stored as a "
                    "RootTrustPolicy). A mistake is reported with the field's path and what "
                    "is allowed, and nothing is stored. The server then issues every selected "
                    "cluster an Istio intermediate whose key is made in that cluster.")
    apply.add_argument("-f", "--filename", required=True, type=Path,
                       help="YAML file (several documents allowed); - for standard input")
    common.add_store_option(apply, "the management store")
    apply.set_defaults(handler=_apply)

    trust = sub.add_parser("trust", help="the state of federated Istio trust")
    trust.set_defaults(help_parser=trust)
    cmds = trust.add_subparsers(dest="trust_command", metavar="COMMAND")
    status = cmds.add_parser("status", help="each cluster's intermediate: state, serial, "
                                            "expiry, pods restarted")
    common.add_store_option(status, "the management store")
    status.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    status.set_defaults(handler=_status)


def _documents(path: Path) -> list[dict[str, Any]]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
        loaded = [d for d in yaml.safe_load_all(text) if d is not None]
    except OSError as exc:
        raise errors.ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise errors.ConfigError(f"{path} is not valid YAML: {exc}") from exc
    for index, document in enumerate(loaded):
        if not isinstance(document, dict):
            raise errors.ConfigError(f"{path}: document {index + 1} is not a mapping")
    if not loaded:
        raise errors.ConfigError(f"{path} holds no document")
    return loaded


def _apply(args: argparse.Namespace, out: Output) -> int:
    documents = _documents(args.filename)

    async def go() -> list[str]:
        store = await open_store(common.store_url(args))
        try:
            clock = clock_module.SystemClock()
            authority = istio.IstioAuthority(store, clock, registry.Registry(store, clock))
            done = []
            for index, document in enumerate(documents):
                try:
                    resource, created = await authority.apply(document)
                except errors.ConfigError as exc:
                    raise errors.ConfigError(f"document {index + 1}: {exc}") from exc
                done.append(f"roottrustpolicy/{resource.name} "
                            f"{'created' if created else 'configured'}")
            return done
        finally:
            await store.close()

    for line in asyncio.run(go()):
        out.line(line)
    return 0


def _status(args: argparse.Namespace, out: Output) -> int:
    async def go() -> list[dict[str, Any]]:
        store = await open_store(common.store_url(args))
        try:
            items = await store.list_resources(istio.ISSUED_KIND)
        finally:
            await store.close()
        return [{"policy": i.spec.get("policy"), "cluster": i.spec.get("cluster"),
                 "state": i.status.get("state"), "round": i.status.get("round"),
                 "serial": i.status.get("serial"), "notAfter": i.status.get("notAfter"),
                 "renewAt": i.status.get("renewAt"),
                 "bouncedPods": i.status.get("bouncedPods", []),
                 "restartNeeded": i.status.get("restartNeeded", False),
                 "message": i.status.get("message", "")} for i in items]

    items = asyncio.run(go())
    if args.output != "table":
        out.document(items, args.output)
        return 0
    rows = [[str(i["policy"]), str(i["cluster"]), str(i["state"]), (i["serial"] or "-")[:16],
             (i["notAfter"] or "-")[:19], str(len(i["bouncedPods"])),
             i["message"][:60]] for i in items]
    styles = {n: "red" for n, i in enumerate(items) if i["state"] == "FAILED"}
    out.table(["policy", "cluster", "state", "serial", "not after", "pods restarted",
               "message"], rows, styles=styles)
    return 0
