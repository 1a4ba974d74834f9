"""The PostgreSQL store's write: a read, then one call that checks and writes under the lock.

A row that moves between the two ends the write as if it had been read moved, and
draws no revision: the change log stays gap-free.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import psycopg
import pytest

from meshtrust import errors, store
from meshtrust.store import base, postgres


def _counter(value: int) -> base.Resource:
    return base.Resource(api_version="test.meshtrust.io/v1", kind="Counter",
                         namespace="default", name="shared", spec={"value": value})


@contextlib.asynccontextmanager
async def _replicas(location: str, *, first_interval: float | None = None
                    ) -> AsyncIterator[tuple[base.Store, base.Store]]:
    """Two stores on ``location``, as two server replicas open it, closed at the end;
    ``first_interval``: the first one's poll interval, if not the default."""
    options = {} if first_interval is None else {"interval": first_interval}
    first = await store.open_store(location, **options)
    other = await store.open_store(location)
    try:
        yield first, other
    finally:
        await first.close()
        await other.close()


def _spy(opened: base.Store, sent: list[str],
         after: Callable[[str], Awaitable[None]] | None = None) -> None:
    """Record each statement ``opened`` sends, up to its first parenthesis, in ``sent``;
    ``after(sql)`` runs once the statement is answered."""
    assert isinstance(opened, postgres.PostgresStore)
    query = opened._query

    async def spied(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        sent.append(sql.split("(")[0])
        rows = await query(sql, params)
        if after is not None:
            await after(sql)
        return rows

    opened._query = spied  # type: ignore[method-assign]


async def _moved_after_read(location: str,
                            write: Callable[[base.Store], Awaitable[object]],
                            meddle: Callable[[base.Store], Awaitable[object]]) -> list[str]:
    """Run ``write`` on one store while another runs ``meddle`` right after the
    first's read of the row; return the SQL the first sent."""
    sent: list[str] = []
    async with _replicas(location) as (first, other):
        async def after(sql: str) -> None:
            if sql.startswith("SELECT body FROM meshtrust_objects") and len(sent) == 1:
                await meddle(other)

        _spy(first, sent, after)
        await write(first)
        return sent


def _revisions(location: str) -> list[int]:
    with psycopg.connect(location) as conn:
        return [row[0] for row in conn.execute(
            "SELECT revision FROM meshtrust_changes ORDER BY revision")]


class TestWriteAgainstAMovedRow:
    def test_update_ends_conflict(self, postgres_url: str) -> None:
        """An update whose row another replica changed after the read is refused, and
        the other's write stands."""
        async def scenario() -> None:
            opened = await store.open_store(postgres_url)
            made = await opened.create(_counter(0))
            await opened.close()

            async def write(s: base.Store) -> None:
                with pytest.raises(errors.Conflict, match="changed"):
                    await s.update(_replace_value(made, 1))

            async def meddle(s: base.Store) -> None:
                await s.update(_replace_value(made, 2))

            sent = await _moved_after_read(postgres_url, write, meddle)
            # The write read the row twice: the second read found it moved past the
            # version it was asked to write at.
            assert sum(sql.startswith("SELECT body") for sql in sent) == 2
            again = await store.open_store(postgres_url)
            try:
                stored = await again.get_resource("Counter", "default", "shared")
                assert (stored.spec, stored.resource_version) == ({"value": 2}, 2)
            finally:
                await again.close()
        asyncio.run(scenario())
        assert _revisions(postgres_url) == [1, 2]

    def test_delete_without_version_reads_again(self, postgres_url: str) -> None:
        """A delete with no version deletes the row as it is by then."""
        async def scenario() -> None:
            opened = await store.open_store(postgres_url)
            made = await opened.create(_counter(0))
            events = opened.watch("Counter", since=made.resource_version)

            async def write(s: base.Store) -> None:
                await s.delete("Counter", "default", "shared")

            async def meddle(s: base.Store) -> None:
                await s.update(_replace_value(made, 5))

            await _moved_after_read(postgres_url, write, meddle)
            changed, deleted = await anext(events), await anext(events)
            assert (changed.type, changed.resource_version) == (base.EventType.MODIFIED, 2)
            assert (deleted.type, deleted.resource_version) == (base.EventType.DELETED, 3)
            assert isinstance(deleted.object, base.Resource)
            assert deleted.object.spec == {"value": 5}  # the last state, as it was deleted
            with pytest.raises(errors.NotFound):
                await opened.get_resource("Counter", "default", "shared")
            await opened.close()
        asyncio.run(scenario())
        assert _revisions(postgres_url) == [1, 2, 3]

    def test_create_ends_already_exists(self, postgres_url: str) -> None:
        """Two replicas creating one object: one wins, the other is told it exists, and
        no revision is drawn for it."""
        async def scenario() -> None:
            async with _replicas(postgres_url) as (first, other):
                results = await asyncio.gather(first.create(_counter(1)),
                                               other.create(_counter(2)),
                                               return_exceptions=True)
                refused = [r for r in results if isinstance(r, BaseException)]
                made = [r for r in results if isinstance(r, base.Resource)]
                assert len(made) == 1 and len(refused) == 1
                assert isinstance(refused[0], errors.AlreadyExists)
                later = await first.create(base.Resource(
                    api_version="test.meshtrust.io/v1", kind="Counter",
                    namespace="default", name="later"))
                assert later.resource_version == made[0].resource_version + 1
        asyncio.run(scenario())
        assert _revisions(postgres_url) == [1, 2]


class TestWriteAfterRead:
    def test_a_write_at_the_version_read_here_reads_nothing_more(self,
                                                                 postgres_url: str) -> None:
        """A write at the version this replica last read or wrote sends only the call;
        one at a version another replica has moved past reads the row and ends Conflict."""
        async def scenario() -> None:
            async with _replicas(postgres_url) as (first, other):
                sent: list[str] = []
                _spy(first, sent)
                made = await first.create(_counter(0))
                read = await first.get_resource("Counter", "default", "shared")
                counted = await first.update_status(
                    _replace_value(read, 0, status={"seen": 1}))
                again = await first.update(_replace_value(counted, 1))
                assert (again.spec, again.status, again.generation) == (
                    {"value": 1}, {"seen": 1}, 2)
                assert sent == ["SELECT meshtrust_write", "SELECT body FROM meshtrust_objects"
                                " WHERE kind = %s AND namespace = %s AND name = %s",
                                "SELECT meshtrust_write", "SELECT meshtrust_write"]
                assert made.resource_version < counted.resource_version
                moved = await other.update(_replace_value(again, 2))
                sent.clear()
                with pytest.raises(errors.Conflict, match="read at resource version"):
                    await first.update(_replace_value(again, 3))
                assert sent[0] == "SELECT meshtrust_write" and len(sent) == 2
                stored = await other.get_resource("Counter", "default", "shared")
                assert stored == moved
        asyncio.run(scenario())


class TestNotifications:
    def test_a_write_wakes_the_watchers_of_its_kind_only(self, postgres_url: str) -> None:
        """Another replica's writes of one kind make a watcher of another kind read
        nothing; a write of its kind wakes it at once (its poll interval is 30 s)."""
        async def scenario() -> None:
            async with _replicas(postgres_url, first_interval=30.0) as (quiet, writer):
                assert isinstance(quiet, postgres.PostgresStore)
                others = quiet.watch("Other", since=0)
                # Only a NOTIFY brings this within 30 s: the listener is up.
                await writer.create(_named("Other", "first"))
                assert (await asyncio.wait_for(anext(others), 10)).object.name == "first"
                read = quiet._feed._read
                reads: list[str] = []

                async def spied(after: int, kind: str, namespace: str | None,
                                limit: int) -> tuple[list[base.WatchEvent], int]:
                    reads.append(kind)
                    return await read(after, kind, namespace, limit)

                quiet._feed._read = spied
                counters = quiet.watch("Counter")
                waiting = asyncio.ensure_future(anext(counters))
                for _ in range(200):  # until it has read the log once, and waits
                    if reads:
                        break
                    await asyncio.sleep(0.05)
                assert reads == ["Counter"]
                for index in range(5):
                    await writer.create(_named("Other", f"other-{index}"))
                for _ in range(5):
                    await asyncio.wait_for(anext(others), 10)
                assert reads.count("Counter") == 1
                await writer.create(_counter(0))
                event = await asyncio.wait_for(waiting, 10)
                assert (event.object.kind, reads.count("Counter")) == ("Counter", 2)
        asyncio.run(scenario())


class TestRecord:
    def test_stored_record_names_the_drawn_revision(self, postgres_url: str) -> None:
        """The stored record and the change log's carry the revision the database drew,
        and read back equal to what the write returned."""
        async def scenario() -> base.Resource:
            opened = await store.open_store(postgres_url)
            try:
                made = await opened.create(_counter(0))
                changed = await opened.update_status(
                    _replace_value(made, 0, status={"seen": "resourceVersion"}))
                assert await opened.get_resource("Counter", "default", "shared") == changed
                return changed
            finally:
                await opened.close()
        changed = asyncio.run(scenario())
        with psycopg.connect(postgres_url) as conn:
            row = conn.execute("SELECT resource_version, body::jsonb -> 'metadata' ->>"
                               " 'resourceVersion' FROM meshtrust_objects").fetchone()
            logged = conn.execute("SELECT body::jsonb -> 'metadata' ->> 'resourceVersion'"
                                  " FROM meshtrust_changes WHERE revision = 2").fetchone()
        assert row == (changed.resource_version, str(changed.resource_version))
        assert logged == (str(changed.resource_version),)


def _named(kind: str, name: str) -> base.Resource:
    return base.Resource(api_version="test.meshtrust.io/v1", kind=kind, namespace="default",
                         name=name)


def _replace_value(resource: base.Resource, value: int,
                   status: dict[str, Any] | None = None) -> base.Resource:
    return base.Resource(api_version=resource.api_version, kind=resource.kind,
                         namespace=resource.namespace, name=resource.name,
                         spec={"value": value}, status=status or {},
                         resource_version=resource.resource_version)
