"""Where the current time comes from.

Pure functions take ``now`` as an argument; only the I/O layers hold a
``Clock``, so that tests can swap in ``meshtrust.testing.FakeClock``.
Every time is timezone-aware UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class Clock(Protocol):
    """A source of the current time."""

    def now(self) -> dt.datetime:
        """Return the current time, timezone-aware, in UTC."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


def require_utc(value: dt.datetime, name: str = "time") -> dt.datetime:
    """Return ``value`` if it is timezone-aware; raise ``ValueError`` otherwise."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value!r}")
    return value.astimezone(dt.UTC)
