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

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.agent import watcher
from meshtrust.authority import enrollment, registry
from meshtrust.pki import bundle, rotation, verify
from meshtrust.store import open_store


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    clusters: int = 3
    workdir: Path
    client_lifetime: int = 20  # seconds
    grace_ratio: float = 0.5
    heartbeat: float = 2.0

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

    @property
    def bootstrapped(self) -> bool:
        return bool(self.serials)

    @property
    def rotations(self) -> int:
        return max(len(self.serials) - 1, 0)

    @property
    def ok(self) -> bool:
        return self.bootstrapped and self.ever_connected and self.rotations >= 1 and self.verified


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
        relay, boot = _free_port(), _free_port()
        self.relay = f"127.0.0.1:{relay}"
        self._spawn("server", "server", "--store", plan.store("mgmt"),
                    "--listen", self.relay, "--bootstrap-listen", f"127.0.0.1:{boot}",
                    "--client-lifetime", f"{plan.client_lifetime}s",
                    "--heartbeat", f"{plan.heartbeat}s", "--ready-file", str(ready))
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self._procs["server"].poll() is not None or time.monotonic() > deadline:
                raise errors.ConfigError(
                    f"the server did not start; see {plan.workdir / 'server.log'}")
            await asyncio.sleep(0.1)
        ports = json.loads(ready.read_text())
        mgmt = await open_store(plan.store("mgmt"))
        try:
            for name in plan.names:
                enrolled = await enrollment.enroll(
                    mgmt, clock_module.SystemClock(), name, server=self.relay,
                    bootstrap_server=f"127.0.0.1:{ports['bootstrap']}")
                cluster_store = await open_store(plan.store(name))
                try:
                    await enrollment.install(cluster_store, enrolled)
                finally:
                    await cluster_store.close()
        finally:
            await mgmt.close()
        for name in plan.names:
            self._spawn(name, "agent", "--cluster", name, "--server", self.relay,
                        "--bootstrap-server", f"127.0.0.1:{ports['bootstrap']}",
                        "--store", plan.store(name), "--grace-ratio", str(plan.grace_ratio),
                        "--status-interval", "2", "--lease-ttl", "6")

    async def observe(self) -> dict[str, ClusterView]:
        """Refresh every view from the management store and the clusters' stores."""
        now = dt.datetime.now(dt.UTC)
        names = settings.SecretNames()
        mgmt = await open_store(self.plan.store("mgmt"))
        try:
            clusters = {c.name: c for c in await registry.Registry(
                mgmt, clock_module.SystemClock()).list()}
        finally:
            await mgmt.close()
        for name, view in self.views.items():
            record = clusters.get(name)
            view.connected = bool(record and record.connected)
            view.ever_connected |= view.connected
            store = await open_store(self.plan.store(name))
            try:
                held = await watcher.read_identity(store, names)
            finally:
                await store.close()
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
        return self.views

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
