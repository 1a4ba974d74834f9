"""Admission control: a bounded number of issuances at once, the rest told when to come back.

An issuance — a bootstrap, a renewal, an Istio intermediate — is the server's
expensive work: the CSR check, the signature and the store writes that record
it. When a whole fleet asks at once (every certificate due together, the
server back after an outage) taking every call makes each of them slow, the
callers' deadlines pass, and they retry on top of the work already queued.

So the server signs at most ``limit`` certificates at a time, and fewer (down
to a quarter) while issuances take longer than ``target`` seconds (the CPU is
short, the store is slow): the limit shrinks by a tenth for each round of
slow issuances (at most once per issuance time) and grows back by one per
limit's worth of fast ones, so calls in flight finish in time instead of
sharing the CPU until all are late. More callers wait in arrival order
(calls that complete work the server handed out behind all of them: ``slot``),
as many as can be served within ``max_wait`` seconds at the rate the server is
issuing (or a fixed ``queue``); the rest are
refused at once with ``errors.RateLimited`` (``RESOURCE_EXHAUSTED`` on the
wire) and a time to retry, and so is a caller still waiting after ``max_wait``.
A caller with a deadline waits no longer than would still let its issuance
finish before it: an answer its caller has given up on is work thrown away.
A waiting call costs the server memory only, a refusal a whole call more, so
waiting is the cheaper way to hold a burst. A caller may bring its own wait instead of
``max_wait`` (``slot(wait=...)``): a bootstrap waits longer, as its agent has nothing to do
until it is answered (``server.config``'s ``max_bootstrap_wait``), where a renewal's
latency is what a rotation storm is judged by.

The retry times are a schedule, not a guess: the server knows how long an
issuance takes and so how many it completes per second at the limit (averaged
over the last ``PACE_SECONDS`` of issuances that ended with the server at its
limit: a stall of the event loop ends many issuances at once, all slow, and must
not send every caller told meanwhile minutes away; and an issuance that had a
quiet server to itself says nothing of how many the server completes when busy,
so the first burst after a quiet spell is booked at the pace of the last busy
one; until the server was first busy, every issuance counts), and
gives each refused caller its own later slot at that rate,
after the queue and after the callers already told to come back who have not
yet. A burst of ten thousand callers comes back as an even stream the server
can serve, instead of ten thousand calls each second; the schedule follows the
rate as it changes, and no caller is told to wait more than ``max_retry``. Agents wait the
time they are given, with a little jitter (``agent.backoff``).

Work the server hands out itself, an intermediate for a cluster to make a key for, is
not booked here: the server hands out only as much as it can take back at once
(``work.HandOuts``), and the calls that bring it back wait behind every caller's own
call, up to ``handed_out_wait`` seconds. Being few, they may wait longer than callers:
a waiting call costs memory only, and each of them takes the first slot the callers
leave free, so the server signs intermediates whenever it has room and never puts a
caller off for them. They hold at most ``handed_out_share`` of the slots at once
(``work_limit``): a caller's issuance shares the CPU with the others in flight, and
beside a whole limit of intermediates it would take that many times longer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable

from meshtrust import errors

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 64
FIRST_ESTIMATE = 0.25  # seconds per issuance (at the limit) before any was measured
_SMOOTHING = 0.1  # weight of the newest duration in the moving average
_BACK_OFF = 0.9  # the limit after a round of slow issuances, as a share of what it was
_FLOOR = 0.25  # the limit never falls below this share of Options.limit
# Refused callers are scheduled this much sooner than the measured rate says: the rate is
# measured at the limit, which the schedule itself keeps the server from reaching if it is
# too low; a caller that comes too early waits in the queue or is told again (cheaply).
_EAGER = 0.5
REPORT_EVERY = 10.0  # seconds between two log lines about refused calls
PACE_SECONDS = 10.0  # the schedule's rate is that of about this many seconds of issuances


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """How many issuances run at once, how many wait, and for how long."""

    limit: int = DEFAULT_LIMIT
    target: float = 1.0  # seconds an issuance should take; slower ones lower the limit
    # Callers that may wait for a slot; None: as many as can be served within max_wait.
    queue: int | None = None
    max_wait: float = 1.0  # seconds a caller waits for a slot before it is refused
    # Seconds a call completing work the server handed out may wait (``slot``).
    handed_out_wait: float = 10.0
    # The share of the limit such calls may hold at once: the rest is kept for callers,
    # whose issuances would otherwise share the CPU with a whole limit of intermediates.
    handed_out_share: float = 0.25
    min_retry: float = 0.05  # bounds of the retry time given to a refused caller (seconds)
    # Past it a caller is told again, at the rate known by then. Not less than the time
    # the server needs for what is asked of it: ten thousand callers at ten issuances a
    # second told to come back within 30 s would each be refused again and again, and the
    # refusals alone would take the server's time. Agents cap a wait at the same 300 s
    # (agent.backoff.MAX_HINT).
    max_retry: float = 300.0

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be at least 1")
        if self.queue is not None and self.queue < 0:
            raise ValueError("queue must be 0 or more")
        if not 0 < self.handed_out_share <= 1:
            raise ValueError("handed_out_share must be more than 0 and at most 1")
        if self.target <= 0 or min(self.max_wait, self.handed_out_wait) < 0 or not (
                0 < self.min_retry <= self.max_retry):
            raise ValueError("target must be > 0, max_wait and handed_out_wait >= 0 and "
                             "0 < min_retry <= max_retry")


class Admission:
    """Slots for issuances; ``async with admission.slot():`` around each one."""

    def __init__(self, options: Options | None = None, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.options = options or Options()
        self._now = monotonic
        self._in_flight = 0
        self._work = 0  # of them, calls completing work handed out
        self._limit = float(self.options.limit)  # the current limit, 1 to options.limit
        self._lowered = -float("inf")  # when the limit was last lowered
        # Calls waiting for a slot, first come first served within each queue: callers'
        # own, then work the server handed out (``slot``). A call that gave up stays in
        # its deque, cancelled, until it reaches the front; ``_queued`` counts the others.
        self._queues: tuple[collections.deque[asyncio.Future[None]], ...] = (
            collections.deque(), collections.deque())
        self._queued = [0, 0]
        self._duration = FIRST_ESTIMATE
        # Seconds per issuance at the limit, as the schedule books them: the average of
        # the issuances so far that ended with the server at its limit, then of about the
        # last PACE_SECONDS of them.
        self._pace = FIRST_ESTIMATE / self.options.limit
        self._paced = 0  # issuances measured
        self._been_busy = False  # whether an issuance has ended with the server at its limit
        self._paced_at = monotonic()  # when the last one ended
        # When refused callers were told to come back, those still to come, in order.
        self._slots: collections.deque[float] = collections.deque()
        self.admitted = 0
        self.refused = 0
        self._refused_since_report = 0
        self._reported = monotonic()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return sum(self._queued)

    @property
    def limit(self) -> int:
        """How many issuances may run at once now."""
        return max(1, int(self._limit))

    @property
    def work_limit(self) -> int:
        """How many of them may complete work the server handed out (``handed_out_share``)."""
        return max(1, int(self._limit * self.options.handed_out_share))

    @property
    def seconds_per_issuance(self) -> float:
        """How long one issuance takes at the limit, divided by the limit: 1 / throughput,
        as the schedule books the callers it refuses (``PACE_SECONDS``)."""
        return self._pace

    @contextlib.asynccontextmanager
    async def slot(self, remaining: float | None = None, *, handed_out: bool = False,
                   wait: float | None = None) -> AsyncIterator[None]:
        """Hold one of the slots for the block; RateLimited if none comes in time.

        ``remaining``: seconds to the caller's deadline, if it has one. ``wait``: how
        long this caller may wait for its slot, if not ``max_wait`` (a bootstrap, whose
        agent has nothing to do meanwhile). ``handed_out``:
        the call completes work the server handed out itself (``work.HandOuts``), and
        waits behind every caller's own call, up to ``handed_out_wait`` seconds rather
        than ``max_wait``. A renewal is its caller's deadline; an intermediate the server
        asked for can come a little later, and in a storm the callers waited behind these
        for slots.
        """
        rank = int(handed_out)
        await self._acquire(self._patience(remaining, rank, wait), rank)
        started = self._now()
        try:
            yield
        finally:
            self._finished(self._now() - started)
            self._release(rank)

    def _finished(self, elapsed: float) -> None:
        now = self._now()
        # At the limit, the limit divided by an issuance's time is how many the server
        # completes per second. Below it, an issuance that had the server to itself would
        # book the next burst many times sooner than it can be served, so once the server
        # has been at its limit only such issuances count. Weighted by the time since the
        # last one ended (at most this one's own time, so that a quiet spell does not wipe
        # out what was measured before it, and one slow issuance at the start of a burst
        # does not send every caller away): the issuances a stall ends together count as
        # one.
        busy = self._in_flight >= self.limit or self._queued[0] > 0
        self._been_busy = self._been_busy or busy
        if busy or not self._been_busy:
            self._paced += 1
            since = min(now - self._paced_at, elapsed)
            weight = max(1 / self._paced, 1 - math.exp(-since / PACE_SECONDS))
            self._pace += weight * (elapsed / self.limit - self._pace)
            self._paced_at = now
        self._duration += _SMOOTHING * (elapsed - self._duration)
        if elapsed > self.options.target:
            # Once per round of issuances, not for each of the slow ones in flight together.
            if now - self._lowered >= self._duration:
                self._lowered = now
                self._limit = max(self.options.limit * _FLOOR, self._limit * _BACK_OFF)
        else:
            self._limit = min(float(self.options.limit), self._limit + 1 / self._limit)

    def _patience(self, remaining: float | None, rank: int, wait: float | None) -> float:
        """How long a call may wait: ``wait``, else max_wait (handed_out_wait for work
        handed out), less if its issuance would end too late."""
        if wait is None:
            wait = self.options.handed_out_wait if rank else self.options.max_wait
        if remaining is None:
            return wait
        return max(0.0, min(wait, remaining - self._duration))

    async def _acquire(self, patience: float, rank: int) -> None:
        if self._free(rank) and not any(self._queued[:rank + 1]):
            self._take(rank)
            self.admitted += 1
            return
        if not self._may_wait(patience, rank):
            raise self._refuse(rank)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues[rank].append(waiter)
        self._queued[rank] += 1
        try:
            async with asyncio.timeout(patience):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                self.admitted += 1  # the slot was handed over as the time ran out: keep it
                return
            self._forget(waiter, rank)
            raise self._refuse(rank) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(rank)  # handed a slot, but the call is gone: pass it on
            self._forget(waiter, rank)
            raise
        self.admitted += 1

    def _may_wait(self, patience: float, rank: int) -> bool:
        """Whether one more call may queue: a fixed queue, or one served in its patience
        (after the calls queued ahead of it: those of its rank and of the ranks before)."""
        if patience <= 0:
            return False
        if self.options.queue is not None:
            return self.waiting < self.options.queue
        ahead = sum(self._queued[:rank + 1])
        slots = self.work_limit if rank else self.limit
        return (ahead + 1) * self._duration / slots <= patience

    def _forget(self, waiter: asyncio.Future[None], rank: int) -> None:
        """A waiter gives up: it no longer counts, and ``_release`` passes it over."""
        if waiter.cancelled() or not waiter.done():  # not handed a slot: it still counts
            self._queued[rank] -= 1
        waiter.cancel()

    def _free(self, rank: int) -> bool:
        """Whether a call of ``rank`` may take a slot: one is free, and work handed out
        holds fewer than its share."""
        return self._in_flight < self.limit and (not rank or self._work < self.work_limit)

    def _take(self, rank: int) -> None:
        self._in_flight += 1
        self._work += rank

    def _release(self, rank: int) -> None:
        """Free a slot of ``rank``, and hand free slots to the calls that have waited
        longest, callers' own first."""
        self._in_flight -= 1
        self._work -= rank
        for queued, waiters in enumerate(self._queues):
            while waiters and self._free(queued):
                waiter = waiters.popleft()
                if not waiter.done():
                    self._queued[queued] -= 1
                    self._take(queued)
                    waiter.set_result(None)

    def _told(self, now: float) -> int:
        """Callers told to come back who have not yet."""
        _expire(self._slots, now)
        return len(self._slots)

    def _turn(self, booked: int, eager: float) -> float:
        """Seconds until a turn after the calls in flight, those waiting and ``booked``
        others, ``eager`` times as far apart as the measured rate says (bounded)."""
        # All at the rate the server issues now (so the schedule follows the rate, rather
        # than the rate of when the others were booked).
        ahead = self._in_flight + self.waiting + booked + 1
        return min(max(ahead * self.seconds_per_issuance * eager, self.options.min_retry),
                   self.options.max_retry)

    def _refuse(self, rank: int = 0) -> errors.RateLimited:
        """The error for a call that gets no slot, with its time to come back.

        A caller gets its own turn, booked after the callers told before it. Work handed
        out comes back once the calls ahead of it now are served, and books no turn: such
        calls are as few as the work the server has on its way (``work.HandOuts``), and
        one refused has most likely waited its ``handed_out_wait`` already.
        """
        now = self._now()
        if rank:
            retry = self._turn(0, 1.0)
        else:
            retry = self._turn(self._told(now), _EAGER)
            self._slots.append(max(now + retry, self._slots[-1] if self._slots else 0.0))
        self.refused += 1
        self._refused_since_report += 1
        if now - self._reported >= REPORT_EVERY:
            log.warning("admission control: %d issuances refused in the last %.0f s (%d in "
                        "flight, limit %d, %d waiting, about %.0f issued/s); callers were told "
                        "to come back within %.1f s", self._refused_since_report,
                        now - self._reported, self._in_flight, self.limit, self.waiting,
                        1 / self.seconds_per_issuance, retry)
            self._refused_since_report = 0
            self._reported = now
        return errors.RateLimited(
            f"the management server is busy ({self._in_flight} issuances in flight, "
            f"{self.waiting} waiting); retry in {retry:.2f} s", retry_after=retry)


def _expire(slots: collections.deque[float], now: float) -> None:
    """Drop the times that have come from the front of ``slots``."""
    while slots and slots[0] <= now:
        slots.popleft()
