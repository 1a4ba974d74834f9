"""Several management server replicas on one PostgreSQL store, as real processes.

``HAFleet`` starts ``meshtrust server`` replicas in slots, each on ports of its
own, all on one PostgreSQL database, with a short leader lease. Agents get
every replica's address, each list starting at a different replica, so the
fleet's agents are spread over the replicas. A slot's replica can be killed
with SIGKILL and started again on the same ports under a new name, as a
Deployment replaces a pod.

It also reads what the store says: who holds the leader lease, each
cluster's intermediate and connections, and how many times the audit log
recorded each Istio work item as issued. ``tests/integration/test_ha.py``
and ``bench/ha.py`` drive it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import json
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import istiofleet as isf
import relayfleet as rf
from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.authority import audit, istio, registry, trust_policy
from meshtrust.pki import bundle, keys, profiles
from meshtrust.server import leadership
from meshtrust.store import base, lease

NS = rf.NS
POLICY = isf.POLICY


class _Fleet(rf.Fleet):
    """A relay fleet whose management store is a given URL (PostgreSQL)."""

    def __init__(self, root: Path, mgmt_url: str) -> None:
        super().__init__(root)
        self._ha_mgmt_url = mgmt_url

    @property
    def mgmt_url(self) -> str:
        return self._ha_mgmt_url


@dataclasses.dataclass
class Replica:
    slot: int
    name: str
    process: rf.Process
    relay_port: int
    bootstrap_port: int

    @property
    def relay(self) -> str:
        return f"127.0.0.1:{self.relay_port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.bootstrap_port}"


@dataclasses.dataclass(frozen=True)
class Failover:
    """One leader killed and replaced, timed by the store's lease records."""

    killed: str
    successor: str
    seconds: float             # from the SIGKILL to the successor's acquireTime
    since_renewal: float       # from the killed leader's last renewal to the SIGKILL


class HAFleet:
    """``replicas`` server replicas with leases of ``ttl`` seconds, and agents."""

    def __init__(self, root: Path, mgmt_url: str, *, ttl: int = 2, replicas: int = 3,
                 reconcile_interval: str = "1s") -> None:
        self.fleet = _Fleet(root, mgmt_url)
        self.ttl = ttl
        self.slots = replicas
        self.reconcile_interval = reconcile_interval
        self.replicas: dict[int, Replica] = {}
        self.agents: dict[str, rf.Process] = {}
        self.dead: set[str] = set()
        self._started = 0

    @property
    def mgmt_url(self) -> str:
        return self.fleet.mgmt_url

    # -- server replicas --------------------------------------------------------------------

    def start(self) -> None:
        """Start every slot's replica at once and wait until each serves."""
        pending = [self._spawn(slot) for slot in range(self.slots)]
        for slot, name, process, ready in pending:
            self.replicas[slot] = self._ready(slot, name, process, ready)
        self.fleet.server = self._as_server(self.replicas[0])

    def restart(self, slot: int) -> Replica:
        """Start the slot's replica again, on the same ports, under a new name."""
        old = self.replicas[slot]
        _, name, process, ready = self._spawn(slot, old.relay_port, old.bootstrap_port)
        self.replicas[slot] = self._ready(slot, name, process, ready)
        return self.replicas[slot]

    def kill(self, slot: int) -> float:
        """SIGKILL the slot's replica; return the wall-clock time of the kill."""
        replica = self.replicas[slot]
        killed_at = time.time()
        replica.process.kill(signal.SIGKILL)
        self.dead.add(replica.name)
        return killed_at

    def slot_of(self, name: str) -> int:
        return next(s for s, r in self.replicas.items() if r.name == name)

    def survivor(self, *, besides: int) -> Replica:
        return next(r for s, r in sorted(self.replicas.items())
                    if s != besides and r.process.alive)

    def _spawn(self, slot: int, relay_port: int = 0,
               bootstrap_port: int = 0) -> tuple[int, str, rf.Process, Path]:
        self._started += 1
        name = f"server-{slot}-{self._started}"
        ready = self.fleet.root / f"{name}.ready"
        process = self.fleet.spawn(
            name, "server", "--store", self.mgmt_url, "--replica", name,
            "--listen", f"127.0.0.1:{relay_port}",
            "--bootstrap-listen", f"127.0.0.1:{bootstrap_port}", "--ready-file", str(ready),
            "--client-lifetime", "1h", "--heartbeat", "1s",
            "--reconcile-interval", self.reconcile_interval,
            "--leader-lease-ttl", f"{self.ttl}s")
        return slot, name, process, ready

    def _ready(self, slot: int, name: str, process: rf.Process, ready: Path) -> Replica:
        def started() -> dict[str, int] | None:
            if not process.alive:
                raise AssertionError(f"{name} exited with {process.popen.returncode}:\n"
                                     f"{process.log()[-3000:]}")
            return json.loads(ready.read_text()) if ready.exists() else None

        ports = rf.poll(started, timeout=30, what=f"{name} to serve")
        return Replica(slot=slot, name=name, process=process, relay_port=ports["relay"],
                       bootstrap_port=ports["bootstrap"])

    @staticmethod
    def _as_server(replica: Replica) -> rf.Server:
        return rf.Server(process=replica.process, relay_port=replica.relay_port,
                         bootstrap_port=replica.bootstrap_port)

    # -- agents -----------------------------------------------------------------------------

    def addresses(self, first: int) -> tuple[str, str]:
        """Every replica's relay and bootstrap address, starting with slot ``first``."""
        order = [self.replicas[(first + i) % self.slots] for i in range(self.slots)]
        return ",".join(r.relay for r in order), ",".join(r.bootstrap for r in order)

    def add_cluster(self, cluster: str, first: int) -> rf.Process:
        """Enrol ``cluster`` and start its agent, trying slot ``first``'s replica first."""
        self.fleet.enroll(cluster)
        relay, boot = self.addresses(first)
        agent = self.fleet.spawn(
            f"agent-{cluster}", "agent", "--cluster", cluster, "--server", relay,
            "--bootstrap-server", boot, "--store", self.fleet.store_url(cluster),
            "--replica", f"{cluster}-a", "--lease-ttl", "2", "--status-interval", "1",
            "--renew-spread", "1", "--grace-ratio", "0.5")
        self.agents[cluster] = agent
        return agent

    def apply(self, document: Mapping[str, Any]) -> None:
        """``meshtrust apply -f``, as a user would (the command writes the store)."""
        path = self.fleet.root / "policy.yaml"
        path.write_text(yaml.safe_dump(dict(document)))
        code, _, err = isf.cli("apply", "-f", str(path), "--store", self.mgmt_url)
        assert code == 0, err

    def close(self) -> None:
        self.fleet.close()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:])
                         for name, text in self.fleet.logs().items())

    # -- what the store says ----------------------------------------------------------------

    async def leader(self, mgmt: base.Store) -> tuple[str, lease.Holding] | None:
        """The replica holding the leader lease now, and the lease; None if nobody does."""
        try:
            found = await mgmt.get_resource(lease.KIND, NS, leadership.LEADER_LEASE)
        except errors.NotFound:
            return None
        held = lease.Holding.of(found)
        if held.holder is None or held.expired(dt.datetime.now(dt.UTC)):
            return None
        return held.holder, held

    async def wait_leader(self, mgmt: base.Store, timeout: float = 20) -> str:
        async def found() -> str | None:
            current = await self.leader(mgmt)
            return current[0] if current else None
        return await rf.apoll(found, timeout=timeout, interval=0.05, what="a leader")

    async def fail_leader(self, mgmt: base.Store, *, timeout: float = 20) -> Failover:
        """SIGKILL the leader; wait until another replica holds the lease; time it."""
        name, held = await self._current_leader(mgmt)
        killed_at = self.kill(self.slot_of(name))

        async def successor() -> tuple[str, lease.Holding] | None:
            current = await self.leader(mgmt)
            return current if current and current[0] != name else None

        new, new_held = await rf.apoll(successor, timeout=timeout, interval=0.02,
                                       what=f"a leader after {name}")
        assert new_held.acquired is not None and held.renewed is not None
        return Failover(killed=name, successor=new,
                        seconds=new_held.acquired.timestamp() - killed_at,
                        since_renewal=killed_at - held.renewed.timestamp())

    async def _current_leader(self, mgmt: base.Store) -> tuple[str, lease.Holding]:
        async def found() -> tuple[str, lease.Holding] | None:
            current = await self.leader(mgmt)
            # A lease still naming a replica killed before is not a leader to kill.
            return current if current and current[0] not in self.dead else None
        return await rf.apoll(found, timeout=20, interval=0.05, what="a live leader")

    async def issued(self, mgmt: base.Store, cluster: str) -> base.Resource | None:
        with contextlib.suppress(errors.NotFound):
            return await mgmt.get_resource(istio.ISSUED_KIND, NS,
                                           istio.issued_name(POLICY, cluster))
        return None

    async def rounds(self, mgmt: base.Store) -> dict[str, int]:
        found = {}
        for cluster in self.agents:
            item = await self.issued(mgmt, cluster)
            found[cluster] = int(item.status.get("round", 0)) if item else 0
        return found

    async def wait_converged(self, mgmt: base.Store, after: Mapping[str, int], *,
                             timeout: float = 30) -> dict[str, base.Resource]:
        """Every cluster FINISHED a round after ``after`` under the current policy, and its
        agent holds exactly that intermediate in ``cacerts``."""
        async def done() -> dict[str, base.Resource] | None:
            policy = await mgmt.get_resource(trust_policy.POLICY_KIND, NS, POLICY)
            found = {}
            for cluster in self.agents:
                item = await self.issued(mgmt, cluster)
                if (item is None or item.status.get("state") != istio.State.FINISHED.value
                        or int(item.status.get("round", 0)) <= after.get(cluster, 0)
                        or item.spec.get("policyGeneration") != policy.generation):
                    return None
                async with rf.opened(self.fleet.store_url(cluster)) as store:
                    with contextlib.suppress(errors.NotFound):
                        cacerts = await store.get_secret(isf.ISTIO_NS, isf.CACERTS)
                        held = bundle.load_certificate(cacerts.data["ca-cert.pem"])
                        if f"{held.serial_number:x}" != item.status.get("serial"):
                            return None
                        found[cluster] = item
                if cluster not in found:
                    return None
            return found

        try:
            return await rf.apoll(done, timeout=timeout, interval=0.1,
                                  what="every cluster to finish a new round")
        except AssertionError as exc:
            states = {c: (i.status.get("state"), i.status.get("round"))
                      if (i := await self.issued(mgmt, c)) else None for c in self.agents}
            raise AssertionError(f"{exc}; states: {states}\n{self.tail()}") from None

    async def connections(self, mgmt: base.Store) -> dict[str, set[str]]:
        """The replicas each cluster's status says hold its work streams."""
        found = {}
        for cluster in self.agents:
            item = await mgmt.get_resource(registry.CLUSTER_KIND, NS, cluster)
            found[cluster] = set(item.status.get("connections") or {})
        return found

    async def issuances(self, mgmt: base.Store) -> collections.Counter[str]:
        """How many audit records say each Istio work item was issued."""
        reading = await audit.read(mgmt, event=audit.Kind.ISSUE, outcome=audit.Outcome.OK)
        return collections.Counter(
            r.message.removeprefix("work ") for r in reading.records
            if r.profile == profiles.ISTIO_INTERMEDIATE.name and r.message.startswith("work "))


async def serve_during_failover(ha: HAFleet, replica: Replica, cluster: str) -> float:
    """Register ``cluster``, bootstrap it at ``replica`` and renew there; the seconds taken."""
    started = time.monotonic()
    ha.fleet.server = HAFleet._as_server(replica)
    enrolled = await ha.fleet.aenroll(cluster, install=False)
    credentials = await rf.bootstrap_credentials(ha.fleet, cluster, enrolled.token)
    key = keys.generate_key(keys.KeyType.EC_P256)
    async with rf.relay_channel(replica.relay, credentials) as channel:
        renewed = await rf.renew(channel, rf.request_for(key, cluster))
    assert bundle.load_certificate(bytes(renewed.certificate_chain)).serial_number != \
        credentials.certificate.serial_number
    taken = time.monotonic() - started
    async with rf.opened(ha.mgmt_url) as mgmt:  # a probe: no agent will serve it
        await registry.Registry(mgmt, clock_module.SystemClock()).deregister(cluster)
    return taken


def policy(cycle: int) -> dict[str, Any]:
    """The trust policy of ``cycle``: each cycle's ttl differs, so every cluster gets a round."""
    return isf.policy(ttl=f"{600 + cycle}s", auto_restart_pods=False)


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {"min": ordered[0], "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "max": ordered[-1]}

