"""One watch loop over any change log, so backends only say how to read theirs.

Every backend keeps a change log ordered by revision. A ``Feed`` turns
"read the entries after revision N" into the ``watch`` iterator: it reads,
yields, and when there is nothing new it sleeps until the backend calls
``notify`` (a write in this process, a PostgreSQL NOTIFY) or the poll
interval passes (a write by another process sharing the file).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from meshtrust import errors
from meshtrust.store import base

Reader = Callable[[int, str, "str | None", int], Awaitable[tuple[list[base.WatchEvent], int]]]
"""``read(after, kind, namespace, limit)`` → (matching events, last revision examined).

It raises ``errors.Conflict`` through ``too_old`` when ``after`` was compacted away.
The last revision examined lets a watch of a rare kind skip past other kinds.
"""

BATCH = 256


def too_old(after: int, oldest: int) -> errors.Conflict:
    """The error for a watch that starts before the history the store still keeps."""
    return errors.Conflict(
        f"cannot watch from resource version {after}: the store keeps history from "
        f"{oldest} on; list again and watch from the current revision")


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
        while not self._closed:
            wakeup = self._wakeups.get(kind) or self._wakeups.setdefault(kind, asyncio.Event())
            events, examined = await self._read(position, kind, namespace, BATCH)
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
                pass
