"""The bootstrap failure limiter, on a fake monotonic clock."""

from __future__ import annotations

import pytest

from meshtrust import errors
from meshtrust.server import authn


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Monotonic:
    return Monotonic()


@pytest.fixture
def limiter(clock: Monotonic) -> authn.FailureLimiter:
    return authn.FailureLimiter(limit=5, window=60.0, monotonic=clock)


def fail(limiter: authn.FailureLimiter, clock: Monotonic, peer: str, times: int,
         every: float = 1.0) -> None:
    for _ in range(times):
        limiter.failed(peer)
        clock.now += every


class TestFailureLimiter:
    def test_a_peer_gets_its_refusals_and_then_is_refused(
            self, limiter: authn.FailureLimiter, clock: Monotonic) -> None:
        """Four refusals leave a peer free; the fifth makes it wait for the oldest to age out."""
        fail(limiter, clock, "10.0.0.1", 4)
        limiter.check("10.0.0.1")
        fail(limiter, clock, "10.0.0.1", 1)
        with pytest.raises(errors.RateLimited,
                           match="too many refused bootstrap attempts from 10.0.0.1; wait 55 s "
                                 "and check the identity token") as info:
            limiter.check("10.0.0.1")
        assert info.value.retry_after == pytest.approx(55.0)

    def test_the_window_slides(self, limiter: authn.FailureLimiter, clock: Monotonic) -> None:
        """A peer is let in again the moment its oldest refusal is a full window old."""
        first = clock.now
        fail(limiter, clock, "10.0.0.1", 5)
        clock.now = first + 59.9
        with pytest.raises(errors.RateLimited) as info:
            limiter.check("10.0.0.1")
        assert info.value.retry_after == pytest.approx(0.1)
        clock.now = first + 60.0
        limiter.check("10.0.0.1")
        limiter.failed("10.0.0.1")
        with pytest.raises(errors.RateLimited):
            limiter.check("10.0.0.1")

    def test_peers_are_counted_apart(self, limiter: authn.FailureLimiter,
                                     clock: Monotonic) -> None:
        """One peer's refusals do not limit another."""
        fail(limiter, clock, "10.0.0.1", 5, every=0)
        limiter.check("10.0.0.2")
        with pytest.raises(errors.RateLimited, match="from 10.0.0.1"):
            limiter.check("10.0.0.1")

    def test_retry_after_is_never_zero(self, clock: Monotonic) -> None:
        """A refusal always asks the peer to wait a little, even at the window's edge."""
        limiter = authn.FailureLimiter(limit=1, window=1.0, monotonic=clock)
        limiter.failed("p")
        clock.now += 0.999999
        with pytest.raises(errors.RateLimited) as info:
            limiter.check("p")
        assert info.value.retry_after >= 0.1

    @pytest.mark.parametrize(("limit", "window"), [(0, 60.0), (5, 0.0), (5, -1.0)])
    def test_nonsense_settings_are_refused(self, limit: int, window: float) -> None:
        """A limit below one or a window that is not positive is a programming error."""
        with pytest.raises(ValueError, match="limit must be >= 1 and window > 0"):
            authn.FailureLimiter(limit=limit, window=window)
