"""Slowing down guessers: refused bootstrap attempts are limited per peer address."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from meshtrust import errors


class FailureLimiter:
    """Allows ``limit`` refusals per ``window`` seconds from one peer, then refuses it."""

    MAX_PEERS = 10_000  # past this many remembered peers, forget the ones whose window passed

    def __init__(self, *, limit: int = 5, window: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self._limit = limit
        self._window = window
        self._now = monotonic
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, peer: str) -> collections.deque[float]:
        now = self._now()
        failures = self._failures.get(peer)
        if failures is None:
            return collections.deque()
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        if not failures:
            del self._failures[peer]
        return failures

    def check(self, peer: str) -> None:
        """Raise RateLimited if ``peer`` used up its refusals."""
        failures = self._recent(peer)
        if len(failures) >= self._limit:
            retry_after = failures[0] + self._window - self._now()
            raise errors.RateLimited(
                f"too many refused bootstrap attempts from {peer}; wait {retry_after:.0f} s "
                "and check the identity token", retry_after=max(retry_after, 0.1))

    def failed(self, peer: str) -> None:
        if len(self._failures) >= self.MAX_PEERS:
            for stale in list(self._failures):
                self._recent(stale)  # drops peers whose refusals are all older than the window
        self._failures.setdefault(peer, collections.deque()).append(self._now())
