"""``meshtrust backup`` and ``meshtrust restore``: the management store's CA material, sealed.

The commands read the passphrase or key file, open the store and write the
sealed file (0600, atomically, never over an existing one without --force).
What goes into a backup and how it is restored lives in
``authority.backup``; the encryption in ``pki.envelope``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.authority import backup
from meshtrust.cli import common
from meshtrust.cli.output import Output
from meshtrust.pki import envelope
from meshtrust.store import opened_store

SHORT_PASSPHRASE = 12

_BACKUP_DESCRIPTION = """\
Write the management store's CA material into one encrypted file: the relay
secrets (relay-root-tls-secret, relay-tls-signing-secret, relay-server-tls-secret,
relay-identity-token-secret), every root-trust.<policy> secret and every secret a
policy's secretRef names, and the RootTrustPolicy, RootRotation, KubernetesCluster
and IssuedCertificate resources with their status. Restored, the server carries on:
agents reconnect with the certificates they hold and no mesh re-issues its CA.

Bootstrap tokens are NOT included: they are single-use secrets. A cluster whose
agent had not bootstrapped when the backup was made needs a new one after a
restore (meshtrust cluster token NAME).

The file is AES-256-GCM under a key derived from the passphrase with scrypt, or
under the 32 bytes of --key-file (raw or base64; make one with
`openssl rand -base64 32`). It is written with mode 0600.

examples:
  meshtrust backup -o mgmt.backup --store sqlite:///var/lib/meshtrust/mgmt.db \\
      --passphrase-file /run/secrets/backup-passphrase
  meshtrust backup inspect mgmt.backup --passphrase-file /run/secrets/backup-passphrase
"""

_RESTORE_DESCRIPTION = """\
Recreate what a backup holds in an empty management store, then start the server.
The file is decrypted and every certificate and key checked before anything is
written: a wrong passphrase or a damaged file changes nothing. A store that holds
the relay secrets or any object of the backup is refused, naming each one, unless
--force, which replaces them (objects not in the backup are left alone).
Stop the server first: on an empty store it generates a new relay PKI.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "backup", help="write the management store's CA material to an encrypted file",
        usage="meshtrust backup -o FILE [--store URL] (--passphrase-file FILE | --key-file "
              "FILE) [--force]\n       meshtrust backup inspect FILE (--passphrase-file FILE "
              "| --key-file FILE)",
        description=_BACKUP_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", metavar="FILE", help="the backup file to write")
    common.add_store_option(parser, "the management store")
    _secret_options(parser, required=False)
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")
    parser.set_defaults(handler=_backup, help_parser=parser)
    cmds = parser.add_subparsers(dest="backup_command", metavar="COMMAND")
    inspect = cmds.add_parser(
        "inspect", help="list what a backup holds, without writing anything",
        description="Decrypt a backup and list what it holds: each secret's keys and "
                    "certificate, each resource's state. Secret values are not shown.")
    inspect.add_argument("file", metavar="FILE", help="the backup file")
    _secret_options(inspect)
    inspect.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table",
                         help="how to print the list (default %(default)s)")
    inspect.set_defaults(handler=_inspect, help_parser=inspect)

    restore = sub.add_parser(
        "restore", help="recreate a backup in an empty management store",
        description=_RESTORE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    restore.add_argument("file", metavar="FILE", help="the backup file")
    common.add_store_option(restore, "the management store to restore into")
    _secret_options(restore)
    restore.add_argument("--force", action="store_true",
                         help="replace objects the store holds already")
    restore.add_argument("--dry-run", action="store_true",
                         help="decrypt, check and list what would be written, and what exists "
                              "already; write nothing")
    restore.set_defaults(handler=_restore, help_parser=restore)


def _secret_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--passphrase-file", metavar="FILE",
                       help="file holding the passphrase (one trailing newline is ignored); "
                            "- for standard input")
    group.add_argument("--key-file", metavar="FILE",
                       help="file holding a 32-byte key, raw or base64")


def _read(path: str, what: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise errors.ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _secret(args: argparse.Namespace) -> envelope.Passphrase | envelope.Key:
    if args.passphrase_file:
        where = f"passphrase file {args.passphrase_file}"
        return envelope.load_passphrase(_read(args.passphrase_file, "passphrase file"), where)
    if args.key_file:
        return envelope.load_key(_read(args.key_file, "key file"), f"key file {args.key_file}")
    raise errors.ConfigError("give --passphrase-file FILE or --key-file FILE")


def _open(path: str,
          secret: envelope.Passphrase | envelope.Key) -> tuple[envelope.Header, backup.Contents]:
    """Decrypt, parse and check a backup file: everything a restore needs, or an error."""
    sealed = _read(path, "backup file")
    try:
        plain = envelope.unseal(sealed, secret)
        header, _ = envelope.load_header(sealed)
    except envelope.CannotOpen as exc:
        raise envelope.CannotOpen(f"{path}: {exc}") from exc
    contents = backup.load_contents(plain)
    backup.check_contents(contents)
    return header, contents


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600 in one atomic step; never over a file
    that exists unless ``force``."""
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise errors.ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if path exists, with no window for a race
    except FileExistsError:
        raise errors.ConfigError(f"{path} exists; pass --force to replace it") from None
    except OSError as exc:
        raise errors.ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    with contextlib.suppress(OSError):  # make the new name durable too
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


def _summary(contents: backup.Contents) -> str:
    counts = backup.count(contents.objects)
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def _backup(args: argparse.Namespace, out: Output) -> int:
    if not args.output:
        raise errors.ConfigError("give -o FILE: where to write the backup")
    target = Path(args.output)
    if target.exists() and not args.force:
        raise errors.ConfigError(f"{target} exists; pass --force to replace it")
    secret = _secret(args)
    url = common.store_url(args)

    async def go() -> backup.Contents:
        async with opened_store(url) as store:
            return await backup.collect(store, clock_module.SystemClock())

    contents = asyncio.run(go())
    _write_private(target, envelope.seal(backup.dump_contents(contents), secret),
                   force=args.force)
    if isinstance(secret, envelope.Passphrase) and len(secret.value) < SHORT_PASSPHRASE:
        out.warn(f"the passphrase is shorter than {SHORT_PASSPHRASE} characters; anyone with "
                 "the file can try to guess it offline")
    for note in contents.notes:
        out.warn(note)
    out.line(f"wrote {target}: {_summary(contents)} (bootstrap tokens are not included)")
    return 0


def _inspect(args: argparse.Namespace, out: Output) -> int:
    header, contents = _open(args.file, _secret(args))
    sealing = "a key file" if header.scrypt is None else (
        f"a passphrase (scrypt n={header.scrypt.n} r={header.scrypt.r} p={header.scrypt.p})")
    if args.output != "table":
        out.document({
            "created": contents.created.isoformat(), "cipher": envelope.CIPHER,
            "sealedWith": sealing, "notes": list(contents.notes),
            "notBootstrapped": backup.unbootstrapped(contents),
            "objects": [{"kind": kind, "namespace": namespace, "name": name, "contents": what}
                        for kind, namespace, name, what in backup.inventory(
                            contents, clock_module.SystemClock().now())]}, args.output)
        return 0
    out.line(f"{args.file}: meshtrust backup made {contents.created.isoformat()}, "
             f"{envelope.CIPHER} with {sealing}; {_summary(contents)}")
    _show(contents, out)
    return 0


def _show(contents: backup.Contents, out: Output) -> None:
    rows = backup.inventory(contents, clock_module.SystemClock().now())
    out.table(("KIND", "NAMESPACE", "NAME", "CONTENTS"), [list(row) for row in rows])
    for note in contents.notes:
        out.line(f"note (when it was made): {note}")
    pending = backup.unbootstrapped(contents)
    if pending:
        out.line("not bootstrapped when the backup was made; each needs a new token after a "
                 "restore: " + ", ".join(pending))


def _restore(args: argparse.Namespace, out: Output) -> int:
    url = common.store_url(args)
    _, contents = _open(args.file, _secret(args))  # the store is opened only after this

    async def go() -> list[str]:
        async with opened_store(url) as store:
            if args.dry_run:
                return await backup.existing(store, contents)
            return await backup.restore(store, contents, force=args.force)

    done = asyncio.run(go())
    if args.dry_run:
        _show(contents, out)
        if done:
            out.line(f"the store holds already: {', '.join(done)}; a restore needs --force "
                     "to replace them")
        else:
            out.line(f"the store is empty: a restore would write {len(contents.objects)} "
                     "objects")
        return 0
    for line in done:
        out.line(line)
    out.line(f"restored {_summary(contents)} from a backup made "
             f"{contents.created.isoformat()}; start the server: agents reconnect with "
             "the certificates they hold")
    pending = backup.unbootstrapped(contents)
    if pending:
        out.warn("these clusters had not bootstrapped and their tokens are not in backups; "
                 "mint each a new one with `meshtrust cluster token NAME`: " + ", ".join(pending))
    return 0
