"""The CA provider port: local keys, brought CAs, checks of what an external CA returns."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

import pytest

from meshtrust import errors, settings
from meshtrust.authority import ca_config, registry, relay, relay_pki, signers
from meshtrust.pki import bundle, csr, issuer, keys, profiles, verify
from meshtrust.providers import base as providers
from meshtrust.providers import local, secret
from meshtrust.store import base
from meshtrust.testing import FakeClock, MemoryStore

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
EC = keys.KeyType.EC_P256


def _request(key: keys.PrivateKey, **names: object) -> csr.Request:
    return csr.load_csr(csr.dump_csr(csr.build_csr(key, **names)))  # type: ignore[arg-type]


def _sign_request(request: csr.Request, profile: profiles.Profile,
                  subject: issuer.Subject) -> providers.SignRequest:
    return providers.SignRequest(request=request, profile=profile, lifetime=dt.timedelta(days=1),
                                 subject=subject, idempotency_key="k")


@pytest.fixture(scope="module")
def root() -> issuer.CA:
    return issuer.new_root(EC, profiles.RELAY_ROOT, NOW)


class TestLocalProvider:
    def test_signs_under_the_profile_and_describes_its_ca(self, root: issuer.CA) -> None:
        signing = issuer.new_intermediate(EC, root, profiles.RELAY_SIGNING, NOW)
        provider = local.LocalProvider(signing)
        key = keys.generate_key(EC)
        signed = asyncio.run(provider.sign(_sign_request(
            _request(key, common_name="c1", names=["c1"]), profiles.RELAY_CLIENT,
            issuer.Subject(cluster="c1")), NOW))
        assert signed.chain == signing.path and signed.root == root.certificate
        verify.verify_chain(signed.certificate, signed.chain[:-1], [root.certificate], NOW,
                            client_auth=True)
        described = asyncio.run(provider.describe())
        assert described.provider == "local" and described.root == root.certificate

    def test_the_pem_handed_out_is_the_certificate_and_its_chain(self, root: issuer.CA) -> None:
        """The PEM the provider wrote as it signed reads back as the certificate, then the
        chain above it: with or without the root, as asked."""
        signing = issuer.new_intermediate(EC, root, profiles.RELAY_SIGNING, NOW)
        signed = asyncio.run(local.LocalProvider(signing).sign(_sign_request(
            _request(keys.generate_key(EC), common_name="c1"), profiles.RELAY_CLIENT,
            issuer.Subject(cluster="c1")), NOW))
        assert signed.certificate_pem is not None
        without = [signed.certificate, signing.certificate]
        assert bundle.load_certificates(signed.pem(root=False)) == without
        assert bundle.load_certificates(signed.pem(root=True)) == [*without, root.certificate]
        # A provider without the PEM at hand (an external CA) gives the same bytes.
        plain = dataclasses.replace(signed, certificate_pem=None)
        assert plain.pem(root=True) == signed.pem(root=True)


class TestBroughtCA:
    def test_a_good_ca_is_used(self, root: issuer.CA) -> None:
        shared = issuer.new_intermediate(EC, root, profiles.SHARED_SIGNING, NOW)
        files = {"tls.crt": bundle.dump_certificate(shared.certificate),
                 "tls.key": keys.dump_private_key(shared.key),
                 "ca.crt": bundle.dump_certificate(root.certificate)}
        provider = secret.load(files, profiles.SHARED_SIGNING, NOW, where="--relay-ca")
        assert provider.ca.root == root.certificate
        assert asyncio.run(provider.describe()).provider == "secret"

    @pytest.mark.parametrize("problem, message", [
        ("pathlen", "must allow 1 CA level below it"),
        ("key", "does not match"),
        ("root", "root certificate is missing"),
        ("leaf", "basicConstraints must be CA:true"),
    ])
    def test_a_bad_ca_is_refused_with_every_problem(self, root: issuer.CA, problem: str,
                                                     message: str) -> None:
        profile = profiles.RELAY_SIGNING if problem == "pathlen" else profiles.SHARED_SIGNING
        ca = issuer.new_intermediate(EC, root, profile, NOW)
        cert, key = ca.certificate, ca.key
        if problem == "key":
            key = keys.generate_key(EC)
        if problem == "leaf":
            leaf_key = keys.generate_key(EC)
            cert = issuer.issue(_request(leaf_key), ca, profiles.RELAY_SERVER, NOW)
            key = leaf_key
        files = {"tls.crt": bundle.dump_certificate(cert), "tls.key": keys.dump_private_key(key)}
        if problem != "root":
            files["ca.crt"] = bundle.dump_certificate(root.certificate)
        with pytest.raises(errors.ConfigError, match=message):
            secret.load(files, profiles.SHARED_SIGNING, NOW, where="--relay-ca")


class TestCheckIssued:
    """What an external CA returns is held to the profile, as a brought bundle is."""

    def test_the_requested_key_and_names(self, root: issuer.CA) -> None:
        signing = issuer.new_intermediate(EC, root, profiles.RELAY_SIGNING, NOW)
        key = keys.generate_key(EC)
        good = issuer.issue(_request(key), signing, profiles.RELAY_SERVER, NOW)
        verify.check_issued(good, signing.path, key.public_key(), profiles.RELAY_SERVER, NOW)
        with pytest.raises(errors.ProfileViolation, match="another public key"):
            verify.check_issued(good, signing.path, keys.generate_key(EC).public_key(),
                                profiles.RELAY_SERVER, NOW)
        client = issuer.issue(_request(key, common_name="c1", names=["c1"]), signing,
                              profiles.RELAY_CLIENT, NOW, subject=issuer.Subject(cluster="c1"))
        with pytest.raises(errors.ProfileViolation, match=r"subjectAltName lacks DNS:\*"):
            verify.check_issued(client, signing.path, key.public_key(), profiles.RELAY_SERVER,
                                NOW)
        with pytest.raises(errors.ProfileViolation, match="basicConstraints must be CA:true"):
            verify.check_issued(client, signing.path, key.public_key(),
                                profiles.ISTIO_INTERMEDIATE, NOW, cluster="c1")
        with pytest.raises(errors.ProfileViolation, match="does not verify"):
            other = issuer.new_root(EC, profiles.RELAY_ROOT, NOW)
            verify.check_issued(good, (other.certificate,), key.public_key(),
                                profiles.RELAY_SERVER, NOW)


class TestCaFromSecret:
    def test_both_forms(self, root: issuer.CA) -> None:
        shared = issuer.new_intermediate(EC, root, profiles.SHARED_SIGNING, NOW)
        tls = base.Secret(namespace="ns", name="tls", data={
            "tls.crt": bundle.dump_certificate(shared.certificate),
            "tls.key": keys.dump_private_key(shared.key),
            "ca.crt": bundle.dump_certificate(root.certificate)})
        rooted = base.Secret(namespace="ns", name="root", data={
            "root-cert.pem": bundle.dump_certificate(root.certificate),
            "cert-chain.pem": bundle.dump_certificates(shared.path),
            "key.pem": keys.dump_private_key(shared.key)})
        for item in (tls, rooted):
            ca = signers.ca_from_secret(item)
            assert ca.certificate == shared.certificate and ca.root == root.certificate
        with pytest.raises(errors.ConfigError, match="holds no CA"):
            signers.ca_from_secret(base.Secret(namespace="ns", name="x", data={"a": b"b"}))

    def test_signers_reload_when_the_secret_changes(self, root: issuer.CA) -> None:
        cache = signers.Signers(open_external=lambda *_: pytest.fail("no external CA"))
        data = {"tls.crt": bundle.dump_certificate(root.certificate),
                "tls.key": keys.dump_private_key(root.key)}
        first = base.Secret(namespace="ns", name="ca", data=data, resource_version=1)
        assert cache.local(first) is cache.local(first)
        assert cache.local(dataclasses.replace(first, resource_version=2)) \
            is not cache.local(first)


def test_a_server_that_issues_nothing_says_why() -> None:
    """Placement external with no provider: bootstrap is refused with what to do instead."""
    async def go() -> None:
        store, clock = MemoryStore(), FakeClock(NOW)
        await relay_pki.ensure(store, clock)
        clusters = registry.Registry(store, clock)
        await clusters.register("c1")
        authority = relay.RelayAuthority(store, clock, clusters, relay.Options(
            signer=ca_config.RelaySigner.NONE))
        request = csr.dump_csr(csr.build_csr(keys.generate_key(EC), common_name="c1",
                                             names=["c1"]))
        with pytest.raises(errors.ConfigError,
                           match=f"does not issue relay certificates.*"
                                 f"{settings.RELAY_CLIENT_SECRET} yourself"):
            await authority.renew("c1", request)

    asyncio.run(go())


class TestKeyLock:
    def test_seal_and_open(self) -> None:
        key = keys.generate_key(EC)
        lock = keys.KeyLock(b"passphrase")
        sealed = lock.seal(key)
        assert keys.is_encrypted(sealed) and b"passphrase" not in sealed
        assert keys.public_key_der(lock.open(sealed)) == keys.public_key_der(key)
        plain = keys.KeyLock().seal(key)
        assert not keys.is_encrypted(plain)
        assert keys.public_key_der(lock.open(plain)) == keys.public_key_der(key)  # not yet sealed
        with pytest.raises(errors.KeyPolicyError, match="give their passphrase"):
            keys.KeyLock().open(sealed)
        with pytest.raises(errors.KeyPolicyError, match="wrong passphrase"):
            keys.KeyLock(b"other").open(sealed)
        with pytest.raises(errors.ConfigError, match="empty"):
            keys.KeyLock(b"")
        assert "passphrase" not in repr(lock)

    def test_unlock_seals_managed_plain_keys_and_checks_the_rest(self) -> None:
        async def go() -> None:
            store, clock = MemoryStore(), FakeClock(NOW)
            await relay_pki.ensure(store, clock)
            lock = keys.KeyLock(b"secret")
            sealed = await signers.unlock(store, lock)
            assert sorted(sealed) == sorted(f"{settings.RELAY_NAMESPACE}/{n}" for n in (
                settings.RELAY_ROOT_SECRET, settings.RELAY_SIGNING_SECRET))
            assert await signers.unlock(store, lock) == []  # sealed already
            with pytest.raises(errors.ConfigError, match="relay-.*wrong passphrase"):
                await signers.unlock(store, keys.KeyLock(b"not it"))
            signing = await store.get_secret(settings.RELAY_NAMESPACE,
                                             settings.RELAY_SIGNING_SECRET)
            assert signers.Signers(lock=lock).local(signing).ca.certificate

        asyncio.run(go())
