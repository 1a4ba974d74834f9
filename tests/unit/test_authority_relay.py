"""Relay use cases — bootstrap, renew, authorize — on the in-memory store and a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from meshtrust import errors, settings
from meshtrust.authority import registry, relay, relay_pki
from meshtrust.pki import bundle, csr, identity, issuer, keys, profiles, verify
from meshtrust.store import base
from meshtrust.testing import FakeClock, MemoryStore

T = TypeVar("T")
NAMES = settings.SecretNames()
LIFETIME = dt.timedelta(hours=1)


@dataclasses.dataclass
class World:
    store: MemoryStore
    clock: FakeClock
    registry: registry.Registry
    authority: relay.RelayAuthority

    async def shared_token(self) -> str:
        secret = await self.store.get_secret(NAMES.relay_namespace, NAMES.relay_token)
        return secret.data["token"].decode()


def run(scenario: Callable[[World], Awaitable[T]],
        mode: relay.TokenMode = relay.TokenMode.ANY) -> T:
    """Run ``scenario`` with a generated relay PKI and c1, c2 registered."""
    async def main() -> T:
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        await relay_pki.ensure(store, clock)
        reg = registry.Registry(store, clock)
        for name in ("c1", "c2"):
            await reg.register(name)
        authority = relay.RelayAuthority(store, clock, reg, relay.Options(
            client_lifetime=LIFETIME, token_mode=mode))
        try:
            return await scenario(World(store=store, clock=clock, registry=reg,
                                        authority=authority))
        finally:
            await store.close()
    return asyncio.run(main())


def request(cluster: str, key: keys.PrivateKey | None = None) -> bytes:
    key = key or keys.generate_key(keys.KeyType.EC_P256)
    return csr.dump_csr(csr.build_csr(key, common_name=cluster, names=[cluster]))


class TestBootstrap:
    def test_a_cluster_token_buys_a_client_certificate_for_the_cluster(self) -> None:
        """Bootstrap issues a clientAuth certificate naming the cluster that chains to the root."""
        async def scenario(w: World) -> None:
            token = await w.registry.create_token("c1")
            key = keys.generate_key(keys.KeyType.EC_P256)
            issued = await w.authority.bootstrap("c1", token, request("c1", key))
            cert = issued.certificate
            assert keys.key_matches(cert, key)
            assert identity.subject_alt_names(cert) == [x509.DNSName("c1")]
            assert cert.not_valid_after_utc == w.clock.now() + LIFETIME
            leaf, *chain = bundle.load_certificates(issued.chain_pem)
            roots = bundle.load_certificates(issued.ca_bundle)
            assert leaf == cert
            verify.verify_chain(cert, chain, roots, w.clock.now(), client_auth=True)
            assert issued.ca_bundle == await relay_pki.trust_bundle(w.store)
            assert (await w.registry.get("c1")).client_serial == issued.serial
        run(scenario)

    def test_the_csr_proposes_only_a_key(self) -> None:
        """A CSR naming another cluster, or asking to be a CA, is refused by the profile."""
        async def scenario(w: World) -> None:
            key = keys.generate_key(keys.KeyType.EC_P256)
            shared = await w.shared_token()
            with pytest.raises(errors.ProfileViolation,
                               match="common name 'c2' is not the cluster name 'c1'"):
                await w.authority.bootstrap("c1", shared, request("c2"))
            as_ca = csr.dump_csr(csr.build_csr(key, common_name="c1", names=["c1"], ca=True))
            with pytest.raises(errors.ProfileViolation, match="asks for CA:true"):
                await w.authority.bootstrap("c1", shared, as_ca)
            with pytest.raises(errors.InvalidCSR):
                await w.authority.bootstrap("c1", shared, b"not a CSR")
        run(scenario)

    def test_unregistered_or_invalid_clusters_are_refused_even_with_the_shared_token(
            self) -> None:
        """The shared token does not bootstrap a cluster that is unregistered or misnamed."""
        async def scenario(w: World) -> None:
            shared = await w.shared_token()
            with pytest.raises(errors.UnknownCluster, match="'c9' is not registered"):
                await w.authority.bootstrap("c9", shared, request("c9"))
            for name in ("C1", "c1.example", "c_1"):
                with pytest.raises(errors.ConfigError, match="is invalid"):
                    await w.authority.bootstrap(name, shared, request("c1"))
        run(scenario)


    def test_a_refused_csr_does_not_spend_the_token(self) -> None:
        """A CSR the profile refuses leaves a single-use token usable for another key."""
        async def scenario(w: World) -> None:
            token = await w.registry.create_token("c1")
            with pytest.raises(errors.ProfileViolation, match="not the cluster name"):
                await w.authority.bootstrap("c1", token, request("c2"))
            issued = await w.authority.bootstrap("c1", token, request("c1"))
            assert identity.subject_alt_names(issued.certificate) == [x509.DNSName("c1")]
        run(scenario)


class TestTokenModes:
    def test_any_mode_accepts_the_shared_and_per_cluster_tokens(self) -> None:
        """In ``any`` mode the shared token works (repeatedly) and so does a cluster token."""
        async def scenario(w: World) -> None:
            shared = await w.shared_token()
            await w.authority.bootstrap("c1", shared, request("c1"))
            await w.authority.bootstrap("c2", shared, request("c2"))
            await w.authority.bootstrap("c1", await w.registry.create_token("c1"), request("c1"))
        run(scenario, relay.TokenMode.ANY)

    def test_shared_mode_refuses_per_cluster_tokens(self) -> None:
        """In ``shared`` mode only the shared token works; a valid cluster token is rejected."""
        async def scenario(w: World) -> None:
            token = await w.registry.create_token("c1")
            with pytest.raises(errors.AuthError, match="identity token rejected for cluster 'c1'"):
                await w.authority.bootstrap("c1", token, request("c1"))
            await w.authority.bootstrap("c1", await w.shared_token(), request("c1"))
        run(scenario, relay.TokenMode.SHARED)

    def test_cluster_mode_refuses_the_shared_token(self) -> None:
        """In ``cluster`` mode the shared token is rejected and a cluster token works once."""
        async def scenario(w: World) -> None:
            with pytest.raises(errors.AuthError, match="identity token rejected for cluster 'c1'"):
                await w.authority.bootstrap("c1", await w.shared_token(), request("c1"))
            token = await w.registry.create_token("c1")
            await w.authority.bootstrap("c1", token, request("c1"))
            with pytest.raises(errors.AuthError, match="was already used"):
                await w.authority.bootstrap("c1", token, request("c1"))
        run(scenario, relay.TokenMode.CLUSTER)

    def test_no_shared_token_secret_means_no_shared_token(self) -> None:
        """With relay-identity-token-secret deleted, an empty or guessed token is rejected."""
        async def scenario(w: World) -> None:
            await w.store.delete(base.SECRET_KIND, NAMES.relay_namespace, NAMES.relay_token)
            for guess in ("", "x"):
                with pytest.raises(errors.AuthError, match="identity token rejected"):
                    await w.authority.bootstrap("c1", guess, request("c1"))
        run(scenario, relay.TokenMode.ANY)


class TestRenewAndAuthorize:
    def test_renewal_is_for_registered_clusters_only(self) -> None:
        """Renew issues for the new key, and is refused once the cluster is deregistered."""
        async def scenario(w: World) -> None:
            key = keys.generate_key(keys.KeyType.EC_P256)
            issued = await w.authority.renew("c1", request("c1", key))
            assert keys.key_matches(issued.certificate, key)
            await w.registry.deregister("c1")
            with pytest.raises(errors.UnknownCluster):
                await w.authority.renew("c1", request("c1"))
        run(scenario)

    def test_renewal_reads_the_cluster_record_once(self, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
        """The record read to check the cluster is the one its new serial is written on:
        one read of it per renewal, not one more to record what was issued."""
        async def scenario(w: World) -> list[str]:
            reads: list[str] = []
            plain = w.store.get_resource

            async def counted(kind: str, namespace: str, name: str) -> base.Resource:
                if kind == registry.CLUSTER_KIND:
                    reads.append(name)
                return await plain(kind, namespace, name)

            monkeypatch.setattr(w.store, "get_resource", counted)
            issued = await w.authority.renew("c1", request("c1"))
            assert (await plain(registry.CLUSTER_KIND, "gloo-mesh", "c1")).status[
                "clientCertificate"]["serial"] == issued.serial
            return reads
        assert run(scenario) == ["c1"]

    def test_a_record_changed_during_the_renewal_keeps_both_changes(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A status written between the renewal's read and its write (another call of the
        agent) is kept: the renewal's write is refused as stale and made again on a
        fresh read."""
        async def scenario(w: World) -> dict[str, object]:
            plain = w.authority.audit.record

            async def report_meanwhile(*args: object, **kwargs: object) -> object:
                await w.registry.reported("c1", agent={"version": "9.9"})
                return await plain(*args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(w.authority.audit, "record", report_meanwhile)
            issued = await w.authority.renew("c1", request("c1"))
            status = (await w.store.get_resource(registry.CLUSTER_KIND, "gloo-mesh",
                                                 "c1")).status
            assert status["clientCertificate"]["serial"] == issued.serial
            return dict(status["agent"])
        assert run(scenario) == {"version": "9.9"}

    def test_authorize_names_the_registered_cluster_of_a_certificate(self) -> None:
        """A peer certificate authorizes as its cluster until that cluster is deregistered."""
        async def scenario(w: World) -> None:
            issued = await w.authority.renew("c1", request("c1"))
            pem = bundle.dump_certificate(issued.certificate)
            assert await w.authority.authorize(pem) == "c1"
            await w.registry.deregister("c1")
            with pytest.raises(errors.UnknownCluster, match="'c1' is not registered"):
                await w.authority.authorize(pem)
            with pytest.raises(errors.AuthError, match="no readable client certificate"):
                await w.authority.authorize(b"garbage")
        run(scenario)

    def test_a_certificate_without_names_is_refused(self) -> None:
        """A certificate with neither a DNS SAN nor a CN names no cluster and is refused."""
        key = keys.generate_key(keys.KeyType.EC_P256)
        now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
        anonymous = (x509.CertificateBuilder().subject_name(x509.Name([]))
                     .issuer_name(x509.Name([])).public_key(key.public_key()).serial_number(1)
                     .not_valid_before(now).not_valid_after(now + LIFETIME)
                     .sign(key, hashes.SHA256()))

        async def scenario(w: World) -> None:
            with pytest.raises(errors.AuthError, match="names no cluster"):
                await w.authority.authorize(bundle.dump_certificate(anonymous))
        run(scenario)

    def test_a_new_signing_ca_is_used_from_the_next_issue(self) -> None:
        """Replacing relay-tls-signing-secret makes the next certificate chain through it."""
        async def scenario(w: World) -> None:
            before = await w.authority.renew("c1", request("c1"))
            root_secret = await w.store.get_secret(NAMES.relay_namespace, NAMES.relay_root)
            root = issuer.CA(
                certificate=bundle.load_certificate(root_secret.data["tls.crt"]),
                key=keys.load_private_key(root_secret.data["tls.key"]))
            signing = issuer.new_intermediate(keys.KeyType.EC_P256, root,
                                              profiles.RELAY_SIGNING, w.clock.now())
            current = await w.store.get_secret(NAMES.relay_namespace, NAMES.relay_signing)
            await w.store.update(dataclasses.replace(current, data={
                "ca.crt": root_secret.data["ca.crt"],
                "tls.crt": bundle.dump_certificate(signing.certificate),
                "tls.key": keys.dump_private_key(signing.key)}))
            after = await w.authority.renew("c1", request("c1"))
            assert bundle.issued_by(after.certificate, signing.certificate)
            assert not bundle.issued_by(before.certificate, signing.certificate)
        run(scenario)
