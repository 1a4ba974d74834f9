"""Pods and istiod simulated in a store, for the local demo and the tests.

The ``Bouncer`` reaches pods through the ``bounce.Pods`` port. ``StorePods``
implements it over a cluster's store: a pod is a ``v1/Pod`` resource whose
labels are the pod's labels and whose status holds ``phase``, ``ready``,
``startedAt`` and ``restartedAt``; the root istiod publishes is a
``v1/ConfigMap`` resource whose spec holds ``data``. ``SimulatedIstio`` plays
the cluster's part: restarted pods become ready after a delay, and an istiod
that started after ``cacerts`` was written copies its ``root-cert.pem`` into
every namespace that has pods. ``seed`` creates a small mesh to run it on.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import datetime as dt
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.agent import bounce
from meshtrust.store import base

log = logging.getLogger(__name__)

POD_KIND = "Pod"
CONFIGMAP_KIND = "ConfigMap"
CORE_API_VERSION = "v1"

_RETRIES = 5
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the one Kubernetes uses for pod names
_BOOKINFO = (("productpage", "v1"), ("details", "v1"), ("reviews", "v1"), ("reviews", "v2"),
             ("reviews", "v3"), ("ratings", "v1"))


def _stamp(when: dt.datetime) -> str:
    return when.isoformat()


def _parse(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def last_start(status: Mapping[str, Any]) -> dt.datetime | None:
    """When a simulated pod last started or was restarted, whichever is later."""
    times = [t for t in (_parse(status.get("startedAt")), _parse(status.get("restartedAt")))
             if t is not None]
    return max(times, default=None)


async def _patch_status(store: base.Store, namespace: str, name: str,
                        changes: Mapping[str, Any]) -> base.Resource:
    """Merge ``changes`` into a pod's status, reading again if another writer won."""
    for _ in range(_RETRIES):
        current = await store.get_resource(POD_KIND, namespace, name)
        try:
            return await store.update_status(
                dataclasses.replace(current, status={**current.status, **changes}))
        except errors.Conflict:
            continue
    raise errors.Conflict(f"pod {namespace}/{name} changed {_RETRIES} times while its status "
                          "was written; try again")


class StorePods:
    """The ``bounce.Pods`` port over simulated pods in a store (all namespaces if None)."""

    def __init__(self, store: base.Store, *, clock: clock_module.Clock | None = None,
                 namespace: str | None = None) -> None:
        self._store = store
        self._clock = clock or clock_module.SystemClock()
        self._namespace = namespace

    async def list(self) -> builtins.list[bounce.Pod]:
        pods = []
        for resource in await self._store.list_resources(POD_KIND, namespace=self._namespace):
            role = bounce.role_of(resource.labels)
            if role is not None:
                pods.append(bounce.Pod(namespace=resource.namespace, name=resource.name,
                                       role=role, labels=resource.labels,
                                       restarted_at=last_start(resource.status)))
        return pods

    async def restart(self, pod: bounce.Pod) -> None:
        await _patch_status(self._store, pod.namespace, pod.name, {
            "phase": "Pending", "ready": False, "restartedAt": _stamp(self._clock.now())})

    async def ready(self, pod: bounce.Pod) -> bool:
        try:
            resource = await self._store.get_resource(POD_KIND, pod.namespace, pod.name)
        except errors.NotFound:
            return False
        return resource.status.get("ready") is True

    async def root_cert(self, namespace: str) -> bytes | None:
        try:
            configmap = await self._store.get_resource(CONFIGMAP_KIND, namespace,
                                                       bounce.ROOT_CERT_CONFIGMAP)
        except errors.NotFound:
            return None
        data = configmap.spec.get("data")
        value = data.get(bounce.ROOT_CERT_KEY) if isinstance(data, dict) else None
        return value.encode() if isinstance(value, str) else None


class SimulatedIstio:
    """istiod and the kubelet, as far as a bounce sees them, acting on a store.

    A restarted pod becomes ready ``ready_after`` seconds after its restart.
    A ready istiod that started after ``cacerts`` was last written serves its
    root, and ``sync_delay`` seconds after it started copies ``root-cert.pem``
    into the ``istio-ca-root-cert`` ConfigMap of every namespace with pods.
    """

    def __init__(self, store: base.Store, *, clock: clock_module.Clock | None = None,
                 ready_after: float = 2.0, sync_delay: float = 0.0,
                 names: settings.SecretNames | None = None) -> None:
        if ready_after < 0 or sync_delay < 0:
            raise ValueError("ready_after and sync_delay must not be negative")
        self._store = store
        self._clock = clock or clock_module.SystemClock()
        self._ready_after = dt.timedelta(seconds=ready_after)
        self._sync_delay = dt.timedelta(seconds=sync_delay)
        self._names = names or settings.SecretNames()

    async def step(self) -> None:
        """Make due pods ready, then let istiod publish its root."""
        now = self._clock.now()
        for resource in await self._store.list_resources(POD_KIND):
            restarted = _parse(resource.status.get("restartedAt"))
            if (resource.status.get("ready") is not True and restarted is not None
                    and now - restarted >= self._ready_after):
                await _patch_status(self._store, resource.namespace, resource.name,
                                    {"phase": "Running", "ready": True, "startedAt": _stamp(now)})
        await self._publish(now)

    async def run(self, interval: float) -> None:
        """Call ``step`` every ``interval`` seconds until cancelled."""
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("the simulated istiod failed a step; trying again")
            await asyncio.sleep(interval)

    async def _publish(self, now: dt.datetime) -> None:
        try:
            cacerts = await self._store.get_secret(self._names.istio_namespace,
                                                   self._names.istio_ca)
        except errors.NotFound:
            return
        root = cacerts.data.get(bounce.ROOT_CERT_KEY)
        written = cacerts.updated or cacerts.created
        if root is None or written is None:
            return
        pods = await self._store.list_resources(POD_KIND)
        serving = [started for r in pods
                   if bounce.role_of(r.labels) is bounce.Role.ISTIOD
                   and r.status.get("ready") is True
                   and (started := _parse(r.status.get("startedAt"))) is not None
                   and started >= written]
        if not serving or now < min(serving) + self._sync_delay:
            return
        for namespace in sorted({r.namespace for r in pods}):
            await self._write_root(namespace, root.decode("ascii"))

    async def _write_root(self, namespace: str, pem: str) -> None:
        data = {bounce.ROOT_CERT_KEY: pem}
        try:
            current = await self._store.get_resource(CONFIGMAP_KIND, namespace,
                                                     bounce.ROOT_CERT_CONFIGMAP)
        except errors.NotFound:
            try:
                await self._store.create(base.Resource(
                    api_version=CORE_API_VERSION, kind=CONFIGMAP_KIND, namespace=namespace,
                    name=bounce.ROOT_CERT_CONFIGMAP, labels={"istio.io/config": "true"},
                    spec={"data": data}))
            except errors.AlreadyExists:
                pass  # another writer made it; the next step compares again
            return
        if current.spec.get("data") != data:
            try:
                await self._store.update(dataclasses.replace(current, spec={"data": data}))
            except errors.Conflict:
                pass  # changed meanwhile; the next step compares again


def _suffix(length: int, *parts: object) -> str:
    number = int.from_bytes(hashlib.sha256(repr(parts).encode()).digest(), "big")
    chars = []
    for _ in range(length):
        number, index = divmod(number, len(_SUFFIX_ALPHABET))
        chars.append(_SUFFIX_ALPHABET[index])
    return "".join(chars)


def _pod(namespace: str, deployment: str, replica: int, labels: Mapping[str, str],
         now: dt.datetime) -> base.Resource:
    name = f"{deployment}-{_suffix(10, namespace, deployment)}-{_suffix(5, deployment, replica)}"
    return base.Resource(api_version=CORE_API_VERSION, kind=POD_KIND, namespace=namespace,
                         name=name, labels=labels,
                         status={"phase": "Running", "ready": True, "startedAt": _stamp(now)})


async def seed(store: base.Store, *, namespaces: Sequence[str] = ("bookinfo",),
               workloads_per_namespace: int = 4, clock: clock_module.Clock | None = None,
               istio_namespace: str = settings.ISTIO_NAMESPACE,
               gateway_namespace: str = "istio-gateways") -> list[base.Resource]:
    """Create a running mesh: istiod, an ingress and an east-west gateway, and workloads.

    The workloads are bookinfo's deployments, repeated as replicas when more
    are asked for. Return the pods as stored.
    """
    if isinstance(namespaces, str):
        raise TypeError("namespaces must be a sequence of names, not a string")
    if workloads_per_namespace < 0:
        raise ValueError("workloads_per_namespace must not be negative")
    now = (clock or clock_module.SystemClock()).now()
    pods = [
        _pod(istio_namespace, "istiod", 0,
             {"app": "istiod", "istio": "pilot", "istio.io/rev": "default"}, now),
        _pod(gateway_namespace, "istio-ingressgateway", 0,
             {"app": "istio-ingressgateway", "istio": "ingressgateway"}, now),
        _pod(gateway_namespace, "istio-eastwestgateway", 0,
             {"app": "istio-eastwestgateway", "istio": "eastwestgateway",
              "topology.istio.io/network": "network1"}, now),
    ]
    for namespace in namespaces:
        for index in range(workloads_per_namespace):
            app, version = _BOOKINFO[index % len(_BOOKINFO)]
            pods.append(_pod(namespace, f"{app}-{version}", index // len(_BOOKINFO), {
                "app": app, "version": version, "security.istio.io/tlsMode": "istio",
                "service.istio.io/canonical-name": app,
                "service.istio.io/canonical-revision": version}, now))
    return [await store.create(pod) for pod in pods]
