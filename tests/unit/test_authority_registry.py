"""The cluster registry and its bootstrap tokens, on the in-memory store and a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from meshtrust import errors
from meshtrust.authority import registry
from meshtrust.testing import FakeClock, MemoryStore

T = TypeVar("T")
KEY_A = "a" * 64
KEY_B = "b" * 64


@dataclasses.dataclass
class World:
    store: MemoryStore
    clock: FakeClock
    registry: registry.Registry


def run(scenario: Callable[[World], Awaitable[T]]) -> T:
    """Run ``scenario`` against a fresh registry with c1 and c2 registered."""
    async def main() -> T:
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        world = World(store=store, clock=clock, registry=registry.Registry(store, clock))
        await world.registry.register("c1")
        await world.registry.register("c2")
        try:
            return await scenario(world)
        finally:
            await store.close()
    return asyncio.run(main())


class TestClusters:
    def test_registering_twice_changes_nothing(self) -> None:
        """Registering a registered cluster keeps its registration time and adds nothing."""
        async def scenario(w: World) -> None:
            first = await w.registry.get("c1")
            w.clock.advance(60)
            again = await w.registry.register("c1")
            assert again.registered == first.registered == dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
            assert [c.name for c in await w.registry.list()] == ["c1", "c2"]
        run(scenario)

    @pytest.mark.parametrize("name", ["Cluster-1", "c_1", "c1.example", "*", "-c1", "x" * 64, ""])
    def test_invalid_names_are_refused(self, name: str) -> None:
        """A name that is not a lower-case DNS label of at most 63 characters is refused."""
        async def scenario(w: World) -> None:
            with pytest.raises(errors.ConfigError, match="is invalid; use lower-case letters"):
                await w.registry.register(name)
        run(scenario)

    @pytest.mark.parametrize("name", ["c9", "C1", "not a name", ""])
    def test_unregistered_cluster_is_unknown(self, name: str) -> None:
        """An unregistered (or impossible) name raises UnknownCluster saying how to register."""
        async def scenario(w: World) -> None:
            with pytest.raises(errors.UnknownCluster,
                               match=f"'{name}' is not registered; register it with `meshtrust "
                                     f"cluster register {name}`"):
                await w.registry.get(name)
        run(scenario)

    def test_deregistration_removes_the_cluster_and_only_its_tokens(self) -> None:
        """Deregistering c1 removes it and its tokens, leaves c2's, and a second time fails."""
        async def scenario(w: World) -> None:
            mine = [await w.registry.create_token("c1") for _ in range(2)]
            theirs = await w.registry.create_token("c2")
            await w.registry.deregister("c1")
            with pytest.raises(errors.UnknownCluster):
                await w.registry.get("c1")
            assert await w.store.list_resources(registry.TOKEN_KIND,
                                                labels={"cluster": "c1"}) == []
            for token in mine:
                with pytest.raises(errors.AuthError, match="token rejected for cluster 'c1'"):
                    await w.registry.consume_token("c1", token, KEY_A)
            await w.registry.consume_token("c2", theirs, KEY_A)
            with pytest.raises(errors.UnknownCluster, match="'c1' is not registered"):
                await w.registry.deregister("c1")
        run(scenario)

    def test_seen_is_recorded_at_most_once_per_interval(self) -> None:
        """``seen`` with nothing to record writes lastSeen at most every 5 s; changes always."""
        async def scenario(w: World) -> None:
            start = w.clock.now()
            await w.registry.seen("c1")
            w.clock.advance(4)
            await w.registry.seen("c1")
            assert (await w.registry.get("c1")).last_seen == start
            await w.registry.seen("c1", connected=True)
            assert (await w.registry.get("c1")).last_seen == start + dt.timedelta(seconds=4)
            w.clock.advance(5)
            await w.registry.seen("c1")
            assert (await w.registry.get("c1")).last_seen == start + dt.timedelta(seconds=9)
            with pytest.raises(errors.UnknownCluster):
                await w.registry.seen("c9")
        run(scenario)

    def test_an_unchanged_report_is_written_once_a_minute(self) -> None:
        """A report saying what the status says refreshes lastSeen only after a minute."""
        async def scenario(w: World) -> None:
            start = w.clock.now()
            held = [{"kind": "relay-client", "serial": "1f"}]
            await w.registry.reported("c1", certificates=held)
            version = (await w.store.get_resource(registry.CLUSTER_KIND, "gloo-mesh",
                                                  "c1")).resource_version
            w.clock.advance(30)
            await w.registry.reported("c1", certificates=held)
            stored = await w.store.get_resource(registry.CLUSTER_KIND, "gloo-mesh", "c1")
            assert stored.resource_version == version  # nothing written
            assert (await w.registry.get("c1")).last_seen == start
            await w.registry.reported("c1", certificates=[{"kind": "relay-client",
                                                           "serial": "2e"}])
            assert (await w.registry.get("c1")).last_seen == start + dt.timedelta(seconds=30)
            w.clock.advance(61)
            await w.registry.reported("c1", certificates=[{"kind": "relay-client",
                                                           "serial": "2e"}])
            assert (await w.registry.get("c1")).last_seen == start + dt.timedelta(seconds=91)
            with pytest.raises(errors.UnknownCluster):
                await w.registry.reported("c9", certificates=held)
            for name in ("", "Not A Name"):  # what an insecure-mode header may carry
                with pytest.raises(errors.UnknownCluster, match="is not registered"):
                    await w.registry.reported(name, certificates=held)
        run(scenario)

    def test_a_connection_records_its_report_in_the_same_write(self) -> None:
        """connect(report=...) writes the connection and the report as one revision, and
        refuses an unregistered cluster."""
        async def scenario(w: World) -> None:
            before = await w.store.revision()
            held = [{"kind": "relay-client", "serial": "1f"}]
            await w.registry.connect("c1", "server-a", report={
                "certificates": held, "agent": {"replica": "agent-a"}})
            assert await w.store.revision() == before + 1  # one write
            stored = await w.store.get_resource(registry.CLUSTER_KIND, "gloo-mesh", "c1")
            assert stored.status["certificates"] == held
            assert stored.status["agent"] == {"replica": "agent-a"}
            assert stored.status["connected"] is True
            assert set(stored.status["connections"]) == {"server-a"}
            assert (await w.registry.get("c1")).last_seen == w.clock.now()
            with pytest.raises(errors.UnknownCluster):
                await w.registry.connect("c9", "server-a", report={"certificates": held})
        run(scenario)

    def test_status_of_a_missing_cluster_is_ignored(self) -> None:
        """Updating the status of a cluster that was just deregistered is not an error."""
        async def scenario(w: World) -> None:
            await w.registry.deregister("c1")
            await w.registry.update_status("c1", connected=False)
            assert [c.name for c in await w.registry.list()] == ["c2"]
        run(scenario)

    def test_a_status_edit_that_loses_every_compare_and_swap_is_an_error(self) -> None:
        """Another writer changing the record between every read and write: the edit is
        retried a few times, then refused with Conflict (the caller learns it was not
        made), and nothing is written; one lost race alone is retried and made."""
        async def scenario(w: World) -> None:
            write = w.store.update_status
            races = 0

            async def racing(resource: Any) -> Any:
                nonlocal races
                if races:
                    races -= 1
                    await write(dataclasses.replace(  # the other writer, first
                        await w.store.get_resource(registry.CLUSTER_KIND, "gloo-mesh", "c1"),
                        status={"other": races}))
                return await write(resource)

            w.store.update_status = racing  # type: ignore[method-assign]
            races = 1
            await w.registry.connect("c1", "server-a")
            stored = await w.store.get_resource(registry.CLUSTER_KIND, "gloo-mesh", "c1")
            assert set(stored.status["connections"]) == {"server-a"}
            races = 100
            with pytest.raises(errors.Conflict, match="cluster 'c1' changed 5 times while it "
                                                      "was being edited"):
                await w.registry.disconnect("c1", "server-a")
            stored = await w.store.get_resource(registry.CLUSTER_KIND, "gloo-mesh", "c1")
            assert "connections" not in stored.status  # only the other writer's
            assert races == 95
        run(scenario)

    def test_a_sweep_goes_on_past_a_cluster_it_cannot_edit(self) -> None:
        """A cluster whose record keeps changing is left (and logged); the others are swept."""
        async def scenario(w: World) -> None:
            for name in ("c1", "c2"):
                await w.registry.connect(name, "server-a")
            write = w.store.update_status

            async def losing_c1(resource: Any) -> Any:
                if resource.name == "c1":
                    raise errors.Conflict("changed meanwhile")
                return await write(resource)

            w.store.update_status = losing_c1  # type: ignore[method-assign]
            assert await w.registry.forget_replicas(gone=["server-a"]) == ("c2",)
            assert (await w.registry.get("c1")).connected
            assert not (await w.registry.get("c2")).connected
        run(scenario)


class TestMembers:
    def test_names_follow_the_watch_from_a_list(self) -> None:
        """Filled from a list, the names change when a cluster is registered or
        deregistered, not on a status report; changes from before the list (the watch
        starts earlier) are left out; until filled there are no names to follow."""
        async def scenario(w: World) -> None:
            members = registry.Members()
            history = w.store.watch(registry.CLUSTER_KIND, since=0)
            first = await anext(history)  # c1 registered: before any list
            assert members.names is None and not members.note(first)
            await w.registry.deregister("c2")
            await w.registry.register("c2")  # listed as registered anew
            members.fill(await w.registry.records())
            assert members.names == {"c1", "c2"}
            await w.registry.register("c3")
            await w.registry.reported("c2", agent={"version": "1"})
            await w.registry.deregister("c1")
            await w.registry.deregister("c3")
            changes = [(event.type.value, event.object.name, members.note(event))
                       for event in [await anext(history) for _ in range(7)]]
            assert changes == [("ADDED", "c2", False), ("DELETED", "c2", False),
                               ("ADDED", "c2", False), ("ADDED", "c3", True),
                               ("MODIFIED", "c2", False), ("DELETED", "c1", True),
                               ("DELETED", "c3", True)]
            assert members.names == {"c2"}
        run(scenario)


class TestTokens:
    def test_only_the_hash_of_a_token_is_stored(self) -> None:
        """The store holds the token's SHA-256, never the token or its secret part."""
        async def scenario(w: World) -> None:
            token = await w.registry.create_token("c1")
            prefix, token_id, secret = token.split(".")
            assert prefix == registry.TOKEN_PREFIX
            stored = await w.store.get_resource(registry.TOKEN_KIND, "gloo-mesh",
                                                f"c1.{token_id}")
            assert stored.spec["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
            assert secret not in repr(stored)
        run(scenario)

    def test_tokens_are_minted_for_registered_clusters_with_positive_lifetimes(self) -> None:
        """Minting for an unregistered cluster or with a lifetime of zero is refused."""
        async def scenario(w: World) -> None:
            with pytest.raises(errors.UnknownCluster):
                await w.registry.create_token("c9")
            with pytest.raises(errors.ConfigError, match="token lifetime must be positive"):
                await w.registry.create_token("c1", dt.timedelta(0))
        run(scenario)

    def test_a_token_is_single_use(self) -> None:
        """A token accepted for one key is refused for another, saying it was already used."""
        async def scenario(w: World) -> None:
            token = await w.registry.create_token("c1")
            await w.registry.consume_token("c1", token, KEY_A)
            with pytest.raises(errors.AuthError,
                               match="token for cluster 'c1' was already used; mint a new one "
                                     "with `meshtrust cluster token c1`"):
                await w.registry.consume_token("c1", token, KEY_B)
        run(scenario)

    def test_the_same_key_may_retry_until_the_token_expires(self) -> None:
        """The key a token was used with may use it again while it lasts: a busy server may
        have kept that agent waiting for many minutes after its reply was lost."""
        async def scenario(w: World) -> None:
            token = await w.registry.create_token("c1")
            await w.registry.consume_token("c1", token, KEY_A)
            w.clock.advance(registry.DEFAULT_TOKEN_TTL - dt.timedelta(seconds=1))
            await w.registry.consume_token("c1", token, KEY_A)
            with pytest.raises(errors.AuthError, match="was already used"):
                await w.registry.consume_token("c1", token, KEY_B)
            w.clock.advance(1)
            with pytest.raises(errors.AuthError, match="expired"):
                await w.registry.consume_token("c1", token, KEY_A)
        run(scenario)

    def test_a_retry_window_can_be_shorter(self) -> None:
        """With a retry window, the same key may use the token again within it only."""
        async def scenario(w: World) -> None:
            short = registry.Registry(w.store, w.clock, retry_window=dt.timedelta(minutes=5))
            token = await short.create_token("c1")
            await short.consume_token("c1", token, KEY_A)
            w.clock.advance(dt.timedelta(minutes=5) - dt.timedelta(seconds=1))
            await short.consume_token("c1", token, KEY_A)
            w.clock.advance(1)
            with pytest.raises(errors.AuthError, match="was already used"):
                await short.consume_token("c1", token, KEY_A)
        run(scenario)

    def test_a_token_expires_at_the_end_of_its_lifetime(self) -> None:
        """A token works until its TTL has passed and is refused from that instant, saying so."""
        async def scenario(w: World) -> None:
            early = await w.registry.create_token("c1", dt.timedelta(seconds=60))
            late = await w.registry.create_token("c1", dt.timedelta(seconds=60))
            w.clock.advance(59.999)
            await w.registry.consume_token("c1", early, KEY_A)
            w.clock.advance(0.001)
            with pytest.raises(errors.AuthError,
                               match="identity token for cluster 'c1' expired; mint a new one"):
                await w.registry.consume_token("c1", late, KEY_A)
        run(scenario)

    def test_an_expired_token_is_refused_even_for_the_key_that_used_it(self) -> None:
        """The retry window does not outlive the token: after expiry the same key is refused."""
        async def scenario(w: World) -> None:
            token = await w.registry.create_token("c1", dt.timedelta(seconds=10))
            await w.registry.consume_token("c1", token, KEY_A)
            w.clock.advance(10)
            with pytest.raises(errors.AuthError, match="expired"):
                await w.registry.consume_token("c1", token, KEY_A)
        run(scenario)

    @pytest.mark.parametrize("forge", [
        lambda t: t[:-1] + ("B" if t.endswith("A") else "A"),
        lambda t: "mt2." + t.split(".", 1)[1],
        lambda t: t + ".extra",
        lambda t: "",
        lambda t: "mt1..secret",
        lambda t: "mt1.NOT-A-NAME.secret",
        lambda t: t.split(".", 1)[1],
    ], ids=["altered", "prefix", "four-parts", "empty", "no-id", "bad-id", "two-parts"])
    def test_forged_or_malformed_tokens_are_rejected(self, forge: Callable[[str], str]) -> None:
        """A token that is altered or malformed is rejected naming the cluster, and not spent."""
        async def scenario(w: World) -> None:
            token = await w.registry.create_token("c1")
            with pytest.raises(errors.AuthError, match="identity token rejected for cluster 'c1'"):
                await w.registry.consume_token("c1", forge(token), KEY_A)
            await w.registry.consume_token("c1", token, KEY_B)
        run(scenario)

    def test_a_token_is_bound_to_its_cluster(self) -> None:
        """c1's token is rejected for c2 and stays usable for c1."""
        async def scenario(w: World) -> None:
            token = await w.registry.create_token("c1")
            with pytest.raises(errors.AuthError, match="identity token rejected for cluster 'c2'"):
                await w.registry.consume_token("c2", token, KEY_A)
            await w.registry.consume_token("c1", token, KEY_A)
        run(scenario)

    def test_concurrent_consumers_have_one_winner(self) -> None:
        """Of 20 concurrent consumers of one token with different keys exactly one succeeds."""
        async def scenario(w: World) -> list[BaseException | None]:
            token = await w.registry.create_token("c1")
            return await asyncio.gather(*(
                w.registry.consume_token("c1", token, f"{n:064x}") for n in range(20)),
                return_exceptions=True)

        results = run(scenario)
        assert results.count(None) == 1
        assert all(isinstance(r, errors.AuthError) for r in results if r is not None)
