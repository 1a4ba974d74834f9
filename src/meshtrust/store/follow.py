"""Following one kind of object for as long as a process runs.

``follow`` is the loop every long-running watcher needs: start at the current
revision, hand each event on, and when the store's history no longer reaches
back (``errors.Conflict``) or the watch fails, resynchronise and go on. The
``resync`` callback runs first and after every gap, so a follower that
re-reads its state there never misses a change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

from meshtrust import errors
from meshtrust.store import base

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


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
