"""Following one kind of object for as long as a process runs.

``follow`` is the loop every long-running watcher needs: start at the current
revision, hand each event on, and when the store's history no longer reaches
back (``errors.Conflict``) or the watch fails, resynchronise and go on. The
``resync`` callback runs first and after every gap, so a follower that
re-reads its state there never misses a change. ``Index`` is the state such a
follower keeps: a summary of each record, filled on resync and noted on each event.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, NoReturn, TypeVar

from meshtrust import errors
from meshtrust.store import base

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0

T = TypeVar("T")
H = TypeVar("H", bound=Hashable)


async def follow(store: base.Store, kind: str,
                 on_event: Callable[[base.WatchEvent], Awaitable[None]], *,
                 namespace: str | None = None,
                 resync: Callable[[], Awaitable[None]] | None = None) -> NoReturn:
    """Call ``on_event`` for every write to ``kind``, forever; cancel the task to stop.

    While the store is unavailable (a database restarting) it retries every
    ``RETRY_SECONDS`` and then resumes after the last event it handed on.
    """
    since: int | None = None  # None: resynchronise, then watch from the revision read first
    while True:
        try:
            if since is None:
                head = await store.revision()
                if resync is not None:
                    await resync()
                since = head
            async for event in store.watch(kind, namespace=namespace, since=since):
                since = event.resource_version
                await on_event(event)
        except errors.Conflict:
            since = None  # the history no longer reaches back that far
        except errors.StoreUnavailable as exc:
            log.warning("following %s: %s; retrying in %.0f s", kind, exc, RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)
        except Exception:  # noqa: BLE001 - a watcher must outlive any one failure
            log.exception("following %s failed; retrying in %.0f s", kind, RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)
            since = None


class Index(abc.ABC, Generic[T]):
    """A summary of each record of one kind (``summarize``), kept in memory from a full
    list (``fill``, on resync) and the watch after it (``note``, on each event).

    A change no newer than what is known of a name is left out: the watch goes on from
    before the list, and must not take a record back to an older state. With a
    ``namespace``, records of other namespaces are left out. Until filled, ``names`` is
    None: ask the store.
    """

    def __init__(self, namespace: str | None = None) -> None:
        self._ns = namespace
        self._known: dict[str, tuple[int, T]] | None = None  # name -> (version, summary)
        self._shared: dict[Hashable, Hashable] = {}

    @abc.abstractmethod
    def summarize(self, resource: base.Resource) -> T:
        """What is kept of ``resource``."""

    def share(self, value: H) -> H:
        """One copy of each equal ``value``, as most records' are alike (until ``fill``)."""
        return self._shared.setdefault(value, value)  # type: ignore[return-value]

    @property
    def names(self) -> frozenset[str] | None:
        return None if self._known is None else frozenset(self._known)

    def get(self, name: str) -> T | None:
        """The summary of ``name``; None if it is not known (or not filled)."""
        known = self._known
        found = None if known is None else known.get(name)
        return None if found is None else found[1]

    def fill(self, resources: Iterable[base.Resource]) -> None:
        self._shared = {}
        self._known = {r.name: (r.resource_version, self.summarize(r)) for r in resources
                       if self._ns is None or r.namespace == self._ns}

    def note(self, event: base.WatchEvent) -> bool:
        """Follow one change; return whether a name came or went."""
        known, item = self._known, event.object
        if (known is None or not isinstance(item, base.Resource)
                or (self._ns is not None and item.namespace != self._ns)
                or event.resource_version <= known.get(item.name, (-1, None))[0]):
            return False
        if event.type is base.EventType.DELETED:
            return known.pop(item.name, None) is not None
        added = item.name not in known
        known[item.name] = (event.resource_version, self.summarize(item))
        return added
