"""Schema versions: a v1 store migrates to the current one with its data; newer is refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
import sqlite3

import psycopg
import pytest

from meshtrust import errors, store
from meshtrust.store import base, manifest, postgres
from meshtrust.store import sqlite as sqlite_store

OLD = base.Secret(namespace="gloo-mesh", name="relay-root-tls-secret", data={"ca.crt": b"root"},
                  labels={"app": "relay"}, resource_version=1,
                  created=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
                  updated=dt.datetime(2025, 1, 1, tzinfo=dt.UTC))


async def _read_back(location: str) -> None:
    """The v1 object is readable, selectable by label (a v2 column) and writable."""
    opened = await store.open_store(location)
    try:
        assert await opened.get_secret(OLD.namespace, OLD.name) == OLD
        assert await opened.list_secrets(labels={"app": "relay"}) == [OLD]
        assert await opened.revision() == 1
        later = await opened.update(OLD)
        assert later.resource_version == 2
    finally:
        await opened.close()


class TestSqliteSchema:
    def _v1(self, path: pathlib.Path) -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            assert sqlite_store.migrate(conn, "fixture", sqlite_store.MIGRATIONS[:1]) == 0
            body = manifest.dump_json(OLD)
            conn.execute("INSERT INTO objects VALUES ('Secret', ?, ?, 1, ?)",
                         (OLD.namespace, OLD.name, body))
            conn.execute("INSERT INTO changes VALUES (1, 'ADDED', 'Secret', ?, ?)",
                         (OLD.namespace, body))
            conn.execute("UPDATE meta SET value = 1 WHERE key = 'revision'")
        finally:
            conn.close()

    def test_v1_migrates(self, tmp_path: pathlib.Path) -> None:
        """A store written at schema 1 opens at schema 2 and keeps its objects."""
        self._v1(tmp_path / "c.db")
        asyncio.run(_read_back(f"sqlite:{tmp_path}/c.db"))
        conn = sqlite3.connect(tmp_path / "c.db")
        try:
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            assert version.fetchone()[0] == sqlite_store.SCHEMA_VERSION == 2
            labels = conn.execute("SELECT labels FROM objects").fetchone()[0]
            assert labels == '{"app":"relay"}'
        finally:
            conn.close()

    def test_newer_is_refused(self, tmp_path: pathlib.Path) -> None:
        """A store written by a newer schema raises SchemaError asking for an upgrade."""
        self._v1(tmp_path / "c.db")
        conn = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
        conn.execute("UPDATE meta SET value = 3 WHERE key = 'schema_version'")
        conn.close()
        with pytest.raises(errors.SchemaError, match=r"written by a newer meshtrust "
                                                     r"\(schema 3 > 2\); upgrade meshtrust"):
            asyncio.run(store.open_store(f"sqlite:{tmp_path}/c.db"))

    def test_foreign_database(self, tmp_path: pathlib.Path) -> None:
        """An SQLite file with someone else's tables is not taken over."""
        conn = sqlite3.connect(tmp_path / "c.db")
        conn.execute("CREATE TABLE invoices (id INTEGER)")
        conn.close()
        with pytest.raises(errors.SchemaError, match=r"not a meshtrust store.*invoices"):
            asyncio.run(store.open_store(f"sqlite:{tmp_path}/c.db"))


class TestPostgresSchema:
    async def _v1(self, location: str) -> None:
        async with await psycopg.AsyncConnection.connect(location, autocommit=True) as conn:
            assert await postgres.migrate(conn, "fixture", postgres.MIGRATIONS[:1]) == 0
            body = manifest.dump_json(OLD)
            await conn.execute("INSERT INTO meshtrust_objects VALUES ('Secret', %s, %s, 1, %s)",
                               (OLD.namespace, OLD.name, body))
            await conn.execute(
                "INSERT INTO meshtrust_changes VALUES (1, 'ADDED', 'Secret', %s, %s)",
                (OLD.namespace, body))
            await conn.execute("SELECT setval('meshtrust_revision', 1)")

    def test_v1_migrates(self, postgres_url: str) -> None:
        """A database written at schema 1 opens at the current schema and keeps its objects."""
        asyncio.run(self._v1(postgres_url))
        asyncio.run(_read_back(postgres_url))
        with psycopg.connect(postgres_url) as conn:
            row = conn.execute("SELECT value FROM meshtrust_meta WHERE key = 'schema_version'")
            assert row.fetchone() == (postgres.SCHEMA_VERSION,)
            assert conn.execute("SELECT labels FROM meshtrust_objects").fetchone() == (
                {"app": "relay"},)

    def test_newer_is_refused(self, postgres_url: str) -> None:
        """A database written by a newer schema raises SchemaError asking for an upgrade."""
        asyncio.run(self._v1(postgres_url))
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("UPDATE meshtrust_meta SET value = 5 WHERE key = 'schema_version'")
        with pytest.raises(errors.SchemaError, match=r"\(schema 5 > 3\); upgrade meshtrust"):
            asyncio.run(store.open_store(postgres_url))
