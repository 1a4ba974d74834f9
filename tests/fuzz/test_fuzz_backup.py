"""Fuzzing backup files: the sealed envelope, and the contents inside it.

A backup as ``meshtrust backup`` writes it (a real management store's relay
PKI, clusters, policy, Istio root and work, sealed with a key or a
passphrase) is damaged anywhere: its magic, its header (bytes, or the JSON
fields with values of every wrong type and range), its ciphertext and tag.
The contents are fuzzed too, as only the holder of the key could write them:
JSON damaged byte by byte or field by field, certificates and keys damaged
inside the secrets. The properties: opening refuses with ``CannotOpen`` (or
another domain error) and a message, and never reads a forged header's cost
parameters before bounding them; contents that pass ``check_contents``
restore into an empty store and can be listed.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import random
from typing import Any

import pytest
from hypothesis import given

import fuzzkit
import fuzzworld
from meshtrust import errors
from meshtrust.authority import backup
from meshtrust.pki import envelope
from meshtrust.testing import FakeClock, MemoryStore

# A damaged certificate may still be readable but break RFC 5280 (a serial of zero, a common
# name of 65 characters): cryptography warns, and a restore must still take it (a brought CA
# may be so). A warning is not a crash.
pytestmark = [
    pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning"),
]
KEY = envelope.Key(bytes(range(32)))
PASSPHRASE = envelope.Passphrase(b"correct horse battery staple")
FAST = envelope.Scrypt(n=2**14, r=8, p=1)  # the lowest cost allowed


@dataclasses.dataclass(frozen=True)
class Backup:
    contents: bytes           # dump_contents of a real management store
    document: dict[str, Any]  # the same, parsed
    sealed: tuple[bytes, ...]  # sealed with the key, and with the passphrase


@pytest.fixture(scope="module")
def made_backup(made: fuzzworld.Template) -> Backup:
    async def collect() -> bytes:
        contents = await backup.collect(made.store, FakeClock(fuzzworld.START))
        return backup.dump_contents(contents)

    data = asyncio.run(collect())
    salt, nonce = bytes(range(16)), bytes(range(12))  # the same sealed bytes every run
    return Backup(contents=data, document=json.loads(data),
                  sealed=(envelope.seal(data, KEY, nonce=nonce),
                          envelope.seal(data, PASSPHRASE, scrypt=FAST, salt=salt, nonce=nonce)))


HEADER_KEYS: tuple[Any, ...] = ("format", "cipher", "kdf", "nonce", "name", "n", "r", "p",
                                "salt", "x", "")
HEADER_VALUES: tuple[Any, ...] = (
    None, True, 0, 1, 2, -1, 1.0, 3, 8, 32, 33, 2**14, 2**15 + 1, 2**20, 2**21, 2**40, 2**64,
    "", "none", "scrypt", "AES-256-GCM", "AES-128-GCM", "A" * 16, "A" * 22 + "==", "!!!!",
    "AAAA\n", "=" * 8, [], {}, {"name": "none"}, {"name": "scrypt"},
    {"name": "scrypt", "n": 2**30, "r": 8, "p": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA=="},
    {"name": "scrypt", "n": 2**14, "r": 2**20, "p": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA=="})


def _edit_header(sealed: bytes, program: bytes) -> bytes:
    """``sealed`` with its header's JSON fields edited, the rest kept."""
    end = sealed.index(b"\n", len(envelope.MAGIC))
    header = json.loads(sealed[len(envelope.MAGIC):end])
    edited = fuzzkit.mutate_document(header, program, [header], keys=HEADER_KEYS,
                                     values=HEADER_VALUES)
    return envelope.MAGIC + json.dumps(edited).encode() + sealed[end:]


def sealed_file(pick: fuzzkit.Picker, made: Backup) -> bytes:
    """A sealed backup damaged: its bytes, its header's fields, or a header nested deep."""
    kind = pick.integer(0, 5)
    if kind < 2:
        return pick.mutated(made.sealed, structured=False)
    if kind < 4:
        return _edit_header(pick.choice(made.sealed), pick.program(3))
    if kind == 4:
        depth = pick.integer(1, envelope.MAX_HEADER)
        return envelope.MAGIC + b"[" * depth + b"\n" + made.sealed[0][-32:]
    return envelope.MAGIC + pick.bytes(64)


@functools.cache
def damaged_values(contents: bytes) -> tuple[Any, ...]:
    """Values of every kind for the contents' fields: secrets' data damaged inside."""
    document = json.loads(contents)
    data = [value for secret in document["secrets"] for value in secret["data"].values()]
    chooser = random.Random(7)  # fixed: the same values every run
    damaged = []
    for value in data:
        raw = base64.b64decode(value)
        for _ in range(4):
            program = bytes(chooser.randrange(256) for _ in range(4 * chooser.randrange(1, 3)))
            damaged.append(base64.b64encode(
                fuzzkit.mutate(raw, program, structured=False)).decode())
    pems = (fuzzkit.pem("CERTIFICATE", b"\x30\x03\x02\x01\x00"),
            fuzzkit.pem("PRIVATE KEY", b"\x30\x00"), b"-----BEGIN CERTIFICATE-----\n",
            fuzzkit.pem("ENCRYPTED PRIVATE KEY", b"\x30\x00"))
    damaged.extend(base64.b64encode(p).decode() for p in pems)
    return (*damaged, *data, None, True, 0, -1, 2**63, 1.5, "", "x", "!!", "AAAA", "2026-13-01",
            "2026-01-01T00:00:00", "2026-01-01T00:00:00Z", "Secret", "KubernetesCluster",
            "AuditEvent", "IssuedCertificate", "gloo-mesh", "Gloo", "a" * 300, "c1", "..",
            "tls.key", "ca.crt", [], {}, [None], [{}], {"a": "b"}, {"": ""})


CONTENT_KEYS: tuple[Any, ...] = (
    "apiVersion", "kind", "created", "notes", "secrets", "resources", "metadata", "name",
    "namespace", "labels", "annotations", "resourceVersion", "generation",
    "creationTimestamp", "type", "data", "stringData", "spec", "status", "tls.crt", "tls.key",
    "ca.crt", "key.pem", "root-cert.pem", "token", "x", "")


def contents_file(pick: fuzzkit.Picker, made: Backup) -> bytes:
    """The contents damaged: field by field (certificates and keys inside the secrets
    too), byte by byte, or as JSON nested deep."""
    kind = pick.integer(0, 4)
    if kind < 3:
        return json.dumps(fuzzkit.mutate_document(
            made.document, pick.program(), [made.document], keys=CONTENT_KEYS,
            values=damaged_values(made.contents))).encode()
    if kind == 3:
        return fuzzkit.mutate(made.contents, pick.program(3), structured=False)
    depth = pick.integer(1, 100_000)
    return b"[" * depth + b"]" * depth


async def restore(contents: backup.Contents) -> str:
    """Restore checked contents into an empty store, and list them as the commands do."""
    store = MemoryStore(clock=FakeClock(fuzzworld.START))
    try:
        written = await backup.restore(store, contents)
    finally:
        await store.close()
    assert len(written) == len(contents.objects)
    backup.inventory(contents, fuzzworld.START)
    backup.unbootstrapped(contents)
    backup.count(contents.objects)
    return "restored"


def open_sealed(data: bytes, made: Backup) -> str:
    """Open a sealed file as ``meshtrust restore`` does (header, then the whole)."""
    try:
        header, _ = envelope.load_header(data)
    except errors.MeshTrustError as exc:
        fuzzkit.refusal(exc)
        header = None
    else:
        if header.scrypt is not None:  # bounded before any work is done
            assert 128 * header.scrypt.n * header.scrypt.r <= envelope.MAX_SCRYPT_MEMORY
    try:
        plain = envelope.unseal(data, KEY)
    except errors.MeshTrustError as exc:
        assert isinstance(fuzzkit.refusal(exc), envelope.CannotOpen)
        return "sealed: did not open" if header else "sealed: header refused"
    assert plain == made.contents
    return "sealed: opened"


class TestBackupFiles:
    def test_sealed_files_and_contents(self, runner: fuzzkit.Loop,
                                       made_backup: Backup) -> None:
        """A damaged backup does not open (CannotOpen, with the reason); damaged contents are
        refused with a domain error; contents that pass the check restore and list."""
        tally = fuzzkit.Tally()

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            if pick.integer(0, 2) == 0:
                sealed = sealed_file(pick, made_backup)
                with fuzzkit.watchdog():
                    tally.add(open_sealed(sealed, made_backup))
                return
            plain = contents_file(pick, made_backup)
            with fuzzkit.watchdog():
                try:
                    contents = backup.load_contents(plain)
                    backup.check_contents(contents)
                except errors.MeshTrustError as exc:
                    fuzzkit.refusal(exc)
                    tally.add(f"contents refused: {type(exc).__name__}")
                    return
                tally.add(runner.run(restore(contents)))

        example()
        print(f"backup files: {tally}")
        assert tally["sealed: opened"] < tally.total // 20
        assert tally["sealed: did not open"] > 0 and tally["sealed: header refused"] > 0
        assert tally["restored"] > tally.total // 20
        assert tally["contents refused: ConfigError"] > tally.total // 4
