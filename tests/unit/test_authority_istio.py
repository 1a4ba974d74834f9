"""Istio intermediates on the server side: policy → per-cluster state → signed CSR."""

from __future__ import annotations

import asyncio
import dataclasses
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


def following(store: MemoryStore, known: istio.Summaries, since: int) -> asyncio.Task[None]:
    """A task feeding ``known`` the intermediates' changes after revision ``since``."""
    async def follow() -> None:
        async for event in store.watch(istio.ISSUED_KIND, since=since):
            known.note(event)
    return asyncio.create_task(follow())


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

    @pytest.mark.parametrize("summaries", [False, True])
    def test_a_round_given_the_summaries_reads_only_what_is_out_of_line(
            self, summaries: bool) -> None:
        """With ``Summaries`` following the watch, a round makes the writes a round that
        lists every intermediate makes, and reads only the intermediates that need one:
        a renewal due, a retry due, a changed spec, an update left half done, a missing
        record, and (without reading it) one whose cluster left the fleet."""
        fleet = tuple(f"c{n}" for n in range(1, 9))
        outcome: dict[str, Any] = {}

        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            known = istio.Summaries()
            known.fill([])
            follower = following(store, known, await store.revision())
            await auth.apply(policy())
            await auth.reconcile(set(fleet))

            async def finish(cluster: str, ok: bool = True) -> None:
                [work] = await auth.work_for(cluster)
                if ok:
                    await auth.sign(cluster, work.id, request()[1])
                await auth.report(cluster, work.id, ok=ok, message="" if ok else "no")

            await finish("c2")  # its renewal falls due first
            clock.advance(300)
            for cluster in ("c1", "c4", "c5", "c6", "c7", "c8"):
                await finish(cluster)
            await finish("c3", ok=False)  # retried after 10 s
            c4 = await store.get_resource(istio.ISSUED_KIND, "gloo-mesh", "mesh.c4")
            changed = {**c4.spec, "organization": "x"}  # as an older policy's, not half done
            await store.update(dataclasses.replace(c4, spec=changed, status={
                **c4.status, "specDigest": istio._spec_digest(changed)}), with_status=True)
            c5 = await store.get_resource(istio.ISSUED_KIND, "gloo-mesh", "mesh.c5")
            await store.update_status(dataclasses.replace(c5, status={
                **c5.status, "specDigest": "0" * 64}))  # a writer died between the two
            await store.delete(istio.ISSUED_KIND, "gloo-mesh", "mesh.c6")
            clock.advance(250)  # c2 past its grace point (500 s), the others not
            await asyncio.sleep(0.1)  # the watch, caught up
            follower.cancel()
            assert known.names == {f"mesh.c{n}" for n in (1, 2, 3, 4, 5, 7, 8)}

            read: list[str] = []
            get, listing = store.get_resource, store.list_resources

            async def counted_get(kind: str, namespace: str, name: str) -> base.Resource:
                if kind == istio.ISSUED_KIND:
                    read.append(name)
                return await get(kind, namespace, name)

            async def counted_list(kind: str, **filters: Any) -> list[base.Resource]:
                if kind == istio.ISSUED_KIND:
                    read.append("every one")
                return await listing(kind, **filters)

            store.get_resource = counted_get  # type: ignore[method-assign]
            store.list_resources = counted_list  # type: ignore[method-assign]
            await auth.reconcile(set(fleet) - {"c8"}, known if summaries else None)
            store.get_resource, store.list_resources = get, listing  # type: ignore[method-assign]
            outcome["read"] = sorted(read)
            outcome["after"] = {
                r.name: (r.spec.get("organization"), r.status["state"], r.status["round"],
                         r.status.get("message"))
                for r in await store.list_resources(istio.ISSUED_KIND)}

        run(scenario, clusters=fleet)
        assert outcome["after"] == {
            "mesh.c1": ("Istio", "FINISHED", 1, ""),
            "mesh.c2": ("Istio", "PENDING", 2, "renewal due"),
            "mesh.c3": ("Istio", "PENDING", 2, "retry 1: no"),
            "mesh.c4": ("Istio", "PENDING", 2, ""),
            "mesh.c5": ("Istio", "PENDING", 2, "resumed an interrupted update"),
            "mesh.c6": ("Istio", "PENDING", 1, ""),
            "mesh.c7": ("Istio", "FINISHED", 1, ""),
        }
        assert outcome["read"] == (  # a missing record is read to be sure, either way
            [f"mesh.c{n}" for n in range(2, 7)] if summaries else ["every one", "mesh.c6"])

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


def test_a_retry_waits_at_most_five_minutes_however_many_failures() -> None:
    """The backoff doubles from 10 s up to 5 minutes; thousands of failures (days of
    retries) neither overflow it nor leave the record out of the summaries."""
    failed = {"state": "FAILED", "updated": "2026-11-22T12:00:00Z"}
    for failures, wait in ((0, 10), (1, 20), (5, 300), (5000, 300)):
        assert istio._due_at({**failed, "failures": failures}) == START + dt.timedelta(
            seconds=wait)
    known = istio.Summaries()
    known.fill([base.Resource(
        api_version=istio.ISSUED_API, kind=istio.ISSUED_KIND, namespace="gloo-mesh",
        name="mesh.c1", spec={"cluster": "c1"}, status={**failed, "failures": 5000})])
    assert known.names == {"mesh.c1"}
    assert known.in_line("mesh.c1", "{}", "c1", START + dt.timedelta(seconds=299))
    assert not known.in_line("mesh.c1", "{}", "c1", START + dt.timedelta(seconds=300))


class TestSummaries:
    def test_changes_older_than_the_list_are_left_out(self) -> None:
        """The watch goes on from before the list: a change no newer than what the list
        showed does not take a record back; a deletion removes it; a record of another
        namespace is not one of the round's; one this server could not have written is
        not taken as in line."""
        async def scenario(auth: istio.IstioAuthority, store: MemoryStore,
                           clock: FakeClock) -> None:
            seen: list[base.WatchEvent] = []

            async def watch() -> None:
                async for event in store.watch(istio.ISSUED_KIND, since=0):
                    seen.append(event)

            watching = asyncio.create_task(watch())
            await auth.apply(policy())
            await auth.reconcile()
            [work] = await auth.work_for("cluster-1")
            await auth.sign("cluster-1", work.id, request()[1])
            await auth.report("cluster-1", work.id, ok=True)
            finished = await store.get_resource(istio.ISSUED_KIND, "gloo-mesh", "mesh.cluster-1")
            spec = istio._without_cluster(finished.spec)
            await store.update_status(dataclasses.replace(finished, status={
                **finished.status, "specDigest": "0" * 64}))  # half done, then listed
            known = istio.Summaries()
            known.fill(await store.list_resources(istio.ISSUED_KIND))

            def in_line(cluster: str) -> bool:
                return known.in_line(f"mesh.{cluster}", spec, cluster, clock.now())

            assert in_line("cluster-2")  # PENDING: nothing for the round to do
            assert not known.in_line("mesh.cluster-2", spec, "cluster-1", clock.now())
            assert not in_line("cluster-1")
            await asyncio.sleep(0.05)
            assert [e.object.status.get("state") for e in seen] == [
                "PENDING", "PENDING", "REQUESTED", "ISSUED", "FINISHED", "FINISHED"]
            for event in seen:  # FINISHED and in line, then half done: older than the list
                known.note(event)
                assert not in_line("cluster-1")
            del seen[:]
            await store.delete(istio.ISSUED_KIND, "gloo-mesh", "mesh.cluster-1")
            await store.create(dataclasses.replace(finished, namespace="elsewhere",
                                                   resource_version=0))  # in line there
            pending = await store.get_resource(istio.ISSUED_KIND, "gloo-mesh", "mesh.cluster-2")
            await store.update_status(dataclasses.replace(pending, status={
                **pending.status, "state": "FAILED", "failures": "many"}))
            await asyncio.sleep(0.05)
            watching.cancel()
            for event in seen:
                known.note(event)
            assert known.names == {"mesh.cluster-2"}
            assert not in_line("cluster-1")
            assert not in_line("cluster-2")  # read by the round, which finds what is wrong
        run(scenario)
