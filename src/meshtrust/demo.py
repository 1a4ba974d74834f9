"""The local fleet demo: a server and one agent per cluster, as real processes.

Everything runs on 127.0.0.1 with one SQLite store per cluster in a work
directory (``mgmt.db``, ``cluster-1.db``, …), so each store can be inspected
afterwards with ``meshtrust store … --store sqlite:///DIR/cluster-1.db``.
Client certificates get lifetimes of seconds, so rotation happens while you
watch. ``Fleet.observe`` reads the stores — exactly what an operator would
see — to report each cluster's state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust import federation
from meshtrust.agent import watcher
from meshtrust.authority import enrollment, istio, registry, root_rotation, trust_policy
from meshtrust.pki import bundle, rotation, verify
from meshtrust.store import base, opened_store

DEMO_POLICY = "mesh"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    clusters: int = 3
    workdir: Path
    client_lifetime: int = 20  # seconds
    grace_ratio: float = 0.5
    heartbeat: float = 2.0
    istio_lifetime: int = 120  # seconds, of each cluster's Istio intermediate
    rotate_root: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.clusters <= 50:
            raise errors.ConfigError("--clusters must be between 1 and 50")
        if self.client_lifetime < 4:
            raise errors.ConfigError("the client lifetime must be at least 4 seconds")

    @property
    def names(self) -> list[str]:
        return [f"cluster-{i}" for i in range(1, self.clusters + 1)]

    def store(self, name: str) -> str:
        return f"sqlite:///{(self.workdir / f'{name}.db').resolve()}"


@dataclasses.dataclass(kw_only=True)
class ClusterView:
    """What the stores say about one cluster, plus what the demo saw over time."""

    name: str
    connected: bool = False
    ever_connected: bool = False
    serial: str | None = None
    not_after: dt.datetime | None = None
    renew_at: dt.datetime | None = None
    verified: bool = False
    serials: set[str] = dataclasses.field(default_factory=set)
    istio_state: str = "-"
    istio_serial: str | None = None
    istio_serials: set[str] = dataclasses.field(default_factory=set)
    pods_bounced: int = 0
    handshakes: int = 0
    handshake_failures: int = 0
    last_handshake: str = "-"

    @property
    def bootstrapped(self) -> bool:
        return bool(self.serials)

    @property
    def rotations(self) -> int:
        return max(len(self.serials) - 1, 0)

    @property
    def relay_ok(self) -> bool:
        return self.bootstrapped and self.ever_connected and self.rotations >= 1 and self.verified

    @property
    def ok(self) -> bool:
        return (self.relay_ok and bool(self.istio_serials) and self.handshakes > 0
                and self.handshake_failures == 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fleet:
    """Starts, watches and stops the demo's processes."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.views = {name: ClusterView(name=name) for name in plan.names}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.relay = ""
        self.dashboard = ""  # the server's expiry dashboard, once it serves
        self.rotation_step = "-"

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.plan.workdir / f"{name}.log").open("ab")
        self._procs[name] = subprocess.Popen(
            [sys.executable, "-m", "meshtrust", *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)

    async def start(self) -> None:
        plan = self.plan
        plan.workdir.mkdir(parents=True, exist_ok=True)
        ready = plan.workdir / "server.ready"
        ready.unlink(missing_ok=True)
        relay, boot, meters = _free_port(), _free_port(), _free_port()
        self.relay = f"127.0.0.1:{relay}"
        self._spawn("server", "server", "--store", plan.store("mgmt"),
                    "--listen", self.relay, "--bootstrap-listen", f"127.0.0.1:{boot}",
                    "--client-lifetime", f"{plan.client_lifetime}s",
                    "--heartbeat", f"{plan.heartbeat}s", "--reconcile-interval", "1s",
                    "--ready-file", str(ready), "--metrics", f"127.0.0.1:{meters}")
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self._procs["server"].poll() is not None or time.monotonic() > deadline:
                raise errors.ConfigError(
                    f"the server did not start; see {plan.workdir / 'server.log'}")
            await asyncio.sleep(0.1)
        ports = json.loads(ready.read_text())
        self.dashboard = f"http://127.0.0.1:{ports.get('metrics', meters)}/ui"
        async with opened_store(plan.store("mgmt")) as mgmt:
            for name in plan.names:
                enrolled = await enrollment.enroll(
                    mgmt, clock_module.SystemClock(), name, server=self.relay,
                    bootstrap_server=f"127.0.0.1:{ports['bootstrap']}")
                async with opened_store(plan.store(name)) as cluster_store:
                    await enrollment.install(cluster_store, enrolled)
        for name in plan.names:
            self._spawn(name, "agent", "--cluster", name, "--server", self.relay,
                        "--bootstrap-server", f"127.0.0.1:{ports['bootstrap']}",
                        "--store", plan.store(name), "--grace-ratio", str(plan.grace_ratio),
                        "--status-interval", "2", "--lease-ttl", "6", "--simulate-pods")
        async with opened_store(plan.store("mgmt")) as mgmt:
            await self._authority(mgmt).apply(self.policy())

    def policy(self) -> dict[str, Any]:
        """The demo's RootTrustPolicy: every cluster, pods restarted, short-lived CAs."""
        return {"apiVersion": trust_policy.POLICY_API, "kind": trust_policy.POLICY_KIND,
                "metadata": {"name": DEMO_POLICY, "namespace": settings.RELAY_NAMESPACE},
                "spec": {"config": {
                    "autoRestartPods": True,
                    "mgmtServerCa": {"generated": {"keyType": "ecdsa-p256"}},
                    "intermediateCertOptions": {
                        "keyType": "ecdsa-p256", "ttl": f"{self.plan.istio_lifetime}s",
                        "secretRotationGracePeriodRatio": 0.5}}}}

    @staticmethod
    def _authority(store: base.Store) -> istio.IstioAuthority:
        clock = clock_module.SystemClock()
        return istio.IstioAuthority(store, clock, registry.Registry(store, clock))

    async def observe(self) -> dict[str, ClusterView]:
        """Refresh every view from the management store and the clusters' stores."""
        now = dt.datetime.now(dt.UTC)
        names = settings.SecretNames()
        async with opened_store(self.plan.store("mgmt")) as mgmt:
            clusters = {c.name: c for c in await registry.Registry(
                mgmt, clock_module.SystemClock()).list()}
            issued = {r.spec.get("cluster"): r.status
                      for r in await mgmt.list_resources(istio.ISSUED_KIND)}
            await self._rotate(mgmt, issued)
        cacerts: dict[str, dict[str, bytes]] = {}
        for name, view in self.views.items():
            record = clusters.get(name)
            view.connected = bool(record and record.connected)
            view.ever_connected |= view.connected
            status = issued.get(name, {})
            view.istio_state = str(status.get("state", "-"))
            view.pods_bounced = len(status.get("bouncedPods", []))
            async with opened_store(self.plan.store(name)) as store:
                held = await watcher.read_identity(store, names)
                try:
                    secret = await store.get_secret(names.istio_namespace, names.istio_ca)
                    cacerts[name] = dict(secret.data)
                    ca_cert = bundle.load_certificate(secret.data["ca-cert.pem"])
                    view.istio_serial = f"{ca_cert.serial_number:x}"
                    view.istio_serials.add(view.istio_serial)
                except (errors.NotFound, KeyError):
                    pass
            if held is None:
                continue
            cert = held.certificate
            view.serial = held.serial
            view.serials.add(held.serial)
            view.not_after = cert.not_valid_after_utc
            view.renew_at = rotation.renew_at(cert, self.plan.grace_ratio)
            try:
                chain = bundle.load_certificates(held.chain)
                verify.verify_chain(cert, chain[1:], bundle.load_certificates(held.trust), now,
                                    client_auth=True)
                view.verified = True
            except errors.ChainError:
                view.verified = False
        await self._handshakes(cacerts, now)
        return self.views

    async def _handshakes(self, cacerts: dict[str, dict[str, bytes]], now: dt.datetime) -> None:
        """Workloads of cluster-1 and each other cluster complete mTLS through the shared root."""
        first, *others = self.plan.names
        if not others or any(n not in cacerts for n in self.plan.names):
            return
        for other in others:
            client = federation.workload(first, cacerts[first], now, service_account="sleep")
            server = federation.workload(other, cacerts[other], now, service_account="httpbin")
            pair = (self.views[first], self.views[other])
            for view in pair:
                view.handshakes += 1
            try:
                await federation.handshake(client, server)
            except errors.ChainError:
                for view in pair:
                    view.handshake_failures += 1
                    view.last_handshake = "FAILED"
                continue
            pair[0].last_handshake = f"ok with {other}"
            pair[1].last_handshake = f"ok with {first}"

    async def _rotate(self, mgmt: base.Store, issued: dict[Any, dict[str, Any]]) -> None:
        """With --rotate-root, start the rotation once every cluster runs its first CA."""
        if not self.plan.rotate_root:
            return
        try:
            rotation = await mgmt.get_resource(root_rotation.ROTATION_KIND,
                                               settings.RELAY_NAMESPACE, DEMO_POLICY)
            self.rotation_step = str(rotation.status.get("step", "-"))
            return
        except errors.NotFound:
            pass
        done = [issued.get(n, {}).get("state") == "FINISHED" for n in self.plan.names]
        if all(done) and all(v.handshakes for v in self.views.values()):
            authority = self._authority(mgmt)
            await root_rotation.RootRotations(mgmt, clock_module.SystemClock(),
                                              authority).start(DEMO_POLICY)
            self.rotation_step = root_rotation.Step.ADDING_ROOT.value

    @property
    def ok(self) -> bool:
        fleet_ok = all(v.ok for v in self.views.values())
        if self.plan.rotate_root:
            return fleet_ok and self.rotation_step == root_rotation.Step.DONE.value
        return fleet_ok

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self._procs.items()}

    async def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self._procs.values():
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
