"""Backups of the management store: the sealed envelope, the contents, restore and the commands."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import io
import json
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshtrust import errors, settings
from meshtrust.authority import backup, istio, registry, relay_pki
from meshtrust.cli import main
from meshtrust.cli.output import Output
from meshtrust.pki import bundle, csr, envelope, issuer, keys, profiles
from meshtrust.store import base, open_store
from meshtrust.testing import FakeClock, MemoryStore

T = TypeVar("T")
START = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
NS = settings.RELAY_NAMESPACE
FAST = envelope.Scrypt(n=2**14, r=8, p=1)  # the lowest cost allowed: quick tests
KEY = envelope.Key(bytes(range(32)))
DAMAGED = "wrong passphrase or damaged backup file"


def run(work: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(work())


def policy(name: str, root: dict[str, Any], ttl: str = "1000s") -> dict[str, Any]:
    return {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"config": {"mgmtServerCa": root, "intermediateCertOptions": {
                "keyType": "ecdsa-p256", "ttl": ttl, "secretRotationGracePeriodRatio": 0.5}}}}


async def finish_work(auth: istio.IstioAuthority, cluster: str) -> None:
    """Do what an agent does for each work item: a CSR, then report success."""
    for work in await auth.work_for(cluster):
        key = keys.generate_key(keys.KeyType.EC_P256)
        await auth.sign(cluster, work.id, csr.dump_csr(csr.build_csr(key, ca=True)))
        await auth.report(cluster, work.id, ok=True)


async def management_store(clock: FakeClock) -> MemoryStore:
    """A management store as a running fleet leaves it: relay PKI, clusters, two policies
    (one generated root, changed once; one secretRef root), finished intermediates, a token."""
    store = MemoryStore(clock=clock)
    await relay_pki.ensure(store, clock)
    reg = registry.Registry(store, clock)
    for name in ("cluster-1", "cluster-2", "cluster-3"):
        await reg.register(name)
    for name in ("cluster-1", "cluster-2"):
        await reg.update_status(name, clientCertificate={"serial": f"{name}-serial",
                                                         "notAfter": "2027-01-01T00:00:00Z"})
    await reg.create_token("cluster-3")
    byo = issuer.new_root(keys.KeyType.EC_P256, profiles.ISTIO_ROOT, clock.now())
    await store.create(base.Secret(namespace=NS, name="my-istio-root", data={
        "root-cert.pem": bundle.dump_certificate(byo.certificate),
        "key.pem": keys.dump_private_key(byo.key)}))
    auth = istio.IstioAuthority(store, clock, reg)
    await auth.apply(policy("mesh", {"generated": {"keyType": "ecdsa-p256"}}))
    await auth.apply(policy("mesh", {"generated": {"keyType": "ecdsa-p256"}}, ttl="2000s"))
    await auth.apply(policy("byo", {"secretRef": {"name": "my-istio-root"}}))
    await auth.reconcile()
    for name in ("cluster-1", "cluster-2", "cluster-3"):
        await finish_work(auth, name)
    return store


async def everything(store: base.Store) -> dict[tuple[str, str, str], base.Object]:
    found: dict[tuple[str, str, str], base.Object] = {}
    for secret in await store.list_secrets():
        found[(secret.kind, secret.namespace, secret.name)] = secret
    for kind in (*backup.RESOURCE_KINDS, registry.TOKEN_KIND):
        for resource in await store.list_resources(kind):
            found[(kind, resource.namespace, resource.name)] = resource
    return found


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


class TestEnvelope:
    def test_passphrase_round_trip(self) -> None:
        """What is sealed under a passphrase opens with the same passphrase."""
        sealed = envelope.seal(b"ca keys", envelope.Passphrase(b"s3cret pass"), scrypt=FAST)
        assert envelope.unseal(sealed, envelope.Passphrase(b"s3cret pass")) == b"ca keys"
        assert b"ca keys" not in sealed

    def test_key_round_trip(self) -> None:
        """What is sealed under a key opens with that key, and the header says no KDF."""
        sealed = envelope.seal(b"ca keys", KEY)
        assert envelope.unseal(sealed, KEY) == b"ca keys"
        header, _ = envelope.load_header(sealed)
        assert header.scrypt is None and header.sealed_with == "a key file"

    def test_default_cost_and_fresh_randomness(self) -> None:
        """The default KDF is scrypt n=2**17 r=8 p=1; each sealing draws a new salt and nonce."""
        one = envelope.seal(b"x", envelope.Passphrase(b"pw"))
        two = envelope.seal(b"x", envelope.Passphrase(b"pw"))
        first, _ = envelope.load_header(one)
        second, _ = envelope.load_header(two)
        assert first.scrypt == envelope.Scrypt(n=2**17, r=8, p=1)
        assert first.salt != second.salt and first.nonce != second.nonce
        assert one.startswith(envelope.MAGIC)

    def test_wrong_passphrase(self) -> None:
        """A wrong passphrase is one clear error."""
        sealed = envelope.seal(b"x", envelope.Passphrase(b"right"), scrypt=FAST)
        with pytest.raises(envelope.CannotOpen, match=f"^{DAMAGED}$"):
            envelope.unseal(sealed, envelope.Passphrase(b"wrong"))

    def test_wrong_key(self) -> None:
        """A wrong key is the same error."""
        sealed = envelope.seal(b"x", KEY)
        with pytest.raises(envelope.CannotOpen, match=DAMAGED):
            envelope.unseal(sealed, envelope.Key(bytes(32)))

    def test_every_flipped_byte_is_detected(self) -> None:
        """Changing any byte — magic, header, nonce, ciphertext or tag — fails to open."""
        sealed = envelope.seal(b'{"secrets": ["a CA key"]}', KEY)
        for index in range(len(sealed)):
            with pytest.raises(envelope.CannotOpen, match=DAMAGED):
                envelope.unseal(flip(sealed, index), KEY)

    def test_flipped_bytes_of_a_passphrase_file_are_detected(self) -> None:
        """In passphrase mode too, including the salt and the scrypt parameters."""
        secret = envelope.Passphrase(b"pw")
        sealed = envelope.seal(b"some payload", secret, scrypt=FAST)
        header_end = sealed.index(b"\n", len(envelope.MAGIC))
        positions = {0, len(envelope.MAGIC) - 1, sealed.index(b'"n":') + 5,
                     sealed.index(b'"salt":"') + 9, sealed.index(b'"nonce":"') + 10,
                     header_end, header_end + 1, len(sealed) - 17, len(sealed) - 1}
        for index in sorted(positions):
            with pytest.raises(envelope.CannotOpen, match=DAMAGED):
                envelope.unseal(flip(sealed, index), secret)

    def test_every_truncation_and_an_extension_are_detected(self) -> None:
        """A file cut at any length, or with bytes added, fails to open."""
        sealed = envelope.seal(b"payload", KEY)
        for length in range(len(sealed)):
            with pytest.raises(envelope.CannotOpen, match=DAMAGED):
                envelope.unseal(sealed[:length], KEY)
        with pytest.raises(envelope.CannotOpen, match=DAMAGED):
            envelope.unseal(sealed + b"\0", KEY)

    def test_the_wrong_kind_of_secret_says_which_was_used(self) -> None:
        """A passphrase for a file sealed with a key file says so."""
        sealed = envelope.seal(b"x", KEY)
        with pytest.raises(envelope.CannotOpen, match=f"{DAMAGED}: it was sealed with a key file"):
            envelope.unseal(sealed, envelope.Passphrase(b"pw"))

    def test_forged_cost_is_refused_before_any_work(self) -> None:
        """A header asking scrypt for gigabytes is refused at once, not attempted."""
        sealed = envelope.seal(b"x", envelope.Passphrase(b"pw"), scrypt=FAST)
        forged = sealed.replace(b'"n":16384', b'"n":1073741824')
        started = time.monotonic()
        with pytest.raises(envelope.CannotOpen, match="header is unreadable"):
            envelope.unseal(forged, envelope.Passphrase(b"pw"))
        assert time.monotonic() - started < 0.5

    def test_not_a_sealed_file(self) -> None:
        """Any other file is the same error, saying it is not a sealed file."""
        with pytest.raises(envelope.CannotOpen, match=f"{DAMAGED}: it does not start"):
            envelope.unseal(b"-----BEGIN CERTIFICATE-----\n", KEY)


class TestSecrets:
    def test_passphrase_loses_one_trailing_newline(self) -> None:
        """A passphrase file's one trailing newline (LF or CRLF) is not part of it."""
        assert envelope.load_passphrase(b"pw\n").value == b"pw"
        assert envelope.load_passphrase(b"pw\r\n").value == b"pw"
        assert envelope.load_passphrase(b"pw\n\n").value == b"pw\n"
        assert envelope.load_passphrase(b" pw ").value == b" pw "

    @pytest.mark.parametrize("data", [b"", b"\n", b"\r\n"])
    def test_empty_passphrase_is_refused(self, data: bytes) -> None:
        """An empty passphrase file is refused."""
        with pytest.raises(errors.ConfigError, match="passphrase file is empty"):
            envelope.load_passphrase(data)

    def test_secrets_do_not_show_in_repr(self) -> None:
        """Neither a passphrase nor a key appears in its repr."""
        assert "hunter2" not in repr(envelope.Passphrase(b"hunter2"))
        assert repr(bytes(range(32))) not in repr(KEY)

    def test_key_raw_or_base64(self) -> None:
        """A key file holds 32 bytes, raw or as base64 with a newline."""
        raw = bytes(range(32))
        assert envelope.load_key(raw).value == raw
        assert envelope.load_key(base64.b64encode(raw) + b"\n").value == raw

    @pytest.mark.parametrize("data", [b"", bytes(31), bytes(33),
                                      base64.b64encode(bytes(16)), b"not base64!\n"])
    def test_key_of_another_size_is_refused(self, data: bytes) -> None:
        """Anything but 32 bytes is refused, saying how to make a key."""
        with pytest.raises(errors.ConfigError, match="32 random bytes.*openssl rand"):
            envelope.load_key(data)


class TestContents:
    def test_collect_takes_the_ca_material_and_leaves_tokens_out(self) -> None:
        """A backup holds the relay secrets, both policies' roots and every record, no token."""
        async def go() -> backup.Contents:
            return await backup.collect(await management_store(FakeClock(START)),
                                        FakeClock(START))

        contents = run(go)
        assert {s.name for s in contents.secrets} == {
            "relay-root-tls-secret", "relay-tls-signing-secret", "relay-server-tls-secret",
            "relay-identity-token-secret", "root-trust.mesh", "my-istio-root"}
        assert sorted((r.kind, r.name) for r in contents.resources) == [
            ("IssuedCertificate", f"{p}.cluster-{n}") for p in ("byo", "mesh")
            for n in (1, 2, 3)] + [("KubernetesCluster", f"cluster-{n}") for n in (1, 2, 3)] + [
            ("RootTrustPolicy", "byo"), ("RootTrustPolicy", "mesh")]
        assert all(o.resource_version == 0 for o in contents.objects)
        assert backup.unbootstrapped(contents) == ["cluster-3"]
        assert contents.notes == ()

    def test_collect_notes_a_missing_secret_ref(self) -> None:
        """A policy whose secretRef does not exist is noted, not fatal."""
        async def go() -> backup.Contents:
            clock = FakeClock(START)
            store = MemoryStore(clock=clock)
            await relay_pki.ensure(store, clock)
            await istio.IstioAuthority(store, clock, registry.Registry(store, clock)).apply(
                policy("byo", {"secretRef": {"name": "gone"}}))
            return await backup.collect(store, clock)

        [note] = run(go).notes
        assert "secretRef gloo-mesh/gone does not exist" in note

    def test_collect_refuses_a_store_without_relay_pki(self) -> None:
        """A store with no relay root is not a management store: nothing to back up."""
        with pytest.raises(errors.ConfigError, match="relay-root-tls-secret does not exist"):
            run(lambda: backup.collect(MemoryStore(), FakeClock(START)))

    def test_dump_and_load_round_trip(self) -> None:
        """The canonical JSON loads back to the same contents, and dumps to the same bytes."""
        async def go() -> backup.Contents:
            return await backup.collect(await management_store(FakeClock(START)),
                                        FakeClock(START))

        contents = run(go)
        data = backup.dump_contents(contents)
        again = backup.load_contents(data)
        assert again == contents
        assert backup.dump_contents(again) == data

    def test_load_refuses_what_it_does_not_know(self) -> None:
        """Another document, or a kind this version does not restore, is refused by name."""
        with pytest.raises(errors.ConfigError, match="not a meshtrust.io/v1 Backup"):
            backup.load_contents(b'{"kind": "List"}')
        document = {"apiVersion": backup.API_VERSION, "kind": backup.KIND,
                    "created": "2026-01-01T00:00:00Z", "secrets": [], "resources": [
                        {"apiVersion": "meshtrust.io/v1", "kind": "BootstrapToken",
                         "metadata": {"name": "c.1", "namespace": NS}, "spec": {}}]}
        with pytest.raises(errors.ConfigError, match="does not restore BootstrapToken"):
            backup.load_contents(json.dumps(document).encode())


class TestRestore:
    def test_restore_into_an_empty_store_carries_on_without_reissuing(self) -> None:
        """Restored, the store holds the same objects (no token), and reconciling it
        re-issues no intermediate and makes no new root."""
        async def go() -> None:
            clock = FakeClock(START)
            source = await management_store(clock)
            contents = await backup.collect(source, clock)
            sealed = envelope.seal(backup.dump_contents(contents), KEY)
            opened = backup.load_contents(envelope.unseal(sealed, KEY))
            target = MemoryStore(clock=clock)
            lines = await backup.restore(target, opened)
            assert len(lines) == len(contents.objects)
            assert all(line.startswith("created ") for line in lines)
            before, after = await everything(source), await everything(target)
            assert set(before) - set(after) == {
                k for k in before if k[0] == registry.TOKEN_KIND}
            for key, obj in after.items():
                old = before[key]
                if isinstance(obj, base.Secret):
                    assert isinstance(old, base.Secret)
                    assert (obj.data, obj.type, obj.labels) == (old.data, old.type, old.labels)
                else:
                    assert isinstance(old, base.Resource)
                    assert obj.status == old.status
            serials = {k: o.status["serial"] for k, o in after.items()
                       if k[0] == istio.ISSUED_KIND and isinstance(o, base.Resource)}
            reg = registry.Registry(target, clock)
            auth = istio.IstioAuthority(target, clock, reg)
            await auth.reconcile()
            for name in ("cluster-1", "cluster-2", "cluster-3"):
                assert await auth.work_for(name) == []
            issued = await target.list_resources(istio.ISSUED_KIND)
            assert {i.status["state"] for i in issued} == {"FINISHED"}
            assert {(istio.ISSUED_KIND, i.namespace, i.name): i.status["serial"]
                    for i in issued} == serials
            root = await target.get_secret(NS, "root-trust.mesh")
            assert root.data == (await source.get_secret(NS, "root-trust.mesh")).data
            ca = await relay_pki.load_signing_ca(target)
            assert ca.certificate == (await relay_pki.load_signing_ca(source)).certificate

        run(go)

    def test_a_store_with_relay_secrets_is_refused_and_untouched(self) -> None:
        """Restoring over a store that made its own relay PKI names what exists, writes nothing."""
        async def go() -> None:
            clock = FakeClock(START)
            contents = await backup.collect(await management_store(clock), clock)
            target = MemoryStore(clock=clock)
            await relay_pki.ensure(target, clock)
            revision = await target.revision()
            with pytest.raises(errors.AlreadyExists,
                               match="holds secret gloo-mesh/relay-root-tls-secret, secret "
                                     "gloo-mesh/relay-tls-signing-secret.*pass --force"):
                await backup.restore(target, contents)
            assert await target.revision() == revision

        run(go)

    def test_one_object_present_is_named(self) -> None:
        """Any object of the backup that exists is enough to refuse, and is named."""
        async def go() -> None:
            clock = FakeClock(START)
            contents = await backup.collect(await management_store(clock), clock)
            target = MemoryStore(clock=clock)
            await registry.Registry(target, clock).register("cluster-2")
            before = await target.revision()  # the registration and its audit record
            assert await backup.existing(target, contents) == [
                "KubernetesCluster gloo-mesh/cluster-2"]
            with pytest.raises(errors.AlreadyExists, match="cluster-2"):
                await backup.restore(target, contents)
            assert await target.revision() == before

        run(go)

    def test_force_replaces_what_exists(self) -> None:
        """With force, the backup's relay root replaces the one the store made."""
        async def go() -> None:
            clock = FakeClock(START)
            source = await management_store(clock)
            contents = await backup.collect(source, clock)
            target = MemoryStore(clock=clock)
            await relay_pki.ensure(target, clock)
            lines = await backup.restore(target, contents, force=True)
            assert "replaced secret gloo-mesh/relay-root-tls-secret" in lines
            assert "created KubernetesCluster gloo-mesh/cluster-1" in lines
            for name in ("relay-root-tls-secret", "relay-server-tls-secret"):
                assert (await target.get_secret(NS, name)).data == (
                    await source.get_secret(NS, name)).data

        run(go)

    @pytest.mark.parametrize("damage, message", [
        ("swap-key", "relay-server-tls-secret: tls.key is not the key of the certificate in "
                     "tls.crt"),
        ("bad-cert", "root-trust.mesh: root-cert.pem holds no readable certificate"),
        ("foreign-server", "relay-server-tls-secret: tls.crt does not chain to the relay root"),
        ("no-signing", "holds no secret gloo-mesh/relay-tls-signing-secret"),
        ("bad-root-key", "my-istio-root: cannot read the private key"),
    ])
    def test_nothing_is_written_from_invalid_contents(self, damage: str, message: str) -> None:
        """Contents whose certificates or keys do not hold together write nothing at all."""
        async def go() -> None:
            clock = FakeClock(START)
            contents = await backup.collect(await management_store(clock), clock)
            secrets = {s.name: s for s in contents.secrets}
            other = issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT, clock.now())

            def change(name: str, **data: bytes) -> None:
                secrets[name] = dataclasses.replace(secrets[name],
                                                    data={**secrets[name].data, **data})

            if damage == "swap-key":
                change("relay-server-tls-secret", **{"tls.key": keys.dump_private_key(
                    keys.generate_key(keys.KeyType.EC_P256))})
            elif damage == "bad-cert":
                change("root-trust.mesh", **{"root-cert.pem": b"-----BEGIN CERTIFICATE-----\n"})
            elif damage == "foreign-server":
                change("relay-server-tls-secret",
                       **{"tls.crt": bundle.dump_certificate(other.certificate),
                          "tls.key": keys.dump_private_key(other.key)})
            elif damage == "no-signing":
                del secrets["relay-tls-signing-secret"]
            else:
                change("my-istio-root", **{"key.pem": b"not a key"})
            damaged = dataclasses.replace(contents, secrets=tuple(secrets.values()))
            target = MemoryStore(clock=clock)
            with pytest.raises(errors.ConfigError, match=message):
                await backup.restore(target, damaged)
            assert await target.revision() == 0

        run(go)

    def test_a_store_failing_midway_says_how_far_it_got(self) -> None:
        """If the store fails during the writes, the error says how many were written."""
        class Failing(MemoryStore):
            writes = 0

            async def create(self, obj: base.ObjectT) -> base.ObjectT:
                Failing.writes += 1
                if Failing.writes > 3:
                    raise errors.StoreUnavailable("disk full")
                return await super().create(obj)

        async def go() -> None:
            clock = FakeClock(START)
            contents = await backup.collect(await management_store(clock), clock)
            with pytest.raises(errors.StoreUnavailable,
                               match=r"restore stopped after writing 3 of 17 objects: disk "
                                     r"full; run it again with --force"):
                await backup.restore(Failing(clock=clock), contents)

        run(go)


# -- the commands -------------------------------------------------------------------------------


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main.main(list(argv), Output(stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def mgmt(tmp_path: Path) -> str:
    """A management store with the relay PKI and two clusters, one of them bootstrapped."""
    url = f"sqlite:{tmp_path}/mgmt.db"

    async def go() -> None:
        store = await open_store(url)
        try:
            clock = FakeClock(START)
            await relay_pki.ensure(store, clock)
            reg = registry.Registry(store, clock)
            await reg.register("cluster-1")
            await reg.register("cluster-2")
            await reg.update_status("cluster-1", clientCertificate={"serial": "abc123"})
        finally:
            await store.close()

    run(go)
    (tmp_path / "pass").write_text(PASSPHRASE + "\n")
    return url


async def secrets_of(url: str) -> dict[str, dict[str, bytes]]:
    store = await open_store(url)
    try:
        return {s.name: dict(s.data) for s in await store.list_secrets()}
    finally:
        await store.close()


class TestCommands:
    @pytest.mark.parametrize("kind", ["sqlite", "dir"])
    def test_backup_then_restore(self, mgmt: str, tmp_path: Path, kind: str) -> None:
        """backup writes a 0600 file; restore recreates its secrets in a new store of any kind."""
        out_file = tmp_path / "mgmt.backup"
        code, out, err = cli("backup", "-o", str(out_file), "--store", mgmt,
                             "--passphrase-file", str(tmp_path / "pass"))
        assert code == 0, err
        assert "4 Secret, 2 KubernetesCluster" in out and "tokens are not included" in out
        assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
        assert list(tmp_path.glob(".mgmt.backup.*")) == []
        target = f"sqlite:{tmp_path}/new.db" if kind == "sqlite" else f"dir:{tmp_path}/new"
        code, out, err = cli("restore", str(out_file), "--store", target,
                             "--passphrase-file", str(tmp_path / "pass"))
        assert code == 0, err
        assert "created secret gloo-mesh/relay-root-tls-secret" in out
        assert "cluster-2" in err and "cluster token" in err  # not bootstrapped: needs a token
        assert run(lambda: secrets_of(target)) == run(lambda: secrets_of(mgmt))

    def test_backup_refuses_to_overwrite_without_force(self, mgmt: str, tmp_path: Path) -> None:
        """An existing file is kept unless --force."""
        out_file = tmp_path / "mgmt.backup"
        out_file.write_bytes(b"precious")
        args = ("backup", "-o", str(out_file), "--store", mgmt, "--key-file")
        (tmp_path / "key").write_bytes(base64.b64encode(bytes(range(32))))
        code, _, err = cli(*args, str(tmp_path / "key"))
        assert code == 1 and "exists; pass --force" in err
        assert out_file.read_bytes() == b"precious"
        code, _, err = cli(*args, str(tmp_path / "key"), "--force")
        assert code == 0, err
        assert out_file.read_bytes().startswith(envelope.MAGIC)
        assert stat.S_IMODE(out_file.stat().st_mode) == 0o600

    def test_wrong_passphrase_changes_nothing(self, mgmt: str, tmp_path: Path) -> None:
        """A wrong passphrase is one error, the passphrase is not echoed, the store stays empty."""
        out_file = tmp_path / "mgmt.backup"
        assert cli("backup", "-o", str(out_file), "--store", mgmt,
                   "--passphrase-file", str(tmp_path / "pass"))[0] == 0
        (tmp_path / "wrong").write_text("not the passphrase\n")
        target = f"sqlite:{tmp_path}/new.db"
        code, out, err = cli("restore", str(out_file), "--store", target,
                             "--passphrase-file", str(tmp_path / "wrong"))
        assert code == 1
        assert err == f"error: {out_file}: {DAMAGED}\n" and out == ""
        assert not (tmp_path / "new.db").exists()

    def test_damaged_file_changes_nothing(self, mgmt: str, tmp_path: Path) -> None:
        """A damaged or truncated file is the same error, and nothing is written."""
        out_file = tmp_path / "mgmt.backup"
        assert cli("backup", "-o", str(out_file), "--store", mgmt,
                   "--passphrase-file", str(tmp_path / "pass"))[0] == 0
        sealed = out_file.read_bytes()
        target = f"sqlite:{tmp_path}/new.db"
        for damaged in (flip(sealed, len(sealed) // 2), sealed[:-1], sealed[:100]):
            out_file.write_bytes(damaged)
            code, _, err = cli("restore", str(out_file), "--store", target,
                               "--passphrase-file", str(tmp_path / "pass"))
            assert code == 1 and DAMAGED in err
        assert not (tmp_path / "new.db").exists()

    def test_restore_over_a_non_empty_store_names_what_exists(self, mgmt: str,
                                                              tmp_path: Path) -> None:
        """Restoring into the store the backup came from is refused, naming its objects."""
        out_file = tmp_path / "mgmt.backup"
        pass_file = str(tmp_path / "pass")
        assert cli("backup", "-o", str(out_file), "--store", mgmt,
                   "--passphrase-file", pass_file)[0] == 0
        code, _, err = cli("restore", str(out_file), "--store", mgmt, "--passphrase-file",
                           pass_file)
        assert code == 1
        assert "the store is not empty: it holds secret gloo-mesh/relay-root-tls-secret" in err
        assert "KubernetesCluster gloo-mesh/cluster-2" in err
        code, out, err = cli("restore", str(out_file), "--store", mgmt, "--passphrase-file",
                             pass_file, "--dry-run")
        assert code == 0, err
        assert "a restore needs --force" in out

    def test_inspect_lists_without_values(self, mgmt: str, tmp_path: Path) -> None:
        """inspect lists every object, and prints neither keys, tokens nor the passphrase."""
        out_file = tmp_path / "mgmt.backup"
        pass_file = str(tmp_path / "pass")
        assert cli("backup", "-o", str(out_file), "--store", mgmt,
                   "--passphrase-file", pass_file)[0] == 0
        code, table, err = cli("backup", "inspect", str(out_file), "--passphrase-file",
                               pass_file)
        assert code == 0, err
        assert "a passphrase (scrypt n=131072 r=8 p=1)" in table and "cluster-1" in table
        code, out, err = cli("backup", "inspect", str(out_file), "--passphrase-file", pass_file,
                             "-o", "json")
        assert code == 0, err
        listed = json.loads(out)
        assert [(o["kind"], o["name"]) for o in listed["objects"]] == [
            ("Secret", "relay-identity-token-secret"), ("Secret", "relay-root-tls-secret"),
            ("Secret", "relay-server-tls-secret"), ("Secret", "relay-tls-signing-secret"),
            ("KubernetesCluster", "cluster-1"), ("KubernetesCluster", "cluster-2")]
        assert listed["objects"][4]["contents"] == "client certificate abc123"
        assert listed["notBootstrapped"] == ["cluster-2"]
        token = run(lambda: secrets_of(mgmt))["relay-identity-token-secret"]["token"]
        for leaked in (token.decode(), "PRIVATE KEY", PASSPHRASE):
            assert leaked not in table + out + err

    def test_empty_passphrase_file_is_refused(self, mgmt: str, tmp_path: Path) -> None:
        """An empty passphrase file is refused before anything is written."""
        (tmp_path / "empty").write_text("\n")
        out_file = tmp_path / "mgmt.backup"
        code, _, err = cli("backup", "-o", str(out_file), "--store", mgmt,
                           "--passphrase-file", str(tmp_path / "empty"))
        assert code == 1 and "is empty" in err
        assert not out_file.exists()

    def test_a_passphrase_for_a_key_file_backup(self, mgmt: str, tmp_path: Path) -> None:
        """Opening a key-file backup with a passphrase says it was sealed with a key file."""
        (tmp_path / "key").write_bytes(bytes(range(32)))
        out_file = tmp_path / "mgmt.backup"
        assert cli("backup", "-o", str(out_file), "--store", mgmt,
                   "--key-file", str(tmp_path / "key"))[0] == 0
        code, _, err = cli("backup", "inspect", str(out_file), "--passphrase-file",
                           str(tmp_path / "pass"))
        assert code == 1 and "sealed with a key file" in err
        code, out, err = cli("backup", "inspect", str(out_file), "--key-file",
                             str(tmp_path / "key"))
        assert code == 0 and "with a key file" in out
