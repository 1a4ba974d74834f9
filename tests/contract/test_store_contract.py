"""One suite that every store backend must pass: memory, sqlite, dir and postgresql."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from meshtrust import errors, store, testing
from meshtrust.store import base, lease

BACKENDS = ("memory", "sqlite", "dir", "postgresql")
Scenario = Callable[[base.Store], Awaitable[None]]


class Backend:
    """Opens fresh stores of one kind and runs a scenario on one."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url

    async def open(self, history: int | None = None) -> base.Store:
        if self.url is None:
            return testing.MemoryStore(history=history, interval=0.01)
        location = self.url + (f"?history={history}" if history else "")
        return await store.open_store(location, interval=0.01)

    def run(self, scenario: Scenario, *, history: int | None = None) -> None:
        async def main() -> None:
            opened = await self.open(history)
            try:
                await asyncio.wait_for(scenario(opened), 20)
            finally:
                await opened.close()

        asyncio.run(main())


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    urls = {"memory": None, "sqlite": f"sqlite://{folder}/cluster.db", "dir": f"dir://{folder}"}
    if kind == "postgresql":
        return Backend(kind, request.getfixturevalue("postgres_url"))
    return Backend(kind, urls[kind])


def secret(name: str = "relay-root-tls-secret", namespace: str = "gloo-mesh",
           **fields: object) -> base.Secret:
    values: dict[str, object] = {"data": {"ca.crt": b"root", "tls.crt": b"cert",
                                          "tls.key": b"key"}}
    values.update(fields)
    return base.Secret(namespace=namespace, name=name, **values)  # type: ignore[arg-type]


def policy(name: str = "default", namespace: str = "gloo-mesh", **fields: object) -> base.Resource:
    values: dict[str, object] = {"spec": {"generated": True}}
    values.update(fields)
    return base.Resource(api_version="admin.gloo.solo.io/v2", kind="RootTrustPolicy",
                         namespace=namespace, name=name, **values)  # type: ignore[arg-type]


class TestCrud:
    def test_create_then_get(self, backend: Backend) -> None:
        """A created secret reads back equal, with a version and timestamps set by the store."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(secret(labels={"app": "relay"}, type="kubernetes.io/tls"))
            assert made.resource_version > 0
            assert made.created is not None and made.created == made.updated
            got = await s.get_secret("gloo-mesh", "relay-root-tls-secret")
            assert got == made
            assert got.data["tls.key"] == b"key"
        backend.run(scenario)

    def test_create_twice(self, backend: Backend) -> None:
        """Creating an object whose name is taken raises AlreadyExists."""
        async def scenario(s: base.Store) -> None:
            await s.create(secret())
            with pytest.raises(errors.AlreadyExists, match="relay-root-tls-secret exists"):
                await s.create(secret())
        backend.run(scenario)

    def test_get_missing(self, backend: Backend) -> None:
        """Reading an object that does not exist raises NotFound."""
        async def scenario(s: base.Store) -> None:
            with pytest.raises(errors.NotFound, match="gloo-mesh/nothing not found"):
                await s.get_secret("gloo-mesh", "nothing")
            with pytest.raises(errors.NotFound, match="roottrustpolicy gloo-mesh/x"):
                await s.get_resource("RootTrustPolicy", "gloo-mesh", "x")
        backend.run(scenario)

    def test_update_replaces(self, backend: Backend) -> None:
        """An update replaces data, moves the version on and keeps the creation time."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(secret())
            changed = await s.update(dataclasses.replace(made, data={"token": b"t"}))
            assert changed.resource_version > made.resource_version
            assert changed.created == made.created
            got = await s.get_secret(made.namespace, made.name)
            assert dict(got.data) == {"token": b"t"}
        backend.run(scenario)

    def test_delete(self, backend: Backend) -> None:
        """A deleted object is gone, and deleting it again raises NotFound."""
        async def scenario(s: base.Store) -> None:
            await s.create(secret())
            await s.delete("Secret", "gloo-mesh", "relay-root-tls-secret")
            with pytest.raises(errors.NotFound):
                await s.get_secret("gloo-mesh", "relay-root-tls-secret")
            with pytest.raises(errors.NotFound, match="not found"):
                await s.delete("Secret", "gloo-mesh", "relay-root-tls-secret")
        backend.run(scenario)

    def test_names_are_per_kind(self, backend: Backend) -> None:
        """A secret and resources of two kinds may share a namespace and name."""
        async def scenario(s: base.Store) -> None:
            await s.create(secret(name="default"))
            await s.create(policy())
            await s.create(dataclasses.replace(policy(), kind="Lease",
                                               api_version="coordination.k8s.io/v1"))
            assert [r.kind for r in await s.list_resources("Lease")] == ["Lease"]
            assert [x.name for x in await s.list_secrets()] == ["default"]
        backend.run(scenario)

    def test_one_revision_for_all_writes(self, backend: Backend) -> None:
        """Every write takes the next revision of one store-wide counter."""
        async def scenario(s: base.Store) -> None:
            start = await s.revision()
            a = await s.create(secret())
            b = await s.create(policy())
            await s.delete("Secret", a.namespace, a.name)
            assert (a.resource_version, b.resource_version) == (start + 1, start + 2)
            assert await s.revision() == start + 3
        backend.run(scenario)

    def test_list_by_namespace(self, backend: Backend) -> None:
        """Listing filters by namespace and returns objects ordered by namespace and name."""
        async def scenario(s: base.Store) -> None:
            await s.create(secret(name="b"))
            await s.create(secret(name="a"))
            await s.create(secret(name="cacerts", namespace="istio-system"))
            assert [x.name for x in await s.list_secrets(namespace="gloo-mesh")] == ["a", "b"]
            assert [x.namespace for x in await s.list_secrets()] == [
                "gloo-mesh", "gloo-mesh", "istio-system"]
        backend.run(scenario)

    def test_update_needs_a_version(self, backend: Backend) -> None:
        """Updating an object never read (resource version 0) is a caller error."""
        async def scenario(s: base.Store) -> None:
            with pytest.raises(ValueError, match="use create for a new object"):
                await s.update(secret())
        backend.run(scenario)


class TestCompareAndSwap:
    def test_stale_update(self, backend: Backend) -> None:
        """An update from a stale read raises Conflict and changes nothing."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(secret())
            await s.update(dataclasses.replace(made, data={"a": b"1"}))
            with pytest.raises(errors.Conflict, match="read it again"):
                await s.update(dataclasses.replace(made, data={"a": b"2"}))
            assert (await s.get_secret(made.namespace, made.name)).data == {"a": b"1"}
        backend.run(scenario)

    def test_update_missing(self, backend: Backend) -> None:
        """Updating an object that does not exist raises NotFound."""
        async def scenario(s: base.Store) -> None:
            with pytest.raises(errors.NotFound):
                await s.update(secret(resource_version=3))
        backend.run(scenario)

    def test_delete_at_version(self, backend: Backend) -> None:
        """A delete at a stale version raises Conflict; at the current one it deletes."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(secret())
            now = await s.update(dataclasses.replace(made, labels={"x": "y"}))
            with pytest.raises(errors.Conflict):
                await s.delete("Secret", made.namespace, made.name,
                               resource_version=made.resource_version)
            await s.delete("Secret", made.namespace, made.name,
                           resource_version=now.resource_version)
            assert await s.list_secrets() == []
        backend.run(scenario)

    def test_racing_updates(self, backend: Backend) -> None:
        """Of many concurrent updates from the same read, exactly one wins."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(secret())
            results = await asyncio.gather(
                *(s.update(dataclasses.replace(made, data={"n": str(i).encode()}))
                  for i in range(12)), return_exceptions=True)
            winners = [r for r in results if isinstance(r, base.Secret)]
            assert len(winners) == 1
            assert all(isinstance(r, errors.Conflict) for r in results if r not in winners)
            assert await s.get_secret(made.namespace, made.name) == winners[0]
        backend.run(scenario)

    def test_writes_together(self, backend: Backend) -> None:
        """Writes sent together (one group commit where the backend has one) each meet
        their own checks: of two updates of one key from the same read one wins, a create
        of an existing name fails, and a delete and a status update land."""
        async def scenario(s: base.Store) -> None:
            kept = await s.create(secret("kept"))
            gone = await s.create(secret("gone"))
            rule = await s.create(policy())
            since = await s.revision()
            results = await asyncio.gather(
                s.create(secret("new-1", labels={"team": "a"})),
                s.update(dataclasses.replace(kept, data={"n": b"1"})),
                s.update(dataclasses.replace(kept, data={"n": b"2"})),
                s.create(secret("gone")),
                s.delete("Secret", gone.namespace, gone.name),
                s.update_status(dataclasses.replace(rule, status={"state": "ISSUED"})),
                return_exceptions=True)
            assert isinstance(results[0], base.Secret)
            updates = results[1:3]
            won = [r for r in updates if isinstance(r, base.Secret)]
            assert len(won) == 1
            assert [type(r) for r in updates if r not in won] == [errors.Conflict]
            # The create of "gone" fails if it runs before the delete (a backend without
            # a group commit may run them in either order) and makes it anew after.
            recreated = isinstance(results[3], base.Secret)
            assert recreated or isinstance(results[3], errors.AlreadyExists)
            assert results[4] is None
            assert {x.name for x in await s.list_secrets()} == {"kept", "new-1"} | (
                {"gone"} if recreated else set())
            assert isinstance(results[5], base.Resource)
            assert (await s.get_secret(kept.namespace, "kept")) == won[0]
            assert [x.name for x in await s.list_secrets(labels={"team": "a"})] == ["new-1"]
            assert (await s.get_resource(rule.kind, rule.namespace, rule.name)).status == {
                "state": "ISSUED"}
            async with asyncio.timeout(5):
                events = await collect(s, 3 + recreated, since=since)
            assert [e.resource_version for e in events] == sorted(
                {e.resource_version for e in events})
            assert {(e.type, e.object.name) for e in events} >= {
                (base.EventType.ADDED, "new-1"), (base.EventType.MODIFIED, "kept"),
                (base.EventType.DELETED, "gone")}
        backend.run(scenario)

    def test_stale_status(self, backend: Backend) -> None:
        """A status update from a stale read raises Conflict."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(policy())
            await s.update_status(dataclasses.replace(made, status={"state": "ISSUED"}))
            with pytest.raises(errors.Conflict):
                await s.update_status(dataclasses.replace(made, status={"state": "FAILED"}))
        backend.run(scenario)


class TestGeneration:
    def test_spec_change_bumps(self, backend: Backend) -> None:
        """A new resource has generation 1, and each spec change adds one."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(policy())
            assert made.generation == 1
            changed = await s.update(dataclasses.replace(made, spec={"generated": False}))
            assert changed.generation == 2
        backend.run(scenario)

    def test_metadata_change_keeps(self, backend: Backend) -> None:
        """An update that leaves the spec alone leaves the generation alone."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(policy())
            changed = await s.update(dataclasses.replace(made, labels={"team": "mesh"}))
            assert (changed.generation, changed.labels) == (1, {"team": "mesh"})
        backend.run(scenario)

    def test_status_is_separate(self, backend: Backend) -> None:
        """update_status changes only the status; update keeps the stored status."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(policy())
            status = await s.update_status(dataclasses.replace(
                made, spec={"ignored": True}, status={"state": "ISSUED"}))
            assert (status.generation, status.spec, status.status) == (
                1, {"generated": True}, {"state": "ISSUED"})
            spec = await s.update(dataclasses.replace(status, spec={"n": 2}, status={}))
            assert (spec.generation, spec.status) == (2, {"state": "ISSUED"})
            assert await s.get_resource("RootTrustPolicy", "gloo-mesh", "default") == spec
        backend.run(scenario)

    def test_spec_and_status_in_one_write(self, backend: Backend) -> None:
        """update with_status writes both in one compare-and-swap: one event, one
        revision, and a stale read writes neither; a secret has no status to write."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(policy())
            events = s.watch("RootTrustPolicy", since=made.resource_version)
            both = await s.update(dataclasses.replace(
                made, spec={"n": 2}, status={"state": "PENDING"}), with_status=True)
            assert (both.generation, both.spec, both.status) == (
                2, {"n": 2}, {"state": "PENDING"})
            assert both.resource_version == made.resource_version + 1
            event = await anext(events)
            assert (event.type, event.object) == (base.EventType.MODIFIED, both)
            with pytest.raises(errors.Conflict):
                await s.update(dataclasses.replace(made, spec={"n": 3},
                                                   status={"state": "FAILED"}),
                               with_status=True)
            assert await s.get_resource("RootTrustPolicy", "gloo-mesh", "default") == both
            with pytest.raises(TypeError, match="only a Resource has a status"):
                await s.update(await s.create(secret()), with_status=True)
        backend.run(scenario)


class TestLabelSelector:
    def test_all_labels_must_match(self, backend: Backend) -> None:
        """A selector keeps objects that carry every label given, with equal values."""
        async def scenario(s: base.Store) -> None:
            await s.create(secret(name="a", labels={"app.kubernetes.io/name": "relay",
                                                    "tier": "root"}))
            await s.create(secret(name="b", labels={"app.kubernetes.io/name": "relay"}))
            await s.create(secret(name="c", labels={"app.kubernetes.io/name": "istio"}))
            names = [x.name for x in await s.list_secrets(
                labels={"app.kubernetes.io/name": "relay"})]
            assert names == ["a", "b"]
            both = await s.list_secrets(labels={"app.kubernetes.io/name": "relay",
                                                "tier": "root"})
            assert [x.name for x in both] == ["a"]
            assert await s.list_secrets(labels={"tier": "leaf"}) == []
        backend.run(scenario)

    def test_resources_with_namespace(self, backend: Backend) -> None:
        """Selectors and namespaces combine for resources too."""
        async def scenario(s: base.Store) -> None:
            await s.create(policy(name="a", labels={"mesh": "one"}))
            await s.create(policy(name="b", namespace="other", labels={"mesh": "one"}))
            found = await s.list_resources("RootTrustPolicy", namespace="other",
                                           labels={"mesh": "one"})
            assert [(r.namespace, r.name) for r in found] == [("other", "b")]
        backend.run(scenario)


async def collect(s: base.Store, count: int, kind: str = "Secret", **options: object
                  ) -> list[base.WatchEvent]:
    events: list[base.WatchEvent] = []
    async for event in s.watch(kind, **options):  # type: ignore[arg-type]
        events.append(event)
        if len(events) == count:
            break
    return events


class TestWatch:
    def test_history_in_order(self, backend: Backend) -> None:
        """A watch from 0 reports every write to the kind, in order, with the right types."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(secret())
            await s.create(policy())
            changed = await s.update(dataclasses.replace(made, data={"a": b"b"}))
            await s.delete("Secret", made.namespace, made.name)
            events = await collect(s, 3, since=0)
            assert [e.type.value for e in events] == ["ADDED", "MODIFIED", "DELETED"]
            assert [e.resource_version for e in events] == [1, 3, 4]
            assert events[1].object == changed
            assert events[2].object.resource_version == 4
            assert events[2].object.name == made.name
        backend.run(scenario)

    def test_resume(self, backend: Backend) -> None:
        """A watch resumed from a revision reports only the writes after it."""
        async def scenario(s: base.Store) -> None:
            first = await s.create(secret(name="a"))
            await s.create(secret(name="b"))
            await s.create(secret(name="c"))
            events = await collect(s, 2, since=first.resource_version)
            assert [e.object.name for e in events] == ["b", "c"]
        backend.run(scenario)

    def test_filters(self, backend: Backend) -> None:
        """A watch sees only its kind and namespace."""
        async def scenario(s: base.Store) -> None:
            await s.create(secret(name="a"))
            await s.create(secret(name="b", namespace="istio-system"))
            await s.create(policy(namespace="istio-system"))
            await s.create(secret(name="c", namespace="istio-system"))
            events = await collect(s, 2, since=0, namespace="istio-system")
            assert [e.object.name for e in events] == ["b", "c"]
            policies = await collect(s, 1, kind="RootTrustPolicy", since=0)
            assert policies[0].resource_version == 3
        backend.run(scenario)

    def test_live(self, backend: Backend) -> None:
        """A watch from now waits for writes and reports them as they happen."""
        async def scenario(s: base.Store) -> None:
            await s.create(secret(name="old"))
            watcher = asyncio.create_task(collect(s, 2, since=await s.revision()))
            await asyncio.sleep(0.05)
            assert not watcher.done()
            await s.create(secret(name="new"))
            await s.create(secret(name="newer"))
            events = await watcher
            assert [e.object.name for e in events] == ["new", "newer"]
        backend.run(scenario)

    def test_compacted(self, backend: Backend) -> None:
        """Resuming from a revision older than the kept history raises Conflict."""
        async def scenario(s: base.Store) -> None:
            made = await s.create(secret())
            for index in range(40):
                made = await s.update(dataclasses.replace(made, data={"n": b"%d" % index}))
            with pytest.raises(errors.Conflict, match="list again"):
                await collect(s, 1, since=1)
            events = await collect(s, 1, since=made.resource_version - 1)
            assert events[0].object == made
        backend.run(scenario, history=8)


class TestLeases:
    def test_first_comer_wins(self, backend: Backend) -> None:
        """The first candidate gets a free lease; another is refused while it is valid."""
        clock = testing.FakeClock()

        async def scenario(s: base.Store) -> None:
            leases = lease.Leases(s, namespace="gloo-mesh", clock=clock)
            assert await leases.acquire("rotator", "pod-a", 15)
            assert not await leases.acquire("rotator", "pod-b", 15)
            assert await leases.holder("rotator") == "pod-a"
            stored = await s.get_resource("Lease", "gloo-mesh", "rotator")
            assert stored.api_version == "coordination.k8s.io/v1"
            assert stored.spec["holderIdentity"] == "pod-a"
            assert stored.spec["leaseDurationSeconds"] == 15
        backend.run(scenario)

    def test_takeover_after_expiry(self, backend: Backend) -> None:
        """Once the holder stops renewing for the lease's duration, another takes it over."""
        clock = testing.FakeClock()

        async def scenario(s: base.Store) -> None:
            leases = lease.Leases(s, namespace="gloo-mesh", clock=clock)
            assert await leases.acquire("rotator", "pod-a", 10)
            clock.advance(9)
            assert not await leases.acquire("rotator", "pod-b", 10)
            clock.advance(1)
            assert await leases.holder("rotator") is None
            assert await leases.acquire("rotator", "pod-b", 10)
            assert not await leases.renew("rotator", "pod-a")
            stored = await s.get_resource("Lease", "gloo-mesh", "rotator")
            assert stored.spec["leaseTransitions"] == 1
        backend.run(scenario)

    def test_renew_extends(self, backend: Backend) -> None:
        """Renewing moves the expiry a full duration on from the renewal."""
        clock = testing.FakeClock()

        async def scenario(s: base.Store) -> None:
            leases = lease.Leases(s, namespace="gloo-mesh", clock=clock)
            await leases.acquire("rotator", "pod-a", 10)
            clock.advance(8)
            assert await leases.renew("rotator", "pod-a")
            clock.advance(8)
            assert await leases.holder("rotator") == "pod-a"
            assert not await leases.acquire("rotator", "pod-b", 10)
        backend.run(scenario)

    def test_release(self, backend: Backend) -> None:
        """A released lease is free at once; only its holder can release it."""
        clock = testing.FakeClock()

        async def scenario(s: base.Store) -> None:
            leases = lease.Leases(s, namespace="gloo-mesh", clock=clock)
            await leases.acquire("rotator", "pod-a", 10)
            assert not await leases.release("rotator", "pod-b")
            assert await leases.release("rotator", "pod-a")
            assert await leases.holder("rotator") is None
            assert await leases.acquire("rotator", "pod-b", 10)
        backend.run(scenario)

    def test_one_winner(self, backend: Backend) -> None:
        """Of many candidates racing for a free lease, exactly one wins."""
        clock = testing.FakeClock()

        async def scenario(s: base.Store) -> None:
            leases = lease.Leases(s, namespace="gloo-mesh", clock=clock)
            won = await asyncio.gather(*(leases.acquire("rotator", f"pod-{i}", 10)
                                         for i in range(8)))
            assert won.count(True) == 1
            assert await leases.holder("rotator") == f"pod-{won.index(True)}"
        backend.run(scenario)
