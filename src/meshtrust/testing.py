"""Public fakes for tests of code that uses meshtrust: a clock and a store.

``FakeClock`` moves only when told, so expiry and rotation can be tested in
microseconds. ``MemoryStore`` is a complete ``store.base.Store`` in a dict:
it follows the same write rules (``store.change``) and the same watch loop
(``store.feed``) as the real backends and passes the same contract suite.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Mapping

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.store import base, change, feed

_EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


class FakeClock:
    """A clock that stands still until a test moves it."""

    def __init__(self, start: dt.datetime = _EPOCH) -> None:
        self._now = clock_module.require_utc(start, "start")

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, delta: float | dt.timedelta) -> dt.datetime:
        """Move forward by ``delta`` (seconds or a timedelta); return the new time."""
        step = delta if isinstance(delta, dt.timedelta) else dt.timedelta(seconds=delta)
        if step < dt.timedelta(0):
            raise ValueError("a clock does not go backwards; use set() to jump")
        self._now += step
        return self._now

    def set(self, when: dt.datetime) -> None:
        """Jump to ``when`` (timezone-aware)."""
        self._now = clock_module.require_utc(when, "when")


class MemoryStore:
    """A ``Store`` held in memory, for tests; one event loop, no persistence.

    ``history`` is how many revisions of change log to keep (all if None).
    """

    def __init__(self, *, clock: clock_module.Clock | None = None,
                 history: int | None = None, interval: float = 0.05) -> None:
        if history is not None and history < 1:
            raise ValueError("history must be at least 1 revision")
        self._clock = clock or clock_module.SystemClock()
        self._objects: dict[change.Key, base.Object] = {}
        self._log: collections.deque[base.WatchEvent] = collections.deque(maxlen=history)
        self._revision = 0
        self._compacted = 0
        self._closed = False
        self._feed = feed.Feed(read=self._read, head=self.revision, interval=interval)

    async def get_secret(self, namespace: str, name: str) -> base.Secret:
        obj = self._get((base.SECRET_KIND, namespace, name))
        assert isinstance(obj, base.Secret)
        return obj

    async def get_resource(self, kind: str, namespace: str, name: str) -> base.Resource:
        base.check_kind(kind)
        obj = self._get((kind, namespace, name))
        assert isinstance(obj, base.Resource)
        return obj

    async def list_secrets(self, *, namespace: str | None = None,
                           labels: Mapping[str, str] | None = None) -> list[base.Secret]:
        return [obj for obj in self._list(base.SECRET_KIND, namespace, labels)
                if isinstance(obj, base.Secret)]

    async def list_resources(self, kind: str, *, namespace: str | None = None,
                             labels: Mapping[str, str] | None = None) -> list[base.Resource]:
        base.check_kind(kind)
        return [obj for obj in self._list(kind, namespace, labels)
                if isinstance(obj, base.Resource)]

    async def create(self, obj: base.ObjectT) -> base.ObjectT:
        return self._stored(obj, change.Write.create(obj))

    async def update(self, obj: base.ObjectT, *, with_status: bool = False) -> base.ObjectT:
        return self._stored(obj, change.Write.update(obj, with_status=with_status))

    async def update_status(self, resource: base.Resource) -> base.Resource:
        return self._stored(resource, change.Write.update_status(resource))

    async def delete(self, kind: str, namespace: str, name: str, *,
                     resource_version: int | None = None) -> None:
        self._write(change.Write.delete(kind, namespace, name, resource_version))

    async def revision(self) -> int:
        return self._revision

    def watch(self, kind: str, *, namespace: str | None = None,
              since: int | None = None) -> AsyncIterator[base.WatchEvent]:
        self._check_open()
        return self._feed.watch(kind, namespace, since)

    async def close(self) -> None:
        self._closed = True
        self._feed.close()

    def _check_open(self) -> None:
        if self._closed:
            raise errors.StoreUnavailable("the memory store is closed")

    def _get(self, key: change.Key) -> base.Object:
        self._check_open()
        base.check_namespace(key[1])
        base.check_name(key[2])
        obj = self._objects.get(key)
        if obj is None:
            raise errors.NotFound(f"{change.describe(key)} not found")
        return dataclasses.replace(obj)  # a fresh copy of spec and status

    def _list(self, kind: str, namespace: str | None,
              labels: Mapping[str, str] | None) -> list[base.Object]:
        self._check_open()
        return [dataclasses.replace(obj) for key, obj in sorted(self._objects.items())
                if key[0] == kind and base.matches(obj, namespace, labels)]

    def _stored(self, obj: base.ObjectT, write: change.Write) -> base.ObjectT:
        """Apply ``write`` and return a copy of what it stored, so callers cannot alter it."""
        return dataclasses.replace(change.stored(obj, self._write(write)))

    def _write(self, write: change.Write) -> base.WatchEvent:
        self._check_open()
        event = change.apply(write, self._objects.get(write.key), self._revision + 1,
                             self._clock.now())
        self._revision = event.resource_version
        if event.type is base.EventType.DELETED:
            del self._objects[write.key]
        else:
            self._objects[write.key] = event.object
        if len(self._log) == self._log.maxlen:
            self._compacted = self._log[0].resource_version
        self._log.append(event)
        self._feed.notify()
        return event

    async def _read(self, after: int, kind: str, namespace: str | None,
                    limit: int) -> tuple[list[base.WatchEvent], int]:
        self._check_open()
        if after < self._compacted:
            raise feed.too_old(after, self._compacted + 1)
        start = bisect.bisect_right(self._log, after, key=lambda event: event.resource_version)
        events = [self._log[index] for index in range(start, min(len(self._log), start + limit))]
        examined = events[-1].resource_version if len(events) == limit else self._revision
        selected = [event for event in events
                    if event.object.kind == kind and base.matches(event.object, namespace, None)]
        return selected, examined
