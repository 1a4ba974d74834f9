"""State stores: Kubernetes-shaped secrets and resources, chosen by URL.

``await open_store(url)`` is the one way in. It is a coroutine because opening
may migrate a schema or connect to a server:

    sqlite:///var/lib/meshtrust/cluster.db   the embedded default (sqlite:relative.db too)
    dir:///etc/meshtrust                     secrets as files <ns>/<name>/<key>
    postgresql://user:password@host:5432/db  several replicas on one database

Any of them takes ``?history=N``, the number of revisions of change log kept
for watches to resume from. A bad URL raises ``errors.ConfigError``; a store
that cannot be reached raises ``errors.StoreUnavailable``; one written by a
newer meshtrust raises ``errors.SchemaError``. Each names the URL with its
password masked. ``meshtrust.testing.MemoryStore`` is the in-memory fake.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from meshtrust import clock as clock_module
from meshtrust.store import base, url


@contextlib.asynccontextmanager
async def opened_store(location: str) -> AsyncIterator[base.Store]:
    """``open_store`` for an ``async with`` block: the store is closed when it ends."""
    store = await open_store(location)
    try:
        yield store
    finally:
        await store.close()


async def open_store(location: str, *, clock: clock_module.Clock | None = None,
                     interval: float = 0.05) -> base.Store:
    """Open the store at ``location`` (a URL, above); close it with ``await store.close()``.

    ``clock`` stamps creation and update times; ``interval`` is how often a
    watch polls for writes made by other processes.
    """
    where = url.parse(location)
    if where.scheme == "sqlite":
        from meshtrust.store import sqlite

        return await sqlite.SqliteStore.open(where.target, name=where.masked, clock=clock,
                                             history=where.history, interval=interval)
    if where.scheme == "dir":
        from meshtrust.store import files

        return await files.DirectoryStore.open(where.target, name=where.masked, clock=clock,
                                               history=where.history, interval=interval)
    from meshtrust.store import postgres

    return await postgres.PostgresStore.open(where.target, name=where.masked, clock=clock,
                                             history=where.history, interval=interval)
