"""Watches of one kind share what the feed reads, and still see every write in order."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from meshtrust.store import base, feed

T = TypeVar("T")


class Log:
    """A change log in memory that counts how often each kind is read."""

    def __init__(self) -> None:
        self.events: list[base.WatchEvent] = []
        self.reads: list[tuple[int, str, str | None]] = []

    def append(self, kind: str, name: str, namespace: str = "gloo-mesh") -> None:
        revision = len(self.events) + 1
        self.events.append(base.WatchEvent(
            type=base.EventType.ADDED, resource_version=revision,
            object=base.Resource(api_version="meshtrust.io/v1", kind=kind,
                                 namespace=namespace, name=name, resource_version=revision)))

    def reads_of(self, kind: str) -> int:
        return sum(1 for _, read_kind, _ in self.reads if read_kind == kind)

    async def read(self, after: int, kind: str, namespace: str | None,
                   limit: int) -> tuple[list[base.WatchEvent], int]:
        self.reads.append((after, kind, namespace))
        head = len(self.events)
        await asyncio.sleep(0)  # a read takes turns of the loop, as a store's does
        found = [e for e in self.events[after:head] if e.object.kind == kind and
                 (namespace is None or e.object.namespace == namespace)][:limit]
        return found, found[-1].resource_version if len(found) == limit else head

    async def head(self) -> int:
        return len(self.events)


async def _collect(watch: feed.Feed, kind: str, count: int, since: int | None = 0,
                   namespace: str | None = None) -> list[str]:
    names: list[str] = []
    async for event in watch.watch(kind, namespace, since):
        names.append(event.object.name)
        if len(names) == count:
            break
    return names


def _run(scenario: Coroutine[Any, Any, T]) -> T:
    """Run ``scenario``, failing it if a watch waits for a write it should have seen."""
    async def bounded() -> T:
        async with asyncio.timeout(10):
            return await scenario
    return asyncio.run(bounded())


async def _until(condition: object, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.001)


class TestSharedReads:
    def test_three_watches_one_read(self) -> None:
        """Three watches of a kind from the same revision read the log once between them."""
        log = Log()
        for index in range(5):
            log.append("Cluster", f"c{index}")
            log.append("Other", f"o{index}")

        async def scenario() -> list[list[str]]:
            watch = feed.Feed(read=log.read, head=log.head, interval=60)
            return list(await asyncio.gather(*(_collect(watch, "Cluster", 5)
                                               for _ in range(3))))

        assert _run(scenario()) == [[f"c{i}" for i in range(5)]] * 3
        assert log.reads_of("Cluster") == 1

    def test_one_read_per_notified_write(self) -> None:
        """Live watches woken by a write read it once between them, and do not read the
        log again to find nothing new while no other write is notified."""
        log = Log()

        async def scenario() -> tuple[list[list[str]], list[int]]:
            watch = feed.Feed(read=log.read, head=log.head, interval=60)
            watchers = [asyncio.create_task(_collect(watch, "Cluster", 3)) for _ in range(3)]
            await _until(lambda: log.reads_of("Cluster") >= 1)
            await asyncio.sleep(0.01)
            reads = [log.reads_of("Cluster")]
            for index in range(3):
                log.append("Cluster", f"c{index}")
                watch.notify(["Cluster"])
                await asyncio.sleep(0.01)
                reads.append(log.reads_of("Cluster"))
            return list(await asyncio.gather(*watchers)), reads

        names, reads = _run(scenario())
        assert names == [["c0", "c1", "c2"]] * 3
        assert reads == [1, 2, 3, 4]

    def test_write_during_a_read_is_not_missed(self) -> None:
        """A write notified while a read is under way makes the next read, even for a
        watch that began waiting after it: the read does not vouch for it."""
        log = Log()

        async def scenario() -> list[list[str]]:
            opened, release = asyncio.Event(), asyncio.Event()
            plain = log.read

            async def gated(after: int, kind: str, namespace: str | None,
                            limit: int) -> tuple[list[base.WatchEvent], int]:
                found = await plain(after, kind, namespace, limit)
                if found[0] and not release.is_set():
                    opened.set()
                    await release.wait()  # "second" lands after this read's view
                return found

            watch = feed.Feed(read=gated, head=log.head, interval=60)
            first = [asyncio.create_task(_collect(watch, "Cluster", 2)) for _ in range(2)]
            await asyncio.sleep(0.01)  # both wait at the end of an empty log
            log.append("Cluster", "first")
            watch.notify(["Cluster"])
            await opened.wait()
            log.append("Cluster", "second")
            watch.notify(["Cluster"])
            late = asyncio.create_task(_collect(watch, "Cluster", 2))  # waits on a new wake-up
            await asyncio.sleep(0.01)
            release.set()
            return list(await asyncio.gather(*first, late))

        assert _run(scenario()) == [["first", "second"]] * 3

    def test_poll_sees_unnotified_writes(self) -> None:
        """A write no one notified (another process's) still reaches every watch, by the
        read each does after waiting a poll interval."""
        log = Log()

        async def scenario() -> list[list[str]]:
            watch = feed.Feed(read=log.read, head=log.head, interval=0.05)
            watchers = [asyncio.create_task(_collect(watch, "Cluster", 1)) for _ in range(2)]
            await _until(lambda: log.reads_of("Cluster") >= 1)
            await asyncio.sleep(0.01)
            log.append("Cluster", "elsewhere")
            return list(await asyncio.gather(*watchers))

        assert _run(scenario()) == [["elsewhere"]] * 2

    def test_watch_behind_the_kept_entries(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A watch from further back than the feed keeps reads its own way, in order."""
        monkeypatch.setattr(feed, "KEPT", 2)
        monkeypatch.setattr(feed, "BATCH", 2)
        log = Log()
        for index in range(7):
            log.append("Cluster", f"c{index}")

        async def scenario() -> tuple[list[str], list[str]]:
            watch = feed.Feed(read=log.read, head=log.head, interval=60)
            ahead = await _collect(watch, "Cluster", 2, since=5)
            behind = await _collect(watch, "Cluster", 7, since=0)
            return ahead, behind

        ahead, behind = _run(scenario())
        assert ahead == ["c5", "c6"]
        assert behind == [f"c{i}" for i in range(7)]

    def test_namespaced_watch_reads_its_own(self) -> None:
        """A watch of one namespace gets only that namespace's writes, read for it alone."""
        log = Log()
        log.append("Cluster", "a", namespace="one")
        log.append("Cluster", "b", namespace="two")
        log.append("Cluster", "c", namespace="one")

        async def scenario() -> tuple[list[str], list[str]]:
            watch = feed.Feed(read=log.read, head=log.head, interval=60)
            every = await _collect(watch, "Cluster", 3)
            one = await _collect(watch, "Cluster", 2, namespace="one")
            return every, one

        assert _run(scenario()) == (["a", "b", "c"], ["a", "c"])
        assert ("Cluster", "one") in {(kind, ns) for _, kind, ns in log.reads}
