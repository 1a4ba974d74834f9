"""``meshtrust store``: look into and edit a cluster's state store by hand.

Operators use it to inspect what meshtrust keeps (``get``, ``list``), to bring
their own certificates or policies (``apply -f``, Kubernetes YAML as for
kubectl), and to clean up (``delete``). It parses, calls the store and
prints; everything else lives in ``meshtrust.store``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from meshtrust import errors
from meshtrust import store as store_module
from meshtrust.cli import output
from meshtrust.store import base, manifest

ENV_STORE = "MESHTRUST_STORE"

_STORE_HELP = (f"the store URL: sqlite:///path/cluster.db, dir:///path or "
               f"postgresql://user:password@host:port/db (default: ${ENV_STORE})")
_DESCRIPTION = """\
Read and write the Kubernetes-shaped objects a cluster's state store keeps:
secrets (certificates, keys, tokens) and resources (policies, leases).
Every command takes --store URL, or reads it from $MESHTRUST_STORE.

examples:
  meshtrust store list secrets -n gloo-mesh --store sqlite:///var/lib/meshtrust/mgmt.db
  meshtrust store get secret cacerts -n istio-system -o yaml
  meshtrust store apply -f my-ca.yaml
  meshtrust store delete secret relay-client-tls-secret -n gloo-mesh
"""


def register(subparsers: Any) -> None:
    """Add ``store`` and its commands to the top-level parser."""
    parser = subparsers.add_parser(
        "store", help="inspect and edit the state store (secrets and resources)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(help_parser=parser)
    verbs = parser.add_subparsers(dest="store_command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="URL", help=_STORE_HELP)

    get = verbs.add_parser("get", help="show one secret or resource",
                           description="Show one secret or resource.")
    get.set_defaults(help_parser=get)
    targets = get.add_subparsers(dest="target", metavar="secret|resource")
    secret = targets.add_parser(
        "secret", parents=[common], help="show a secret: its keys and their sizes",
        description="Show a secret. Values stay hidden unless --show-data is given; "
                    "without it each key is shown with its size in bytes.")
    secret.add_argument("name", help="the secret's name, such as cacerts")
    _add_namespace(secret)
    _add_format(secret)
    secret.add_argument("--show-data", action="store_true",
                        help="print the values (base64 in JSON/YAML); they may be private keys")
    secret.set_defaults(handler=_get_secret, help_parser=secret)
    resource = targets.add_parser("resource", parents=[common], help="show a resource",
                                  description="Show a resource with its spec and status.")
    resource.add_argument("kind", help="the resource's kind, such as RootTrustPolicy or Lease")
    resource.add_argument("name", help="the resource's name")
    _add_namespace(resource)
    _add_format(resource, default="yaml")
    resource.set_defaults(handler=_get_resource, help_parser=resource)

    listing = verbs.add_parser(
        "list", parents=[common], help="list secrets or resources",
        description="List secrets, or resources of one kind, optionally filtered by "
                    "namespace and labels.")
    listing.add_argument("what", choices=("secrets", "resources"), help="what to list")
    listing.add_argument("-n", "--namespace", help="only this namespace (default: all)")
    listing.add_argument("-l", "--selector", metavar="KEY=VALUE,...",
                         help="only objects carrying all these labels")
    listing.add_argument("--kind", help="the kind of resources to list (required for resources)")
    _add_format(listing)
    listing.add_argument("--show-data", action="store_true",
                         help="with -o json|yaml, include secret values")
    listing.set_defaults(handler=_list, help_parser=listing)

    apply = verbs.add_parser(
        "apply", parents=[common], help="create or update objects from Kubernetes YAML",
        description="Create or update every object in a multi-document Kubernetes YAML file. "
                    "Secrets take data (base64) and stringData; any other kind is stored "
                    "as a resource. A metadata.resourceVersion, if given, must match.")
    apply.add_argument("-f", "--filename", required=True, metavar="FILE",
                       help="the YAML file, or - for standard input")
    _add_namespace(apply, "the namespace of documents that name none")
    apply.set_defaults(handler=_apply, help_parser=apply)

    delete = verbs.add_parser("delete", help="delete a secret or resource",
                              description="Delete a secret or resource.")
    delete.set_defaults(help_parser=delete)
    gone = delete.add_subparsers(dest="target", metavar="secret|resource")
    secret = gone.add_parser("secret", parents=[common], help="delete a secret")
    secret.add_argument("name", help="the secret's name")
    resource = gone.add_parser("resource", parents=[common], help="delete a resource")
    resource.add_argument("kind", help="the resource's kind")
    resource.add_argument("name", help="the resource's name")
    for parser_ in (secret, resource):
        _add_namespace(parser_)
        parser_.add_argument("--resource-version", type=int, metavar="N",
                             help="delete only if the object is still at this version")
        parser_.set_defaults(handler=_delete, help_parser=parser_)


def _add_namespace(parser: argparse.ArgumentParser, text: str = "the namespace") -> None:
    parser.add_argument("-n", "--namespace", default="default", help=f"{text} (default: default)")


def _add_format(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("-o", "--output", choices=("json", "yaml"), default=default,
                        help="print the Kubernetes manifest as JSON or YAML instead of a table")


def _run(args: argparse.Namespace, work: Callable[[base.Store], Awaitable[int]]) -> int:
    """Open the store the arguments name, run ``work`` on it, and close it."""
    location = args.store or os.environ.get(ENV_STORE)
    if not location:
        raise errors.ConfigError(f"no store given: pass --store URL or set {ENV_STORE}")

    async def main() -> int:
        opened = await store_module.open_store(location)
        try:
            return await work(opened)
        finally:
            await opened.close()

    try:
        return asyncio.run(main())
    except base.InvalidField as exc:  # a malformed name or kind typed on the command line
        raise errors.ConfigError(f"invalid {exc.field}: {exc.reason}") from exc


def _get_secret(args: argparse.Namespace, out: output.Output) -> int:
    async def work(opened: base.Store) -> int:
        secret = await opened.get_secret(args.namespace, args.name)
        fmt = args.output or ("yaml" if args.show_data else None)
        if fmt:
            out.document(manifest.dump(secret, show_data=args.show_data), fmt)
            return 0
        out.line(f"secret {secret.namespace}/{secret.name}  type {secret.type}  "
                 f"resourceVersion {secret.resource_version}  created {_time(secret.created)}")
        if secret.labels:
            out.line("labels: " + _selector_text(secret.labels))
        out.table(("KEY", "SIZE"), [(key, f"{len(value)} bytes")
                                    for key, value in sorted(secret.data.items())])
        return 0

    return _run(args, work)


def _get_resource(args: argparse.Namespace, out: output.Output) -> int:
    async def work(opened: base.Store) -> int:
        resource = await opened.get_resource(args.kind, args.namespace, args.name)
        out.document(manifest.dump(resource), args.output)
        return 0

    return _run(args, work)


def _list(args: argparse.Namespace, out: output.Output) -> int:
    labels = _parse_selector(args.selector)
    if args.what == "resources" and not args.kind:
        raise errors.ConfigError("list resources needs --kind, such as --kind Lease")

    async def work(opened: base.Store) -> int:
        found: list[base.Object] = []
        if args.what == "secrets":
            found.extend(await opened.list_secrets(namespace=args.namespace, labels=labels))
        else:
            found.extend(await opened.list_resources(args.kind, namespace=args.namespace,
                                                     labels=labels))
        if args.output:
            items = [manifest.dump(obj, show_data=args.show_data) for obj in found]
            out.document({"apiVersion": "v1", "kind": "List", "items": items}, args.output)
        elif args.what == "secrets":
            out.table(("NAMESPACE", "NAME", "TYPE", "KEYS", "VERSION", "UPDATED"), [
                (obj.namespace, obj.name, obj.type, ", ".join(sorted(obj.data)),
                 str(obj.resource_version), _time(obj.updated))
                for obj in found if isinstance(obj, base.Secret)])
        else:
            out.table(("NAMESPACE", "NAME", "GENERATION", "VERSION", "UPDATED"), [
                (obj.namespace, obj.name, str(obj.generation), str(obj.resource_version),
                 _time(obj.updated))
                for obj in found if isinstance(obj, base.Resource)], title=args.kind)
        return 0

    return _run(args, work)


def _apply(args: argparse.Namespace, out: output.Output) -> int:
    source = "standard input" if args.filename == "-" else args.filename
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as handle:
                text = handle.read()
    except OSError as exc:
        raise errors.ConfigError(f"cannot read {source}: {exc.strerror}") from exc
    documents = manifest.load_documents(text, source=source, namespace=args.namespace)

    async def work(opened: base.Store) -> int:
        for obj in documents:
            out.line(f"{obj.kind.lower()}/{obj.namespace}/{obj.name} "
                     f"{await _apply_one(opened, obj)}")
        return 0

    return _run(args, work)


async def _apply_one(opened: base.Store, obj: base.Object) -> str:
    """Create ``obj`` or update it in place; say which."""
    try:
        current: base.Object = (
            await opened.get_secret(obj.namespace, obj.name) if isinstance(obj, base.Secret)
            else await opened.get_resource(obj.kind, obj.namespace, obj.name))
    except errors.NotFound:
        if isinstance(obj, base.Secret):
            await opened.create(dataclasses.replace(obj, resource_version=0))
        else:
            await opened.create(dataclasses.replace(obj, resource_version=0))
        return "created"
    wanted = dataclasses.replace(obj, resource_version=obj.resource_version
                                 or current.resource_version)
    if isinstance(wanted, base.Resource):
        assert isinstance(current, base.Resource)
        same = (wanted.api_version, wanted.labels, wanted.annotations, wanted.spec) == (
            current.api_version, current.labels, current.annotations, current.spec)
        if not same:
            wanted = dataclasses.replace(wanted, resource_version=(
                await opened.update(wanted)).resource_version)
        if wanted.status and wanted.status != current.status:
            await opened.update_status(wanted)
            same = False
        return "unchanged" if same else "configured"
    assert isinstance(current, base.Secret)
    if (wanted.type, wanted.data, wanted.labels, wanted.annotations) == (
            current.type, current.data, current.labels, current.annotations):
        return "unchanged"
    await opened.update(wanted)
    return "configured"


def _delete(args: argparse.Namespace, out: output.Output) -> int:
    kind = base.SECRET_KIND if args.target == "secret" else args.kind

    async def work(opened: base.Store) -> int:
        await opened.delete(kind, args.namespace, args.name,
                            resource_version=args.resource_version)
        out.line(f"{kind.lower()}/{args.namespace}/{args.name} deleted")
        return 0

    return _run(args, work)


def _parse_selector(text: str | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for term in (text or "").split(","):
        if not term.strip():
            continue
        key, equals, value = term.partition("=")
        if not equals or not key.strip():
            raise errors.ConfigError(f"label selector term {term!r} is not KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


def _selector_text(labels: Any) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _time(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"
