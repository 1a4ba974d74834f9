"""The highly available store: several server replicas on one PostgreSQL database.

Each write is one transaction: it takes a transaction-level advisory lock,
reads the current row, applies the write rules, takes the next revision from
the ``meshtrust_revision`` sequence and updates the row with
``WHERE resource_version = <the one read>``. The advisory lock is what keeps
the change log gap-free for watchers: with a bare sequence, a transaction that
drew revision 10 could commit after one that drew 11, and a watcher that had
read 11 would never see 10. Holding the lock from ``nextval`` to commit makes
commit order equal revision order. A write ends with ``pg_notify``; watchers
``LISTEN`` on a connection of their own and read the ``meshtrust_changes``
table when woken, polling as well in case a notification is lost.

Commits are durable as far as the server's ``synchronous_commit`` makes them
(on, by default). This is the only module that imports ``psycopg``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import psycopg

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.store import backend, base, change, feed, manifest

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: objects, their change log, and the revision sequence.
    (
        "CREATE TABLE meshtrust_meta (key text PRIMARY KEY, value bigint NOT NULL)",
        "CREATE SEQUENCE meshtrust_revision",
        ("CREATE TABLE meshtrust_objects (kind text NOT NULL, namespace text NOT NULL,"
         " name text NOT NULL, resource_version bigint NOT NULL, body text NOT NULL,"
         " PRIMARY KEY (kind, namespace, name))"),
        ("CREATE TABLE meshtrust_changes (revision bigint PRIMARY KEY, type text NOT NULL,"
         " kind text NOT NULL, namespace text NOT NULL, body text NOT NULL)"),
        "INSERT INTO meshtrust_meta (key, value) VALUES ('compacted', 0)",
    ),
    # 2: labels as a jsonb column with a GIN index, so selectors run in SQL
    # (backfilled from the stored manifests), and a per-kind index for watches.
    (
        "ALTER TABLE meshtrust_objects ADD COLUMN labels jsonb NOT NULL DEFAULT '{}'",
        ("UPDATE meshtrust_objects"
         " SET labels = coalesce(body::jsonb -> 'metadata' -> 'labels', '{}')"),
        "CREATE INDEX meshtrust_objects_labels ON meshtrust_objects USING gin (labels)",
        "CREATE INDEX meshtrust_changes_by_kind ON meshtrust_changes (kind, revision)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
DEFAULT_HISTORY = 10_000
CHANNEL = "meshtrust_changes"
_LOCK = 0x6D657368  # "mesh": the advisory lock every writer takes
_POOL = 4
_Connection = psycopg.AsyncConnection[tuple[Any, ...]]


async def connect(conninfo: str, name: str) -> _Connection:
    """A connection in autocommit mode, or ``errors.StoreUnavailable`` naming the store."""
    try:
        return await psycopg.AsyncConnection.connect(conninfo, autocommit=True,
                                                     connect_timeout=5)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise errors.StoreUnavailable(f"postgres store {name}: cannot connect ({reason})") from exc


def _dropped(conn: _Connection) -> bool:
    """Whether the server has closed an idle connection, as a restart does.

    An idle connection has nothing to read unless the server ended it (its last
    message, or the end of the stream is waiting), so this costs no round trip.
    """
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


async def migrate(conn: _Connection, name: str,
                  migrations: Sequence[tuple[str, ...]] = MIGRATIONS) -> int:
    """Bring the schema up to ``len(migrations)``; return the version found.

    Replicas that open at once take turns on an advisory lock. Raise
    ``errors.SchemaError`` for a database written by a newer meshtrust.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        row = await (await conn.execute("SELECT to_regclass('meshtrust_meta')")).fetchone()
        version = 0
        if row and row[0] is not None:
            found = await (await conn.execute(
                "SELECT value FROM meshtrust_meta WHERE key = 'schema_version'")).fetchone()
            version = int(found[0]) if found else 0
        if version > len(migrations):
            raise errors.SchemaError(
                f"postgres store {name} was written by a newer meshtrust (schema {version} > "
                f"{len(migrations)}); upgrade meshtrust")
        for statements in migrations[version:]:
            for statement in statements:
                await conn.execute(statement)
        await conn.execute(
            "INSERT INTO meshtrust_meta (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (len(migrations),))
    return version


class PostgresStore(backend.Backend):
    """A ``Store`` in a PostgreSQL database; open it with ``await PostgresStore.open(...)``."""

    def __init__(self, *, conninfo: str, name: str, pool: list[_Connection],
                 clock: clock_module.Clock, history: int, interval: float) -> None:
        self._conninfo = conninfo
        self._name = name
        self._idle: asyncio.Queue[_Connection | None] = asyncio.Queue()
        for conn in pool:
            self._idle.put_nowait(conn)
        self._clock = clock
        self._history = history
        self._writes = 0
        self._feed = feed.Feed(read=self._read_changes, head=self.revision, interval=interval)
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, conninfo: str, *, name: str | None = None,
                   clock: clock_module.Clock | None = None, history: int | None = None,
                   interval: float = 0.5) -> PostgresStore:
        """Connect, migrate the schema if needed, and start listening for changes."""
        label = name or "postgresql store"
        first = await connect(conninfo, label)
        try:
            await migrate(first, label)
        except psycopg.Error as exc:
            await first.close()
            raise errors.StoreUnavailable(f"postgres store {label}: {exc}") from exc
        except BaseException:
            await first.close()
            raise
        store = cls(conninfo=conninfo, name=label, pool=[first],
                    clock=clock or clock_module.SystemClock(),
                    history=history or DEFAULT_HISTORY, interval=interval)
        for _ in range(_POOL - 1):
            store._idle.put_nowait(None)  # connected on first use
        store._listener = asyncio.create_task(store._listen())
        return store

    async def revision(self) -> int:
        rows = await self._query(
            "SELECT greatest((SELECT max(revision) FROM meshtrust_changes),"
            " (SELECT value FROM meshtrust_meta WHERE key = 'compacted'))", ())
        return int(rows[0][0])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._feed.close()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                await conn.close()

    def _check_open(self) -> None:
        if self._closed:
            raise errors.StoreUnavailable(f"postgres store {self._name} is closed")

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        self._check_open()
        conn = await self._idle.get()
        try:
            if conn is not None and not conn.closed and _dropped(conn):
                with contextlib.suppress(Exception):
                    await conn.close()
            if conn is None or conn.closed:
                conn = await connect(self._conninfo, self._name)
            yield conn
        except errors.MeshTrustError:
            raise  # ours, raised after the transaction rolled back: the connection is fine
        except BaseException as exc:
            # A driver error or a cancellation may leave the connection mid-query: drop it.
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
                conn = None
            if isinstance(exc, psycopg.Error):
                raise errors.StoreUnavailable(f"postgres store {self._name}: {exc}") from exc
            raise
        finally:
            self._idle.put_nowait(conn)

    async def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall()

    async def _get(self, key: change.Key) -> base.Object:
        rows = await self._query("SELECT body FROM meshtrust_objects"
                                 " WHERE kind = %s AND namespace = %s AND name = %s", key)
        if not rows:
            raise errors.NotFound(f"{change.describe(key)} not found")
        return manifest.load_json(rows[0][0], source=f"{self._name} {change.describe(key)}")

    async def _list(self, kind: str, namespace: str | None,
                    labels: Mapping[str, str] | None) -> list[base.Object]:
        sql = "SELECT body FROM meshtrust_objects WHERE kind = %s"
        params: list[Any] = [kind]
        if namespace is not None:
            sql += " AND namespace = %s"
            params.append(base.check_namespace(namespace))
        if labels:
            sql += " AND labels @> %s::jsonb"
            params.append(json.dumps(dict(labels)))
        rows = await self._query(sql + " ORDER BY namespace, name", params)
        return await backend.load_all((row[0] for row in rows), source=self._name)

    async def _read_changes(self, after: int, kind: str, namespace: str | None,
                            limit: int) -> tuple[list[base.WatchEvent], int]:
        async with self._connection() as conn, conn.transaction():
            row = await (await conn.execute(
                "SELECT (SELECT value FROM meshtrust_meta WHERE key = 'compacted'),"
                " (SELECT coalesce(max(revision), 0) FROM meshtrust_changes)")).fetchone()
            assert row is not None
            compacted, head = int(row[0]), max(int(row[0]), int(row[1]))
            if after < compacted:
                raise feed.too_old(after, compacted + 1)
            sql = ("SELECT revision, type, body FROM meshtrust_changes"
                   " WHERE kind = %s AND revision > %s AND revision <= %s")
            params: list[Any] = [kind, after, head]
            if namespace is not None:
                sql += " AND namespace = %s"
                params.append(namespace)
            cursor = await conn.execute(sql + " ORDER BY revision LIMIT %s",
                                        params + [limit])
            rows = await cursor.fetchall()
        events = await backend.load_events(rows, source=self._name)
        examined = events[-1].resource_version if len(rows) == limit else head
        return events, examined

    async def _submit(self, write: change.Write) -> base.WatchEvent:
        kind, namespace, name = write.key
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            row = await (await conn.execute(
                "SELECT body FROM meshtrust_objects"
                " WHERE kind = %s AND namespace = %s AND name = %s", write.key)).fetchone()
            current = (manifest.load_json(row[0], source=f"{self._name} "
                                          f"{change.describe(write.key)}") if row else None)
            change.check(write, current)
            next_row = await (await conn.execute("SELECT nextval('meshtrust_revision')")).fetchone()
            assert next_row is not None
            event = change.apply(write, current, int(next_row[0]), self._clock.now())
            obj, body = event.object, manifest.dump_json(event.object)
            if event.type is base.EventType.ADDED:
                await conn.execute(
                    "INSERT INTO meshtrust_objects"
                    " (kind, namespace, name, resource_version, labels, body)"
                    " VALUES (%s, %s, %s, %s, %s::jsonb, %s)",
                    (kind, namespace, name, obj.resource_version, json.dumps(dict(obj.labels)),
                     body))
            else:
                assert current is not None
                await self._swap(conn, write.key, current.resource_version, event, body)
            await conn.execute(
                "INSERT INTO meshtrust_changes (revision, type, kind, namespace, body)"
                " VALUES (%s, %s, %s, %s, %s)",
                (event.resource_version, event.type.value, kind, namespace, body))
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(event.resource_version)))
            self._writes += 1
            if self._writes % max(1, min(256, self._history // 8)) == 0:
                await self._compact(conn, event.resource_version)
        self._feed.notify()
        return event

    @staticmethod
    async def _swap(conn: _Connection, key: change.Key, old: int, event: base.WatchEvent,
                    body: str) -> None:
        """The compare-and-swap itself: touch the row only if it is still at ``old``."""
        if event.type is base.EventType.DELETED:
            cursor = await conn.execute(
                "DELETE FROM meshtrust_objects WHERE kind = %s AND namespace = %s AND name = %s"
                " AND resource_version = %s", (*key, old))
        else:
            cursor = await conn.execute(
                "UPDATE meshtrust_objects SET resource_version = %s, labels = %s::jsonb,"
                " body = %s WHERE kind = %s AND namespace = %s AND name = %s"
                " AND resource_version = %s",
                (event.resource_version, json.dumps(dict(event.object.labels)), body, *key, old))
        if cursor.rowcount != 1:
            raise errors.Conflict(f"{change.describe(key)} changed during the write; "
                                  "read it again and retry")

    async def _compact(self, conn: _Connection, head: int) -> None:
        floor = head - self._history
        if floor > 0:
            await conn.execute("DELETE FROM meshtrust_changes WHERE revision <= %s", (floor,))
            await conn.execute("UPDATE meshtrust_meta SET value = greatest(value, %s)"
                               " WHERE key = 'compacted'", (floor,))

    async def _listen(self) -> None:
        """Wake the watchers on every NOTIFY; reconnect after a pause if the link drops."""
        while not self._closed:
            try:
                conn = await connect(self._conninfo, self._name)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._feed.notify()  # catch up on what was written while not listening
                    async for _ in conn.notifies():
                        self._feed.notify()
            except (errors.StoreUnavailable, psycopg.Error):
                await asyncio.sleep(1.0)  # watchers keep polling meanwhile
