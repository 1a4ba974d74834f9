"""When the agent's rotator plans a renewal: overdue ones are spread over ``renew_spread``."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest

from meshtrust import errors
from meshtrust.agent.config import AgentConfig
from meshtrust.agent.provider import ClientIdentity, Provider
from meshtrust.agent.rotator import Rotator
from meshtrust.pki import bundle, issuer, keys, profiles, rotation
from meshtrust.testing import FakeClock, MemoryStore

START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
SPREAD = 30.0


def identity(not_before: dt.datetime, lifetime: dt.timedelta) -> ClientIdentity:
    root = issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT, not_before, lifetime)
    return ClientIdentity(chain=bundle.dump_certificate(root.certificate),
                          key=keys.dump_private_key(root.key),
                          trust=bundle.dump_certificate(root.certificate),
                          resource_version=1, managed=True)


def rotator(clock: FakeClock, seed: int, provider: Provider | None = None) -> Rotator:
    config = AgentConfig(cluster="c1", server="127.0.0.1:1", store="sqlite:///unused.db",
                         grace_ratio=0.5, jitter=0.0, renew_spread=SPREAD)
    return Rotator(config, MemoryStore(), provider or Provider(),
                   None,  # type: ignore[arg-type] - planning makes no call
                   asyncio.Event(), clock=clock, rng=random.Random(seed))


def test_a_renewal_due_later_keeps_its_time() -> None:
    """Due at half of a 2 h lifetime: planned for then, with no spread."""
    clock = FakeClock(START)
    current = identity(START, dt.timedelta(hours=2))
    due = rotation.renew_at(current.certificate, 0.5)
    assert due > START + dt.timedelta(minutes=30)
    assert rotator(clock, 1).due_at(current) == due


def test_overdue_renewals_are_spread_over_the_window() -> None:
    """A fleet whose certificates are all overdue plans them over 30 s, not at one instant."""
    clock = FakeClock(START)
    current = identity(START - dt.timedelta(hours=2), dt.timedelta(hours=3))  # due 30 min ago
    offsets = [(rotator(clock, seed).due_at(current) - START).total_seconds()
               for seed in range(200)]
    assert all(0 <= offset <= SPREAD for offset in offsets)
    assert max(offsets) - min(offsets) > SPREAD * 0.8  # spread, not bunched
    assert len({round(offset, 3) for offset in offsets}) > 150


def test_a_renewal_the_server_asks_for_comes_within_the_spread() -> None:
    """Asked to renew a certificate due in an hour, the agent renews within 30 s."""
    clock = FakeClock(START)
    current = identity(START, dt.timedelta(hours=2))
    provider = Provider()
    asyncio.run(provider.set(current))  # as the watcher hands it over
    planner = rotator(clock, 7, provider)
    planner.renew_now()
    due = planner.due_at(current)
    assert START <= due <= START + dt.timedelta(seconds=SPREAD)


def test_the_spread_is_at_most_a_tenth_of_the_time_left() -> None:
    """An overdue certificate with 100 s left renews within 10 s, however long the spread:
    the wait must not put the certificate at risk."""
    clock = FakeClock(START)
    current = identity(START - dt.timedelta(seconds=900), dt.timedelta(seconds=1000))
    offsets = [(rotator(clock, seed).due_at(current) - START).total_seconds()
               for seed in range(200)]
    assert all(0 <= offset <= 10.0 for offset in offsets), max(offsets)
    assert max(offsets) > 8.0  # the tenth is used, not nothing


@pytest.mark.parametrize("spread", [-1.0, 3601.0])
def test_a_spread_out_of_range_is_refused(spread: float) -> None:
    for name in ("renew_spread", "bootstrap_spread"):
        words = name.replace("_", " ")
        with pytest.raises(errors.ConfigError, match=f"{words} must be from 0 to 3600 seconds"):
            AgentConfig(cluster="c1", server="127.0.0.1:1", store="sqlite:///unused.db",
                        **{name: spread})
