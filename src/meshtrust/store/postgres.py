"""The highly available store: several server replicas on one PostgreSQL database.

A write is at most two round trips. The first reads the current row, without a
lock, and the write rules (``store.change``) make the new record of it here; a
write at the version this replica last read or wrote the row at (a status
edited right after it was read) starts from that record instead, kept for the
last few thousand rows, and skips the read. The second calls
``meshtrust_write``, a function in the database, which does the rest in one
transaction: it takes a transaction-level advisory lock, checks that
the row is still at the version read (or still absent, for a create), takes the
next revision from the ``meshtrust_revision`` sequence, writes the row and its
change, and notifies. If the row moved in between, the function writes nothing
and the write ends ``Conflict`` (``AlreadyExists`` for a create), as if it had
read the newer row; only a delete without a version reads again and retries.

The advisory lock is what keeps the change log gap-free for watchers: with a
bare sequence, a transaction that drew revision 10 could commit after one that
drew 11, and a watcher that had read 11 would never see 10. Holding the lock
from ``nextval`` to commit makes commit order equal revision order. It is held
inside the database only: a writer whose event loop is busy with other work
keeps no other replica waiting (with the lock taken from Python, a busy
server's every write held it for several turns of its loop, and a fleet's
writes queued behind it). The record's ``resourceVersion`` is the one thing the
function fills in: the record is sent as the text before and after it.

A write's notification names its kind. Watchers ``LISTEN`` on a connection of
their own, and the watchers of that kind read the ``meshtrust_changes`` table
when woken (one statement, so one snapshot of the log and its compaction),
polling as well in case a notification is lost. Waking every watcher on every
write had each replica read the log once per kind it follows for each write in
the fleet, and those reads held the connections the calls' own reads and writes
waited for.

Commits are durable as far as the server's ``synchronous_commit`` makes them
(on, by default). This is the only module that imports ``psycopg``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import secrets
import select
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import psycopg

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.store import backend, base, change, feed, manifest

CHANNEL = "meshtrust_changes"
_LOCK = 0x6D657368  # "mesh": the advisory lock every writer takes
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
    # 3: a write's checks, revision, row, change and notification in one call (see above).
    (f"""
CREATE FUNCTION meshtrust_write(p_type text, p_kind text, p_namespace text, p_name text,
                                p_old bigint, p_labels jsonb, p_head text, p_tail text,
                                p_history bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    rev bigint;
    record text;
BEGIN
    PERFORM pg_advisory_xact_lock({_LOCK});
    PERFORM 1 FROM meshtrust_objects
        WHERE kind = p_kind AND namespace = p_namespace AND name = p_name
          AND (p_type = 'ADDED' OR resource_version = p_old);
    IF FOUND = (p_type = 'ADDED') THEN
        RETURN NULL;  -- created meanwhile, or no longer at p_old: nothing written
    END IF;
    rev := nextval('meshtrust_revision');
    record := p_head || rev::text || p_tail;
    IF p_type = 'ADDED' THEN
        INSERT INTO meshtrust_objects (kind, namespace, name, resource_version, labels, body)
            VALUES (p_kind, p_namespace, p_name, rev, p_labels, record);
    ELSIF p_type = 'DELETED' THEN
        DELETE FROM meshtrust_objects
            WHERE kind = p_kind AND namespace = p_namespace AND name = p_name;
    ELSE
        UPDATE meshtrust_objects SET resource_version = rev, labels = p_labels, body = record
            WHERE kind = p_kind AND namespace = p_namespace AND name = p_name;
    END IF;
    INSERT INTO meshtrust_changes (revision, type, kind, namespace, body)
        VALUES (rev, p_type, p_kind, p_namespace, record);
    PERFORM pg_notify('{CHANNEL}', p_kind);
    IF p_history > 0 AND rev > p_history THEN
        DELETE FROM meshtrust_changes WHERE revision <= rev - p_history;
        UPDATE meshtrust_meta SET value = greatest(value, rev - p_history)
            WHERE key = 'compacted';
    END IF;
    RETURN rev;
END
$$""",),
)
SCHEMA_VERSION = len(MIGRATIONS)
DEFAULT_HISTORY = 10_000
_POOL = 4
_ATTEMPTS = 5  # reads of a row that keeps moving before a write gives up (Conflict)
_RECENT = 4096  # records kept of the rows last read or written, for the writes that follow
_STAND_INS = 10**18  # stand-in revisions are 19-digit numbers, never drawn in practice
_VERSION_FIELD = '"resourceVersion":"'  # how a record (manifest.dump_json) begins its version
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


def _kinds_in(payload: str) -> tuple[str, ...] | None:
    """The kind a NOTIFY's payload names; None (every kind) for one that names none, as
    from a replica of an older meshtrust, whose payload is the revision."""
    try:
        return (base.check_kind(payload),)
    except ValueError:
        return None


def _revised(event: base.WatchEvent, revision: int) -> base.WatchEvent:
    """``event`` with the revision the database drew in place of the stand-in."""
    obj = event.object
    if isinstance(obj, base.Resource):
        # Its spec and status were checked and copied when the write made it, and are
        # passed on with it alone: no need to check and copy them again.
        obj = dataclasses.replace(obj, resource_version=revision, parsed=True)
    else:
        obj = dataclasses.replace(obj, resource_version=revision)
    return base.WatchEvent(type=event.type, object=obj, resource_version=revision)


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
        self._recent: collections.OrderedDict[change.Key, tuple[int, str]] = \
            collections.OrderedDict()
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
        found = await self._row(key)
        if found is None:
            raise errors.NotFound(f"{change.describe(key)} not found")
        return found

    async def _row(self, key: change.Key) -> base.Object | None:
        """The object at ``key`` as the database holds it now (None if there is none);
        its record is kept for a write that follows at its version."""
        rows = await self._query("SELECT body FROM meshtrust_objects"
                                 " WHERE kind = %s AND namespace = %s AND name = %s", key)
        if not rows:
            self._recent.pop(key, None)
            return None
        found = manifest.load_json(rows[0][0], source=f"{self._name} {change.describe(key)}")
        self._remember(key, found.resource_version, rows[0][0])
        return found

    def _remember(self, key: change.Key, version: int, record: str) -> None:
        self._recent[key] = (version, record)
        self._recent.move_to_end(key)
        if len(self._recent) > _RECENT:
            self._recent.popitem(last=False)

    def _recalled(self, key: change.Key, version: int | None) -> base.Object | None:
        """The object at ``key`` as last read or written here, if that was at ``version``."""
        kept = self._recent.get(key)
        if kept is None or version is None or kept[0] != version:
            return None
        return manifest.load_json(kept[1], source=f"{self._name} {change.describe(key)}")

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
        # One statement, so one snapshot: the compaction mark, the head and the entries
        # agree (and it is one round trip).
        where = " AND namespace = %s" if namespace is not None else ""
        rows = await self._query(
            "WITH log AS (SELECT"
            " (SELECT value FROM meshtrust_meta WHERE key = 'compacted') AS compacted,"
            " (SELECT coalesce(max(revision), 0) FROM meshtrust_changes) AS head)"
            " SELECT log.compacted, log.head, entry.revision, entry.type, entry.body"
            " FROM log LEFT JOIN LATERAL (SELECT revision, type, body FROM meshtrust_changes"
            " WHERE kind = %s AND revision > %s AND revision <= log.head" + where +
            " ORDER BY revision LIMIT %s) AS entry ON true ORDER BY entry.revision",
            [kind, after, *([namespace] if namespace is not None else []), limit])
        compacted = int(rows[0][0])
        head = max(compacted, int(rows[0][1]))
        if after < compacted:
            raise feed.too_old(after, compacted + 1)
        entries = [row[2:] for row in rows if row[2] is not None]
        events = await backend.load_events(entries, source=self._name)
        examined = events[-1].resource_version if len(entries) == limit else head
        return events, examined

    async def _submit(self, write: change.Write) -> base.WatchEvent:
        kind, namespace, name = write.key
        # A write at the version this replica last read or wrote starts from that record:
        # the database checks under its lock that the row is still at it. Otherwise, or
        # if the row moved, the row is read.
        current = self._recalled(write.key, write.expected)
        for attempt in range(_ATTEMPTS):
            if attempt or (current is None and write.action is not change.Action.CREATE):
                current = await self._row(write.key)
            # The record as it will be stored but for its revision, which the database
            # draws: a random stand-in marks where it goes.
            stand_in = secrets.randbelow(_STAND_INS) + _STAND_INS
            event = change.apply(write, current, stand_in, self._clock.now())
            head, mark, tail = manifest.dump_json(event.object).partition(
                f'{_VERSION_FIELD}{stand_in}"')
            assert mark, "a record names its resourceVersion"
            head, tail = head + _VERSION_FIELD, '"' + tail
            self._writes += 1
            compact = not self._writes % max(1, min(256, self._history // 8))
            rows = await self._query(
                "SELECT meshtrust_write(%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)",
                (event.type.value, kind, namespace, name,
                 current.resource_version if current else 0,
                 json.dumps(dict(event.object.labels)), head, tail,
                 self._history if compact else 0))
            revision = rows[0][0]
            if revision is not None:
                self._feed.notify((kind,))
                if event.type is base.EventType.DELETED:
                    self._recent.pop(write.key, None)
                else:
                    self._remember(write.key, int(revision), f"{head}{revision}{tail}")
                return _revised(event, int(revision))
            if write.action is change.Action.CREATE:
                raise errors.AlreadyExists(f"{change.describe(write.key)} exists already")
            # The row moved since it was read: read it again, and check the write against
            # what it is now (a write with a version then ends Conflict).
        raise errors.Conflict(f"{change.describe(write.key)} kept changing during the write; "
                              "read it again and retry")

    async def _listen(self) -> None:
        """Wake the watchers of the kind each NOTIFY names; reconnect after a pause if the
        link drops."""
        while not self._closed:
            try:
                conn = await connect(self._conninfo, self._name)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._feed.notify()  # catch up on what was written while not listening
                    async for notice in conn.notifies():
                        self._feed.notify(_kinds_in(notice.payload))
            except (errors.StoreUnavailable, psycopg.Error):
                await asyncio.sleep(1.0)  # watchers keep polling meanwhile
