"""The grace-ratio renewal rule, with examples and properties."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshtrust.pki import rotation

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class TestRenewalTime:
    def test_seed_example(self) -> None:
        """Ratio 0.1 of a 365-day certificate renews 36.5 days before expiry."""
        after = T0 + dt.timedelta(days=365)
        assert after - rotation.renewal_time(T0, after, 0.1) == dt.timedelta(days=36.5)

    @pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
    def test_ratio_out_of_range(self, ratio: float) -> None:
        """Ratios outside (0, 1) are refused."""
        with pytest.raises(ValueError, match="grace_ratio"):
            rotation.renewal_time(T0, T0 + dt.timedelta(days=1), ratio)

    def test_inverted_window(self) -> None:
        """A window that ends before it starts is refused."""
        with pytest.raises(ValueError, match="later than"):
            rotation.renewal_time(T0, T0, 0.5)

    @given(seconds=st.integers(min_value=1, max_value=20 * 365 * 86400),
           ratio=st.floats(min_value=0.001, max_value=0.999),
           jitter=st.floats(min_value=0.0, max_value=0.999),
           seed=st.integers(min_value=0, max_value=2**32))
    def test_within_validity_and_not_after_grace(self, seconds: int, ratio: float,
                                                 jitter: float, seed: int) -> None:
        """The renewal time lies inside the validity and no later than the grace point."""
        after = T0 + dt.timedelta(seconds=seconds)
        at = rotation.renewal_time(T0, after, ratio, jitter, random.Random(seed))
        grace_point = rotation.renewal_time(T0, after, ratio)
        assert T0 <= at <= grace_point <= after

    @given(seconds=st.integers(min_value=10, max_value=10 * 365 * 86400),
           a=st.floats(min_value=0.01, max_value=0.98),
           b=st.floats(min_value=0.01, max_value=0.98))
    def test_larger_ratio_renews_earlier(self, seconds: int, a: float, b: float) -> None:
        """A larger grace ratio never renews later than a smaller one."""
        after = T0 + dt.timedelta(seconds=seconds)
        lo, hi = sorted((a, b))
        assert rotation.renewal_time(T0, after, hi) <= rotation.renewal_time(T0, after, lo)

    @given(seconds=st.integers(min_value=1000, max_value=10 * 365 * 86400),
           ratio=st.floats(min_value=0.01, max_value=0.5))
    def test_grace_is_ratio_of_lifetime(self, seconds: int, ratio: float) -> None:
        """Without jitter, time left at renewal is ratio × lifetime (to a millisecond)."""
        after = T0 + dt.timedelta(seconds=seconds)
        left = after - rotation.renewal_time(T0, after, ratio)
        assert abs(left.total_seconds() - ratio * seconds) < 1e-3

    def test_jitter_spreads_a_fleet(self) -> None:
        """With jitter, certificates issued together get different renewal times."""
        after = T0 + dt.timedelta(days=365)
        rng = random.Random(7)
        times = {rotation.renewal_time(T0, after, 0.1, 0.5, rng) for _ in range(100)}
        assert len(times) > 90
