"""The agent's Istio CA: the key is kept before the CSR leaves; cacerts in both forms."""

from __future__ import annotations

import asyncio
import datetime as dt

from meshtrust.agent import istio
from meshtrust.pki import bundle, csr, issuer, keys, profiles
from meshtrust.store import base
from meshtrust.testing import MemoryStore

NOW = dt.datetime.now(dt.UTC)
ROOT = issuer.new_root(keys.KeyType.EC_P256, profiles.ISTIO_ROOT, NOW)


def request(form: str = "cacerts", work: str = "mesh.c1/1/1") -> istio.Request:
    return istio.Request(id=work, policy="mesh", key_type=keys.KeyType.EC_P256,
                         organization="Istio", form=form, auto_restart_pods=False)


async def sign(csr_pem: bytes) -> tuple[bytes, bytes]:
    cert = issuer.issue(csr.load_csr(csr_pem), ROOT, profiles.ISTIO_INTERMEDIATE, NOW,
                        subject=issuer.Subject(cluster="c1"))
    return bundle.dump_certificates([cert, ROOT.certificate]), \
        bundle.dump_certificate(ROOT.certificate)


class TestIstioCA:
    def test_cacerts_form(self) -> None:
        """The cacerts form has the four keys, the key matching the certificate."""
        async def go() -> dict[str, bytes]:
            store = MemoryStore()
            outcome = await istio.IstioCA(store, "c1").handle(request(), sign, None)
            assert outcome.ok and outcome.restart_needed
            return dict((await store.get_secret("istio-system", "cacerts")).data)
        data = asyncio.run(go())
        assert set(data) == {"ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"}
        assert keys.key_matches(bundle.load_certificate(data["ca-cert.pem"]),
                                keys.load_private_key(data["ca-key.pem"]))

    def test_tls_form(self) -> None:
        """The tls form writes tls.crt (the chain), tls.key and ca.crt."""
        async def go() -> dict[str, bytes]:
            store = MemoryStore()
            await istio.IstioCA(store, "c1").handle(request(form="tls"), sign, None)
            return dict((await store.get_secret("istio-system", "cacerts")).data)
        data = asyncio.run(go())
        assert set(data) == {"tls.crt", "tls.key", "ca.crt"}
        assert len(bundle.load_certificates(data["tls.crt"])) == 2

    def test_retry_reuses_the_stored_key(self) -> None:
        """A second attempt at the same work item sends a CSR for the same key."""
        async def go() -> tuple[bytes, bytes, bytes]:
            store = MemoryStore()
            ca = istio.IstioCA(store, "c1")
            sent: list[bytes] = []

            async def lost(csr_pem: bytes) -> tuple[bytes, bytes]:
                sent.append(csr_pem)
                raise ConnectionError("reply lost")
            try:
                await ca.handle(request(), lost, None)
            except ConnectionError:
                pass
            pending = (await store.get_secret("istio-system", "cacerts-pending")).data
            await ca.handle(request(), sign, None)
            written = (await store.get_secret("istio-system", "cacerts")).data
            return sent[0], pending["ca-key.pem"], written["ca-key.pem"]
        first_csr, pending_key, final_key = asyncio.run(go())
        assert pending_key == final_key
        assert keys.public_key_der(csr.load_csr(first_csr).public_key) == \
            keys.public_key_der(keys.load_private_key(final_key))

    def test_foreign_cacerts_is_left_alone(self) -> None:
        """A cacerts meshtrust did not write is kept unchanged and reported."""
        async def go() -> tuple[istio.Outcome, base.Secret, base.Secret]:
            store = MemoryStore()
            before = await store.create(base.Secret(namespace="istio-system", name="cacerts",
                                                    data={"ca-cert.pem": b"theirs"}))
            outcome = await istio.IstioCA(store, "c1").handle(request(), sign, None)
            return outcome, before, await store.get_secret("istio-system", "cacerts")
        outcome, before, after = asyncio.run(go())
        assert not outcome.ok and "left alone" in outcome.message
        assert after == before
