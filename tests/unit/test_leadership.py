"""Leadership among server replicas, on the in-memory store with a one-second lease."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.server import leadership
from meshtrust.store import lease, open_store
from meshtrust.testing import MemoryStore

NS = "gloo-mesh"
TTL = 1


class Replica:
    """One replica's Leadership, run as a task, counting the rounds of a leader-only job."""

    def __init__(self, store: MemoryStore, name: str) -> None:
        self.elector = leadership.Leadership(store, clock_module.SystemClock(), replica=name,
                                             ttl=TTL, namespace=NS)
        self.rounds = 0
        self.tasks: list[asyncio.Task[Any]] = []

    async def _job(self) -> None:
        while True:
            self.rounds += 1
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.elector.run()),
                      asyncio.create_task(self.elector.while_leading(self._job))]

    async def kill(self) -> None:
        """Stop as SIGKILL would: no release, the lease just stops being renewed."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``check()``; return how long it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def run(scenario: Callable[[MemoryStore], Awaitable[None]]) -> None:
    async def go() -> None:
        store = MemoryStore(interval=0.01)
        try:
            await scenario(store)
        finally:
            await store.close()
    asyncio.run(go())


def leaders(replicas: list[Replica]) -> list[Replica]:
    return [r for r in replicas if r.elector.leading()]


class TestLeadership:
    def test_one_leads_and_a_killed_leader_is_replaced_within_the_ttl(self) -> None:
        """Of three replicas one runs the job; killed, another takes over within the TTL."""
        async def scenario(store: MemoryStore) -> None:
            replicas = [Replica(store, f"server-{i}") for i in range(3)]
            for replica in replicas:
                replica.start()
            await until(lambda: len(leaders(replicas)) == 1, 2, "a leader")
            for _ in range(2):
                [leader] = leaders(replicas)
                others = sum(r.rounds for r in replicas if r is not leader)
                await asyncio.sleep(0.2)
                assert sum(r.rounds for r in replicas if r is not leader) == others
                await leader.kill()
                replicas.remove(leader)
                waited = await until(lambda: len(leaders(replicas)) == 1, 2 * TTL,
                                     "a new leader")
                assert waited <= TTL + 0.2
                fresh = Replica(store, f"server-{time.monotonic_ns()}")
                fresh.start()
                replicas.append(fresh)
                assert len(leaders(replicas)) == 1
            for replica in replicas:
                await replica.kill()
        run(scenario)

    def test_only_the_leader_runs_the_jobs(self) -> None:
        """While one replica leads, the job of the others never runs."""
        async def scenario(store: MemoryStore) -> None:
            first, second = Replica(store, "server-a"), Replica(store, "server-b")
            first.start()
            await until(first.elector.leading, 2, "the first replica to lead")
            second.start()
            await asyncio.sleep(TTL * 1.5)
            assert first.rounds > 10 and second.rounds == 0
            for replica in (first, second):
                await replica.kill()
        run(scenario)

    def test_a_released_lease_is_taken_at_once(self) -> None:
        """A leader that stops cleanly releases the lease; the next leads in well under a TTL."""
        async def scenario(store: MemoryStore) -> None:
            first, second = Replica(store, "server-a"), Replica(store, "server-b")
            first.start()
            await until(first.elector.leading, 2, "the first replica to lead")
            second.start()
            await asyncio.sleep(0.1)
            await first.kill()
            await first.elector.release()
            waited = await until(second.elector.leading, 2, "the second replica to lead")
            assert waited < TTL / 2
            await second.kill()
        run(scenario)

    def test_a_leader_that_cannot_renew_steps_down_before_the_lease_ends(self) -> None:
        """With the store refusing lease writes, the leader stops leading within 2/3 TTL."""
        async def scenario(store: MemoryStore) -> None:
            replica = Replica(store, "server-a")
            replica.start()
            await until(replica.elector.leading, 2, "the replica to lead")

            async def refuse(obj: Any) -> Any:
                raise errors.StoreUnavailable("connection refused")

            original = store.update
            store.update = refuse  # type: ignore[method-assign]
            try:
                waited = await until(lambda: not replica.elector.leading(), 2 * TTL,
                                     "the leader to step down")
            finally:
                store.update = original  # type: ignore[method-assign]
            held = lease.Holding.of(
                await store.get_resource(lease.KIND, NS, leadership.LEADER_LEASE))
            assert held.renewed is not None
            # It stepped down before the lease it last renewed could pass to another.
            assert clock_module.SystemClock().now() < held.renewed + held.duration
            assert waited <= TTL * 2 / 3 + 0.1
            await replica.kill()
        run(scenario)

    def test_presence_is_swept_once_expired(self) -> None:
        """A killed replica's presence expires: the sweep names only the live ones."""
        async def scenario(store: MemoryStore) -> None:
            first, second = Replica(store, "server-a"), Replica(store, "server-b")
            first.start()
            second.start()
            await until(lambda: len(leaders([first, second])) == 1, 2, "a leader")
            await second.kill()
            await asyncio.sleep(TTL + 0.1)
            live: list[set[str]] = []

            async def forget(names: Any) -> None:
                live.append(set(names))

            await first.elector.sweep(forget)
            assert live == [{"server-a"}]
            await first.kill()
        run(scenario)


class TestLeasesApart:
    def test_a_blocked_event_loop_does_not_lose_the_lease(self, tmp_path: Any) -> None:
        """Kept on a thread of their own (as the server runs them), the leases are renewed
        while the server's event loop is blocked for three TTLs; the job runs on that loop,
        and stopping ends the thread."""
        url = f"sqlite:///{tmp_path / 'mgmt.db'}"

        async def scenario() -> tuple[list[bool], set[int], int, int]:
            main = await open_store(url)
            elector = leadership.Leadership(main, clock_module.SystemClock(),
                                            replica="server-a", ttl=TTL, namespace=NS)
            threads: set[int] = set()
            again: list[int] = []

            async def job() -> None:
                while True:
                    threads.add(threading.get_ident())
                    await asyncio.sleep(0.05)

            async def present_again() -> None:
                again.append(threading.get_ident())

            elector.on_present_again = present_again
            apart = asyncio.create_task(elector.run_apart(lambda: open_store(url)))
            jobs = asyncio.create_task(elector.while_leading(job))
            try:
                await until(elector.leading, 5, "the replica to lead")
                await until(lambda: bool(threads), 2, "the job to run")
                before = lease.Holding.of(
                    await main.get_resource(lease.KIND, NS, leadership.LEADER_LEASE))
                seen = []
                for _ in range(6):  # 3 TTLs in all, with the loop blocked
                    time.sleep(TTL / 2)  # noqa: ASYNC251 - blocking the loop is the point
                    seen.append(elector.leading())
                after = lease.Holding.of(
                    await main.get_resource(lease.KIND, NS, leadership.LEADER_LEASE))
                assert before.renewed is not None and after.renewed is not None
                assert after.renewed - before.renewed >= dt.timedelta(seconds=2 * TTL)
            finally:
                for task in (apart, jobs):
                    task.cancel()
                await asyncio.gather(apart, jobs, return_exceptions=True)
                await main.close()
            lease_threads = [t for t in threading.enumerate() if t.name.startswith("leases-")]
            return seen, threads, len(again) and again[0], len(lease_threads)

        seen, job_threads, present_thread, left = asyncio.run(scenario())
        assert seen == [True] * 6
        assert job_threads == {threading.get_ident()}  # the jobs ran on the server's loop
        assert present_thread == threading.get_ident()
        assert left == 0

    def test_the_leases_do_not_wait_for_a_blocked_loop_to_record_presence(
            self, tmp_path: Any) -> None:
        """The first presence asks the server's loop to record its connections; that loop is
        blocked from before the first lease for three TTLs, and the leases are renewed all
        the same; the record is made once the loop is free."""
        url = f"sqlite:///{tmp_path / 'mgmt.db'}"

        async def scenario() -> tuple[lease.Holding, list[int]]:
            main = await open_store(url)
            elector = leadership.Leadership(main, clock_module.SystemClock(),
                                            replica="server-a", ttl=TTL, namespace=NS)
            again: list[int] = []

            async def present_again() -> None:
                again.append(threading.get_ident())

            elector.on_present_again = present_again
            apart = asyncio.create_task(elector.run_apart(lambda: open_store(url)))
            try:
                await asyncio.sleep(0)  # the lease thread starts
                time.sleep(3 * TTL)  # noqa: ASYNC251 - blocking the loop is the point
                held = lease.Holding.of(
                    await main.get_resource(lease.KIND, NS, leadership.LEADER_LEASE))
                await until(lambda: bool(again), 2, "the presence to be recorded")
            finally:
                apart.cancel()
                await asyncio.gather(apart, return_exceptions=True)
                await main.close()
            return held, again

        held, again = asyncio.run(scenario())
        assert held.acquired is not None and held.renewed is not None
        assert held.renewed - held.acquired >= dt.timedelta(seconds=TTL)
        assert again == [threading.get_ident()]


    def test_a_store_that_cannot_be_opened_yet_is_tried_again(self, tmp_path: Any) -> None:
        """The leases' own connection fails twice (the database is restarting): the
        replica still comes to lead, once it opens."""
        url = f"sqlite:///{tmp_path / 'mgmt.db'}"

        async def scenario() -> int:
            main = await open_store(url)
            elector = leadership.Leadership(main, clock_module.SystemClock(),
                                            replica="server-a", ttl=TTL, namespace=NS)
            attempts = 0

            async def flaky() -> Any:
                nonlocal attempts
                attempts += 1
                if attempts <= 2:
                    raise errors.StoreUnavailable("connection refused")
                return await open_store(url)

            apart = asyncio.create_task(elector.run_apart(flaky))
            try:
                await until(elector.leading, 5, "the replica to lead")
            finally:
                apart.cancel()
                await asyncio.gather(apart, return_exceptions=True)
                await main.close()
            return attempts

        assert asyncio.run(scenario()) == 3


class TestReplicaNames:
    def test_default_is_a_dns_label(self) -> None:
        """The default name, from the host name and process id, can name a lease."""
        assert leadership.check_replica(leadership.default_replica())

    def test_bad_name(self) -> None:
        """An upper-case name is refused with what to give instead."""
        with pytest.raises(errors.ConfigError, match="such as server-0"):
            leadership.check_replica("Server-0")
