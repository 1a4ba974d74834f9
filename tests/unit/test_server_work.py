"""The index of clusters with Istio work, followed from the store's changes, and waking the
work streams of many clusters."""

from __future__ import annotations

import asyncio
from typing import Any

from meshtrust import clock, metrics
from meshtrust.authority import istio
from meshtrust.server import service, work
from meshtrust.store import base


def _item(cluster: str, state: istio.State, version: int = 1) -> base.Resource:
    return base.Resource(api_version=istio.ISSUED_API, kind=istio.ISSUED_KIND,
                         namespace="gloo-mesh", name=f"mesh-{cluster}",
                         labels={"cluster": cluster}, status={"state": state.value},
                         resource_version=version)


def _event(item: base.Resource, kind: base.EventType = base.EventType.MODIFIED
           ) -> base.WatchEvent:
    return base.WatchEvent(type=kind, object=item, resource_version=item.resource_version)


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
                return sum(s.wake.is_set() for group in groups.values() for s in group)

            task = asyncio.create_task(relay.kick_many())
            await asyncio.sleep(0)
            assert woken() == service.WAKE_SLICE
            await task
            assert woken() == count
            for group in groups.values():
                for stream in group:
                    stream.wake.clear()
            await relay.kick_many(["c-1", "c-7", "not-connected"])
            assert {name for name, group in groups.items()
                    if any(s.wake.is_set() for s in group)} == {"c-1", "c-7"}

        asyncio.run(scenario())


class _Schedule:
    """An issuance schedule that books every turn ``delay`` seconds away, and counts them."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.booked = 0

    def schedule(self) -> float:
        self.booked += 1
        return self.delay


class TestTurns:
    def _relay(self, schedule: _Schedule, *pending: str) -> service.RelayService:
        authority: Any = None  # booking turns asks nothing of the authority
        relay = service.RelayService(authority, clock.SystemClock(), metrics.Metrics(),
                                     admission_control=schedule)  # type: ignore[arg-type]
        relay.work.fill([_item(name, istio.State.PENDING) for name in pending])
        return relay

    def test_a_cluster_books_one_turn_whichever_of_its_streams_looks(self) -> None:
        """An agent that renews its certificate opens a second stream before it closes the
        first: the new stream waits for the turn the first one booked, and books no other
        (one booked per stream put every renewing cluster at the end of the schedule, and
        left its first turn booked for nothing)."""
        schedule = _Schedule(60.0)
        relay = self._relay(schedule, "c-1", "c-2")
        assert not relay._work_due("c-1")
        assert not relay._work_due("c-1")  # the second stream of c-1
        assert schedule.booked == 1
        assert not relay._work_due("c-2")
        assert schedule.booked == 2

    def test_a_turn_that_came_is_used_once_and_work_handed_out_books_none(self) -> None:
        """Once its turn has come the cluster is handed its work; work already handed out
        (not PENDING) goes again at once, without a turn."""
        schedule = _Schedule(0.0)
        relay = self._relay(schedule, "c-1")
        assert relay._work_due("c-1")
        assert schedule.booked == 1
        schedule.delay = 60.0
        assert not relay._work_due("c-1")  # still PENDING: a new turn, far away
        assert schedule.booked == 2
        relay.work.note(_event(_item("c-1", istio.State.REQUESTED, 2)))
        assert relay._work_due("c-1")
        assert relay._work_due("c-2")
        assert schedule.booked == 2
