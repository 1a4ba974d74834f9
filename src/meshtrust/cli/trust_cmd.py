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
from meshtrust.authority import istio, registry, relay_rotation, root_rotation, signers
from meshtrust.cli import common
from meshtrust.cli.output import Output
from meshtrust.store import opened_store


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

    rotate = sub.add_parser("rotate", help="rotate a trust policy's root without loss of trust")
    rotate.set_defaults(help_parser=rotate)
    what = rotate.add_subparsers(dest="rotate_command", metavar="WHAT")
    root = what.add_parser(
        "root", help="rotate the Istio root of a policy",
        description="Rotate the generated root of a trust policy in recorded steps that the "
                    "server carries out: (1) every cluster trusts old and new root, (2) "
                    "intermediates are re-issued under the new root, (3) the old root is "
                    "dropped once no cluster runs an intermediate of it. Each step waits "
                    "until every cluster confirms; a crash resumes where it stopped. "
                    "--rollback returns to the old root, before step 3.")
    root.add_argument("--policy", required=True, help="the RootTrustPolicy's name")
    root.add_argument("--rollback", action="store_true",
                      help="roll the rotation under way back to the old root")
    root.add_argument("--wait", type=float, metavar="SECONDS",
                      help="wait up to SECONDS for the rotation to finish, showing each step")
    common.add_store_option(root, "the management store")
    common.add_key_passphrase_option(root)
    root.set_defaults(handler=_rotate)
    relay_root = what.add_parser(
        "relay-root", help="rotate the relay root (agents and server) without loss of trust",
        description="Rotate the relay root in recorded steps that the server carries out: "
                    "(1) a new root and signing CA are made and the server and agents trust "
                    "old and new, (2) the new signing CA signs: the server certificate is "
                    "re-issued and every agent renews, (3) the old root is dropped once every "
                    "agent holds a certificate of the new one. The server asks each agent to "
                    "renew, and each renews within its --renew-spread (300 s by default), so a "
                    "step can take that long; a crash resumes where it "
                    "stopped. The server starts one by itself "
                    "when the relay root is past its renewal time. Bootstrap tokens minted "
                    "before the rotation carry the old root only: mint new ones after it.")
    relay_root.add_argument("--wait", type=float, metavar="SECONDS",
                            help="wait up to SECONDS for the rotation to finish, showing each "
                                 "step")
    common.add_store_option(relay_root, "the management store")
    common.add_key_passphrase_option(relay_root)
    relay_root.set_defaults(handler=_rotate_relay_root)


def _documents(path: Path) -> list[dict[str, Any]]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
        loaded = [d for d in yaml.safe_load_all(text) if d is not None]
    except OSError as exc:
        raise errors.ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # ValueError: not UTF-8, or a value YAML cannot build (a date such as 2026-13-45,
        # an !!int that is not a number); RecursionError: nesting too deep to read.
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
        async with opened_store(common.store_url(args)) as store:
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

    for line in asyncio.run(go()):
        out.line(line)
    return 0


def _status(args: argparse.Namespace, out: Output) -> int:
    async def go() -> list[dict[str, Any]]:
        async with opened_store(common.store_url(args)) as store:
            items = await store.list_resources(istio.ISSUED_KIND)
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


def _rotate(args: argparse.Namespace, out: Output) -> int:
    async def go() -> str:
        async with opened_store(common.store_url(args)) as store:
            clock = clock_module.SystemClock()
            authority = istio.IstioAuthority(
                store, clock, registry.Registry(store, clock), signer_cache=signers.Signers(
                    lock=signers.key_lock(args.key_passphrase_file)))
            rotations = root_rotation.RootRotations(store, clock, authority)
            if args.rollback:
                resource = await rotations.rollback(args.policy)
            else:
                resource = await rotations.start(args.policy)
            out.line(f"root rotation of policy {args.policy}: {resource.status['step']}")
            if args.wait is None:
                return str(resource.status["step"])
            return await _follow(store, args.policy, args.wait, out)

    step = asyncio.run(go())
    if args.wait is not None and step not in (s.value for s in root_rotation.FINAL):
        out.error(f"the rotation is still at {step}; see `meshtrust trust status` for the "
                  "clusters that have not confirmed")
        return 1
    return 0


ISTIO_FINAL = tuple(step.value for step in root_rotation.FINAL)


def _rotate_relay_root(args: argparse.Namespace, out: Output) -> int:
    async def go() -> str:
        async with opened_store(common.store_url(args)) as store:
            clock = clock_module.SystemClock()
            rotations = relay_rotation.RelayRootRotations(
                store, clock, registry.Registry(store, clock),
                signers.Signers(lock=signers.key_lock(args.key_passphrase_file)))
            resource = await rotations.start()
            out.line(f"relay root rotation: {resource.status['step']}")
            if args.wait is None:
                return str(resource.status["step"])
            return await _follow(store, relay_rotation.NAME, args.wait, out,
                                 kind=relay_rotation.ROTATION_KIND,
                                 final=(relay_rotation.Step.DONE.value,))

    step = asyncio.run(go())
    if args.wait is not None and step != relay_rotation.Step.DONE.value:
        out.error(f"the rotation is still at {step}; `meshtrust cluster list` shows the "
                  "clusters whose agents have not renewed (they must be connected)")
        return 1
    return 0


async def _follow(store: Any, name: str, seconds: float, out: Output, *,
                  kind: str = root_rotation.ROTATION_KIND,
                  final: tuple[str, ...] = ISTIO_FINAL) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    seen = ""
    while True:
        resource = await store.get_resource(kind, "gloo-mesh", name)
        step = str(resource.status.get("step"))
        if step != seen:
            out.line(f"  step {step}")
            seen = step
        if step in final or loop.time() >= deadline:
            return step
        await asyncio.sleep(0.5)
