"""Fixtures of the relay's integration tests: a fleet of real processes per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import relayfleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[relayfleet.Fleet]:
    """An empty fleet in ``tmp_path``; every process it started is killed afterwards.

    At teardown it also checks that no token it minted appears in any log.
    """
    with relayfleet.fleet_in(tmp_path) as made:
        yield made
    made.assert_no_tokens_in_logs()
