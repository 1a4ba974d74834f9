"""The server collects Python's garbage less often, and times the collections."""

from __future__ import annotations

import gc

import pytest

from meshtrust import errors
from meshtrust.server import app, config


def _kept_lists(count: int) -> list[list[int]]:
    """``count`` new container objects, kept alive: each counts toward a young collection."""
    return [[] for _ in range(count)]


class TestCollectingLess:
    def test_young_collections_come_every_threshold_allocations(self) -> None:
        """100,000 objects kept alive bring Python's 700-allocation threshold to over a
        hundred collections, and the server's 50,000 to a handful."""
        counts = {}
        for threshold in (700, config.DEFAULT_GC_THRESHOLD):
            gc.collect()
            with app.collecting_less(threshold) as collected:
                kept = _kept_lists(100_000)
            counts[threshold] = collected.count
            del kept
        assert counts[700] > 100, counts
        assert 1 <= counts[config.DEFAULT_GC_THRESHOLD] <= 3, counts

    def test_collections_are_timed(self) -> None:
        """Each collection is counted and timed, the longest kept."""
        ticks = iter([1.0, 1.5, 2.0, 2.1])
        timer = app.CollectorTime(clock=lambda: next(ticks))
        for phase in ("start", "stop", "start", "stop"):
            timer(phase, {"generation": 0})
        assert timer.count == 2
        assert timer.seconds == pytest.approx(0.6)
        assert timer.longest == pytest.approx(0.5)

    def test_everything_is_undone_at_the_end(self) -> None:
        """The threshold, the frozen objects and the callback are as before afterwards (the
        tests run servers in the test process)."""
        before = gc.get_threshold()
        with app.collecting_less(12_345) as collected:
            assert gc.get_threshold()[0] == 12_345
            assert gc.get_freeze_count() > 0  # what was alive at the start is left out
            assert collected in gc.callbacks
            gc.collect()
        assert collected.count >= 1 and collected.seconds > 0
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0
        assert collected not in gc.callbacks


class TestSetting:
    def test_the_threshold_is_a_server_setting(self) -> None:
        assert config.from_mapping({"store": "sqlite:///x.db"}).gc_threshold == 50_000
        made = config.from_mapping({"store": "sqlite:///x.db", "gc-threshold": "700"})
        assert made.gc_threshold == 700
        with pytest.raises(errors.ConfigError, match="gc-threshold must be from 1"):
            config.from_mapping({"store": "sqlite:///x.db", "gc-threshold": 0})
        with pytest.raises(errors.ConfigError, match="gc-threshold: give a whole number"):
            config.from_mapping({"store": "sqlite:///x.db", "gc-threshold": "lots"})
