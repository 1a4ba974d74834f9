"""Admission control of issuances, and the agent's answer to a busy server."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from meshtrust import errors
from meshtrust.agent import backoff
from meshtrust.server import admission, config


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


async def hold(control: admission.Admission, release: asyncio.Event,
               started: list[int] | None = None, index: int = 0) -> None:
    async with control.slot():
        if started is not None:
            started.append(index)
        await release.wait()


class TestAdmission:
    def test_calls_within_the_limit_run_at_once(self) -> None:
        """Up to ``limit`` issuances hold a slot together without waiting."""
        async def scenario() -> None:
            control = admission.Admission(admission.Options(limit=3, queue=0))
            release = asyncio.Event()
            tasks = [asyncio.create_task(hold(control, release)) for _ in range(3)]
            await asyncio.sleep(0)
            assert control.in_flight == 3
            release.set()
            await asyncio.gather(*tasks)
            assert control.in_flight == 0 and control.refused == 0

        run(scenario())

    def test_past_the_queue_callers_get_distinct_later_slots(self) -> None:
        """Refused callers are each given their own time, spaced at the server's rate."""
        async def scenario() -> None:
            control = admission.Admission(admission.Options(limit=2, queue=1, max_wait=5))
            release = asyncio.Event()
            tasks = [asyncio.create_task(hold(control, release)) for _ in range(3)]
            await asyncio.sleep(0)
            assert (control.in_flight, control.waiting) == (2, 1)
            refusals = []
            for _ in range(4):
                with pytest.raises(errors.RateLimited,
                                   match=r"the management server is busy \(2 issuances in "
                                         r"flight, 1 waiting\); retry in") as info:
                    async with control.slot():
                        pass
                refusals.append(info.value.retry_after)
            spacing = control.seconds_per_issuance * admission._EAGER
            assert refusals == sorted(refusals) and len(set(refusals)) == 4
            assert refusals[0] == pytest.approx(4 * spacing, rel=0.05)  # 3 ahead, then its own
            assert refusals[-1] - refusals[0] == pytest.approx(3 * spacing, rel=0.05)
            release.set()
            await asyncio.gather(*tasks)
            assert control.in_flight == 0

        run(scenario())

    def test_waiters_get_slots_in_arrival_order(self) -> None:
        """A freed slot goes to the caller that has waited longest."""
        async def scenario() -> None:
            control = admission.Admission(admission.Options(limit=1, queue=3, max_wait=5))
            gates = [asyncio.Event() for _ in range(4)]
            order: list[int] = []
            tasks = []
            for i, gate in enumerate(gates):
                tasks.append(asyncio.create_task(hold(control, gate, order, i)))
                await asyncio.sleep(0)
            for gate in gates:
                gate.set()
                await asyncio.sleep(0.01)
            await asyncio.gather(*tasks)
            assert order == [0, 1, 2, 3]

        run(scenario())

    def test_callers_are_served_before_work_handed_out(self) -> None:
        """A freed slot goes to a caller's own call before work the server handed out,
        even one that came later; work waits behind every caller, a caller only behind
        callers. With issuances taking about 0.25 s and 0.6 s to wait, two calls can
        wait ahead of a third."""
        async def scenario() -> None:
            control = admission.Admission(admission.Options(limit=1, max_wait=0.6,
                                                            handed_out_wait=0.6))
            release = asyncio.Event()
            order: list[int] = []
            holder = asyncio.create_task(hold(control, release))
            await asyncio.sleep(0)

            async def call(index: int, handed_out: bool) -> None:
                async with control.slot(handed_out=handed_out):
                    order.append(index)

            tasks = []
            for index, handed_out in enumerate((True, True, False)):
                tasks.append(asyncio.create_task(call(index, handed_out)))
                await asyncio.sleep(0)
            assert control.waiting == 3  # the caller had no caller ahead of it
            with pytest.raises(errors.RateLimited):  # work: three ahead, no time left
                async with control.slot(handed_out=True):
                    pass
            release.set()
            await asyncio.gather(holder, *tasks)
            assert order == [2, 0, 1]
            assert control.in_flight == 0 and control.waiting == 0

        run(scenario())

    def test_a_caller_waits_at_most_max_wait(self) -> None:
        """A queued caller whose slot does not come within max_wait is refused."""
        async def scenario() -> None:
            control = admission.Admission(admission.Options(limit=1, queue=1, max_wait=0.05))
            release = asyncio.Event()
            holder = asyncio.create_task(hold(control, release))
            await asyncio.sleep(0)
            began = time.monotonic()
            with pytest.raises(errors.RateLimited):
                async with control.slot():
                    pass
            assert 0.04 < time.monotonic() - began < 1.0
            assert control.waiting == 0
            release.set()
            await holder
            assert control.in_flight == 0

        run(scenario())

    def test_a_caller_given_its_own_wait_waits_that_long(self) -> None:
        """A bootstrap's own wait (``wait``) replaces max_wait: with max_wait 0.05 s it is
        still served after 0.3 s, where a caller without one is refused."""
        async def scenario() -> float:
            control = admission.Admission(admission.Options(limit=1, max_wait=0.05))
            release = asyncio.Event()
            holder = asyncio.create_task(hold(control, release))
            await asyncio.sleep(0)
            with pytest.raises(errors.RateLimited):
                async with control.slot():
                    pass
            asyncio.get_running_loop().call_later(0.3, release.set)
            began = time.monotonic()
            async with control.slot(wait=2.0):
                waited = time.monotonic() - began
            await holder
            assert control.in_flight == 0 and control.waiting == 0
            return waited

        assert 0.25 < run(scenario()) < 1.0  # type: ignore[operator]

    def test_a_caller_waits_no_longer_than_its_deadline_allows(self) -> None:
        """With 0.6 s left and issuances taking about 0.25 s, a caller waits 0.35 s at most;
        one whose deadline leaves no time for the issuance is refused at once."""
        async def scenario() -> tuple[float, float]:
            control = admission.Admission(admission.Options(limit=1, queue=5, max_wait=10))
            release = asyncio.Event()
            holder = asyncio.create_task(hold(control, release))
            await asyncio.sleep(0)
            waits = []
            for remaining in (0.6, 0.2):
                began = time.monotonic()
                with pytest.raises(errors.RateLimited):
                    async with control.slot(remaining):
                        pass
                waits.append(time.monotonic() - began)
            assert control.waiting == 0
            async with asyncio.timeout(1):  # no deadline: it waits for the slot
                waiter = asyncio.create_task(hold(control, asyncio.Event()))
                await asyncio.sleep(0.05)
                assert control.waiting == 1
                release.set()
                await holder
                assert control.in_flight == 1 and control.waiting == 0
                waiter.cancel()
            return waits[0], waits[1]

        deadline_wait, no_time = run(scenario())  # type: ignore[misc]
        assert 0.3 <= deadline_wait < 0.6
        assert no_time < 0.05

    def test_a_cancelled_waiter_leaks_no_slot(self) -> None:
        """A call cancelled while it waits leaves the slots as they were."""
        async def scenario() -> None:
            control = admission.Admission(admission.Options(limit=1, queue=2, max_wait=5))
            release = asyncio.Event()
            holder = asyncio.create_task(hold(control, release))
            await asyncio.sleep(0)
            waiter = asyncio.create_task(hold(control, asyncio.Event()))
            await asyncio.sleep(0)
            waiter.cancel()
            release.set()
            await holder
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert control.in_flight == 0
            async with control.slot():
                assert control.in_flight == 1

        run(scenario())

    def test_a_burst_beyond_the_limit_all_succeed_with_retries(self) -> None:
        """300 callers at once against 4 slots: some are refused, all finish, none is late."""
        async def scenario() -> tuple[int, float, admission.Admission]:
            control = admission.Admission(admission.Options(limit=4, max_wait=0.2))
            rng = random.Random(7)
            refused = 0
            worst = 0.0

            async def issue() -> None:
                async with control.slot():
                    await asyncio.sleep(0.004)  # the signature and the store write

            async def caller() -> None:
                nonlocal refused, worst
                began = time.monotonic()
                while True:
                    try:
                        await issue()
                        break
                    except errors.RateLimited as exc:
                        refused += 1
                        await asyncio.sleep(backoff.delay(exc, 1.0, rng))
                worst = max(worst, time.monotonic() - began)

            for _ in range(40):  # the server learns how long an issuance takes
                await issue()
            async with asyncio.timeout(10):  # no caller may hang
                await asyncio.gather(*(caller() for _ in range(300)))
            return refused, worst, control

        refused, worst, control = run(scenario())  # type: ignore[misc]
        assert control.admitted == 340 and control.in_flight == 0
        assert refused > 0
        # 300 issuances of 4 ms, 4 at a time, take 0.3 s at best; the schedule keeps the
        # last caller within a small multiple of that, not at some long backoff.
        assert worst < 1.5, worst
        # Each refused caller came back about when told: few were refused twice.
        assert refused < 2 * 300

    def test_slow_issuances_lower_the_limit_and_fast_ones_raise_it(self) -> None:
        """Past the target duration fewer run at once; back under it, the limit grows again."""
        now = [0.0]
        control = admission.Admission(admission.Options(limit=8, target=1.0),
                                      monotonic=lambda: now[0])

        async def issue(seconds: float, times: int) -> None:
            for _ in range(times):
                async with control.slot():
                    now[0] += seconds

        run(issue(2.0, 20))
        assert control.limit == 2  # 8 x 0.9^n, and never below a quarter of 8
        run(issue(0.1, 200))
        assert control.limit == 8

    def test_a_stall_does_not_put_the_schedule_off(self) -> None:
        """The issuances a stall of the event loop ends together, all slow, barely move
        the rate callers are booked at: it is that of the last seconds, not of the last
        few issuances."""
        now = [0.0]
        control = admission.Admission(admission.Options(limit=8, target=10.0),
                                      monotonic=lambda: now[0])

        async def rounds(seconds: float, count: int = 1) -> None:
            for _ in range(count):  # eight at a time, ending together
                release = asyncio.Event()
                holders = [asyncio.create_task(hold(control, release)) for _ in range(8)]
                await asyncio.sleep(0)
                now[0] += seconds
                release.set()
                await asyncio.gather(*holders)

        run(rounds(0.08, 200))  # 80 ms each, eight at a time: 100 a second
        steady = control.seconds_per_issuance
        assert steady == pytest.approx(0.01)
        run(rounds(0.5))  # the loop stalls for half a second
        assert control.seconds_per_issuance < 1.5 * steady
        run(rounds(0.16, 200))  # issuances take twice as long from now on
        assert control.seconds_per_issuance == pytest.approx(2 * steady, rel=0.05)

    def test_a_quiet_spell_does_not_make_the_schedule_eager(self) -> None:
        """Issuances that each had the server to themselves say nothing of how many it
        completes when busy: after a busy spell at 100 a second, fifty quick issuances one
        at a time leave the pace at 100 a second, and a burst is booked 10 ms apart (at
        the old pace of each one's own time over the limit, 1 ms / 8, it would be booked
        eighty times sooner than it can be served)."""
        now = [0.0]
        control = admission.Admission(admission.Options(limit=8, target=10.0),
                                      monotonic=lambda: now[0])

        async def together(count: int) -> None:
            for _ in range(count):  # eight at a time: the limit
                release = asyncio.Event()
                holders = [asyncio.create_task(hold(control, release)) for _ in range(8)]
                await asyncio.sleep(0)
                now[0] += 0.08
                release.set()
                await asyncio.gather(*holders)

        async def alone(count: int) -> None:
            for _ in range(count):
                now[0] += 60.0  # quiet in between
                async with control.slot():
                    now[0] += 0.001

        run(together(200))
        assert control.seconds_per_issuance == pytest.approx(0.01)
        run(alone(50))
        assert control.seconds_per_issuance == pytest.approx(0.01)
        assert control._turn(99, 1.0) == pytest.approx(100 * 0.01)
        now[0] += 60.0
        run(together(1))  # the first busy round after the quiet spell counts as one round
        assert control.seconds_per_issuance == pytest.approx(0.01, rel=0.01)

    def test_work_handed_out_waits_longer_than_a_caller(self) -> None:
        """A call bringing back work the server handed out may wait ``handed_out_wait``
        for a slot, where a caller is refused after ``max_wait``: the server hands out
        only as much as it can take back, and the call takes the first free slot."""
        async def scenario() -> None:
            control = admission.Admission(admission.Options(limit=1, max_wait=0.05,
                                                            handed_out_wait=5.0))
            release = asyncio.Event()
            holder = asyncio.create_task(hold(control, release))
            await asyncio.sleep(0)

            async def work() -> float:
                async with control.slot(handed_out=True):
                    return time.monotonic()

            waiting = asyncio.create_task(work())
            await asyncio.sleep(0)
            with pytest.raises(errors.RateLimited):
                async with control.slot():
                    pass
            await asyncio.sleep(0.2)
            released = time.monotonic()
            release.set()
            assert await waiting >= released
            await holder
            assert control.refused == 1

        run(scenario())

    def test_work_handed_out_holds_at_most_its_share_of_the_slots(self) -> None:
        """With a limit of 4 and half of it for work handed out, two such calls run and a
        third waits while slots are free, which a caller takes at once; the third runs
        when one of the first two ends, not when the caller does."""
        async def scenario() -> None:
            control = admission.Admission(admission.Options(limit=4, handed_out_share=0.5))
            assert control.work_limit == 2
            releases = [asyncio.Event() for _ in range(3)]
            started: list[int] = []

            async def work(index: int) -> None:
                async with control.slot(handed_out=True):
                    started.append(index)
                    await releases[index].wait()

            tasks = [asyncio.create_task(work(index)) for index in range(3)]
            await asyncio.sleep(0)
            assert started == [0, 1] and control.waiting == 1
            caller_release = asyncio.Event()
            caller = asyncio.create_task(hold(control, caller_release))
            await asyncio.sleep(0)
            assert control.in_flight == 3 and control.waiting == 1
            caller_release.set()
            await caller
            assert started == [0, 1]
            releases[0].set()
            await asyncio.sleep(0.01)
            assert started == [0, 1, 2]
            for release in releases:
                release.set()
            await asyncio.gather(*tasks)
            assert control.in_flight == 0 and control.waiting == 0

        run(scenario())

    def test_refused_work_comes_back_after_the_calls_ahead_and_books_no_turn(self) -> None:
        """A refused call bringing back work comes back once the calls ahead of it now are
        served, one issuance apart; it books no turn among the callers told to come back,
        who are booked more eagerly."""
        async def scenario() -> None:
            control = admission.Admission(admission.Options(limit=2, queue=0))
            turn = control.seconds_per_issuance
            release = asyncio.Event()
            holders = [asyncio.create_task(hold(control, release)) for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(errors.RateLimited) as work:
                async with control.slot(handed_out=True):
                    pass
            assert work.value.retry_after == pytest.approx(3 * turn)
            for told in (1, 2):  # two in flight, and the callers told before
                with pytest.raises(errors.RateLimited) as caller:
                    async with control.slot():
                        pass
                assert caller.value.retry_after == pytest.approx(
                    (2 + told) * turn * admission._EAGER)
            release.set()
            await asyncio.gather(*holders)

        run(scenario())

    def test_options_are_checked(self) -> None:
        """A limit below one is a caller's mistake."""
        with pytest.raises(ValueError, match="limit must be at least 1"):
            admission.Options(limit=0)
        with pytest.raises(ValueError, match="handed_out_share"):
            admission.Options(handed_out_share=0)


class TestBackoff:
    def test_a_busy_server_is_waited_for_as_long_as_it_asks(self) -> None:
        """The server's time, stretched by at most the jitter; the backoff does not grow."""
        busy = errors.RateLimited("busy", retry_after=2.0)
        waits = [backoff.delay(busy, 30.0, random.Random(i)) for i in range(50)]
        assert all(2.0 <= w <= 2.0 * (1 + backoff.JITTER) for w in waits)
        assert len(set(waits)) > 1
        assert backoff.next_backoff(busy, 4.0, 30.0) == 4.0

    def test_other_failures_back_off_exponentially(self) -> None:
        """A failure waits the backoff and up to half more, and doubles it to the ceiling."""
        failure = errors.RPCError("connection refused")
        assert 4.0 <= backoff.delay(failure, 4.0, random.Random(1)) <= 6.0
        assert backoff.next_backoff(failure, 4.0, 30.0) == 8.0
        assert backoff.next_backoff(failure, 20.0, 30.0) == 30.0

    def test_while_busy_retries_only_a_busy_server(self) -> None:
        """A call refused as busy is made again; any other error is raised at once."""
        calls: list[int] = []

        async def flaky() -> str:
            calls.append(1)
            if len(calls) < 3:
                raise errors.RateLimited("busy", retry_after=0.01)
            return "signed"

        assert run(backoff.while_busy(flaky, what="test")) == "signed"
        assert len(calls) == 3

        async def broken() -> str:
            raise errors.ProfileViolation("no")

        with pytest.raises(errors.ProfileViolation, match="no"):
            run(backoff.while_busy(broken, what="test"))


class TestSettings:
    def test_the_limits_are_server_settings(self) -> None:
        """--max-issuances and --max-issuance-wait reach the config; 0 s means no waiting."""
        made = config.from_mapping({"store": "sqlite:///x.db", "max-issuances": "8",
                                    "max-issuance-wait": "0"})
        assert (made.max_issuances, made.max_issuance_wait) == (8, 0.0)
        assert config.from_mapping({"store": "sqlite:///x.db",
                                    "max-issuance-wait": "2s"}).max_issuance_wait == 2.0
        with pytest.raises(errors.ConfigError, match="max-issuances must be at least 1"):
            config.from_mapping({"store": "sqlite:///x.db", "max-issuances": 0})
        with pytest.raises(errors.ConfigError, match="max-issuance-wait must be from 0"):
            config.from_mapping({"store": "sqlite:///x.db", "max-issuance-wait": "20s"})

    def test_a_bootstrap_waits_10_s_by_default_and_its_wait_is_a_setting(self) -> None:
        assert config.from_mapping({"store": "sqlite:///x.db"}).max_bootstrap_wait == 10.0
        assert config.from_mapping({"store": "sqlite:///x.db",
                                    "max-bootstrap-wait": "0"}).max_bootstrap_wait == 0.0
        with pytest.raises(errors.ConfigError, match="max-bootstrap-wait must be from 0 to "
                                                     "less than the agents' 15 s"):
            config.from_mapping({"store": "sqlite:///x.db", "max-bootstrap-wait": "15s"})
