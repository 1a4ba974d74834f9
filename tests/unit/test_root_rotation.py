"""Root rotation steps: each waits for every cluster, resumes after a crash, can roll back."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable

import pytest

from meshtrust import errors
from meshtrust.authority import istio, registry, root_rotation
from meshtrust.pki import bundle, csr, keys
from meshtrust.testing import FakeClock, MemoryStore

START = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
POLICY = {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
          "metadata": {"name": "mesh", "namespace": "gloo-mesh"},
          "spec": {"config": {"mgmtServerCa": {"generated": {"keyType": "ecdsa-p256"}},
                              "intermediateCertOptions": {"keyType": "ecdsa-p256"}}}}


class Fleet:
    """The server's authorities with agents answering work by hand."""

    def __init__(self, store: MemoryStore, clock: FakeClock) -> None:
        self.store = store
        self.istio = istio.IstioAuthority(store, clock, registry.Registry(store, clock))
        self.rotations = root_rotation.RootRotations(store, clock, self.istio)
        self.roots: dict[str, bytes] = {}
        self.signers: dict[str, str] = {}

    async def round(self, clusters: tuple[str, ...] = ("cluster-1", "cluster-2")) -> None:
        """One reconcile round, then the given clusters answer their work."""
        await self.rotations.advance()
        await self.istio.reconcile()
        for cluster in clusters:
            for work in await self.istio.work_for(cluster):
                key = keys.generate_key(keys.KeyType.EC_P256)
                signed = await self.istio.sign(cluster, work.id,
                                               csr.dump_csr(csr.build_csr(key, ca=True)))
                self.roots[cluster] = signed.root_bundle
                self.signers[cluster] = signed.certificate.issuer.rfc4514_string()
                await self.istio.report(cluster, work.id, ok=True)

    async def step(self) -> str:
        rotation = await self.store.get_resource(root_rotation.ROTATION_KIND, "gloo-mesh",
                                                 "mesh")
        return str(rotation.status["step"])

    def trusted(self, cluster: str) -> set[str]:
        return {bundle.fingerprint(c) for c in bundle.load_certificates(self.roots[cluster])}


Scenario = Callable[[Fleet], Awaitable[None]]


def run(scenario: Scenario) -> None:
    async def go() -> None:
        clock = FakeClock(START)
        store = MemoryStore(clock=clock)
        reg = registry.Registry(store, clock)
        for name in ("cluster-1", "cluster-2"):
            await reg.register(name)
        fleet = Fleet(store, clock)
        await fleet.istio.apply(POLICY)
        await fleet.round()
        await scenario(fleet)
    asyncio.run(go())


class TestRootRotation:
    def test_steps_wait_for_every_cluster(self) -> None:
        """No step passes while one cluster has not confirmed, and trust never narrows early."""
        async def scenario(fleet: Fleet) -> None:
            old = fleet.trusted("cluster-1")
            await fleet.rotations.start("mesh")
            await fleet.round(clusters=("cluster-1",))  # cluster-2 silent
            await fleet.round(clusters=("cluster-1",))
            assert await fleet.step() == "ADDING_ROOT"
            both = fleet.trusted("cluster-1")
            assert old < both and len(both) == 2
            await fleet.round()  # cluster-2 answers: both now trust old + new
            assert fleet.trusted("cluster-2") == both
            await fleet.round()
            assert await fleet.step() == "REISSUING"
            await fleet.round()
            assert await fleet.step() == "DROPPING_OLD"
            await fleet.round()
            assert await fleet.step() == "DONE"
            new = both - old
            assert fleet.trusted("cluster-1") == new == fleet.trusted("cluster-2")
            secret = await fleet.store.get_secret("gloo-mesh", "root-trust.mesh")
            assert set(secret.data) == {"root-cert.pem", "key.pem"}
        run(scenario)

    def test_resumes_after_a_crash(self) -> None:
        """A new set of authorities on the same store carries the rotation to DONE."""
        async def scenario(fleet: Fleet) -> None:
            await fleet.rotations.start("mesh")
            await fleet.round()
            await fleet.round()
            assert await fleet.step() == "REISSUING"
            restarted = Fleet(fleet.store, FakeClock(START))  # the server came back
            restarted.roots = fleet.roots
            for _ in range(4):
                await restarted.round()
            assert await restarted.step() == "DONE"
        run(scenario)

    def test_rollback_before_the_drop(self) -> None:
        """Rolling back during REISSUING returns every cluster to the old root alone."""
        async def scenario(fleet: Fleet) -> None:
            old = fleet.trusted("cluster-1")
            await fleet.rotations.start("mesh")
            await fleet.round()
            await fleet.round()
            assert await fleet.step() == "REISSUING"
            await fleet.rotations.rollback("mesh")
            for _ in range(3):
                await fleet.round()
            assert await fleet.step() == "ROLLED_BACK"
            assert fleet.trusted("cluster-1") == old == fleet.trusted("cluster-2")
        run(scenario)

    def test_no_rollback_after_the_drop(self) -> None:
        """Once the old root is being dropped, rollback is refused with what to do instead."""
        async def scenario(fleet: Fleet) -> None:
            await fleet.rotations.start("mesh")
            for _ in range(3):
                await fleet.round()
            assert await fleet.step() == "DROPPING_OLD"
            with pytest.raises(errors.ConfigError, match="rotate again instead"):
                await fleet.rotations.rollback("mesh")
        run(scenario)

    def test_one_rotation_at_a_time(self) -> None:
        """A second rotation while one is under way is refused."""
        async def scenario(fleet: Fleet) -> None:
            await fleet.rotations.start("mesh")
            with pytest.raises(errors.ConfigError, match="under way"):
                await fleet.rotations.start("mesh")
        run(scenario)
