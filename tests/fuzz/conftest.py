"""Fixtures of the fuzz suites: an event loop per module, the server state every example copies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

import fuzzkit
import fuzzworld


@pytest.fixture(scope="module")
def runner() -> Iterator[fuzzkit.Loop]:
    """One event loop for all of a module's examples: a new loop per example costs more than
    most examples."""
    with asyncio.Runner() as loop:
        yield fuzzkit.Loop(loop.get_loop())


@pytest.fixture(scope="session")
def made() -> fuzzworld.Template:
    """A management server's state after bootstraps, a policy and its work items."""
    return asyncio.run(fuzzworld.template())


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """Only errors from meshtrust's loggers: ten thousand refusals would bury a failure."""
    logger = logging.getLogger("meshtrust")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
