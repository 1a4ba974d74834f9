"""What lets several server replicas share one store: connection records, signing once,
several relay addresses for an agent, and the leader lease settings."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from meshtrust import errors
from meshtrust.agent.config import AgentConfig
from meshtrust.agent.connection import RelayClient
from meshtrust.agent.provider import Provider
from meshtrust.authority import audit, istio, registry
from meshtrust.pki import bundle, csr, keys
from meshtrust.server import config as server_config
from meshtrust.store import base
from meshtrust.testing import FakeClock, MemoryStore

START = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
NS = "gloo-mesh"
POLICY = {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
          "metadata": {"name": "mesh", "namespace": NS},
          "spec": {"config": {
              "mgmtServerCa": {"generated": {"keyType": "ecdsa-p256"}},
              "intermediateCertOptions": {"keyType": "ecdsa-p256", "ttl": "1000s"}}}}


def run(scenario: Callable[[MemoryStore, FakeClock], Awaitable[None]]) -> None:
    async def go() -> None:
        clock = FakeClock(START)
        store = MemoryStore(clock=clock)
        for name in ("c1", "c2"):
            await registry.Registry(store, clock).register(name)
        await scenario(store, clock)
    asyncio.run(go())


async def status(store: base.Store, cluster: str) -> dict[str, Any]:
    return (await store.get_resource(registry.CLUSTER_KIND, NS, cluster)).status


class TestConnections:
    def test_each_replica_records_its_own_stream(self) -> None:
        """Connected while any replica holds a stream; one replica leaving ends only its own."""
        async def scenario(store: MemoryStore, clock: FakeClock) -> None:
            reg = registry.Registry(store, clock)
            await reg.connect("c1", "server-a")
            await reg.connect("c1", "server-b")
            assert sorted((await status(store, "c1"))["connections"]) == ["server-a", "server-b"]
            await reg.disconnect("c1", "server-a")
            assert (await reg.get("c1")).connected
            await reg.disconnect("c1", "server-b")
            assert not (await reg.get("c1")).connected
            assert (await status(store, "c1"))["connections"] == {}
        run(scenario)

    def test_dead_replicas_are_forgotten(self) -> None:
        """forget_replicas keeps the live replicas' streams and drops the others'."""
        async def scenario(store: MemoryStore, clock: FakeClock) -> None:
            reg = registry.Registry(store, clock)
            await reg.connect("c1", "server-a")
            await reg.connect("c2", "server-b")
            assert await reg.forget_replicas({"server-a"}) == ("c2",)
            assert (await reg.get("c1")).connected
            assert not (await reg.get("c2")).connected
            assert await reg.forget_replicas({"server-a"}) == ()
            assert await reg.forget_replicas(gone=["server-a"]) == ("c1",)
            assert not (await reg.get("c1")).connected
        run(scenario)

    def test_a_single_replica_flag_is_stale_for_the_leader(self) -> None:
        """A connected flag naming no replica (an older server's) is cleared by the sweep."""
        async def scenario(store: MemoryStore, clock: FakeClock) -> None:
            reg = registry.Registry(store, clock)
            await reg.update_status("c1", connected=True)
            assert await reg.forget_replicas(gone=["server-a"]) == ()
            assert await reg.forget_replicas({"server-a"}) == ("c1",)
            assert not (await reg.get("c1")).connected
        run(scenario)

    def test_the_watch_finds_what_the_sweep_would_change(self) -> None:
        """Members, filled from a list and following the watch, names exactly the
        clusters that forget_replicas would change, and which are connected; given
        those names, the sweep reads and edits no other record."""
        async def scenario(store: MemoryStore, clock: FakeClock) -> None:
            reg = registry.Registry(store, clock)
            for name in ("c3", "c4", "c5", "c6"):
                await reg.register(name)
            history = store.watch(registry.CLUSTER_KIND, since=0)
            members = registry.Members()
            assert members.stale({"server-a"}) is None and members.connected is None
            members.fill(await reg.records())
            await reg.connect("c1", "server-a")
            await reg.connect("c2", "server-b")
            await reg.connect("c3", "server-a")
            await reg.connect("c3", "server-b")
            await reg.update_status("c4", connected=True)  # an older server's flag
            await reg.update_status("c5", connected=False,  # a hand-edited record
                                    connections={"server-a": "2026-11-22T12:00:00Z"})
            last = (await store.get_resource(registry.CLUSTER_KIND, NS, "c5")).resource_version
            async for event in history:
                members.note(event)
                if event.resource_version == last:
                    break
            assert members.connected == ["c1", "c2", "c3", "c4"]
            stale = members.stale({"server-a"})
            assert stale == ["c2", "c3", "c4", "c5"]
            assert members.stale(["server-a", "server-b"]) == ["c4", "c5"]

            reads = 0
            get = store.get_resource

            async def counted(*args: Any, **kwargs: Any) -> base.Resource:
                nonlocal reads
                reads += 1
                return await get(*args, **kwargs)
            store.get_resource = counted  # type: ignore[method-assign]
            assert await reg.forget_replicas({"server-a"}, among=["c1", "c2"]) == ("c2",)
            assert reads == 2
            assert await reg.forget_replicas({"server-a"}) == ("c3", "c4", "c5")
            assert sorted((await status(store, "c3"))["connections"]) == ["server-a"]
            assert not (await reg.get("c4")).connected
            assert (await reg.get("c5")).connected
        run(scenario)


def _csr() -> bytes:
    key = keys.generate_key(keys.KeyType.EC_P256)
    return csr.dump_csr(csr.build_csr(key, ca=True))


async def _issue_records(store: base.Store, work: str) -> list[audit.Record]:
    reading = await audit.read(store, event=audit.Kind.ISSUE, outcome=audit.Outcome.OK)
    return [r for r in reading.records if r.message == f"work {work}"]


async def _work(store: MemoryStore, clock: FakeClock) -> tuple[istio.IstioAuthority, str]:
    reg = registry.Registry(store, clock)
    authority = istio.IstioAuthority(store, clock, reg)
    await authority.apply(POLICY)
    await authority.reconcile()
    [work] = await authority.work_for("c1")
    return authority, work.id


class _RefusingAudit(MemoryStore):
    """A store that refuses the next ``refusals`` audit records."""

    refusals = 0

    async def create(self, obj: Any) -> Any:
        if obj.kind == audit.KIND and self.refusals:
            self.refusals -= 1
            raise errors.StoreUnavailable("the database is restarting")
        return await super().create(obj)


class TestSignOnce:
    def test_a_csr_sent_again_gets_the_same_certificate(self) -> None:
        """The same work item and key, sent twice (a lost reply): one certificate, one record."""
        async def scenario(store: MemoryStore, clock: FakeClock) -> None:
            authority, work = await _work(store, clock)
            pem = _csr()
            first = await authority.sign("c1", work, pem)
            again = await authority.sign("c1", work, pem)
            assert again.chain_pem == first.chain_pem
            assert len(await _issue_records(store, work)) == 1
        run(scenario)

    def test_two_replicas_signing_at_once_agree(self) -> None:
        """Two authorities on one store sign one item at once: both hand out the same one."""
        async def scenario(store: MemoryStore, clock: FakeClock) -> None:
            authority, work = await _work(store, clock)
            other = istio.IstioAuthority(store, clock, registry.Registry(store, clock))
            pem = _csr()
            results = await asyncio.gather(authority.sign("c1", work, pem),
                                           other.sign("c1", work, pem))
            serials = {r.certificate.serial_number for r in results}
            assert len(serials) == 1
            records = await _issue_records(store, work)
            assert [r.serial for r in records] == [f"{serials.pop():x}"]
        run(scenario)

    def test_an_unrecorded_certificate_is_recorded_before_the_retry_gets_it(self) -> None:
        """The audit record failed: nothing is handed out; the retry records it once."""
        async def go() -> None:
            clock = FakeClock(START)
            store = _RefusingAudit(clock=clock)
            await registry.Registry(store, clock).register("c1")
            authority, work = await _work(store, clock)
            pem = _csr()
            store.refusals = 1
            with pytest.raises(errors.StoreUnavailable, match="audit log: cannot record"):
                await authority.sign("c1", work, pem)
            signed = await authority.sign("c1", work, pem)
            [record] = await _issue_records(store, work)
            assert record.serial == f"{signed.certificate.serial_number:x}"
        asyncio.run(go())

    def test_a_new_key_is_signed(self) -> None:
        """A CSR for another key (the agent lost its pending key) gets a certificate for it."""
        async def scenario(store: MemoryStore, clock: FakeClock) -> None:
            authority, work = await _work(store, clock)
            first = await authority.sign("c1", work, _csr())
            second = await authority.sign("c1", work, _csr())
            assert second.certificate.public_key() != first.certificate.public_key()
            assert bundle.fingerprint(second.certificate) != bundle.fingerprint(first.certificate)
            assert len(await _issue_records(store, work)) == 2
        run(scenario)


class TestInterruptedReconcile:
    def test_a_spec_written_without_its_state_is_issued_on_the_next_round(self) -> None:
        """A new spec and its PENDING are one write; a spec left without its state (a
        leader of a version that wrote them apart died between the two) starts the
        round on the next reconcile, once."""
        async def go() -> None:
            clock = FakeClock(START)
            store = MemoryStore(clock=clock)
            reg = registry.Registry(store, clock)
            await reg.register("c1")
            authority = istio.IstioAuthority(store, clock, reg)
            await authority.apply(POLICY)
            await authority.reconcile()
            [work] = await authority.work_for("c1")
            await authority.sign("c1", work.id, _csr())
            await authority.report("c1", work.id, ok=True)
            finished = await store.get_resource(istio.ISSUED_KIND, NS, "mesh.c1")
            changed = {**POLICY, "spec": {"config": {
                **POLICY["spec"]["config"],  # type: ignore[index]
                "intermediateCertOptions": {"keyType": "ecdsa-p256", "ttl": "2000s"}}}}
            await authority.apply(changed)
            writes = store.watch(istio.ISSUED_KIND, since=finished.resource_version)
            await authority.reconcile()
            item = await store.get_resource(istio.ISSUED_KIND, NS, "mesh.c1")
            assert (item.status["state"], item.status["round"],
                    item.spec["lifetimeSeconds"]) == ("PENDING", 2, 2000)
            assert (await anext(writes)).object == item
            with pytest.raises(TimeoutError):  # no second write
                await asyncio.wait_for(anext(writes), 0.3)
            # What an older leader left when it died between its two writes:
            await store.update_status(dataclasses.replace(item, status=finished.status))
            interrupted = await store.get_resource(istio.ISSUED_KIND, NS, "mesh.c1")
            assert (interrupted.status["state"], interrupted.spec["lifetimeSeconds"]) == (
                "FINISHED", 2000)
            await istio.IstioAuthority(store, clock, reg).reconcile()
            item = await store.get_resource(istio.ISSUED_KIND, NS, "mesh.c1")
            assert (item.status["state"], item.status["round"]) == ("PENDING", 2)
            await authority.reconcile()  # and once only
            item = await store.get_resource(istio.ISSUED_KIND, NS, "mesh.c1")
            assert item.status["round"] == 2
        asyncio.run(go())


class TestAgentAddresses:
    def test_comma_separated_servers(self) -> None:
        """--server A,B gives two relay addresses and two bootstrap addresses (port + 1)."""
        config = AgentConfig(cluster="c1", server="10.0.0.1:9900, 10.0.0.2:7000",
                             store="sqlite:///x.db")
        assert config.servers == ("10.0.0.1:9900", "10.0.0.2:7000")
        assert config.bootstrap_servers == ("10.0.0.1:9901", "10.0.0.2:7001")
        given = AgentConfig(cluster="c1", server="a:1,b:1", bootstrap_server="c:5,d:6",
                            store="sqlite:///x.db")
        assert given.bootstrap_servers == ("c:5", "d:6")

    def test_a_bad_address_in_the_list_is_named(self) -> None:
        """One address without a port in the list is refused, naming it."""
        with pytest.raises(errors.ConfigError, match="'b' is not host:port"):
            AgentConfig(cluster="c1", server="a:1,b", store="sqlite:///x.db")

    def test_the_next_address_after_a_failure(self) -> None:
        """next_server moves the relay channel on, and wraps around."""
        client = RelayClient(AgentConfig(cluster="c1", server="a:1,b:2", store="sqlite:///x"),
                             Provider())
        assert client.address == "a:1"
        client.next_server()
        assert client.address == "b:2"
        client.next_server()
        assert client.address == "a:1"

    def test_bootstrap_tries_each_address_until_one_answers(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unreachable bootstrap address is skipped; a refusal is an answer and ends it."""
        client = RelayClient(AgentConfig(cluster="c1", server="a:1,b:1,c:1",
                                         store="sqlite:///x"), Provider())
        tried: list[str] = []

        async def at(address: str, *_args: Any) -> str:
            tried.append(address)
            if address == "a:2":
                raise errors.RPCError("failed to connect to all addresses")
            if address == "b:2":
                return "certificate"
            raise errors.AuthError("identity token rejected")

        monkeypatch.setattr(client, "_bootstrap_at", at)
        assert asyncio.run(client.bootstrap(b"", "token", b"")) == "certificate"
        assert asyncio.run(client.bootstrap(b"", "token", b"")) == "certificate"
        assert tried == ["a:2", "b:2", "b:2"]

        async def refuse(address: str, *_args: Any) -> str:
            tried.append(address)
            raise errors.AuthError("identity token rejected")

        monkeypatch.setattr(client, "_bootstrap_at", refuse)
        with pytest.raises(errors.AuthError, match="rejected"):
            asyncio.run(client.bootstrap(b"", "token", b""))
        assert tried[-1] == "b:2" and len(tried) == 4


class TestLeaderLeaseSetting:
    def test_default_and_flag(self) -> None:
        """The lease lasts 10 s unless set; a duration such as 3s is read as whole seconds."""
        assert server_config.ServerConfig(store="sqlite:///x").leader_lease_ttl == 10
        made = server_config.from_mapping({"store": "sqlite:///x", "leader-lease-ttl": "3s",
                                           "replica": "server-0"})
        assert (made.leader_lease_ttl, made.replica) == (3, "server-0")

    def test_fractions_and_bad_names_are_refused(self) -> None:
        """A lease of 1.5 s, or a replica name that is not a DNS label, is a ConfigError."""
        with pytest.raises(errors.ConfigError, match="leader-lease-ttl: give whole seconds"):
            server_config.from_mapping({"store": "sqlite:///x", "leader-lease-ttl": "1.5s"})
        with pytest.raises(errors.ConfigError, match="is not a DNS label"):
            server_config.from_mapping({"store": "sqlite:///x", "replica": "Server_0"})
