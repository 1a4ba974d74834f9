"""The embedded default store: one SQLite file per cluster.

Durability: WAL mode with ``synchronous=FULL``. In WAL mode ``NORMAL`` skips
the fsync at each commit, so the last commits can roll back after a power
loss; a CA that has handed out a certificate must not forget it, so every
commit is fsynced. Group commit pays for that: every write goes to one
writer thread, which takes whatever writes are queued, applies each with its
own compare-and-swap check inside one ``BEGIN IMMEDIATE`` transaction, and
commits them with a single fsync. Callers are answered only after the commit.

Reads run on a second connection in a reader thread; WAL lets them proceed
while the writer commits. Every write also lands in the ``changes`` table,
ordered by revision, which ``watch`` polls, so processes that share the file
see each other's writes. This is the only module that imports ``sqlite3``.

Statements per batch, not per row: Python's ``sqlite3`` lets go of the GIL at
every step of a statement (each row read, each statement run), and the store's
threads then wait to get it back while the event loop runs. In a busy server
the writer thread spent about five times as long in each commit as it used the
CPU. So a batch of writes is one statement per table (its rows passed as one
JSON array, unpacked by ``json_each``), and a query of many rows comes back as
one JSON array (``json_group_array``): a handful of steps per batch or query,
whatever its size.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.store import backend, base, change, feed, manifest

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: objects, their change log, and the revision counter.
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
        ("CREATE TABLE objects (kind TEXT NOT NULL, namespace TEXT NOT NULL,"
         " name TEXT NOT NULL, resource_version INTEGER NOT NULL, body TEXT NOT NULL,"
         " PRIMARY KEY (kind, namespace, name)) WITHOUT ROWID"),
        ("CREATE TABLE changes (revision INTEGER PRIMARY KEY, type TEXT NOT NULL,"
         " kind TEXT NOT NULL, namespace TEXT NOT NULL, body TEXT NOT NULL)"),
        "INSERT INTO meta (key, value) VALUES ('revision', 0), ('compacted', 0)",
    ),
    # 2: labels as their own column, so label selectors run in SQL (backfilled
    # from the stored manifests), and an index that keeps watches of one kind cheap.
    (
        "ALTER TABLE objects ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",
        "UPDATE objects SET labels = coalesce(json_extract(body, '$.metadata.labels'), '{}')",
        "CREATE INDEX changes_by_kind ON changes (kind, revision)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
DEFAULT_HISTORY = 10_000
BUSY_TIMEOUT = 10.0
MAX_BATCH = 512
_WRITTEN_CACHE = 4096


class _Turns:
    """The writers of one database file in this process take its write lock in turn.

    SQLite's own wait for a busy lock is not fair: a writer that commits batch
    after batch can keep another connection out for seconds (the server's leases
    have a connection of their own, and must be renewed in time). Within one
    process, writers queue here first, in arrival order, so that each waits at
    most for the batches ahead of it.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._issued = 0
        self._serving = 0

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._changed:
            ticket = self._issued
            self._issued += 1
            while ticket != self._serving:
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._serving += 1
                self._changed.notify_all()


_TURNS: dict[str, _Turns] = {}
_TURNS_LOCK = threading.Lock()


def _turns_for(path: str) -> _Turns:
    with _TURNS_LOCK:
        return _TURNS.setdefault(os.path.realpath(path), _Turns())


@dataclasses.dataclass(frozen=True)
class _Job:
    write: change.Write
    future: asyncio.Future[base.WatchEvent]
    loop: asyncio.AbstractEventLoop


def _resolve(jobs: list[_Job], results: list[base.WatchEvent | Exception],
             notify: Callable[[], None] | None) -> None:
    """Answer the callers of one batch; runs on their event loop."""
    for job, result in zip(jobs, results, strict=True):
        if job.future.done():
            continue
        if isinstance(result, Exception):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)
    if notify is not None:
        notify()


def _connect(path: str, name: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise errors.StoreUnavailable(
                f"sqlite store {name}: cannot use WAL mode here ({mode})")
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException as exc:
        conn.close()
        folder = os.path.dirname(os.path.abspath(path))
        if isinstance(exc, sqlite3.Error) and not os.access(folder, os.W_OK):
            # SQLite only says "unable to open database file".
            raise errors.StoreUnavailable(
                f"sqlite store {name}: {folder} is not writable (a read-only file system, "
                "or no permission); SQLite writes its WAL beside the file even to read it: "
                "make it writable") from exc
        raise
    return conn


def migrate(conn: Any, name: str, migrations: Sequence[tuple[str, ...]] = MIGRATIONS) -> int:
    """Bring the schema of an open connection up to ``len(migrations)``; return the old version.

    Raise ``errors.SchemaError`` for a file written by a newer meshtrust, or one
    that holds tables but is not a meshtrust store.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
        elif tables:
            raise errors.SchemaError(f"sqlite store {name} is not a meshtrust store "
                                     f"(it holds tables {sorted(tables)})")
        else:
            version = 0
        if version > len(migrations):
            raise errors.SchemaError(
                f"sqlite store {name} was written by a newer meshtrust (schema {version} > "
                f"{len(migrations)}); upgrade meshtrust")
        for statements in migrations[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                     (len(migrations),))
        conn.execute("COMMIT")
        return version
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class SqliteStore(backend.Backend):
    """A ``Store`` in one SQLite file; open it with ``await SqliteStore.open(...)``."""

    def __init__(self, *, path: str, name: str, writer: sqlite3.Connection,
                 reader: sqlite3.Connection, clock: clock_module.Clock, history: int,
                 interval: float) -> None:
        self._path = path
        self._name = name
        self._writer = writer
        self._reader = reader
        self._clock = clock
        self._history = history
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._reads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._thread = threading.Thread(target=self._write_loop, name="store-write", daemon=True)
        self._feed = feed.Feed(read=self._read_changes, head=self.revision, interval=interval)
        self._closed = False
        # What this writer last stored per key, to skip parsing it back (writer thread only).
        self._written: dict[change.Key, base.Object] = {}
        self._turns = _turns_for(path)
        self._thread.start()

    @classmethod
    async def open(cls, path: str, *, name: str | None = None,
                   clock: clock_module.Clock | None = None, history: int | None = None,
                   interval: float = 0.05) -> SqliteStore:
        """Open (creating and migrating if needed) the store in the file at ``path``."""
        label = name or f"sqlite:{path}"

        def connect() -> tuple[sqlite3.Connection, sqlite3.Connection]:
            writer = _connect(path, label)
            try:
                migrate(writer, label)
                return writer, _connect(path, label)
            except BaseException:
                writer.close()
                raise

        try:
            writer, reader = await asyncio.to_thread(connect)
        except sqlite3.DatabaseError as exc:
            raise _translate(exc, label) from exc
        except OSError as exc:
            raise errors.StoreUnavailable(f"sqlite store {label}: cannot open ({exc})") from exc
        return cls(path=path, name=label, writer=writer, reader=reader,
                   clock=clock or clock_module.SystemClock(),
                   history=history or DEFAULT_HISTORY, interval=interval)

    async def revision(self) -> int:
        return await self._head()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._feed.close()
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._reads.shutdown(wait=True)
        self._writer.close()
        self._reader.close()

    # Reads, on the reader thread.

    def _check_open(self) -> None:
        if self._closed:
            raise errors.StoreUnavailable(f"sqlite store {self._name} is closed")

    async def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """The rows of a query that returns at most a few (one step of SQLite each)."""
        rows: list[Any] = await self._read(lambda: self._reader.execute(sql, params).fetchall())
        return rows

    async def _query_rows(self, columns: str, sql: str, params: Sequence[Any]) -> list[Any]:
        """The rows of ``sql`` as lists of ``columns``, fetched in one step (see above)."""
        rows: list[Any] = await self._read(lambda: _rows(self._reader, columns, sql, params))
        return rows

    async def _read(self, run: Callable[[], Any]) -> Any:
        self._check_open()
        try:
            return await self._loop.run_in_executor(self._reads, run)
        except sqlite3.Error as exc:
            raise _translate(exc, self._name) from exc

    async def _head(self) -> int:
        rows = await self._query("SELECT value FROM meta WHERE key = 'revision'", ())
        return int(rows[0][0])

    async def _get(self, key: change.Key) -> base.Object:
        rows = await self._query(
            "SELECT body FROM objects WHERE kind = ? AND namespace = ? AND name = ?", key)
        if not rows:
            raise errors.NotFound(f"{change.describe(key)} not found")
        return manifest.load_json(rows[0][0], source=f"{self._name} {change.describe(key)}")

    async def _list(self, kind: str, namespace: str | None,
                    labels: Mapping[str, str] | None) -> list[base.Object]:
        sql = "SELECT namespace, name, body FROM objects WHERE kind = ?"
        params: list[Any] = [kind]
        if namespace is not None:
            sql += " AND namespace = ?"
            params.append(base.check_namespace(namespace))
        for key, value in (labels or {}).items():
            sql += " AND json_extract(labels, ?) = ?"
            params += [f'$."{key}"', value]
        rows = await self._query_rows("namespace, name, body", sql, params)
        rows.sort(key=lambda row: (row[0], row[1]))
        return await backend.load_all((row[2] for row in rows), source=self._name)

    async def _read_changes(self, after: int, kind: str, namespace: str | None,
                            limit: int) -> tuple[list[base.WatchEvent], int]:
        meta = await self._read(lambda: _meta(self._reader))
        if after < meta["compacted"]:
            raise feed.too_old(after, meta["compacted"] + 1)
        sql = "SELECT revision, type, body FROM changes WHERE kind = ? AND revision > ?"
        params: list[Any] = [kind, after]
        if namespace is not None:
            sql += " AND namespace = ?"
            params.append(namespace)
        rows = await self._query_rows(
            "revision, type, body", sql + " AND revision <= ? ORDER BY revision LIMIT ?",
            params + [meta["revision"], limit])
        rows.sort(key=lambda row: row[0])
        events = await backend.load_events(rows, source=self._name)
        examined = events[-1].resource_version if len(rows) == limit else meta["revision"]
        return events, examined

    # Writes, on the writer thread.

    async def _submit(self, write: change.Write) -> base.WatchEvent:
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[base.WatchEvent] = loop.create_future()
        self._jobs.put(_Job(write, future, loop))
        return await future

    def _write_loop(self) -> None:
        running = True
        while running:
            job = self._jobs.get()
            if job is None:
                break
            jobs = [job]
            while len(jobs) < MAX_BATCH:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    running = False
                    break
                jobs.append(more)
            results = self._commit(jobs)
            # One wake-up per event loop and batch, not one per write.
            by_loop: dict[asyncio.AbstractEventLoop, tuple[list[_Job], list[Any]]] = {}
            for job, result in zip(jobs, results, strict=True):
                batch = by_loop.setdefault(job.loop, ([], []))
                batch[0].append(job)
                batch[1].append(result)
            if self._loop not in by_loop:
                by_loop[self._loop] = ([], [])
            # Only the watchers of the kinds written need to read the change log.
            kinds = {job.write.key[0] for job, result in zip(jobs, results, strict=True)
                     if not isinstance(result, Exception)}
            for loop, (done, answers) in by_loop.items():
                notify = functools.partial(self._feed.notify, kinds) if loop is self._loop \
                    else None
                loop.call_soon_threadsafe(_resolve, done, answers, notify)

    def _commit(self, jobs: list[_Job]) -> list[base.WatchEvent | Exception]:
        try:
            with self._turns.turn():
                return self._apply(jobs)
        except sqlite3.Error as exc:
            return [_translate(exc, self._name)] * len(jobs)
        except errors.MeshTrustError as exc:
            return [exc] * len(jobs)

    def _apply(self, jobs: list[_Job]) -> list[base.WatchEvent | Exception]:
        """Apply ``jobs`` in one transaction; each write's own failure is its result."""
        conn = self._writer
        now = self._clock.now()
        results: list[base.WatchEvent | Exception] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            meta = _meta(conn)
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise errors.SchemaError(
                    f"sqlite store {self._name} changed to schema "
                    f"{meta.get('schema_version')} while open; restart meshtrust")
            head = int(meta["revision"])
            current = self._current({job.write.key for job in jobs})
            events: list[base.WatchEvent] = []
            for job in jobs:
                key = job.write.key
                try:
                    event = change.apply(job.write, current.get(key), head + 1, now)
                except (errors.StoreError, errors.ConfigError) as exc:
                    results.append(exc)
                    continue
                head = event.resource_version
                current[key] = None if event.type is base.EventType.DELETED else event.object
                events.append(event)
                results.append(event)
            self._persist(events)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (head,))
            if head - int(meta["compacted"]) > self._history + self._history // 8:
                conn.execute("DELETE FROM changes WHERE revision <= ?",
                             (head - self._history,))
                conn.execute("UPDATE meta SET value = ? WHERE key = 'compacted'",
                             (head - self._history,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    def _current(self, keys: set[change.Key]) -> dict[change.Key, base.Object | None]:
        """The stored objects at ``keys`` (absent if none); parsed again only if another
        writer changed them since ours."""
        found: dict[change.Key, base.Object | None] = {}
        for kind, namespace, name, version, body in _rows(
                self._writer, "kind, namespace, name, resource_version, body", _CURRENT,
                (json.dumps(list(keys)),)):
            key = (kind, namespace, name)
            obj = self._written.get(key)
            if obj is None or obj.resource_version != version:
                obj = manifest.load_json(body, source=f"{self._name} {change.describe(key)}")
            found[key] = obj
        return found

    def _persist(self, events: list[base.WatchEvent]) -> None:
        """Store the objects ``events`` leave and the events themselves, a statement each."""
        changes = []
        final: dict[change.Key, tuple[base.WatchEvent, str]] = {}
        for event in events:
            obj = event.object
            body = manifest.dump_json(obj)
            changes.append(_row([event.resource_version, event.type.value, obj.kind,
                                 obj.namespace], body))
            final[(obj.kind, obj.namespace, obj.name)] = (event, body)
        if len(self._written) + len(final) > _WRITTEN_CACHE:
            self._written.clear()
        kept, gone = [], []
        for key, (event, body) in final.items():
            self._written[key] = event.object
            if event.type is base.EventType.DELETED:
                gone.append(key)
            else:
                kept.append(_row([*key, event.object.resource_version,
                                  dict(event.object.labels)], body))
        if kept:
            self._writer.execute(_UPSERT, (_array(kept),))
        if gone:
            self._writer.execute(_DELETE, (json.dumps(gone),))
        if changes:
            self._writer.execute(_LOG, (_array(changes),))


def _row(fields: list[Any], body: str) -> str:
    """One row of a batch statement: ``fields``, then ``body``, a record already encoded
    as JSON, put in as it is (``->`` gives it back as the same text) rather than as a
    string to be escaped, and unescaped again."""
    return f"{json.dumps(fields)[:-1]},{body}]"


def _array(rows: list[str]) -> str:
    """The JSON array of ``rows``, each already JSON (``_row``): a batch's parameter."""
    return f"[{','.join(rows)}]"


def _rows(conn: sqlite3.Connection, columns: str, sql: str, params: Sequence[Any]) -> list[Any]:
    """The rows of ``sql`` as lists of ``columns``, aggregated by SQLite into one JSON text."""
    text = conn.execute(f"SELECT json_group_array(json_array({columns})) FROM ({sql})",
                        params).fetchone()[0]
    rows: list[Any] = json.loads(text)
    return rows


def _meta(conn: sqlite3.Connection) -> dict[str, int]:
    """The meta table (revision, compacted, schema_version) in one step."""
    meta: dict[str, int] = json.loads(conn.execute(
        "SELECT json_group_object(key, value) FROM meta").fetchone()[0])
    return meta


# The batch statements: their rows come as one JSON array parameter (see the module's
# docstring). Keys are [kind, namespace, name].
_CURRENT = ("SELECT o.kind, o.namespace, o.name, o.resource_version, o.body"
            " FROM json_each(?) AS k JOIN objects AS o ON o.kind = k.value ->> 0"
            " AND o.namespace = k.value ->> 1 AND o.name = k.value ->> 2")
_UPSERT = ("INSERT INTO objects (kind, namespace, name, resource_version, labels, body)"
           " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value -> 4,"
           " value -> 5 FROM json_each(?) WHERE true"
           " ON CONFLICT (kind, namespace, name) DO UPDATE"
           " SET resource_version = excluded.resource_version,"
           " labels = excluded.labels, body = excluded.body")
_DELETE = ("DELETE FROM objects WHERE (kind, namespace, name) IN"
           " (SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?))")
_LOG = ("INSERT INTO changes (revision, type, kind, namespace, body)"
        " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value -> 4"
        " FROM json_each(?)")


def _translate(exc: sqlite3.Error, name: str) -> errors.StoreError:
    message = str(exc)
    if "not a database" in message or "malformed" in message:
        return errors.SchemaError(f"sqlite store {name} is not a meshtrust store or is damaged "
                                  f"({message})")
    if "locked" in message or "busy" in message:
        return errors.StoreUnavailable(
            f"sqlite store {name} stayed locked by another process for {BUSY_TIMEOUT:.0f}s")
    return errors.StoreUnavailable(f"sqlite store {name}: {message}")
