"""Leader election over any store, so only one replica runs the rotator.

A lease is a ``coordination.k8s.io/v1`` ``Lease`` resource: who holds it,
for how long, and when it was last renewed. Every change is a
compare-and-swap on the resource version, so two candidates can never both
win; a lease whose holder stopped renewing can be taken over once
``renewTime + leaseDurationSeconds`` has passed by the ``Clock`` given, which
tests replace with ``meshtrust.testing.FakeClock``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.store import base, manifest

KIND = "Lease"
API_VERSION = "coordination.k8s.io/v1"
_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class Holding:
    """The state of one lease as read from the store."""

    holder: str | None
    duration: dt.timedelta
    acquired: dt.datetime | None
    renewed: dt.datetime | None
    transitions: int

    def expired(self, now: dt.datetime) -> bool:
        return self.holder is None or self.renewed is None or now >= self.renewed + self.duration

    @classmethod
    def of(cls, lease: base.Resource) -> Holding:
        """Read a lease's spec; fields written badly by someone else read as expired."""
        spec = lease.spec
        holder = spec.get("holderIdentity") or None
        return cls(holder=holder if isinstance(holder, str) else None,
                   duration=dt.timedelta(seconds=_number(spec.get("leaseDurationSeconds"))),
                   acquired=manifest.read_time(spec.get("acquireTime")),
                   renewed=manifest.read_time(spec.get("renewTime")),
                   transitions=_number(spec.get("leaseTransitions")))


class Leases:
    """Acquire, renew and release named leases in one namespace of a store."""

    def __init__(self, store: base.Store, *, namespace: str,
                 clock: clock_module.Clock | None = None) -> None:
        self._store = store
        self._namespace = base.check_namespace(namespace)
        self._clock = clock or clock_module.SystemClock()

    async def acquire(self, name: str, holder: str, ttl: float | dt.timedelta) -> bool:
        """Take the lease for ``ttl``, or renew it if ``holder`` has it; False if another does."""
        duration = _duration(ttl)
        _check_holder(holder)
        for _ in range(_ATTEMPTS):
            now = self._clock.now()
            try:
                lease = await self._store.get_resource(KIND, self._namespace, name)
            except errors.NotFound:
                spec = _spec(holder, duration, acquired=now, renewed=now, transitions=0)
                try:
                    await self._store.create(base.Resource(
                        api_version=API_VERSION, kind=KIND, namespace=self._namespace,
                        name=name, spec=spec))
                    return True
                except errors.AlreadyExists:
                    continue
            held = Holding.of(lease)
            if held.holder != holder and not held.expired(now):
                return False
            ours = held.holder == holder and not held.expired(now)
            spec = _spec(holder, duration, acquired=held.acquired if ours else now, renewed=now,
                         transitions=held.transitions + (0 if held.holder == holder else 1))
            try:
                await self._store.update(dataclasses.replace(lease, spec=spec))
                return True
            except errors.Conflict:
                continue
        return False

    async def renew(self, name: str, holder: str) -> bool:
        """Extend the lease ``holder`` holds by its duration; False if it holds it no more."""
        return await self._edit_held(name, holder, lambda spec: dict(
            spec, renewTime=manifest.dump_time(self._clock.now())))

    async def release(self, name: str, holder: str) -> bool:
        """Give the lease up so another can take it at once; False if ``holder`` had it not."""
        return await self._edit_held(name, holder, lambda spec: {
            key: value for key, value in spec.items()
            if key not in ("holderIdentity", "renewTime")})

    async def _edit_held(self, name: str, holder: str,
                         edit: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
        """Change the spec of a lease ``holder`` holds, by compare-and-swap; False if not held."""
        _check_holder(holder)
        for _ in range(_ATTEMPTS):
            try:
                lease = await self._store.get_resource(KIND, self._namespace, name)
            except errors.NotFound:
                return False
            if Holding.of(lease).holder != holder:
                return False
            try:
                await self._store.update(dataclasses.replace(lease, spec=edit(lease.spec)))
                return True
            except errors.Conflict:
                continue
        return False

    async def holder(self, name: str) -> str | None:
        """Who holds the lease now; None if nobody does or the holding has expired."""
        try:
            lease = await self._store.get_resource(KIND, self._namespace, name)
        except errors.NotFound:
            return None
        held = Holding.of(lease)
        return None if held.expired(self._clock.now()) else held.holder


def _duration(ttl: float | dt.timedelta) -> dt.timedelta:
    seconds = ttl.total_seconds() if isinstance(ttl, dt.timedelta) else float(ttl)
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"a lease lasts a whole number of seconds, at least 1; got {ttl!r}")
    return dt.timedelta(seconds=int(seconds))


def _check_holder(holder: str) -> None:
    if not isinstance(holder, str) or not holder:
        raise ValueError("a lease holder is a non-empty string, such as the pod name")


def _spec(holder: str, duration: dt.timedelta, *, acquired: dt.datetime | None,
          renewed: dt.datetime, transitions: int) -> dict[str, Any]:
    return {
        "holderIdentity": holder,
        "leaseDurationSeconds": int(duration.total_seconds()),
        "acquireTime": manifest.dump_time(acquired or renewed),
        "renewTime": manifest.dump_time(renewed),
        "leaseTransitions": transitions,
    }




def _number(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
