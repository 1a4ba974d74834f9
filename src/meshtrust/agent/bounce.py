"""Restarting the pods that need a new Istio CA, in an order that keeps the mesh up.

istiod signs with a new intermediate CA only after it restarts, and a sidecar
trusts the new root only once it restarts too. When ``cacerts`` changes and
the trust policy sets ``autoRestartPods``, the agent's ``Bouncer`` restarts
(gloo-mesh calls this a PodBounceDirective):

1. istiod, one replica at a time, waiting for each to be ready;
2. the gateways, once the ``istio-ca-root-cert`` ConfigMap of each of their
   namespaces holds the new root (the "root-cert sync");
3. the workloads, after the same sync in their namespaces.

istiod is what publishes that ConfigMap, so its own step waits for no sync.
Restarts are rate-limited, and a dry run returns the plan and restarts
nothing. With ``autoRestartPods: false`` the agent only reports
``pods_needing_restart``. Pods are reached through the small ``Pods`` port:
``agent.simulation`` implements it over a store; a Kubernetes adapter comes later.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import datetime as dt
import enum
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.pki import bundle
from meshtrust.store import base

ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"

# Labels that put a pod in the mesh (an injected sidecar); istiod and gateways are told apart first.
_MESH_LABELS = {"security.istio.io/tlsMode": "istio", "sidecar.istio.io/inject": "true"}
_MESH_LABEL_KEYS = ("istio.io/rev", "service.istio.io/canonical-name")


class Role(enum.Enum):
    """What a pod is to the mesh; the bounce restarts roles in ``ORDER``."""

    ISTIOD = "istiod"
    GATEWAY = "gateway"
    WORKLOAD = "workload"


ORDER = (Role.ISTIOD, Role.GATEWAY, Role.WORKLOAD)


def role_of(labels: Mapping[str, str]) -> Role | None:
    """The role a pod's labels give it, or None for a pod outside the mesh."""
    if labels.get("app") == "istiod":
        return Role.ISTIOD
    if labels.get("istio", "").endswith("gateway"):
        return Role.GATEWAY
    if labels.get("sidecar.istio.io/inject") == "false":
        return None
    if (any(labels.get(key) == value for key, value in _MESH_LABELS.items())
            or any(key in labels for key in _MESH_LABEL_KEYS)):
        return Role.WORKLOAD
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pod:
    """A pod in the mesh; ``restarted_at`` is when it last started (None if unknown)."""

    namespace: str
    name: str
    role: Role
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    restarted_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        base.check_namespace(self.namespace)
        base.check_name(self.name)
        if not isinstance(self.role, Role):
            raise TypeError(f"Pod.role must be a Role, got {self.role!r}")
        object.__setattr__(self, "labels", dict(self.labels))
        if self.restarted_at is not None:
            object.__setattr__(self, "restarted_at",
                               clock_module.require_utc(self.restarted_at, "restarted_at"))

    @property
    def key(self) -> str:
        """``namespace/name``, as results and messages name the pod."""
        return f"{self.namespace}/{self.name}"


class Pods(Protocol):
    """The pods of one cluster, and the root istiod publishes in each namespace."""

    async def list(self) -> builtins.list[Pod]:
        """Every pod in the mesh (pods outside it are left out)."""
        ...

    async def restart(self, pod: Pod) -> None:
        """Restart ``pod``; it is not ready until it has started again."""
        ...

    async def ready(self, pod: Pod) -> bool:
        """Whether ``pod`` runs and is ready."""
        ...

    async def root_cert(self, namespace: str) -> bytes | None:
        """``root-cert.pem`` of the ``istio-ca-root-cert`` ConfigMap (None if absent)."""
        ...


def pods_needing_restart(pods: Iterable[Pod], *,
                         since: dt.datetime | None = None) -> list[Pod]:
    """The pods to restart, in bounce order: those that have not started since ``since``.

    ``since`` is when the new CA was written: a pod started at or after it runs
    with it already. Without ``since``, or for a pod with no known start, every
    pod counts. Within a role the order is by namespace, then name.
    """
    if since is not None:
        since = clock_module.require_utc(since, "since")
    rank = {role: index for index, role in enumerate(ORDER)}
    chosen = [pod for pod in pods
              if since is None or pod.restarted_at is None or pod.restarted_at < since]
    return sorted(chosen, key=lambda pod: (rank[pod.role], pod.namespace, pod.name))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BounceSettings:
    """How fast to restart and how long to wait.

    ``rate`` is the most pods restarted per second; ``timeout`` bounds each
    wait (one pod's readiness, or one namespace's root-cert sync), in
    seconds; ``poll`` is how often a wait looks again.
    """

    rate: float = 2.0
    timeout: float = 300.0
    poll: float = 1.0

    def __post_init__(self) -> None:
        for field in ("rate", "timeout", "poll"):
            value = getattr(self, field)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise errors.ConfigError(
                    f"pod restarts: {field} must be a positive number of "
                    f"{'pods per second' if field == 'rate' else 'seconds'}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    """One step of a bounce, for progress reports: ``planned``, ``restarted``,
    ``ready`` (a pod, ``namespace/name``) or ``synced`` (a namespace)."""

    role: Role
    action: str
    target: str

    def __str__(self) -> str:
        return f"{self.role.value}: {self.action} {self.target}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wait:
    """How long the bounce waited for ``what`` (``ready`` or ``root-cert sync``) of ``target``."""

    what: str
    target: str
    seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class BounceResult:
    """What a bounce did: pods as ``namespace/name``, ``bounced`` in restart order.

    ``planned`` is the order a bounce follows (all a dry run returns);
    ``skipped`` are the pods that had started since the CA changed.
    """

    bounced: tuple[str, ...] = ()
    planned: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    dry_run: bool = False
    waits: tuple[Wait, ...] = ()


class BounceTimeout(errors.MeshTrustError):
    """A wait ran out of time; ``bounced`` lists the pods restarted before it."""

    def __init__(self, message: str, *, waited_for: str, bounced: tuple[str, ...]) -> None:
        super().__init__(message)
        self.waited_for = waited_for
        self.bounced = bounced


Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """At most ``rate`` acquisitions per second, evenly spaced on a monotonic clock."""

    def __init__(self, rate: float, *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"rate must be a positive number per second, got {rate!r}")
        self._interval = 1.0 / rate
        self._monotonic = monotonic
        self._sleep = sleep
        self._next: float | None = None

    async def acquire(self) -> None:
        """Take the next free slot and return when it comes; slots are 1/rate apart."""
        now = self._monotonic()
        slot = now if self._next is None else max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await self._sleep(slot - now)


def _fingerprints(pem: bytes, what: str) -> frozenset[str]:
    return frozenset(bundle.fingerprint(c) for c in bundle.load_certificates(pem, what))


def _short(fingerprints: Iterable[str]) -> str:
    return ", ".join(sorted(f"{fp[:11]}…" for fp in fingerprints))


class Bouncer:
    """Restarts a cluster's mesh pods for a new root: istiod, gateways, workloads.

    ``monotonic`` and ``sleep`` drive the rate limit and the waits; tests
    replace them to run without real time passing.
    """

    def __init__(self, pods: Pods, settings: BounceSettings | None = None, *,
                 progress: Callable[[Event], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self._pods = pods
        self._settings = settings or BounceSettings()
        self._progress = progress
        self._monotonic = monotonic
        self._sleep = sleep

    async def bounce(self, new_root: bytes, *, dry_run: bool = False,
                     since: dt.datetime | None = None) -> BounceResult:
        """Restart the pods that have not started since ``since`` (all if None).

        ``new_root`` is the ``root-cert.pem`` of the new ``cacerts``. Raise
        ``BounceTimeout`` when a wait runs out and ``errors.ChainError`` if
        ``new_root`` holds no certificate.
        """
        expected = _fingerprints(new_root, "the new root-cert.pem")
        pods = await self._pods.list()
        plan = pods_needing_restart(pods, since=since)
        planned = tuple(pod.key for pod in plan)
        skipped = tuple(sorted({pod.key for pod in pods} - set(planned)))
        if dry_run:
            for pod in plan:
                self._emit(pod.role, "planned", pod.key)
            return BounceResult(planned=planned, skipped=skipped, dry_run=True)
        limiter = RateLimiter(self._settings.rate, monotonic=self._monotonic, sleep=self._sleep)
        bounced: list[str] = []
        waits: list[Wait] = []
        for role in ORDER:
            step = [pod for pod in plan if pod.role is role]
            if role is not Role.ISTIOD:
                for namespace in sorted({pod.namespace for pod in step}):
                    waits.append(await self._wait_synced(role, namespace, expected, bounced))
            for pod in step:
                await limiter.acquire()
                await self._pods.restart(pod)
                bounced.append(pod.key)
                self._emit(role, "restarted", pod.key)
                if role is Role.ISTIOD:
                    waits.append(await self._wait_ready(pod, bounced))
        return BounceResult(bounced=tuple(bounced), planned=planned, skipped=skipped,
                            waits=tuple(waits))

    async def _wait_ready(self, pod: Pod, bounced: builtins.list[str]) -> Wait:
        async def missing() -> str | None:
            return None if await self._pods.ready(pod) else "not ready"

        wait = await self._wait("ready", pod.key, missing, bounced, advice=(
            f"check its events and logs (kubectl -n {pod.namespace} describe pod {pod.name})"))
        self._emit(pod.role, "ready", pod.key)
        return wait

    async def _wait_synced(self, role: Role, namespace: str, expected: frozenset[str],
                           bounced: builtins.list[str]) -> Wait:
        async def missing() -> str | None:
            pem = await self._pods.root_cert(namespace)
            if pem is None:
                return f"the ConfigMap {ROOT_CERT_CONFIGMAP} or its {ROOT_CERT_KEY} is missing"
            try:
                found = _fingerprints(pem, f"{ROOT_CERT_CONFIGMAP} in {namespace}")
            except errors.ChainError:
                return f"{ROOT_CERT_CONFIGMAP} holds no readable certificate"
            if found == expected:
                return None
            return (f"{ROOT_CERT_CONFIGMAP} holds root(s) {_short(found)} "
                    f"instead of {_short(expected)}")

        wait = await self._wait("root-cert sync", namespace, missing, bounced, advice=(
            "check that istiod runs with the new cacerts and can write ConfigMaps "
            f"in namespace {namespace}"))
        self._emit(role, "synced", namespace)
        return wait

    async def _wait(self, what: str, target: str, missing: Callable[[], Awaitable[str | None]],
                    bounced: builtins.list[str], *, advice: str) -> Wait:
        timeout = self._settings.timeout
        start = self._monotonic()
        while True:
            reason = await missing()
            waited = self._monotonic() - start
            if reason is None:
                return Wait(what=what, target=target, seconds=waited)
            if waited >= timeout:
                done = ", ".join(bounced) or "none"
                raise BounceTimeout(
                    f"gave up waiting {timeout:g} s for {what} of {target}: {reason}; {advice}. "
                    f"Pods restarted so far: {done}; bounce again once fixed",
                    waited_for=f"{what} of {target}", bounced=tuple(bounced))
            await self._sleep(min(self._settings.poll, timeout - waited))

    def _emit(self, role: Role, action: str, target: str) -> None:
        if self._progress is not None:
            self._progress(Event(role=role, action=action, target=target))
