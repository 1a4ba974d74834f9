"""Store URLs choose a backend, and every failure to open one names it with the password hidden."""

from __future__ import annotations

import asyncio
import pathlib
import socket

import pytest

import pgserver
from meshtrust import errors, store
from meshtrust.store import url


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TestMask:
    @pytest.mark.parametrize(("given", "shown"), [
        ("postgresql://app:s3cret@db:5432/mesh", "postgresql://app:***@db:5432/mesh"),
        ("postgresql://app@db/mesh", "postgresql://app@db/mesh"),
        ("postgresql://db/mesh?user=app&password=s3cret", "postgresql://db/mesh?user=app&password=***"),
        ("sqlite:///var/lib/meshtrust/c.db", "sqlite:///var/lib/meshtrust/c.db"),
        ("postgresql://a:b@[::1", "postgresql://a:***@[::1"),
    ])
    def test_hides_passwords(self, given: str, shown: str) -> None:
        """The password is replaced by *** wherever the URL carries it; the rest stays."""
        assert url.mask(given) == shown


class TestParse:
    def test_file_stores(self) -> None:
        """sqlite and dir URLs give a path, absolute or relative, and options."""
        assert url.parse("sqlite:///abs/c.db").target == "/abs/c.db"
        assert url.parse("sqlite:relative.db").target == "relative.db"
        where = url.parse("dir:///etc/certs?history=50")
        assert (where.scheme, where.target, where.history) == ("dir", "/etc/certs", 50)

    def test_server_store(self) -> None:
        """A postgresql URL keeps its own options and loses meshtrust's."""
        where = url.parse("postgres://u:p@h:5/db?sslmode=require&history=9")
        assert where.scheme == "postgresql"
        assert where.target == "postgresql://u:p@h:5/db?sslmode=require"
        assert where.masked == "postgres://u:***@h:5/db?sslmode=require&history=9"

    @pytest.mark.parametrize(("given", "message"), [
        ("mysql://u:pw@h/db", r"'mysql://u:\*\*\*@h/db' has no known scheme"),
        ("sqlite://host/c.db", "has a host 'host'"),
        ("sqlite:", "names no file"),
        ("dir:///x?history=soon", "history must be a positive"),
        ("postgresql:///db", "names no host"),
        ("/just/a/path", "has no known scheme"),
    ])
    def test_malformed(self, given: str, message: str) -> None:
        """A URL that names no usable store raises ConfigError saying what is wrong."""
        with pytest.raises(errors.ConfigError, match=message):
            url.parse(given)


class TestOpenStore:
    def test_unreachable_postgres(self) -> None:
        """A server that does not answer gives StoreUnavailable naming the masked URL."""
        location = f"postgresql://app:hunter2@127.0.0.1:{_closed_port()}/mesh"
        with pytest.raises(errors.StoreUnavailable, match=r"app:\*\*\*@127\.0\.0\.1") as caught:
            asyncio.run(store.open_store(location))
        assert "hunter2" not in str(caught.value)

    def test_wrong_password(self, postgres_server: pgserver.Server) -> None:
        """A refused login gives StoreUnavailable, never the password."""
        location = postgres_server.url.replace(postgres_server.password, "wrong-password")
        with pytest.raises(errors.StoreUnavailable, match="password authentication failed"
                           ) as caught:
            asyncio.run(store.open_store(location))
        assert "wrong-password" not in str(caught.value)

    def test_sqlite_cannot_create(self, tmp_path: pathlib.Path) -> None:
        """A database file that cannot be created gives StoreUnavailable naming the URL."""
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        with pytest.raises(errors.StoreUnavailable, match=f"sqlite:{blocker}/c.db"):
            asyncio.run(store.open_store(f"sqlite:{blocker}/c.db"))

    def test_sqlite_not_a_database(self, tmp_path: pathlib.Path) -> None:
        """A file that is not SQLite gives SchemaError, not a traceback."""
        (tmp_path / "c.db").write_bytes(b"certainly not sqlite" * 100)
        with pytest.raises(errors.SchemaError, match="not a meshtrust store"):
            asyncio.run(store.open_store(f"sqlite:{tmp_path}/c.db"))

    def test_dir_not_a_directory(self, tmp_path: pathlib.Path) -> None:
        """A dir store rooted at a file gives StoreUnavailable."""
        (tmp_path / "f").write_text("x")
        with pytest.raises(errors.StoreUnavailable, match=f"dir store dir:{tmp_path}/f"):
            asyncio.run(store.open_store(f"dir:{tmp_path}/f"))
