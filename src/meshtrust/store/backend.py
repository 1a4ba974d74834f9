"""The public Store operations, written once on top of three primitives per backend.

A backend provides a change ``_feed`` for watches, ``_get`` (one object by
key, or ``errors.NotFound``),
``_list`` (objects of a kind, filtered) and ``_submit`` (apply one checked
write and return its event); ``Backend`` turns them into the ``Store``
protocol's typed reads and writes.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

from meshtrust.store import base, change, feed, manifest

# Stored records parsed between two turns of the event loop: parsing the ten thousand
# clusters of a fleet at once would hold every call for seconds.
LOAD_SLICE = 256


async def load_all(texts: Iterable[str | bytes], *, source: str) -> list[base.Object]:
    """Parse stored records (``manifest.load_json``), letting other tasks run between
    slices of ``LOAD_SLICE``."""
    loaded: list[base.Object] = []
    for text in texts:
        if loaded and not len(loaded) % LOAD_SLICE:
            await asyncio.sleep(0)
        loaded.append(manifest.load_json(text, source=source))
    return loaded


async def load_events(rows: Sequence[tuple[int, str, str | bytes]], *,
                      source: str) -> list[base.WatchEvent]:
    """The watch events of stored change rows ``(revision, type, body)``, parsed as
    ``load_all`` parses records."""
    loaded = await load_all((body for _, _, body in rows), source=source)
    return [base.WatchEvent(type=base.EventType(kind), resource_version=int(revision),
                            object=obj)
            for (revision, kind, _), obj in zip(rows, loaded, strict=True)]


class Backend(abc.ABC):
    _feed: feed.Feed

    @abc.abstractmethod
    def _check_open(self) -> None:
        """Raise ``errors.StoreUnavailable`` if the store was closed."""

    def watch(self, kind: str, *, namespace: str | None = None,
              since: int | None = None) -> AsyncIterator[base.WatchEvent]:
        self._check_open()
        return self._feed.watch(kind, namespace, since)

    @abc.abstractmethod
    async def _get(self, key: change.Key) -> base.Object:
        """The object at ``key``; raise ``errors.NotFound`` if there is none."""

    @abc.abstractmethod
    async def _list(self, kind: str, namespace: str | None,
                    labels: Mapping[str, str] | None) -> list[base.Object]:
        """Objects of ``kind`` in ``namespace`` (every one if None) with all ``labels``."""

    @abc.abstractmethod
    async def _submit(self, write: change.Write) -> base.WatchEvent:
        """Apply ``write`` with its compare-and-swap; return the event it made."""

    async def get_secret(self, namespace: str, name: str) -> base.Secret:
        obj = await self._get((base.SECRET_KIND, base.check_namespace(namespace),
                               base.check_name(name)))
        assert isinstance(obj, base.Secret)
        return obj

    async def get_resource(self, kind: str, namespace: str, name: str) -> base.Resource:
        obj = await self._get((base.check_kind(kind), base.check_namespace(namespace),
                               base.check_name(name)))
        assert isinstance(obj, base.Resource)
        return obj

    async def list_secrets(self, *, namespace: str | None = None,
                           labels: Mapping[str, str] | None = None) -> list[base.Secret]:
        return [obj for obj in await self._list(base.SECRET_KIND, namespace, labels)
                if isinstance(obj, base.Secret)]

    async def list_resources(self, kind: str, *, namespace: str | None = None,
                             labels: Mapping[str, str] | None = None) -> list[base.Resource]:
        return [obj for obj in await self._list(base.check_kind(kind), namespace, labels)
                if isinstance(obj, base.Resource)]

    async def create(self, obj: base.ObjectT) -> base.ObjectT:
        return change.stored(obj, await self._submit(change.Write.create(obj)))

    async def update(self, obj: base.ObjectT, *, with_status: bool = False) -> base.ObjectT:
        return change.stored(obj, await self._submit(change.Write.update(
            obj, with_status=with_status)))

    async def update_status(self, resource: base.Resource) -> base.Resource:
        return change.stored(resource, await self._submit(change.Write.update_status(resource)))

    async def delete(self, kind: str, namespace: str, name: str, *,
                     resource_version: int | None = None) -> None:
        await self._submit(change.Write.delete(kind, namespace, name, resource_version))
