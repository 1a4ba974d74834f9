"""The index of clusters with Istio work, followed from the store's changes, and waking the
work streams of many clusters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshtrust import clock, metrics, rpc, settings
from meshtrust.authority import istio, registry, relay
from meshtrust.rpc.transport import messages
from meshtrust.server import service, work
from meshtrust.store import base
from meshtrust.testing import FakeClock, MemoryStore
from servicercontext import Aborted, Context, Metadatum


def _item(cluster: str, state: istio.State, version: int = 1) -> base.Resource:
    return base.Resource(api_version=istio.ISSUED_API, kind=istio.ISSUED_KIND,
                         namespace="gloo-mesh", name=f"mesh-{cluster}",
                         labels={"cluster": cluster}, status={"state": state.value},
                         resource_version=version)


def _event(item: base.Resource, kind: base.EventType = base.EventType.MODIFIED
           ) -> base.WatchEvent:
    return base.WatchEvent(type=kind, object=item, resource_version=item.resource_version)


class TestStreamRecords:
    """Which work streams record the connection in the registry."""

    @staticmethod
    def _run(scenario: Any) -> None:
        async def main() -> None:
            store_clock = FakeClock()
            store = MemoryStore(clock=store_clock)
            reg = registry.Registry(store, store_clock)
            await reg.register("c1")
            relay_service = service.RelayService(
                relay.RelayAuthority(store, store_clock, reg), store_clock, metrics.Metrics(),
                insecure=True)
            try:
                await scenario(store, store_clock, reg, relay_service)
            finally:
                await store.close()
        asyncio.run(main())

    @staticmethod
    async def _open(relay_service: service.RelayService) -> AsyncIterator[Any]:
        stream = relay_service.Work(messages.WorkSubscribe(
            protocol_version=rpc.PROTOCOL_VERSION, replica="agent"),
            Context(metadata=[Metadatum(service.INSECURE_CLUSTER_HEADER, "c1")]))
        first = await anext(stream)
        assert first.HasField("heartbeat")
        return stream

    def test_a_stream_moved_to_a_renewed_connection_writes_nothing(self) -> None:
        """The first stream records the connection; a second one of the same cluster (the
        agent moved it to its renewed certificate's connection) neither reads nor writes
        the record; the last one to end records the disconnection."""
        async def scenario(store: MemoryStore, now: FakeClock, reg: registry.Registry,
                           relay_service: service.RelayService) -> None:
            first = await self._open(relay_service)
            now.advance(60)  # a connection recorded again would say when
            record = await store.get_resource(registry.CLUSTER_KIND, settings.RELAY_NAMESPACE, "c1")
            assert record.status["connections"] == {"server": record.status["lastSeen"]}
            second = await self._open(relay_service)
            again = await store.get_resource(registry.CLUSTER_KIND, settings.RELAY_NAMESPACE, "c1")
            assert again.resource_version == record.resource_version
            await first.aclose()
            assert (await reg.get("c1")).connected
            await second.aclose()
            assert not (await reg.get("c1")).connected
            assert relay_service.connected == []
        self._run(scenario)

    def test_a_stream_after_deregistration_is_refused(self) -> None:
        """Once the cluster is deregistered its open streams are gone, so a stream that
        comes after them asks the registry again, and is refused."""
        async def scenario(store: MemoryStore, now: FakeClock, reg: registry.Registry,
                           relay_service: service.RelayService) -> None:
            first = await self._open(relay_service)
            await reg.deregister("c1")
            relay_service.drop("c1")
            with pytest.raises(Aborted, match="not registered"):
                await self._open(relay_service)
            with pytest.raises(Aborted, match="deregistered"):
                await anext(first)
        self._run(scenario)


    def test_a_resting_stream_keeps_no_work_item(self) -> None:
        """The work items a stream sent are not kept while it rests: ten thousand
        streams would each keep their last one."""
        async def scenario(store: MemoryStore, now: FakeClock, reg: registry.Registry,
                           relay_service: service.RelayService) -> None:
            sent = [messages.WorkItem(id=f"mesh.c1/1/{n}") for n in (1, 2)]
            due = iter([True])

            async def work_items(cluster: str) -> list[Any]:
                return list(sent)

            relay_service._work_items = work_items  # type: ignore[method-assign]
            relay_service._work_due = lambda cluster: next(due, False)  # type: ignore
            stream = await self._open(relay_service)
            assert [await anext(stream), await anext(stream)] == sent
            resting = asyncio.create_task(anext(stream))
            await asyncio.sleep(0.05)
            assert not resting.done()
            assert stream.ag_frame is not None
            kept = [value for value in stream.ag_frame.f_locals.values()
                    if isinstance(value, messages.WorkItem)]
            assert kept == []
            resting.cancel()
            await asyncio.gather(resting, return_exceptions=True)
        self._run(scenario)


class TestWorkIndex:
    def test_until_filled_every_cluster_may_have_work_and_none_is_new(self) -> None:
        """Before the first full list the streams ask the store, and hand out at once."""
        index = work.WorkIndex()
        assert index.has_work("cluster-1")
        assert not index.has_new_work("cluster-1")

    def test_new_work_is_pending_work_until_handed_out(self) -> None:
        """PENDING is new; REQUESTED and ISSUED are outstanding but handed out; FINISHED is
        neither, and a deleted item leaves the index."""
        index = work.WorkIndex()
        index.fill([_item("cluster-1", istio.State.PENDING),
                    _item("cluster-2", istio.State.ISSUED)])
        assert index.has_new_work("cluster-1") and index.has_work("cluster-1")
        assert not index.has_new_work("cluster-2") and index.has_work("cluster-2")
        assert not index.has_work("cluster-3")
        assert index.note(_event(_item("cluster-1", istio.State.REQUESTED, 2))) is None
        assert not index.has_new_work("cluster-1") and index.has_work("cluster-1")
        assert index.note(_event(_item("cluster-2", istio.State.PENDING, 3))) == "cluster-2"
        assert index.has_new_work("cluster-2")
        index.note(_event(_item("cluster-1", istio.State.FINISHED, 4)))
        assert not index.has_work("cluster-1")
        index.note(_event(_item("cluster-2", istio.State.PENDING, 5), base.EventType.DELETED))
        assert index.clusters == []


class TestWakingStreams:
    def test_many_streams_are_woken_a_slice_per_turn_of_the_loop(self) -> None:
        """Waking every stream gives the loop a turn after each slice, so that one turn does
        not run thousands of streams; waking some clusters wakes only theirs."""
        async def scenario() -> None:
            authority: Any = None  # waking streams asks nothing of the authority
            relay = service.RelayService(authority, clock.SystemClock(), metrics.Metrics())
            count = 2 * service.WAKE_SLICE + 10
            groups = {f"c-{i}": {service._Stream()} for i in range(count)}
            relay._streams.update(groups)

            def woken() -> int:
                return sum(s.woken for group in groups.values() for s in group)

            task = asyncio.create_task(relay.kick_many())
            await asyncio.sleep(0)
            assert woken() == service.WAKE_SLICE
            await task
            assert woken() == count
            for group in groups.values():
                for stream in group:
                    stream.woken = False
            await relay.kick_many(["c-1", "c-7", "not-connected"])
            assert {name for name, group in groups.items()
                    if any(s.woken for s in group)} == {"c-1", "c-7"}

        asyncio.run(scenario())


class TestStreamRest:
    def test_a_stream_rests_until_woken_or_for_its_time(self) -> None:
        """Woken before it rests, it goes on at once; woken while resting, at once too;
        else after its time. Each rest leaves it not woken."""
        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            stream = service._Stream()
            stream.wake()
            began = loop.time()
            await stream.rest(5.0)
            assert loop.time() - began < 0.5 and not stream.woken
            resting = asyncio.create_task(stream.rest(5.0))
            await asyncio.sleep(0.05)
            assert not resting.done() and stream.waiter is not None
            stream.end()
            await asyncio.wait_for(resting, 0.5)
            assert stream.gone and stream.waiter is None and not stream.woken
            began = loop.time()
            await stream.rest(0.1)
            assert 0.09 <= loop.time() - began < 0.5

        asyncio.run(scenario())


class TestHandOuts:
    def _handouts(self, room: int = 2) -> tuple[work.HandOuts, list[float]]:
        now = [0.0]
        return work.HandOuts(lambda: room, hold=30.0, monotonic=lambda: now[0]), now

    def test_work_goes_out_as_far_as_there_is_room_then_in_the_order_asked(self) -> None:
        """Two clusters may have work on its way; the others wait, each once however often
        its streams ask, and are handed theirs in the order they asked, one for each
        cluster whose work came back."""
        handouts, _ = self._handouts()
        assert handouts.ask("c-1") == (True, [])
        assert handouts.ask("c-2") == (True, [])
        assert handouts.ask("c-3") == (False, [])
        assert handouts.ask("c-4") == (False, [])
        assert handouts.ask("c-3") == (False, [])  # its second stream
        assert handouts.ask("c-1") == (True, [])  # on its way: may be sent again
        assert (handouts.out, handouts.waiting) == (2, 2)
        assert handouts.done("c-2") == ["c-3"]
        assert handouts.done("c-2") == []  # came back once
        assert handouts.ask("c-3") == (True, [])
        assert handouts.done("c-1") == ["c-4"]
        assert (handouts.out, handouts.waiting) == (2, 0)

    def test_work_not_answered_within_the_hold_leaves_room(self) -> None:
        """An agent that never answers keeps its room for ``hold`` seconds; a CSR told to
        come back later keeps it that much longer."""
        handouts, now = self._handouts(room=1)
        assert handouts.ask("c-1")[0]
        assert not handouts.ask("c-2")[0]
        now[0] = 29.0
        assert not handouts.ask("c-2")[0]
        now[0] = 30.0
        assert handouts.ask("c-2") == (True, [])
        handouts.deferred("c-2", 100.0)  # now + 100 + 30
        handouts.deferred("c-9", 100.0)  # not on its way: nothing to keep
        now[0] = 159.0
        assert handouts.ask("c-3") == (False, [])
        assert handouts.out == 1
        now[0] = 160.0
        assert handouts.ask("c-4") == (False, ["c-3"])
        assert handouts.ask("c-2") == (False, [])  # its room went: it waits again

    def test_a_cluster_done_leaves_the_line_and_its_room(self) -> None:
        """A cluster whose work was withdrawn, or whose streams ended, while it waited
        leaves the line: the next one gets the room, not a cluster with nothing to do."""
        handouts, _ = self._handouts(room=1)
        assert handouts.ask("c-1")[0]
        assert not handouts.ask("c-2")[0]
        assert not handouts.ask("c-3")[0]
        assert handouts.done("c-2") == []
        assert handouts.done("c-1") == ["c-3"]
        assert handouts.waiting == 0

    def test_the_room_follows_the_server(self) -> None:
        """The room is asked each time: a server that lowers its limit hands out less."""
        room = [1]
        handouts = work.HandOuts(lambda: room[0], hold=30.0)
        assert handouts.ask("c-1")[0]
        assert not handouts.ask("c-2")[0]
        room[0] = 3
        assert handouts.ask("c-3") == (True, ["c-2"])


class _Limit:
    """Admission control as the hand-outs see it: the slots work may hold."""

    work_limit = 1


class TestStreamsHandOut:
    def _relay(self, *pending: str) -> service.RelayService:
        authority: Any = None  # handing out asks nothing of the authority
        relay = service.RelayService(authority, clock.SystemClock(), metrics.Metrics(),
                                     admission_control=_Limit())  # type: ignore[arg-type]
        relay.work.fill([_item(name, istio.State.PENDING) for name in pending])
        for name in pending:
            relay._streams[name] = {service._Stream()}
        return relay

    def test_new_work_goes_out_as_the_store_says_work_came_back(self) -> None:
        """Streams of clusters with new work hand it out as there is room; work already
        handed out goes again at once. Once the store says a cluster's intermediate was
        signed (whichever replica signed it) the next cluster's stream is woken, and its
        work is due; the same cluster's work handed out (REQUESTED) keeps its room."""
        room = service.HANDED_OUT_PER_SLOT
        names = [f"c-{i}" for i in range(room + 1)]
        relay = self._relay(*names)
        assert [relay._work_due(name) for name in names] == [True] * room + [False]
        last = names[-1]
        relay.work_changed(_event(_item(names[0], istio.State.REQUESTED, 2)))
        assert relay._work_due(names[0])  # handed out: sent again at once
        assert not relay._work_due(last)
        stream = next(iter(relay._streams[last]))
        assert not stream.woken
        relay.work_changed(_event(_item(names[0], istio.State.ISSUED, 3)))
        assert stream.woken
        assert relay._work_due(last)

    def test_work_withdrawn_while_waiting_leaves_the_line(self) -> None:
        """A cluster whose new work is deleted (its policy went) while it waits takes no
        turn: the next cluster in line gets the room the first one frees."""
        room = service.HANDED_OUT_PER_SLOT
        names = [f"c-{i}" for i in range(room + 2)]
        relay = self._relay(*names)
        assert [relay._work_due(name) for name in names] == [True] * room + [False] * 2
        assert relay.handouts.waiting == 2
        relay.work_changed(_event(_item(names[room], istio.State.PENDING, 2),
                                  base.EventType.DELETED))
        assert relay.handouts.waiting == 1
        relay.work_changed(_event(_item(names[0], istio.State.ISSUED, 3)))
        assert next(iter(relay._streams[names[-1]])).woken
        assert not next(iter(relay._streams[names[room]])).woken
