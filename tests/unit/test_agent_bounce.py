"""Pod restarts for a new Istio CA: order, root-cert sync, readiness, rate, dry run, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from meshtrust import errors
from meshtrust.agent import bounce, simulation
from meshtrust.pki import bundle, issuer, keys, profiles
from meshtrust.store import base
from meshtrust.testing import FakeClock, MemoryStore

T = TypeVar("T")
START = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
SUFFIX = "[bcdfghjklmnpqrstvwxz2456789]"


@functools.cache
def root(name: str) -> bytes:
    """A fresh Istio root certificate as PEM, one per ``name``."""
    ca = issuer.new_root(keys.KeyType.EC_P256, profiles.ISTIO_ROOT, START)
    return bundle.dump_certificate(ca.certificate)


@dataclasses.dataclass(frozen=True)
class Restart:
    pod: str
    at: dt.datetime
    root_seen: bytes | None  # the namespace's istio-ca-root-cert when the restart began


class RecordingPods(simulation.StorePods):
    """StorePods that notes, for each restart, the time and the root its namespace had."""

    def __init__(self, store: base.Store, clock: FakeClock) -> None:
        super().__init__(store, clock=clock)
        self.clock = clock
        self.restarts: list[Restart] = []

    async def restart(self, pod: bounce.Pod) -> None:
        seen = await self.root_cert(pod.namespace)
        self.restarts.append(Restart(pod.key, self.clock.now(), seen))
        await super().restart(pod)


@dataclasses.dataclass
class World:
    """A seeded mesh on a fake clock; the bouncer's sleeps move the clock and step istiod."""

    clock: FakeClock
    store: MemoryStore
    sim: simulation.SimulatedIstio
    pods: RecordingPods
    changed: dt.datetime = START  # when the new cacerts was written

    def monotonic(self) -> float:
        return (self.clock.now() - START).total_seconds()

    async def sleep(self, seconds: float) -> None:
        self.clock.advance(max(round(seconds, 6), 1e-6))  # time passes, as it does for real
        await self.sim.step()

    def bouncer(self, progress: Callable[[bounce.Event], None] | None = None,
                **settings: Any) -> bounce.Bouncer:
        return bounce.Bouncer(self.pods, bounce.BounceSettings(**settings), progress=progress,
                              monotonic=self.monotonic, sleep=self.sleep)

    async def pod(self, prefix: str) -> base.Resource:
        found = [r for r in await self.store.list_resources("Pod") if r.name.startswith(prefix)]
        assert len(found) == 1, found
        return found[0]

    async def configmap(self, namespace: str) -> base.Resource:
        return await self.store.get_resource("ConfigMap", namespace, "istio-ca-root-cert")

    async def write_configmaps(self, pem: bytes) -> None:
        """Publish ``pem`` in every namespace with pods, as a hot-reloading istiod would."""
        spec = {"data": {"root-cert.pem": pem.decode()}}
        for namespace in ("istio-system", "istio-gateways", "bookinfo"):
            try:
                cm = await self.configmap(namespace)
            except errors.NotFound:
                await self.store.create(base.Resource(
                    api_version="v1", kind="ConfigMap", namespace=namespace,
                    name="istio-ca-root-cert", spec=spec))
            else:
                await self.store.update(dataclasses.replace(cm, spec=spec))


async def write_cacerts(store: base.Store, pem: bytes) -> None:
    try:
        current = await store.get_secret("istio-system", "cacerts")
    except errors.NotFound:
        await store.create(base.Secret(namespace="istio-system", name="cacerts",
                                       data={"root-cert.pem": pem}))
    else:
        await store.update(dataclasses.replace(current, data={"root-cert.pem": pem}))


def run(scenario: Callable[[World], Awaitable[T]], *, ready_after: float = 2.0,
        sync_delay: float = 0.0, workloads: int = 3) -> T:
    """Seed a mesh serving the old root, write the new root to cacerts a minute later, run."""
    async def main() -> T:
        clock = FakeClock(START)
        store = MemoryStore(clock=clock)
        world = World(clock=clock, store=store,
                      sim=simulation.SimulatedIstio(store, clock=clock, ready_after=ready_after,
                                                    sync_delay=sync_delay),
                      pods=RecordingPods(store, clock))
        await write_cacerts(store, root("old"))
        await simulation.seed(store, workloads_per_namespace=workloads, clock=clock)
        await world.write_configmaps(root("old"))  # what istiod published before the change
        world.changed = clock.advance(60)
        await write_cacerts(store, root("new"))
        try:
            return await scenario(world)
        finally:
            await store.close()
    return asyncio.run(main())


def deployment(target: str) -> str:
    """A pod key without its generated suffixes (``bookinfo/details-v1``); namespaces as is."""
    return re.sub(rf"-{SUFFIX}{{10}}-{SUFFIX}{{5}}$", "", target)


def mesh_pod(name: str, role: bounce.Role, namespace: str = "bookinfo",
             restarted_at: dt.datetime | None = None) -> bounce.Pod:
    return bounce.Pod(namespace=namespace, name=name, role=role, restarted_at=restarted_at)


class TestRoleOf:
    @pytest.mark.parametrize(("labels", "role"), [
        ({"app": "istiod", "istio": "pilot"}, bounce.Role.ISTIOD),
        ({"istio": "ingressgateway"}, bounce.Role.GATEWAY),
        ({"istio": "eastwestgateway", "sidecar.istio.io/inject": "false"}, bounce.Role.GATEWAY),
        ({"istio": "egressgateway"}, bounce.Role.GATEWAY),
        ({"app": "reviews", "security.istio.io/tlsMode": "istio"}, bounce.Role.WORKLOAD),
        ({"app": "reviews", "sidecar.istio.io/inject": "true"}, bounce.Role.WORKLOAD),
        ({"istio.io/rev": "canary"}, bounce.Role.WORKLOAD),
        ({"app": "reviews"}, None),
        ({"app": "batch", "sidecar.istio.io/inject": "false", "istio.io/rev": "x"}, None),
    ])
    def test_role_from_labels(self, labels: dict[str, str], role: bounce.Role | None) -> None:
        """istiod, gateways and sidecar workloads are told apart; other pods are outside."""
        assert bounce.role_of(labels) is role


class TestPodsNeedingRestart:
    def test_order_is_istiod_gateways_workloads(self) -> None:
        """Pods come istiod first, then gateways, then workloads, each by namespace and name."""
        pods = [mesh_pod("reviews-1", bounce.Role.WORKLOAD, "b"),
                mesh_pod("ingress", bounce.Role.GATEWAY, "gw"),
                mesh_pod("details-1", bounce.Role.WORKLOAD, "a"),
                mesh_pod("istiod-1", bounce.Role.ISTIOD, "istio-system"),
                mesh_pod("eastwest", bounce.Role.GATEWAY, "gw")]
        assert [p.key for p in bounce.pods_needing_restart(pods)] == [
            "istio-system/istiod-1", "gw/eastwest", "gw/ingress", "a/details-1", "b/reviews-1"]

    def test_pods_started_since_the_change_are_left_out(self) -> None:
        """A pod started at or after ``since`` runs with the new CA; unknown start times count."""
        pods = [mesh_pod("old", bounce.Role.WORKLOAD, restarted_at=START),
                mesh_pod("fresh", bounce.Role.WORKLOAD, restarted_at=START + dt.timedelta(1)),
                mesh_pod("unknown", bounce.Role.WORKLOAD)]
        needed = bounce.pods_needing_restart(pods, since=START + dt.timedelta(hours=1))
        assert [p.name for p in needed] == ["old", "unknown"]


class TestStorePods:
    def test_lists_mesh_pods_with_roles(self) -> None:
        """Pods come with their roles and labels; a pod outside the mesh is not listed."""
        async def scenario(w: World) -> None:
            await w.store.create(base.Resource(
                api_version="v1", kind="Pod", namespace="kube-system", name="coredns-1",
                labels={"k8s-app": "kube-dns"}))
            pods = await w.pods.list()
            assert sorted((p.role.value, p.namespace) for p in pods) == [
                ("gateway", "istio-gateways"), ("gateway", "istio-gateways"),
                ("istiod", "istio-system"), ("workload", "bookinfo"), ("workload", "bookinfo"),
                ("workload", "bookinfo")]
            assert all(p.restarted_at == START for p in pods)
        run(scenario)

    def test_restart_makes_a_pod_not_ready(self) -> None:
        """A restart marks the pod not ready and records the restart time."""
        async def scenario(w: World) -> None:
            [istiod] = [p for p in await w.pods.list() if p.role is bounce.Role.ISTIOD]
            assert await w.pods.ready(istiod)
            await w.pods.restart(istiod)
            assert not await w.pods.ready(istiod)
            status = (await w.pod("istiod")).status
            assert status["restartedAt"] == w.changed.isoformat()
            assert status["phase"] == "Pending"
        run(scenario)

    def test_root_cert_reads_the_configmap(self) -> None:
        """root_cert returns the published root-cert.pem, or None where none is published."""
        async def scenario(w: World) -> None:
            assert await w.pods.root_cert("bookinfo") == root("old")
            assert await w.pods.root_cert("default") is None
        run(scenario)


class TestSimulatedIstio:
    def test_restarted_pods_get_ready_after_the_delay(self) -> None:
        """A restarted pod stays not ready until ready_after has passed."""
        async def scenario(w: World) -> None:
            [pod] = [p for p in await w.pods.list() if p.name.startswith("details")]
            await w.pods.restart(pod)
            await w.sleep(1.9)
            assert not await w.pods.ready(pod)
            await w.sleep(0.1)
            assert await w.pods.ready(pod)
        run(scenario)

    def test_only_a_restarted_istiod_publishes_the_new_root(self) -> None:
        """istiod started before cacerts changed keeps the old root; after a restart it syncs."""
        async def scenario(w: World) -> None:
            await w.sleep(30)
            assert await w.pods.root_cert("bookinfo") == root("old")
            [istiod] = [p for p in await w.pods.list() if p.role is bounce.Role.ISTIOD]
            await w.pods.restart(istiod)
            await w.sleep(2)
            for namespace in ("istio-system", "istio-gateways", "bookinfo"):
                assert await w.pods.root_cert(namespace) == root("new")
            assert await w.pods.root_cert("default") is None
        run(scenario)

    def test_seed_creates_a_realistic_mesh(self) -> None:
        """seed makes istiod, two gateways and bookinfo workloads with Kubernetes-like names."""
        async def scenario(w: World) -> None:
            names = sorted(r.name for r in await w.store.list_resources("Pod"))
            assert len(names) == 12
            assert sum(n.startswith("reviews-v1-") for n in names) == 2  # replicas
            assert all(re.fullmatch(rf"[a-z0-9-]+-{SUFFIX}{{10}}-{SUFFIX}{{5}}", n) for n in names)
            again = MemoryStore()
            await simulation.seed(again, workloads_per_namespace=9)
            assert sorted(r.name for r in await again.list_resources("Pod")) == names
        run(scenario, workloads=9)


class TestRateLimiter:
    def test_acquisitions_are_spaced(self) -> None:
        """At rate 4 each acquisition waits a quarter second after the previous one."""
        now = [0.0]
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds

        async def main() -> None:
            limiter = bounce.RateLimiter(4, monotonic=lambda: now[0], sleep=sleep)
            for _ in range(3):
                await limiter.acquire()
            now[0] += 10
            await limiter.acquire()
        asyncio.run(main())
        assert slept == [0.25, 0.25]


class TestBounceSettings:
    @pytest.mark.parametrize("field", [{"rate": 0}, {"timeout": -1}, {"poll": float("nan")},
                                       {"rate": True}])
    def test_rejects_non_positive_values(self, field: dict[str, Any]) -> None:
        """Rate, timeout and poll must be positive numbers."""
        with pytest.raises(errors.ConfigError, match="must be a positive number"):
            bounce.BounceSettings(**field)


class TestBouncer:
    def test_order_istiod_gateways_workloads(self) -> None:
        """istiod is restarted first, then both gateways, then the workloads."""
        async def scenario(w: World) -> bounce.BounceResult:
            return await w.bouncer(rate=100).bounce(root("new"))
        result = run(scenario)
        assert [deployment(p) for p in result.bounced] == [
            "istio-system/istiod", "istio-gateways/istio-eastwestgateway",
            "istio-gateways/istio-ingressgateway", "bookinfo/details-v1",
            "bookinfo/productpage-v1", "bookinfo/reviews-v1"]
        assert result.bounced == result.planned
        assert not result.dry_run and result.skipped == ()

    def test_each_step_waits_for_root_cert_sync(self) -> None:
        """Gateways and workloads restart only once their namespace's ConfigMap has the new root."""
        async def scenario(w: World) -> bounce.BounceResult:
            result = await w.bouncer(rate=100, poll=0.5).bounce(root("new"))
            assert deployment(w.pods.restarts[0].pod) == "istio-system/istiod"
            assert w.pods.restarts[0].root_seen == root("old")  # istiod publishes, so goes first
            assert all(r.root_seen == root("new") for r in w.pods.restarts[1:])
            synced = (await w.configmap("istio-gateways")).updated
            istiod_ready = dt.datetime.fromisoformat((await w.pod("istiod")).status["startedAt"])
            assert synced is not None and synced >= istiod_ready + dt.timedelta(seconds=30)
            assert all(r.at >= synced for r in w.pods.restarts[1:])
            return result
        result = run(scenario, sync_delay=30)
        sync = [w for w in result.waits if w.what == "root-cert sync"]
        assert [w.target for w in sync] == ["istio-gateways", "bookinfo"]
        assert sync[0].seconds >= 30

    def test_sync_compares_certificates_not_bytes(self) -> None:
        """A ConfigMap with the same roots in another order and layout counts as synced."""
        both = root("new") + root("old")

        async def scenario(w: World) -> bounce.BounceResult:
            await w.write_configmaps(root("old") + b"\n" + root("new"))
            return await w.bouncer(rate=100, timeout=5).bounce(both)
        assert len(run(scenario, sync_delay=1e6).bounced) == 6

        async def subset(w: World) -> None:
            await w.write_configmaps(root("new"))
            with pytest.raises(bounce.BounceTimeout, match="root-cert sync of istio-gateways"):
                await w.bouncer(rate=100, timeout=5).bounce(both)
        run(subset, sync_delay=1e6)

    def test_istiod_readiness_is_waited_for(self) -> None:
        """Each istiod replica is restarted only after the previous one is ready, gateways after."""
        async def scenario(w: World) -> bounce.BounceResult:
            await w.write_configmaps(root("new"))  # synced already: only readiness holds it back
            await w.store.create(base.Resource(
                api_version="v1", kind="Pod", namespace="istio-system", name="istiod-2",
                labels={"app": "istiod"}, status={"ready": True}))
            result = await w.bouncer(rate=100, poll=0.5).bounce(root("new"))
            first, second, gateway = w.pods.restarts[:3]
            assert second.at >= first.at + dt.timedelta(seconds=10)
            assert gateway.at >= second.at + dt.timedelta(seconds=10)
            return result
        result = run(scenario, ready_after=10)
        ready = [w for w in result.waits if w.what == "ready"]
        assert len(ready) == 2 and all(w.seconds >= 10 for w in ready)

    def test_dry_run_restarts_nothing_and_lists_the_plan(self) -> None:
        """A dry run writes nothing and returns, in order, the pods a bounce would restart."""
        events: list[bounce.Event] = []

        async def scenario(w: World) -> bounce.BounceResult:
            before = await w.store.revision()
            result = await w.bouncer(events.append).bounce(root("new"), dry_run=True)
            assert await w.store.revision() == before and w.pods.restarts == []
            return result
        result = run(scenario)
        assert result.dry_run and result.bounced == ()
        assert [p.split("/")[0] for p in result.planned] == [
            "istio-system", "istio-gateways", "istio-gateways", "bookinfo", "bookinfo", "bookinfo"]
        assert [e.target for e in events] == list(result.planned)
        assert {e.action for e in events} == {"planned"}

    def test_rate_limit_is_respected(self) -> None:
        """At rate 2, restarts are at least half a second apart."""
        async def scenario(w: World) -> list[dt.datetime]:
            await w.write_configmaps(root("new"))
            await w.bouncer(rate=2).bounce(root("new"))
            return [r.at for r in w.pods.restarts]
        times = run(scenario, ready_after=0, workloads=8)
        assert len(times) == 11
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
        assert min(gaps) >= 0.5
        assert gaps[-7:] == [0.5] * 7  # workloads in a row go at exactly the allowed rate

    def test_progress_reports_each_step(self) -> None:
        """The progress callback sees restarts, readiness and syncs in the order they happen."""
        events: list[str] = []

        async def scenario(w: World) -> None:
            await w.bouncer(lambda e: events.append(f"{e.action} {deployment(e.target)}"),
                            rate=100).bounce(root("new"))
        run(scenario, workloads=1)
        assert events == ["restarted istio-system/istiod", "ready istio-system/istiod",
                          "synced istio-gateways",
                          "restarted istio-gateways/istio-eastwestgateway",
                          "restarted istio-gateways/istio-ingressgateway",
                          "synced bookinfo", "restarted bookinfo/productpage-v1"]

    def test_pods_started_since_the_change_are_skipped(self) -> None:
        """Bouncing again after a full bounce restarts nothing and reports every pod skipped."""
        async def scenario(w: World) -> bounce.BounceResult:
            await w.bouncer(rate=100).bounce(root("new"), since=w.changed)
            return await w.bouncer(rate=100).bounce(root("new"), since=w.changed)
        again = run(scenario)
        assert again.bounced == again.planned == () and len(again.skipped) == 6

    def test_timeout_names_the_pod_not_ready(self) -> None:
        """When istiod never gets ready, the error names it and says what to check."""
        async def scenario(w: World) -> None:
            with pytest.raises(bounce.BounceTimeout,
                               match=r"ready of istio-system/istiod-\w+-\w+: not ready; check its "
                                     r"events .*kubectl -n istio-system describe pod") as caught:
                await w.bouncer(timeout=5).bounce(root("new"))
            assert caught.value.bounced == (w.pods.restarts[0].pod,)
            assert w.monotonic() - 60 == pytest.approx(5)
        run(scenario, ready_after=1000)

    def test_timeout_names_the_namespace_not_synced(self) -> None:
        """When the ConfigMap never holds the expected root, the error names namespace and roots."""
        async def scenario(w: World) -> None:
            with pytest.raises(bounce.BounceTimeout,
                               match="root-cert sync of istio-gateways: istio-ca-root-cert holds "
                                     "root.* instead of .*check that istiod runs with the new "
                                     "cacerts") as caught:
                await w.bouncer(timeout=5).bounce(root("other"))
            assert caught.value.waited_for == "root-cert sync of istio-gateways"
            assert len(w.pods.restarts) == 1
        run(scenario)

    def test_unreadable_root_restarts_nothing(self) -> None:
        """A new root that holds no certificate is refused before any pod is restarted."""
        async def scenario(w: World) -> None:
            with pytest.raises(errors.ChainError, match="new root-cert.pem"):
                await w.bouncer().bounce(b"-----BEGIN CERTIFICATE-----\nnope\n")
            assert w.pods.restarts == []
        run(scenario)

    def test_runs_against_the_simulation_in_real_time(self) -> None:
        """With real sleeps and SimulatedIstio.run in the background, the bounce completes."""
        async def main() -> bounce.BounceResult:
            store = MemoryStore()
            await write_cacerts(store, root("old"))
            await simulation.seed(store, workloads_per_namespace=2)
            sim = simulation.SimulatedIstio(store, ready_after=0.01)
            await sim.step()
            await asyncio.sleep(0.002)
            await write_cacerts(store, root("new"))
            task = asyncio.create_task(sim.run(0.002))
            try:
                settings = bounce.BounceSettings(rate=1000, timeout=2, poll=0.002)
                return await bounce.Bouncer(simulation.StorePods(store),
                                            settings).bounce(root("new"))
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await store.close()
        result = asyncio.run(main())
        assert [p.split("/")[0] for p in result.bounced] == [
            "istio-system", "istio-gateways", "istio-gateways", "bookinfo", "bookinfo"]
