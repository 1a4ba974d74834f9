"""Istio intermediates on the server side: policy → per-cluster state → signed CSR."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from cryptography import x509

from meshtrust import errors
from meshtrust.authority import istio, registry, trust_policy
from meshtrust.pki import bundle, csr, keys, verify
from meshtrust.store import base
from meshtrust.testing import FakeClock, MemoryStore

START = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


def policy(**config: Any) -> dict[str, Any]:
    spec_config: dict[str, Any] = {
        "mgmtServerCa": {"generated": {"keyType": "ecdsa-p256"}},
        "intermediateCertOptions": {"keyType": "ecdsa-p256", "ttl": "1000s",
                                    "secretRotationGracePeriodRatio": 0.5},
    }
    spec_config.update(config)
    return {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
            "metadata": {"name": "mesh", "namespace": "gloo-mesh"},
            "spec": {"config": spec_config}}


Scenario = Callable[[istio.IstioAuthority, MemoryStore, FakeClock], Awaitable[None]]


def run(scenario: Scenario, clusters: tuple[str, ...] = ("cluster-1", "cluster-2")) -> None:
    async def go() -> None:
        clock = FakeClock(START)
        store = MemoryStore(clock=clock)
        reg = registry.Registry(store, clock)
        for name in clusters:
            await reg.register(name)
        await scenario(istio.IstioAuthority(store, clock, reg), store, clock)
    asyncio.run(go())


def request(key_type: keys.KeyType = keys.KeyType.EC_P256) -> tuple[keys.PrivateKey, bytes]:
    key = keys.generate_key(key_type)
    return key, csr.dump_csr(csr.build_csr(key, ca=True))


async def state(store: MemoryStore, name: str) -> dict[str, Any]:
    return (await store.get_resource(istio.ISSUED_KIND, "gloo-mesh", name)).status


class TestIssuance:
    def test_policy_to_finished(self) -> None:
        """A policy gives each cluster PENDING → REQUESTED → ISSUED → FINISHED."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            await auth.apply(policy())
            await auth.reconcile()
            assert (await state(store, "mesh.cluster-1"))["state"] == "PENDING"
            [work] = await auth.work_for("cluster-1")
            assert (await state(store, "mesh.cluster-1"))["state"] == "REQUESTED"
            _, pem = request()
            signed = await auth.sign("cluster-1", work.id, pem)
            assert (await state(store, "mesh.cluster-1"))["state"] == "ISSUED"
            chain = bundle.load_certificates(signed.chain_pem)
            roots = bundle.load_certificates(signed.root_bundle)
            verify.verify_chain(signed.certificate, chain[1:-1], roots, clock.now())
            assert signed.certificate.subject.rfc4514_string() == \
                "L=cluster-1,CN=Intermediate CA,O=Istio"
            await auth.report("cluster-1", work.id, ok=True, pods=["istio-system/istiod-0"])
            status = await state(store, "mesh.cluster-1")
            assert status["state"] == "FINISHED" and status["bouncedPods"] == [
                "istio-system/istiod-0"]
        run(scenario)

    def test_root_is_generated_once(self) -> None:
        """The generated root is stored in root-trust.<policy> and reused."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            await auth.apply(policy())
            await auth.reconcile()
            first = await store.get_secret("gloo-mesh", "root-trust.mesh")
            await auth.reconcile()
            assert (await store.get_secret("gloo-mesh", "root-trust.mesh")) == first
            assert set(first.data) == {"root-cert.pem", "key.pem"}
        run(scenario)

    def test_spec_change_reissues(self) -> None:
        """Changing the intermediate options sends every cluster back to PENDING."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            await auth.apply(policy())
            await auth.reconcile()
            [work] = await auth.work_for("cluster-1")
            await auth.sign("cluster-1", work.id, request()[1])
            await auth.apply(policy(intermediateCertOptions={"keyType": "ecdsa-p384",
                                                             "ttl": "1000s"}))
            await auth.reconcile()
            status = await state(store, "mesh.cluster-1")
            assert status["state"] == "PENDING" and status["round"] == 2
            [again] = await auth.work_for("cluster-1")
            assert again.id != work.id and again.key_type == "ecdsa-p384"
            with pytest.raises(errors.ConfigError, match="stale"):
                await auth.sign("cluster-1", work.id, request()[1])
        run(scenario)

    def test_a_policy_is_parsed_again_only_when_it_changed(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every CSR looks its policy up; the stored policy is parsed once per spec, and a
        changed or deleted policy is seen at the next lookup."""
        parsed: list[str] = []
        parse = trust_policy.parse

        def counting(document: Any) -> Any:
            parsed.append(document["spec"]["config"]["intermediateCertOptions"]["keyType"])
            return parse(document)

        monkeypatch.setattr(trust_policy, "parse", counting)

        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            resource, _ = await auth.apply(policy())
            parsed.clear()
            for _ in range(3):
                _, found = await auth.policy("mesh")
                assert found.intermediate.key_type is keys.KeyType.EC_P256
            assert parsed == ["ecdsa-p256"]
            await auth.apply(policy(intermediateCertOptions={"keyType": "ecdsa-p384",
                                                             "ttl": "1000s"}))
            parsed.clear()
            for _ in range(2):
                _, found = await auth.policy("mesh")
                assert found.intermediate.key_type is keys.KeyType.EC_P384
            assert parsed == ["ecdsa-p384"]
            await store.delete(trust_policy.POLICY_KIND, resource.namespace,
                               resource.name)
            with pytest.raises(errors.ConfigError, match="no trust policy named 'mesh'"):
                await auth.policy("mesh")
        run(scenario)

    def test_renewal_at_grace_ratio(self) -> None:
        """When the grace point passes, the cluster goes back to PENDING for a new key."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            await auth.apply(policy())
            await auth.reconcile()
            [work] = await auth.work_for("cluster-2")
            await auth.sign("cluster-2", work.id, request()[1])
            await auth.report("cluster-2", work.id, ok=True)
            clock.advance(400)
            await auth.reconcile()
            assert (await state(store, "mesh.cluster-2"))["state"] == "FINISHED"
            clock.advance(200)  # past notAfter - 0.5 × 1000 s
            await auth.reconcile()
            assert (await state(store, "mesh.cluster-2"))["state"] == "PENDING"
        run(scenario)

    def test_failed_work_is_retried_with_backoff(self) -> None:
        """A FAILED cluster returns to PENDING after 10 s, then after 20 s, then succeeds."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            await auth.apply(policy())
            await auth.reconcile()
            [work] = await auth.work_for("cluster-1")
            await auth.report("cluster-1", work.id, ok=False, message="cacerts left alone")
            clock.advance(9)
            await auth.reconcile()
            assert (await state(store, "mesh.cluster-1"))["state"] == "FAILED"
            clock.advance(2)
            await auth.reconcile()
            status = await state(store, "mesh.cluster-1")
            assert status["state"] == "PENDING" and status["round"] == 2
            assert "cacerts left alone" in status["message"]
            [again] = await auth.work_for("cluster-1")
            await auth.report("cluster-1", again.id, ok=False, message="still there")
            clock.advance(15)
            await auth.reconcile()
            assert (await state(store, "mesh.cluster-1"))["state"] == "FAILED"
            clock.advance(6)
            await auth.reconcile()
            [third] = await auth.work_for("cluster-1")
            await auth.sign("cluster-1", third.id, request()[1])
            await auth.report("cluster-1", third.id, ok=True)
            status = await state(store, "mesh.cluster-1")
            assert status["state"] == "FINISHED" and status["failures"] == 0
        run(scenario)

    def test_another_clusters_work_is_refused(self) -> None:
        """A cluster cannot answer another cluster's work item."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            await auth.apply(policy())
            await auth.reconcile()
            [work] = await auth.work_for("cluster-1")
            with pytest.raises(errors.AuthError, match="another cluster"):
                await auth.sign("cluster-2", work.id, request()[1])
        run(scenario)

    def test_wrong_key_type_is_refused(self) -> None:
        """A CSR whose key is not the policy's key type is refused with both named."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            await auth.apply(policy())
            await auth.reconcile()
            [work] = await auth.work_for("cluster-1")
            with pytest.raises(errors.ProfileViolation, match="ecdsa-p256 keys.*ECDSA P-384"):
                await auth.sign("cluster-1", work.id, request(keys.KeyType.EC_P384)[1])
        run(scenario)

    def test_selectors_limit_clusters(self) -> None:
        """Only selected clusters get an IssuedCertificate; a deselected one is removed."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            document = policy()
            document["spec"]["applyToMeshes"] = [{"selector": {"cluster": "cluster-2"}}]
            await auth.apply(document)
            await auth.reconcile()
            names = {r.name for r in await store.list_resources(istio.ISSUED_KIND)}
            assert names == {"mesh.cluster-2"}
            assert await auth.work_for("cluster-1") == []
        run(scenario)

    def test_a_round_given_the_clusters_names_takes_them_as_the_fleet(self) -> None:
        """A caller that follows the registry (the server) passes its names: the round
        brings those in line and removes the intermediates of the others."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            await auth.apply(policy())
            await auth.reconcile()
            await auth.reconcile(clusters={"cluster-2", "cluster-3"})
            names = {r.name for r in await store.list_resources(istio.ISSUED_KIND)}
            assert names == {"mesh.cluster-2", "mesh.cluster-3"}
        run(scenario)

    def test_missing_secret_ref_fails_the_policy(self) -> None:
        """A secretRef to a missing secret marks the policy FAILED with what to do."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            await auth.apply(policy(mgmtServerCa={"secretRef": {"name": "my-root"}}))
            await auth.reconcile()
            [resource] = await store.list_resources("RootTrustPolicy")
            assert resource.status["state"] == "FAILED"
            assert "gloo-mesh/my-root" in resource.status["message"]
            assert await store.list_resources(istio.ISSUED_KIND) == []
        run(scenario)

    def test_secret_ref_root_signs(self) -> None:
        """A user's root in a secret signs the intermediates."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            from meshtrust.pki import issuer, profiles
            root = issuer.new_root(keys.KeyType.EC_P256, profiles.ISTIO_ROOT, clock.now())
            await store.create(base.Secret(namespace="gloo-mesh", name="my-root", data={
                "root-cert.pem": bundle.dump_certificate(root.certificate),
                "key.pem": keys.dump_private_key(root.key)}))
            await auth.apply(policy(mgmtServerCa={"secretRef": {"name": "my-root"}}))
            await auth.reconcile()
            [work] = await auth.work_for("cluster-1")
            signed = await auth.sign("cluster-1", work.id, request()[1])
            assert signed.certificate.issuer == root.certificate.subject
            assert isinstance(signed.certificate, x509.Certificate)
        run(scenario)
