"""``meshtrust pki``: offline hierarchies, inspection and bring-your-own checks.

These commands work on files only, with no server: ``init`` writes every
secret of an architecture in the directory layout of the ``dir://`` store,
``inspect`` describes certificates, ``verify`` checks a bundle against a
profile and lists every problem.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509

from meshtrust import errors, settings
from meshtrust.cli.output import Output
from meshtrust.pki import bundle, hierarchy, keys, profiles, verify
from meshtrust.store import base as store_base
from meshtrust.store import opened_store

CERT_SUFFIXES = (".crt", ".pem", ".cer", ".der")
MAIN_CERT_KEYS = ("ca-cert.pem", "tls.crt", "root-cert.pem", "ca.crt")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pki = sub.add_parser("pki", help="offline CA hierarchies, inspection and checks",
                         description=__doc__.split("\n\n")[1])
    pki.set_defaults(help_parser=pki)
    cmds = pki.add_subparsers(dest="pki_command", metavar="COMMAND")

    init = cmds.add_parser(
        "init", help="write a whole CA hierarchy for one architecture",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate the relay PKI (root, signing CA, server and client "
                    "certificates, identity token) and the Istio PKI (root, one intermediate "
                    "per cluster) and write them as secrets:\n\n"
                    "  DIR/mgmt/gloo-mesh/relay-root-tls-secret/{ca.crt,tls.crt,tls.key}\n"
                    "  DIR/<cluster>/gloo-mesh/relay-client-tls-secret/{ca.crt,tls.crt,tls.key}\n"
                    "  DIR/<cluster>/istio-system/cacerts/{ca-cert.pem,ca-key.pem,"
                    "root-cert.pem,cert-chain.pem}\n\n"
                    "Architectures: shared = one root and one intermediate for relay and "
                    "Istio; split = one root, separate relay and Istio intermediates; "
                    "separate = separate roots. Each DIR/<cluster> is a dir:// store.")
    init.add_argument("--architecture", required=True,
                      choices=[a.value for a in hierarchy.Architecture])
    init.add_argument("--clusters", required=True,
                      help="comma-separated workload cluster names, e.g. cluster-1,cluster-2")
    init.add_argument("--out", required=True, type=Path, help="directory to write into")
    init.add_argument("--key-type", default="ecdsa-p256",
                      help="key type of the relay CAs and certificates "
                           "(rsa-2048|rsa-3072|rsa-4096|ecdsa-p256|ecdsa-p384; default "
                           "%(default)s)")
    init.add_argument("--istio-key-type", default="rsa-4096",
                      help="key type of the Istio CAs (default %(default)s, as Istio's tools)")
    init.add_argument("--trust-domain", default=settings.DEFAULT_TRUST_DOMAIN,
                      help="Istio trust domain (default %(default)s)")
    init.add_argument("--server-name", action="append", default=[], dest="server_names",
                      help="extra SAN of the relay server certificate (repeatable); "
                           "DNS:*.gloo-mesh is always present")
    init.add_argument("--policy", default=settings.DEFAULT_POLICY_NAME,
                      help="trust policy name: the Istio root goes to root-trust.<policy>")
    init.add_argument("--force", action="store_true",
                      help="write into a non-empty directory, replacing what is there")
    init.set_defaults(handler=_init)

    inspect = cmds.add_parser(
        "inspect", help="describe certificates in files or secret folders",
        description="Print subject, issuer, SANs, key, validity, days left and SHA-256 "
                    "fingerprint of every certificate in the given files or folders.")
    inspect.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    inspect.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    inspect.set_defaults(handler=_inspect)

    verify = cmds.add_parser(
        "verify", help="check a bring-your-own bundle against a profile",
        description="Check a secret folder (cacerts or tls form) against a profile: the "
                    "chain verifies to the root, the key matches, CA flag, pathlen, key "
                    "usages, SANs, lifetime within the issuer's. Lists every problem and "
                    "exits 1 when there is one.")
    verify.add_argument("--profile", required=True, choices=list(profiles.PROFILES))
    verify.add_argument("--cluster", help="expected cluster name (relay-client)")
    verify.add_argument("--trust-domain", default=settings.DEFAULT_TRUST_DOMAIN)
    verify.add_argument("path", type=Path, metavar="DIR")
    verify.set_defaults(handler=_verify)


def _init(args: argparse.Namespace, out: Output) -> int:
    clusters = tuple(c.strip() for c in args.clusters.split(",") if c.strip())
    options = hierarchy.Options(
        architecture=hierarchy.Architecture.parse(args.architecture),
        clusters=clusters,
        key_type=keys.KeyType.parse(args.key_type),
        istio_key_type=keys.KeyType.parse(args.istio_key_type),
        trust_domain=args.trust_domain,
        server_names=tuple(args.server_names),
        policy=args.policy,
    )
    target: Path = args.out
    if target.exists() and not target.is_dir():
        raise errors.ConfigError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not args.force:
        raise errors.ConfigError(
            f"{target} is not empty; choose an empty directory or pass --force to replace "
            "the secrets in it")
    now = dt.datetime.now(dt.UTC)
    built = hierarchy.build(options, now)
    asyncio.run(_write_secrets(target, built.secrets))
    out.line(f"wrote the {options.architecture.value} hierarchy for "
             f"{', '.join(clusters)} to {target}")
    _print_inventory(out, built, now)
    return 0


async def _write_secrets(target: Path, secrets: tuple[hierarchy.SecretFiles, ...]) -> None:
    by_cluster: dict[str, list[hierarchy.SecretFiles]] = {}
    for item in secrets:
        by_cluster.setdefault(item.cluster, []).append(item)
    for cluster, items in by_cluster.items():
        folder = (target / cluster).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        async with opened_store(f"dir://{folder}") as store:
            for item in items:
                secret = store_base.Secret(namespace=item.namespace, name=item.name,
                                           type=item.type, data=item.data,
                                           labels=settings.MANAGED_BY)
                try:
                    current = await store.get_secret(item.namespace, item.name)
                except errors.NotFound:
                    await store.create(secret)
                else:
                    await store.update(dataclasses.replace(
                        secret, resource_version=current.resource_version))


def _print_inventory(out: Output, built: hierarchy.Hierarchy, now: dt.datetime) -> None:
    """One row per secret: its main certificate, who signed it, and its files."""
    rows = []
    for item in built.secrets:
        main = next((k for k in MAIN_CERT_KEYS if k in item.data), None)
        summary = bundle.summary(bundle.load_certificate(item.data[main]), now) if main else None
        rows.append([
            item.cluster, f"{item.namespace}/{item.name}",
            summary["subject"] if summary else "(token)",
            summary["issuer"] if summary else "",
            str(summary["days_left"]) if summary else "",
        ])
    out.table(["cluster", "secret", "subject", "issuer", "days"], rows, title="inventory")


def _inspect(args: argparse.Namespace, out: Output) -> int:
    now = dt.datetime.now(dt.UTC)
    items: list[dict[str, Any]] = []
    for path in args.paths:
        for file, cert in _read_certificates(path):
            items.append({"source": str(file), **bundle.summary(cert, now)})
    if not items:
        raise errors.ConfigError("no certificates found in " +
                                 ", ".join(str(p) for p in args.paths))
    if args.output != "table":
        out.document(items, args.output)
        return 0
    for item in items:
        rows = [["subject", item["subject"]], ["issuer", item["issuer"]],
                ["SANs", ", ".join(item["sans"]) or "-"], ["key", item["key"]],
                ["CA", f"yes, pathlen {item['path_length']}" if item["ca"] and
                 item["path_length"] is not None else "yes" if item["ca"] else "no"],
                ["serial", item["serial"]],
                ["valid", f"{item['not_before']} → {item['not_after']}"],
                ["days left", str(item["days_left"])],
                ["SHA-256", item["fingerprint_sha256"]]]
        styles = {7: "red"} if item["days_left"] < 0 else None
        out.table(["field", "value"], rows, title=item["source"], styles=styles)
    return 0


def _verify(args: argparse.Namespace, out: Output) -> int:
    path: Path = args.path
    files = _read_secret_folder(path)
    found = bundle.load_bundle(files)
    profile = profiles.get_profile(args.profile)
    problems = verify.check_bundle(profile, found, dt.datetime.now(dt.UTC),
                                   cluster=args.cluster, trust_domain=args.trust_domain)
    if not problems:
        out.line(f"{path}: OK for profile {profile.name}")
        return 0
    out.line(f"{path}: {len(problems)} problem(s) for profile {profile.name}:")
    for problem in problems:
        out.line(f"  - {problem}")
    return 1


def _read_secret_folder(path: Path) -> dict[str, bytes]:
    if not path.is_dir():
        raise errors.ConfigError(f"{path} is not a folder; give the secret's folder, such as "
                                 "DIR/cluster-1/istio-system/cacerts")
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())
            if f.is_file() and not f.name.startswith(".")}


def _read_certificates(path: Path) -> list[tuple[Path, x509.Certificate]]:
    if not path.exists():
        raise errors.ConfigError(f"{path} does not exist")
    if path.is_dir():
        # Skip hidden entries: the dir:// store keeps versioned copies under "..r<N>".
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
    else:
        files = [path]
    found = []
    for file in files:
        if path.is_dir() and file.suffix not in CERT_SUFFIXES:
            continue
        data = file.read_bytes()
        if b"BEGIN CERTIFICATE" not in data and file.suffix != ".der":
            if not path.is_dir():
                raise errors.ConfigError(f"{file} holds no PEM certificate")
            continue
        for cert in bundle.load_certificates(data, str(file)):
            found.append((file, cert))
    return found
