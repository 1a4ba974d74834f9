"""One watch loop over any change log, so backends only say how to read theirs.

Every backend keeps a change log ordered by revision. A ``Feed`` turns
"read the entries after revision N" into the ``watch`` iterator: it reads,
yields, and when there is nothing new it sleeps until the backend calls
``notify`` (a write in this process, a PostgreSQL NOTIFY) or the poll
interval passes (a write by another process sharing the file).

Watches of one kind in every namespace share what is read: a server follows
the clusters and the intermediates three times each (to close streams, to
reconcile, for the dashboard), and each write would otherwise be read and
parsed once per watch, and the log read once more by each to find nothing
new. The latest entries of each kind are kept (``_Tail``): a watch whose next
entries are among them takes them from there, and a watch at their end reads
nothing when no write was notified since they were read. A watch that waited
a whole poll interval reads the log itself, for the writes of other processes.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import operator
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from meshtrust import errors
from meshtrust.store import base

Reader = Callable[[int, str, "str | None", int], Awaitable[tuple[list[base.WatchEvent], int]]]
"""``read(after, kind, namespace, limit)`` → (matching events, last revision examined).

It raises ``errors.Conflict`` through ``too_old`` when ``after`` was compacted away.
The last revision examined lets a watch of a rare kind skip past other kinds.
"""

BATCH = 256
KEPT = 4 * BATCH  # the most entries of one kind kept for the watches that share them
_REVISION = operator.attrgetter("resource_version")


def too_old(after: int, oldest: int) -> errors.Conflict:
    """The error for a watch that starts before the history the store still keeps."""
    return errors.Conflict(
        f"cannot watch from resource version {after}: the store keeps history from "
        f"{oldest} on; list again and watch from the current revision")


@dataclasses.dataclass
class _Tail:
    """The latest entries of one kind, every namespace: all those after ``start`` up to
    ``end`` (the last revision examined), in order.

    ``read_while`` is the wake-up that was pending when the entries up to ``end``
    began to be read: a write notified since then was notified on it (and it is no
    longer pending), so a watch waiting on it misses nothing by not reading again.
    """

    start: int = 0
    end: int = -1  # nothing kept yet
    events: list[base.WatchEvent] = dataclasses.field(default_factory=list)
    read_while: asyncio.Event | None = None
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    def covers(self, after: int) -> bool:
        return self.start <= after < self.end

    def current(self, after: int, wakeup: asyncio.Event) -> bool:
        """Whether a watch at ``after`` waiting on ``wakeup`` can do without reading: it
        is at the end, and a write notified since that was read wakes it."""
        return after == self.end and self.read_while is wakeup

    def keep(self, after: int, events: list[base.WatchEvent], examined: int,
             read_while: asyncio.Event | None) -> None:
        """Take in what a read after ``after`` returned: appended if it goes on from the
        end, in place of what is kept if it reaches further, else left out."""
        if after == self.end:
            self.events.extend(events)
        elif examined > self.end:
            self.start, self.events = after, list(events)
        else:
            return
        self.end, self.read_while = examined, read_while
        if len(self.events) > KEPT:
            dropped = len(self.events) - KEPT
            self.start = self.events[dropped - 1].resource_version
            del self.events[:dropped]

    def after(self, after: int, limit: int) -> tuple[list[base.WatchEvent], int]:
        """The kept entries after ``after`` (at most ``limit``) and the last revision
        they account for, as ``Reader`` returns them."""
        first = bisect.bisect_right(self.events, after, key=_REVISION)
        events = self.events[first:first + limit]
        if first + limit < len(self.events):
            return events, events[-1].resource_version
        return events, self.end


class Feed:
    """Wakes watchers when a backend's change log grows."""

    def __init__(self, *, read: Reader, head: Callable[[], Awaitable[int]],
                 interval: float) -> None:
        if interval <= 0:
            raise ValueError("the poll interval must be positive")
        self._read = read
        self._head = head
        self._interval = interval
        self._wakeups: dict[str, asyncio.Event] = {}  # by the kind its watchers follow
        self._tails: dict[str, _Tail] = {}  # by kind, for the watches of every namespace
        self._closed = False

    def notify(self, kinds: Iterable[str] | None = None) -> None:
        """Wake the watchers of ``kinds`` (every watcher if None) now, from their event loop.

        A backend that knows what it wrote wakes only the watchers of those kinds;
        with many watches, waking all of them on every write costs more reads
        than the writes themselves.
        """
        if kinds is None:
            woken, self._wakeups = list(self._wakeups.values()), {}
        else:
            woken = [event for kind in set(kinds)
                     if (event := self._wakeups.pop(kind, None)) is not None]
        for event in woken:
            event.set()

    def close(self) -> None:
        """End every watch at its next wake-up."""
        self._closed = True
        self.notify()

    async def watch(self, kind: str, namespace: str | None,
                    since: int | None) -> AsyncIterator[base.WatchEvent]:
        base.check_kind(kind)
        if namespace is not None:
            base.check_namespace(namespace)
        if since is not None and since < 0:
            raise ValueError("since must be a revision (0 or more)")
        position = await self._head() if since is None else since
        poll = False  # read the log even if no write was notified: the interval passed
        while not self._closed:
            wakeup = self._wakeups.get(kind) or self._wakeups.setdefault(kind, asyncio.Event())
            events, examined = await self._next(position, kind, namespace, wakeup, poll)
            poll = False
            for event in events:
                yield event
            if examined > position:
                position = examined
                continue
            try:
                # Not wait_for: on Python 3.11 it loses a cancellation that arrives as the
                # event is set, and the watch (and whoever awaits its end) never stops.
                async with asyncio.timeout(self._interval):
                    await wakeup.wait()
            except TimeoutError:
                poll = True

    async def _next(self, after: int, kind: str, namespace: str | None,
                    wakeup: asyncio.Event, poll: bool) -> tuple[list[base.WatchEvent], int]:
        """The entries after ``after``: from the kept ones of ``kind`` when they reach, none
        if nothing was notified since they were read (unless ``poll``), else read."""
        if namespace is not None:
            return await self._read(after, kind, namespace, BATCH)
        tail = self._tails.get(kind) or self._tails.setdefault(kind, _Tail())
        # One read at a time per kind: the watches woken by one write wait for the first
        # to read it, then take it from the tail.
        async with tail.lock:
            if tail.covers(after):
                return tail.after(after, BATCH)
            if not poll and tail.current(after, wakeup):
                return [], after
            # The wake-up pending as the read begins: a write notified from now on sets it.
            pending = self._wakeups.get(kind)
            events, examined = await self._read(after, kind, None, BATCH)
            tail.keep(after, events, examined, pending)
            if tail.covers(after):
                return tail.after(after, BATCH)
            return events, examined  # behind what is kept, or nothing new
