"""Root rotation of a trust policy across real processes: no lost trust, crashes, rollback.

Agents reach the server in insecure mode through recording proxies, so a test
can hold one cluster's CompleteWork call of a chosen round in flight: that
pins the rotation in a step with the clusters on either side of it, long
enough to run handshakes against the mixed state or to kill the server there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import istiofleet as isf
import openssl_cli
import relayfleet as rf
from meshtrust import clock as clock_module
from meshtrust import errors, federation
from meshtrust.authority import istio, root_rotation
from meshtrust.authority import registry as registry_module
from meshtrust.pki import bundle, hierarchy, keys
from meshtrust.store import base

CLUSTERS = ("cluster-1", "cluster-2")
Step = root_rotation.Step
# What one cluster's cacerts says: the root its intermediate chains to, and the roots it trusts.
Trust = tuple[str, frozenset[str]]


@pytest.fixture
def mesh(fleet: rf.Fleet) -> Iterator[isf.Mesh]:
    made = isf.Mesh(fleet)
    try:
        yield made
    finally:
        made.close()


def _trust(cacerts: base.Secret) -> Trust:
    return (isf.fingerprints(cacerts.data["cert-chain.pem"])[-1],
            frozenset(isf.fingerprints(cacerts.data["root-cert.pem"])))


async def _start(mesh: isf.Mesh) -> str:
    """Two clusters in insecure mode, issued under the policy's root; that root's fingerprint."""
    await asyncio.to_thread(mesh.start_server, insecure=True)
    for cluster in CLUSTERS:
        await asyncio.to_thread(mesh.add_cluster, cluster, simulate=False)
    await mesh.aapply(isf.policy())
    await mesh.wait_finished(CLUSTERS)
    root = await mesh.root_trust()
    return bundle.fingerprint(bundle.load_certificate(root.data["root-cert.pem"]))


async def _held(mesh: isf.Mesh, cluster: str) -> None:
    proxy = mesh.proxies[cluster]
    await rf.apoll(lambda: asyncio.to_thread(proxy.held.is_set), timeout=20,
                   what=f"the proxy of {cluster} to hold a call")


async def _new_root(mesh: isf.Mesh) -> str:
    rotation = await mesh.wait_step(Step.ADDING_ROOT, Step.REISSUING, Step.DROPPING_OLD,
                                    Step.DONE)
    return str(rotation.status["newRoot"])


async def _all_under(mesh: isf.Mesh, root: str, root_pem: bytes, tmp: Path) -> None:
    """Every cluster's cacerts chains to ``root`` alone, trusts it alone, and openssl agrees."""
    (tmp / "only-root.pem").write_bytes(root_pem)
    for cluster in CLUSTERS:
        cacerts = await mesh.secret(cluster)
        assert cacerts is not None
        assert _trust(cacerts) == (root, frozenset({root})), cluster
        folder = isf.write_cacerts(tmp / cluster, cacerts.data)
        openssl_cli.run("verify", "-CAfile", tmp / "only-root.pem", folder / "cert-chain.pem")


class Handshakes:
    """Workloads of both clusters, made afresh from each cacerts, handshake both ways."""

    def __init__(self, mesh: isf.Mesh) -> None:
        self.mesh = mesh
        self.succeeded = 0
        self.failures: list[tuple[tuple[Trust, Trust], str]] = []
        self.states: list[tuple[Trust, Trust]] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task

    async def run(self) -> None:
        async with rf.opened(self.mesh.fleet.store_url(CLUSTERS[0])) as one, \
                rf.opened(self.mesh.fleet.store_url(CLUSTERS[1])) as two:
            while not self.stop.is_set():
                # Each cluster's cacerts is one secret: each read is one consistent state.
                first = await one.get_secret(isf.ISTIO_NS, isf.CACERTS)
                second = await two.get_secret(isf.ISTIO_NS, isf.CACERTS)
                state = (_trust(first), _trust(second))
                now = dt.datetime.now(dt.UTC)
                a = federation.workload(CLUSTERS[0], first.data, now, service_account="sleep")
                b = federation.workload(CLUSTERS[1], second.data, now,
                                        service_account="httpbin")
                for client, server in ((a, b), (b, a)):
                    try:
                        await federation.handshake(client, server)
                        self.succeeded += 1
                    except errors.ChainError as exc:
                        self.failures.append((state, str(exc)))
                self.states.append(state)
                await asyncio.sleep(0.2)

    async def seen(self, state: tuple[Trust, Trust], times: int = 3) -> None:
        """Wait until ``times`` rounds of handshakes ran against ``state``."""
        async def enough() -> bool:
            if self.task is not None and self.task.done():
                await self.task  # the loop broke: show why
                raise AssertionError("the handshake loop ended early")
            return self.states.count(state) >= times
        await rf.apoll(enough, timeout=20, what=f"{times} handshake rounds in state {state}")


class TestRotationKeepsTrust:
    def test_cross_cluster_mtls_never_fails_through_a_root_rotation(
            self, mesh: isf.Mesh, tmp_path: Path) -> None:
        """Handshakes both ways through every step, mixed ones included, all succeed; DONE."""
        async def scenario() -> None:
            old = await _start(mesh)
            handshakes = Handshakes(mesh)
            handshakes.start()
            two = mesh.proxies["cluster-2"]
            try:
                # The handshake can fail: a workload under an unrelated root is refused.
                made = hierarchy.build(hierarchy.Options(
                    architecture=hierarchy.Architecture.SEPARATE, clusters=("other",),
                    istio_key_type=keys.KeyType.EC_P256), dt.datetime.now(dt.UTC))
                other = federation.workload("other", next(
                    s.data for s in made.secrets if s.name == "cacerts"), dt.datetime.now(dt.UTC))
                cacerts = await mesh.secret("cluster-1")
                assert cacerts is not None
                mine = federation.workload("cluster-1", cacerts.data, dt.datetime.now(dt.UTC))
                with pytest.raises(errors.ChainError):
                    await federation.handshake(mine, other)

                two.hold(isf.work_pattern("cluster-2", 2))
                rotating = asyncio.create_task(asyncio.to_thread(
                    isf.cli, "rotate", "root", "--policy", isf.POLICY, "--wait", "120",
                    "--store", mesh.fleet.mgmt_url))
                new = await _new_root(mesh)
                both = frozenset({old, new})
                # 1. cluster-1 trusts both roots, cluster-2 the old one only.
                await _held(mesh, "cluster-2")
                await handshakes.seen(((old, both), (old, frozenset({old}))))
                two.hold(isf.work_pattern("cluster-2", 3))
                two.release()
                # 2. cluster-1 runs an intermediate of the new root, cluster-2 one of the old.
                await _held(mesh, "cluster-2")
                await handshakes.seen(((new, both), (old, both)))
                two.hold(isf.work_pattern("cluster-2", 4))
                two.release()
                # 3. cluster-1 trusts the new root alone, cluster-2 still both.
                await _held(mesh, "cluster-2")
                await handshakes.seen(((new, frozenset({new})), (new, both)))
                two.release()
                code, out, err = await asyncio.wait_for(rotating, 60)
                await handshakes.seen(((new, frozenset({new})),) * 2, times=1)
            finally:
                await handshakes.finish()
            assert code == 0, err + mesh.tail(*CLUSTERS)
            assert "step DONE" in out
            assert handshakes.failures == []
            assert handshakes.succeeded >= 2 * 10
            rotation = await mesh.rotation()
            assert rotation is not None
            assert [h["step"] for h in rotation.status["history"]] == [
                "ADDING_ROOT", "REISSUING", "DROPPING_OLD", "DONE"]
            root = await mesh.root_trust()
            assert set(root.data) == {"root-cert.pem", "key.pem"}
            await _all_under(mesh, new, root.data["root-cert.pem"], tmp_path)

        asyncio.run(scenario())


async def _start_rotation(mesh: isf.Mesh, *extra: str) -> str:
    code, out, err = await asyncio.to_thread(
        isf.cli, "rotate", "root", "--policy", isf.POLICY, *extra, "--store", mesh.fleet.mgmt_url)
    assert code == 0, err
    return out


def _under(root: str) -> Callable[[base.Resource], bool]:
    """An IssuedCertificate signed by ``root`` (as the spec it was issued for says)."""
    return lambda item: item.spec["signerFingerprint"] == root


class TestRotationCrash:
    def test_a_rotation_resumes_after_the_server_dies_in_each_step(
            self, mesh: isf.Mesh, tmp_path: Path) -> None:
        """SIGKILL mid ADDING_ROOT, then mid REISSUING: the rotation resumes and ends DONE."""
        async def scenario() -> None:
            old = await _start(mesh)
            two = mesh.proxies["cluster-2"]
            two.hold(isf.work_pattern("cluster-2", 2))
            await _start_rotation(mesh)
            new = await _new_root(mesh)
            assert new != old

            # Mid ADDING_ROOT: cluster-1 done, cluster-2's key stored and its CSR in flight.
            await mesh.wait_finished(["cluster-1"], after_round=1)
            await _held(mesh, "cluster-2")
            pending = await mesh.wait_secret("cluster-2", isf.PENDING)
            assert await mesh.step() == Step.ADDING_ROOT.value
            mesh.kill_server()
            two.hold(isf.work_pattern("cluster-2", 3))
            await asyncio.to_thread(mesh.start_server, insecure=True, same_ports=True)

            # Mid REISSUING: cluster-1 re-issued under the new root, cluster-2 in flight.
            await mesh.wait_finished(["cluster-1"], after_round=2, check=_under(new))
            await _held(mesh, "cluster-2")
            assert await mesh.step() == Step.REISSUING.value
            two_now = await mesh.secret("cluster-2")
            assert two_now is not None and _trust(two_now) == (old, frozenset({old, new}))
            assert isf.public_der(two_now.data["ca-key.pem"]) == isf.public_der(
                pending.data["ca-key.pem"]), "the retry after the crash kept the stored key"
            mesh.kill_server()
            await asyncio.to_thread(mesh.start_server, insecure=True, same_ports=True)

            rotation = await mesh.wait_step(Step.DONE)
            assert [h["step"] for h in rotation.status["history"]] == [
                "ADDING_ROOT", "REISSUING", "DROPPING_OLD", "DONE"]
            root_pem = (await mesh.root_trust()).data["root-cert.pem"]
            only_new = istio.bundle_fingerprint(root_pem)
            await mesh.wait_finished(CLUSTERS, check=lambda i: _under(new)(i)
                                     and i.spec["bundleFingerprint"] == only_new)
            await _all_under(mesh, new, root_pem, tmp_path)

        asyncio.run(scenario())


class TestRotationRollback:
    @pytest.mark.parametrize(("step", "held_round", "history"), [
        (Step.ADDING_ROOT, 2, ["ADDING_ROOT", "ROLLED_BACK"]),
        (Step.REISSUING, 3, ["ADDING_ROOT", "REISSUING", "ROLLING_BACK", "ROLLED_BACK"]),
    ], ids=["adding-root", "reissuing"])
    def test_a_rollback_mid_step_returns_every_cluster_to_the_old_root(
            self, mesh: isf.Mesh, tmp_path: Path, step: root_rotation.Step, held_round: int,
            history: list[str]) -> None:
        """Rolled back mid-step (cluster-1 ahead, cluster-2 in flight): old root alone again."""
        async def scenario() -> None:
            old = await _start(mesh)
            old_pem = (await mesh.root_trust()).data["root-cert.pem"]
            two = mesh.proxies["cluster-2"]
            two.hold(isf.work_pattern("cluster-2", held_round))
            await _start_rotation(mesh)
            new = await _new_root(mesh)
            await mesh.wait_finished(["cluster-1"], after_round=held_round - 1)
            await _held(mesh, "cluster-2")
            assert await mesh.step() == step.value
            if step is Step.REISSUING:
                one = await mesh.secret("cluster-1")
                assert one is not None and _trust(one)[0] == new, "cluster-1 runs the new root"

            out = await _start_rotation(mesh, "--rollback")
            assert history[history.index(step.value) + 1] in out
            two.release()
            rotation = await mesh.wait_step(Step.ROLLED_BACK, timeout=30)
            assert [h["step"] for h in rotation.status["history"]] == history
            only_old = istio.bundle_fingerprint(old_pem)
            await mesh.wait_finished(CLUSTERS, check=lambda i: _under(old)(i)
                                     and i.spec["bundleFingerprint"] == only_old)
            root = await mesh.root_trust()
            assert root.data["root-cert.pem"] == old_pem
            assert set(root.data) == {"root-cert.pem", "key.pem"}
            await _all_under(mesh, old, old_pem, tmp_path)

        asyncio.run(scenario())


class _RacingStore:
    """A store that lets the server act once just before the command's first secret update."""

    def __init__(self, store: base.Store, server_turn: Callable[[], Awaitable[None]]) -> None:
        self._store = store
        self._server_turn: Callable[[], Awaitable[None]] | None = server_turn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def update(self, obj: Any) -> Any:
        if isinstance(obj, base.Secret) and self._server_turn is not None:
            turn, self._server_turn = self._server_turn, None
            await turn()
        return await self._store.update(obj)


class TestRotationCommandRace:
    def test_a_rollback_applied_by_the_server_at_the_same_time_still_succeeds(
            self, tmp_path: Path) -> None:
        """The server applies the new step between the command's read and write: no Conflict."""
        async def scenario() -> None:
            async with rf.opened(f"sqlite:///{tmp_path / 'mgmt.db'}") as store:
                clock = clock_module.SystemClock()
                registry = registry_module.Registry(store, clock)
                server_side = root_rotation.RootRotations(
                    store, clock, istio.IstioAuthority(store, clock, registry))
                await istio.IstioAuthority(store, clock, registry).apply(isf.policy())
                await server_side.start(isf.POLICY)
                await server_side.advance()  # no cluster to wait for: on to REISSUING
                rotation = await store.get_resource(root_rotation.ROTATION_KIND, isf.NS,
                                                    isf.POLICY)
                assert rotation.status["step"] == Step.REISSUING.value

                racing = _RacingStore(store, server_side.advance)
                command = root_rotation.RootRotations(
                    racing, clock, istio.IstioAuthority(racing, clock, registry))
                await command.rollback(isf.POLICY)
                rotation = await store.get_resource(root_rotation.ROTATION_KIND, isf.NS,
                                                    isf.POLICY)
                assert rotation.status["step"] in (Step.ROLLING_BACK.value,
                                                   Step.ROLLED_BACK.value)

        asyncio.run(scenario())
