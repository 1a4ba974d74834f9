"""Leadership among server replicas: every replica serves, one runs the timed loops.

Several ``meshtrust server`` replicas can share one store (PostgreSQL). Each
of them serves bootstrap, renewal, status reports and work streams: those
answer a request from the store, and every write they make is a
compare-and-swap. The loops that write on a timer — trust-policy reconcile,
root rotations, relay CA renewal, audit pruning, the sweep of connections
left by dead replicas — run only on the replica that holds the leader lease
``meshtrust-server-leader`` (``store.lease``), so they do not run twice.

The leader renews its lease every third of the TTL. If it cannot for two
thirds of the TTL it steps down by itself, before anyone else may take the
lease over. Others retry every third of the TTL, and right at the moment
the lease they saw expires, so a leader killed with SIGKILL is replaced
within the TTL; a leader that stops cleanly releases the lease, and the
next one takes it at once.

Each replica also holds a presence lease ``meshtrust-server.<replica>``: the
leader drops the connection records of replicas whose presence expired,
and deletes such leases.

A replica that thousands of agents keep busy answers everything late, and a
renewal that waits its turn behind their calls can miss the lease: the
replica would stop reconciling just when a rotation storm needs it. So the
server keeps its leases on a thread, an event loop and a store connection of
their own (``run_apart``); the jobs still run on the server's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, NoReturn

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.store import base, follow, lease

log = logging.getLogger(__name__)

LEADER_LEASE = "meshtrust-server-leader"
PRESENCE_PREFIX = "meshtrust-server."
DEFAULT_TTL = 10
_SWEEP_EVERY = 60.0  # seconds between two sweeps of dead replicas' records, at most
_INVALID = re.compile(r"[^a-z0-9-]+")

Job = Callable[[], Coroutine[Any, Any, None]]


def default_replica() -> str:
    """This process's replica name: the host name and process id, as a DNS label."""
    name = _INVALID.sub("-", socket.gethostname().lower()).strip("-")[:40] or "server"
    return f"{name}-{os.getpid()}"


def check_replica(name: str) -> str:
    """Return ``name`` if it can name a replica (a DNS label); raise ConfigError otherwise."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise errors.ConfigError(f"replica: {name!r} is not a DNS label (lower-case letters, "
                                 "digits and '-', at most 63), such as server-0")
    return name


@dataclasses.dataclass(frozen=True, kw_only=True)
class Replica:
    """A replica's presence lease as read from the store."""

    name: str
    lease: base.Resource
    live: bool


class Leadership:
    """Seeks, holds and gives up the leader lease for one replica; tracks presence."""

    def __init__(self, store: base.Store, clock: clock_module.Clock, *, replica: str,
                 ttl: int = DEFAULT_TTL, namespace: str) -> None:
        self.replica = check_replica(replica)
        self.ttl = ttl
        self._store = store
        self._clock = clock
        self._namespace = namespace
        self._leases = lease.Leases(store, namespace=namespace, clock=clock)
        # Whether this replica holds the lease, as the renewals see it; the two events say
        # the same on the loop the jobs run on (``_home``), which may be another thread's.
        self._holding = False
        self._leading = asyncio.Event()
        self._following = asyncio.Event()
        self._following.set()
        self._home: asyncio.AbstractEventLoop | None = None
        self._poke = asyncio.Event()
        self._deadline = 0.0  # monotonic time until which the leadership is surely ours
        self._present_until = 0.0
        # on_present_again running on the jobs' loop, when that is another thread's.
        self._announcing: concurrent.futures.Future[None] | None = None
        self.on_change: Callable[[bool], None] = lambda _leading: None
        self.on_present_again: Job | None = None

    @property
    def presence_lease(self) -> str:
        return PRESENCE_PREFIX + self.replica

    def leading(self) -> bool:
        """True while this replica surely holds the lease (checked before each round)."""
        return self._holding and time.monotonic() < self._deadline

    async def run_apart(self, open_store: Callable[[], Awaitable[base.Store]]) -> NoReturn:
        """``run`` on a thread and an event loop of its own, with the store ``open_store``
        opens there; cancel this task to stop it. ``while_leading`` stays on this loop."""
        home = asyncio.get_running_loop()

        async def renewing() -> None:
            while True:
                try:
                    store = await open_store()
                    break
                except errors.MeshTrustError as exc:  # the store is down: try again
                    log.warning("leases: cannot open the store: %s; retrying in %.1f s", exc,
                                self.ttl / 3)
                    await asyncio.sleep(self.ttl / 3)
            try:
                await self.run(store, home=home)
            finally:
                await store.close()

        await _in_own_thread(renewing, name=f"leases-{self.replica}")
        raise AssertionError("unreachable")  # run returns only by an exception

    async def run(self, store: base.Store | None = None, *,
                  home: asyncio.AbstractEventLoop | None = None) -> NoReturn:
        """Renew or seek the leader lease and the presence lease, forever.

        ``store``: where to keep the leases, by default the store given at
        construction (the same data, through another connection); ``home``: the
        event loop the jobs run on, when this runs on another one.
        """
        self._home = home
        store = store or self._store
        leases = self._leases if store is self._store else lease.Leases(
            store, namespace=self._namespace, clock=self._clock)
        interval = self.ttl / 3
        watcher = asyncio.create_task(self._watch_releases(store))
        try:
            while True:
                started = time.monotonic()
                held: bool | None
                try:
                    async with asyncio.timeout(interval):
                        held = await leases.acquire(LEADER_LEASE, self.replica, self.ttl)
                except TimeoutError:
                    log.warning("leader election: the store did not answer in %.1f s", interval)
                    held = None
                except errors.MeshTrustError as exc:
                    log.warning("leader election: %s", exc)
                    held = None
                except Exception:  # noqa: BLE001 - keep electing; log and go on
                    log.exception("leader election failed")
                    held = None
                if held:
                    # The lease runs from before the call, by the store's writer's clock;
                    # give it up two thirds in, before another replica may take it.
                    self._deadline = started + self.ttl - interval
                    self._set(True)
                elif held is False or time.monotonic() >= self._deadline:
                    self._set(False)
                # After the leader lease, whose renewal must not wait for this one.
                await self._presence(started, leases)
                await self._pause(interval, started, store)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def while_leading(self, *jobs: Job) -> NoReturn:
        """Run ``jobs`` while this replica leads; cancel them when it stops leading."""
        while True:
            await self._leading.wait()
            tasks: list[asyncio.Task[None]] = [asyncio.create_task(job()) for job in jobs]
            try:
                await self._following.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def release(self) -> None:
        """Give the leases up, so another replica leads at once (on a clean stop)."""
        self._set(False)
        for name in (LEADER_LEASE, self.presence_lease):
            with contextlib.suppress(errors.MeshTrustError):
                await self._leases.release(name, self.replica)

    async def replicas(self) -> list[Replica]:
        """Every replica's presence lease, live or expired."""
        now = self._clock.now()
        return [Replica(name=item.name[len(PRESENCE_PREFIX):], lease=item,
                        live=not lease.Holding.of(item).expired(now))
                for item in await self._store.list_resources(lease.KIND,
                                                             namespace=self._namespace)
                if item.name.startswith(PRESENCE_PREFIX)]

    async def sweep(self, forget: Callable[[Collection[str]], Awaitable[object]]) -> None:
        """Call ``forget`` with the live replicas, then delete long-expired presence leases."""
        found = await self.replicas()
        await forget({r.name for r in found if r.live} | {self.replica})
        now = self._clock.now()
        for dead in found:
            held = lease.Holding.of(dead.lease)
            if not dead.live and (held.renewed is None
                                  or now - held.renewed > dt.timedelta(seconds=10 * self.ttl)):
                with contextlib.suppress(errors.NotFound, errors.Conflict):
                    await self._store.delete(lease.KIND, self._namespace, dead.lease.name,
                                             resource_version=dead.lease.resource_version)

    async def sweeping(self, forget: Callable[[Collection[str]], Awaitable[object]]) -> None:
        """The leader's loop: sweep when a replica's presence expires, and every minute."""
        known: frozenset[str] | None = None
        last = 0.0
        while True:
            try:
                live = frozenset(r.name for r in await self.replicas() if r.live)
                if live != known or time.monotonic() - last >= _SWEEP_EVERY:
                    await self.sweep(forget)
                    known, last = live, time.monotonic()
            except Exception:  # noqa: BLE001 - keep sweeping; log and go on
                log.exception("sweeping the records of stopped replicas failed; retrying")
            await asyncio.sleep(self.ttl / 3)

    # -- inside ---------------------------------------------------------------------------

    def _set(self, leading: bool) -> None:
        if leading == self._holding:
            return
        self._holding = leading
        if leading:
            log.info("replica %s is now the leader (lease %s, ttl %d s)", self.replica,
                     LEADER_LEASE, self.ttl)
        else:
            log.info("replica %s is no longer the leader", self.replica)
        home = self._home
        if home is not None and home is not _running_loop():
            home.call_soon_threadsafe(self._switch, leading)
        else:
            self._switch(leading)

    def _switch(self, leading: bool) -> None:
        """Start or stop the jobs (on the loop they run on)."""
        if leading != self._holding or leading == self._leading.is_set():
            return  # changed again meanwhile, or already so
        if leading:
            self._following.clear()
            self._leading.set()
        else:
            self._leading.clear()
            self._following.set()
        self.on_change(leading)

    async def _presence(self, started: float, leases: lease.Leases) -> None:
        """Renew the presence lease; after a gap, say again what this replica holds."""
        try:
            async with asyncio.timeout(self.ttl / 3):
                held = await leases.acquire(self.presence_lease, self.replica, self.ttl)
        except TimeoutError:
            log.warning("presence lease: the store did not answer in %.1f s", self.ttl / 3)
            return
        except errors.MeshTrustError as exc:
            log.warning("presence lease: %s", exc)
            return
        except Exception:  # noqa: BLE001 - keep renewing; log and go on
            log.exception("renewing the presence lease failed")
            return
        if not held:
            log.error("presence lease %s is held by another process: is replica name %s "
                      "used twice?", self.presence_lease, self.replica)
            return
        failed = self._announce_failed()
        gap = started >= self._present_until or failed
        self._present_until = started + self.ttl
        if gap and self.on_present_again is not None:
            await self._announce(self.on_present_again)

    async def _announce(self, job: Job) -> None:
        """Run ``job`` on the loop the jobs run on; if that is another thread's, do not wait
        for it: the leases are renewed on time even while that loop is blocked. A failure
        is tried again at the next renewal (``_announce_failed``)."""
        home = self._home
        if home is None or home is _running_loop():
            try:
                await job()
            except Exception:  # noqa: BLE001 - try again on the next renewal
                log.exception("cannot record this replica's connections again; retrying")
                self._present_until = 0.0
        elif self._announcing is None or self._announcing.done():
            self._announcing = asyncio.run_coroutine_threadsafe(job(), home)

    def _announce_failed(self) -> bool:
        """True, once, if ``on_present_again`` ran on the jobs' loop and failed."""
        done = self._announcing
        if done is None or not done.done():
            return False
        self._announcing = None
        failure = None if done.cancelled() else done.exception()
        if failure is not None:
            log.error("cannot record this replica's connections again; retrying",
                      exc_info=failure)
        return failure is not None

    async def _pause(self, interval: float, started: float, store: base.Store) -> None:
        """Sleep a third of the TTL, or less: until the lease seen expires, or is released."""
        wait = interval - (time.monotonic() - started)
        if not self._holding:
            try:
                current = await store.get_resource(lease.KIND, self._namespace, LEADER_LEASE)
                held = lease.Holding.of(current)
                if held.renewed is not None:
                    expires = held.renewed + held.duration - self._clock.now()
                    wait = min(wait, expires.total_seconds() + 0.01)
            except (errors.MeshTrustError, ValueError):
                pass
        self._poke.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(wait, 0.01)):
                await self._poke.wait()

    async def _watch_releases(self, store: base.Store) -> NoReturn:
        """Wake the election at once when the leader lease is released or deleted."""
        async def changed(event: base.WatchEvent) -> None:
            if event.object.name != LEADER_LEASE or self._holding:
                return
            spec = event.object.spec if isinstance(event.object, base.Resource) else {}
            if event.type is base.EventType.DELETED or not spec.get("holderIdentity"):
                self._poke.set()

        await follow.follow(store, lease.KIND, changed, namespace=self._namespace)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _in_own_thread(make: Callable[[], Coroutine[Any, Any, None]], *, name: str) -> None:
    """Run ``make()`` on a new event loop in a new thread until it ends, and raise what it
    raised; cancelling the calling task cancels it there and waits for the thread."""
    home = asyncio.get_running_loop()
    finished: asyncio.Future[BaseException | None] = home.create_future()
    loop = asyncio.new_event_loop()

    def settle(outcome: BaseException | None) -> None:
        if not finished.done():
            finished.set_result(outcome)

    def body() -> None:
        outcome: BaseException | None = None
        try:
            loop.run_until_complete(make())
        except BaseException as exc:  # noqa: BLE001 - handed to the calling task
            outcome = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            with contextlib.suppress(RuntimeError):  # the calling loop is gone already
                home.call_soon_threadsafe(settle, outcome)

    def cancel_all() -> None:
        for task in asyncio.all_tasks(loop):
            task.cancel()

    threading.Thread(target=body, name=name, daemon=True).start()
    try:
        outcome = await asyncio.shield(finished)
    except asyncio.CancelledError:
        with contextlib.suppress(RuntimeError):  # its loop is closed: it ended already
            loop.call_soon_threadsafe(cancel_all)
        await asyncio.wait({finished}, timeout=30)
        raise
    if outcome is not None:
        raise outcome
