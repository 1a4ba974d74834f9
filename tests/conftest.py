"""Shared fixtures: one real PostgreSQL server per test session, a database per test, and
one fake AWS Private CA server per session."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

import pcaserver
import pgserver

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pgserver.Server]:
    """A PostgreSQL server on 127.0.0.1 for the whole session; fails if none is installed."""
    try:
        server = pgserver.Server()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: pgserver.Server) -> str:
    """The URL of a new, empty database on the session's server."""
    return postgres_server.create_database(f"test_{next(_databases)}")


@pytest.fixture(scope="session")
def pca_server() -> Iterator[pcaserver.Server]:
    """A fake AWS Private CA (moto, as documented, with faults on demand) for the session."""
    server = pcaserver.Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()
