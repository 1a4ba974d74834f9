"""Several server replicas on one PostgreSQL store: one leader, failover, each issuance once.

The first test runs a hundred failover cycles in this process: three
replicas, each with its own connection to the database, elect a leader with
the lease API on a fake clock, the leader reconciles, any replica signs,
replies are lost and signatures race, and the leader dies every cycle. The
second runs three real ``meshtrust server`` replicas and three agents, kills
the leader with SIGKILL a few times, and checks the store's lease, the audit
log and every agent's ``cacerts``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

import hafleet
import relayfleet as rf
from meshtrust.authority import audit, istio, registry
from meshtrust.pki import csr, keys
from meshtrust.server import leadership
from meshtrust.store import base, lease, open_store
from meshtrust.testing import FakeClock

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

NS = "gloo-mesh"
START = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
LEASE_SECONDS = 600
CLUSTERS = ("cluster-1", "cluster-2")
POLICY = {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
          "metadata": {"name": "mesh", "namespace": NS},
          "spec": {"config": {
              "mgmtServerCa": {"generated": {"keyType": "ecdsa-p256"}},
              "intermediateCertOptions": {"keyType": "ecdsa-p256", "ttl": "1000s",
                                          "secretRotationGracePeriodRatio": 0.5}}}}


class Replica:
    """What a server replica does with the store: its lease, its Istio authority."""

    def __init__(self, store: base.Store, clock: FakeClock, name: str) -> None:
        self.name = name
        self.leases = lease.Leases(store, namespace=NS, clock=clock)
        self.istio = istio.IstioAuthority(store, clock, registry.Registry(store, clock))

    async def campaign(self) -> bool:
        return await self.leases.acquire(leadership.LEADER_LEASE, self.name, LEASE_SECONDS)


def _csr() -> bytes:
    return csr.dump_csr(csr.build_csr(keys.generate_key(keys.KeyType.EC_P256), ca=True))


async def _serve(rng: random.Random, replicas: list[Replica], cluster: str) -> str:
    """One cluster's round as an agent meets it over failing replicas; the work id."""
    first, second = rng.sample(replicas, 2)
    [work] = await first.istio.work_for(cluster)
    pem = _csr()
    how = rng.choice(("once", "reply-lost", "race"))
    if how == "once":
        serials = {(await first.istio.sign(cluster, work.id, pem)).certificate.serial_number}
    elif how == "reply-lost":  # the replica answered, then died: the agent asks another
        await first.istio.sign(cluster, work.id, pem)
        serials = {(await first.istio.sign(cluster, work.id, pem)).certificate.serial_number,
                   (await second.istio.sign(cluster, work.id, pem)).certificate.serial_number}
    else:  # two replicas get the CSR at once
        signed = await asyncio.gather(first.istio.sign(cluster, work.id, pem),
                                      second.istio.sign(cluster, work.id, pem))
        serials = {s.certificate.serial_number for s in signed}
    assert len(serials) == 1, f"{how}: work {work.id} handed out {len(serials)} certificates"
    await rng.choice(replicas).istio.report(cluster, work.id, ok=True)
    return work.id


async def _failovers(url: str, cycles: int) -> None:
    clock = FakeClock(START)
    rng = random.Random(7)
    stores = [await open_store(url, interval=0.02) for _ in range(3)]
    try:
        born = 0

        def replica(index: int) -> Replica:
            nonlocal born
            born += 1
            return Replica(stores[index], clock, f"server-{born}")

        replicas = [replica(i) for i in range(3)]
        for cluster in CLUSTERS:
            await replicas[0].istio._registry.register(cluster)
        await replicas[0].istio.apply(POLICY)
        won = await asyncio.gather(*(r.campaign() for r in replicas))
        assert sum(won) == 1
        leader = replicas[won.index(True)]
        works = []
        for cycle in range(cycles):
            clock.advance(LEASE_SECONDS * 0.8)  # the intermediates are due for renewal
            assert await leader.campaign(), f"cycle {cycle}: the leader lost its lease"
            others = [r for r in replicas if r is not leader]
            assert not any(await asyncio.gather(*(r.campaign() for r in others)))
            await leader.istio.reconcile()
            for cluster in CLUSTERS:
                works.append(await _serve(rng, replicas, cluster))
            # The leader dies (no release); the survivors cannot take over before the TTL.
            index = replicas.index(leader)
            replicas[index] = replica(index)
            assert not any(await asyncio.gather(*(r.campaign() for r in replicas)))
            clock.advance(LEASE_SECONDS + 1)
            won = await asyncio.gather(*(r.campaign() for r in replicas))
            assert sum(won) == 1, f"cycle {cycle}: {sum(won)} replicas won the lease"
            leader = replicas[won.index(True)]
        reading = await audit.read(stores[0], event=audit.Kind.ISSUE, outcome=audit.Outcome.OK)
        issued = [r.message.removeprefix("work ") for r in reading.records
                  if r.message.startswith("work ")]
        assert len(works) == len(set(works)) == cycles * len(CLUSTERS)
        assert sorted(issued) == sorted(works), "each work item is recorded as issued once"
    finally:
        for store in stores:
            await store.close()


class TestFailoverCycles:
    def test_hundred_failovers_issue_each_intermediate_once(self, postgres_url: str) -> None:
        """100 leader deaths, lost replies and racing signatures: one certificate per round."""
        asyncio.run(_failovers(postgres_url, 100))


@pytest.fixture
def ha(tmp_path: Path, postgres_url: str) -> Iterator[hafleet.HAFleet]:
    made = hafleet.HAFleet(tmp_path, postgres_url, ttl=2)
    try:
        yield made
    finally:
        made.close()
    made.fleet.assert_no_tokens_in_logs()


async def _replicas(ha: hafleet.HAFleet, cycles: int) -> list[hafleet.Failover]:
    await asyncio.to_thread(ha.start)
    for index, cluster in enumerate(("cluster-1", "cluster-2", "cluster-3")):
        await asyncio.to_thread(ha.add_cluster, cluster, index)
    failovers = []
    async with rf.opened(ha.mgmt_url) as mgmt:
        # Each agent holds its stream on the replica its list starts with.
        expected = {c: {ha.replicas[i].name} for i, c in enumerate(ha.agents)}

        async def spread() -> bool:
            return await ha.connections(mgmt) == expected
        await rf.apoll(spread, timeout=20, what=f"the agents connected as {expected}")
        await asyncio.to_thread(ha.apply, hafleet.policy(0))
        rounds = {c: r.status["round"]
                  for c, r in (await ha.wait_converged(mgmt, {})).items()}
        for cycle in range(1, cycles + 1):
            # A new round for every cluster, under way while the leader dies.
            await asyncio.to_thread(ha.apply, hafleet.policy(cycle))
            leader = await ha.wait_leader(mgmt)
            slot = ha.slot_of(leader)
            survivor = ha.survivor(besides=slot)
            serving = asyncio.create_task(
                hafleet.serve_during_failover(ha, survivor, f"extra-{cycle}"))
            failover = await ha.fail_leader(mgmt)
            # Bootstrap and renewal on a surviving replica, meanwhile.
            await serving
            failovers.append(failover)
            # Replaced within the TTL (and slack for a loaded machine), never before the
            # lease the dead leader renewed last had run out.
            assert failover.seconds <= ha.ttl + 0.5, failover
            assert failover.seconds + failover.since_renewal >= ha.ttl - 0.05, failover
            await asyncio.to_thread(ha.restart, slot)
            rounds = {c: r.status["round"]
                      for c, r in (await ha.wait_converged(mgmt, rounds)).items()}
        counts = await ha.issuances(mgmt)
        assert counts and set(counts.values()) == {1}, \
            f"work items issued more than once: {[w for w, n in counts.items() if n > 1]}"
        assert len(counts) == len(ha.agents) * (cycles + 1)

        # The leader drops the streams the dead replicas held from the records.
        async def swept() -> bool:
            held = await ha.connections(mgmt)
            return all(names and not names & ha.dead for names in held.values())
        await rf.apoll(swept, timeout=4 * ha.ttl, what="dead replicas' connections dropped")
    return failovers


class TestReplicas:
    def test_leader_killed_repeatedly(self, ha: hafleet.HAFleet) -> None:
        """Three replicas, three agents, the leader SIGKILLed thrice: replaced within the
        TTL, bootstrap and renewal served meanwhile, every round issued once, all converge."""
        failovers = asyncio.run(_replicas(ha, 3))
        assert len(failovers) == 3
