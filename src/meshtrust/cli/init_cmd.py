"""``meshtrust init``: set a management store up for one certificate architecture."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rich.tree import Tree

from meshtrust import clock, errors, settings
from meshtrust.authority import architectures, ca_config, signers
from meshtrust.cli import common
from meshtrust.cli.output import Output
from meshtrust.pki import hierarchy, keys
from meshtrust.providers import external
from meshtrust.store import opened_store

DESCRIPTION = """\
Set the management store up for one of the nine combinations of the reference's
certificate architectures, so that `meshtrust server --store URL` then runs it.

How many CAs (--architecture):
  shared    one root and one intermediate that signs relay and Istio certificates
  split     one root; a relay intermediate and a separate signer of Istio intermediates
  separate  a relay root and an Istio root that share nothing

Where the CA keys live (--placement, --provider):
  internal  every CA key in the management store (--provider local, the default)
  hybrid    the roots outside: at AWS Private CA (--provider aws-pca; for split the relay
            intermediate too, as the reference's ACM example does), or your own offline
            root, bringing the intermediates as files (--provider secret --relay-ca DIR
            [--istio-ca DIR]); meshtrust keeps the other intermediates and signs with them
  external  every CA key at AWS Private CA (--provider aws-pca), which then signs the relay
            server and client certificates and the clusters' Istio CAs; or nowhere meshtrust
            can reach (--provider none): you bring and renew every certificate, and
            meshtrust only watches the secrets, reloads them and reports expiry

It writes the relay secrets (relay-root-tls-secret, relay-tls-signing-secret,
relay-server-tls-secret, relay-identity-token-secret), a RootTrustPolicy for the
clusters' Istio CAs and a CertificateAuthorities record, then prints the hierarchy:
which CA signs what and where each key lives. AWS credentials come from the usual
places (environment, profile, instance role); the region from --region.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    init = sub.add_parser("init", help="set the management store up for one certificate "
                                       "architecture (CAs, relay secrets, trust policy)",
                          description=DESCRIPTION,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_store_option(init, "the management store")
    init.add_argument("--architecture", required=True,
                      choices=[a.value for a in hierarchy.Architecture])
    init.add_argument("--placement", default="internal",
                      choices=[p.value for p in ca_config.Placement],
                      help="where the CA keys live (default %(default)s)")
    init.add_argument("--provider", default="",
                      choices=["", "local", "aws-pca", "secret", "none"],
                      help="who holds the external CA keys; default: local for internal, "
                           "aws-pca for hybrid and external")
    init.add_argument("--region", help="AWS region of the Private CAs (aws-pca)")
    init.add_argument("--root-arn", default="",
                      help="adopt this AWS Private CA root instead of creating one")
    init.add_argument("--istio-root-arn", default="",
                      help="adopt this AWS Private CA as the Istio root (separate)")
    init.add_argument("--relay-ca", type=Path,
                      help="folder with the relay (or shared) intermediate you bring: tls.crt, "
                           "tls.key, ca.crt (provider secret)")
    init.add_argument("--istio-ca", type=Path,
                      help="folder with the intermediate that signs Istio CAs, for split and "
                           "separate (provider secret)")
    init.add_argument("--key-type", default="ecdsa-p256",
                      help="key type of the CAs and server certificate meshtrust makes "
                           "(default %(default)s)")
    init.add_argument("--server-name", action="append", default=[], dest="server_names",
                      help="extra SAN of the relay server certificate (repeatable; default "
                           "localhost and 127.0.0.1); DNS:*.gloo-mesh is always present")
    init.add_argument("--policy", default=settings.DEFAULT_POLICY_NAME,
                      help="name of the RootTrustPolicy to write (default %(default)s)")
    init.add_argument("--trust-domain", default=settings.DEFAULT_TRUST_DOMAIN,
                      help="Istio trust domain (default %(default)s)")
    init.add_argument("--auto-restart-pods", action="store_true",
                      help="let agents restart istiod and workloads after a new Istio CA")
    common.add_key_passphrase_option(init)
    init.add_argument("--force", action="store_true",
                      help="replace a store that is set up already")
    init.add_argument("-o", "--output", default="tree", choices=["tree", "json", "yaml"])
    init.set_defaults(handler=_init)


def _folder(path: Path | None, what: str) -> dict[str, bytes] | None:
    if path is None:
        return None
    if not path.is_dir():
        raise errors.ConfigError(f"{what} {path} is not a folder with tls.crt, tls.key and "
                                 "ca.crt")
    return {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()}


def _init(args: argparse.Namespace, out: Output) -> int:
    options = architectures.Options(
        architecture=hierarchy.Architecture.parse(args.architecture),
        placement=ca_config.Placement.parse(args.placement),
        provider=args.provider, key_type=keys.KeyType.parse(args.key_type),
        server_names=tuple(args.server_names) or architectures.Options.server_names,
        policy=args.policy, trust_domain=args.trust_domain,
        auto_restart_pods=args.auto_restart_pods, root_arn=args.root_arn,
        istio_root_arn=args.istio_root_arn,
        relay_ca=_folder(args.relay_ca, "--relay-ca"),
        istio_ca=_folder(args.istio_ca, "--istio-ca"),
        key_lock=signers.key_lock(args.key_passphrase_file))
    options.check()
    service = None
    if options.chosen_provider == "aws-pca":
        if not args.region:
            raise errors.ConfigError("--provider aws-pca needs --region, the AWS region of "
                                     "the Private CAs")
        service = external.open_service("aws-pca", args.region)

    async def go() -> architectures.Result:
        async with opened_store(common.store_url(args)) as store:
            return await architectures.initialize(store, clock.SystemClock(), options,
                                                  external=service, force=args.force)

    result = asyncio.run(go())
    if args.output != "tree":
        out.document({"architecture": result.config.architecture,
                      "placement": result.config.placement.value,
                      "relaySigner": result.config.to_spec()["relaySigner"],
                      "policy": result.policy, "secrets": list(result.secrets),
                      "hierarchy": [n.to_dict() for n in result.tree]}, args.output)
        return 0
    title = (f"{result.config.architecture} architecture, {result.config.placement.value} "
             "placement")
    tree = Tree(f"[bold]{title}[/bold]")
    for node in result.tree:
        _add(tree, node)
    out.console.print(tree)
    out.line()
    for name in result.secrets:
        out.line(f"wrote secret {name}")
    if result.policy:
        out.line(f"applied RootTrustPolicy {result.policy}")
    out.line("next: meshtrust server --store URL")
    return 0


def _add(parent: Tree, node: architectures.Node) -> None:
    expiry = f", expires {node.not_after:%Y-%m-%d}" if node.not_after else ""
    branch = parent.add(f"[bold]{node.role}[/bold] {node.subject} "
                        f"[dim](key: {node.key_location}{expiry})[/dim]")
    for child in node.children:
        _add(branch, child)

