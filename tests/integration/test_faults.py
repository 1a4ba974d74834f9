"""Faults injected into real processes and stores: SIGKILL, SIGSTOP, a PostgreSQL restart, a
full or read-only disk. After each, the fleet converges and no record is torn."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import istiofleet as isf
import pgserver
import relayfleet as rf
from meshtrust import errors, settings
from meshtrust.agent import identity as agent_identity
from meshtrust.authority import audit, istio, registry
from meshtrust.pki import bundle, keys, verify
from meshtrust.store import base, follow, open_store

pytestmark = pytest.mark.slow

NAMES = settings.SecretNames()
NS = NAMES.relay_namespace
CLIENT_PENDING = agent_identity.pending_name(NAMES)
# The pairs of a secret's data that must hold a certificate and its own key.
KEY_PAIRS = (("tls.crt", "tls.key"), ("ca-cert.pem", "ca-key.pem"), ("root-cert.pem", "key.pem"))
STATES = {state.value for state in istio.State}


@pytest.fixture
def mesh(fleet: rf.Fleet) -> Iterator[isf.Mesh]:
    made = isf.Mesh(fleet)
    try:
        yield made
    finally:
        made.close()


# -- what a whole store looks like ------------------------------------------------------------


def check_secret(secret: base.Secret, where: str) -> None:
    """Every certificate in ``secret`` parses and every key matches its certificate."""
    name = f"{where} {secret.namespace}/{secret.name}"
    assert secret.data, f"{name} is empty"
    for key, value in secret.data.items():
        if b"CERTIFICATE-----" in value:
            assert bundle.load_certificates(value, f"{name} {key}"), f"{name} {key} is empty"
        elif key.endswith(("key", "key.pem")) and not keys.is_encrypted(value):
            keys.load_private_key(value)  # raises on a torn key
    for cert_key, key_key in KEY_PAIRS:
        cert_pem, key_pem = secret.data.get(cert_key), secret.data.get(key_key)
        if cert_pem and key_pem and not keys.is_encrypted(key_pem):
            certificate = bundle.load_certificates(cert_pem, name)[0]
            assert keys.key_matches(certificate, keys.load_private_key(key_pem)), \
                f"{name}: {key_key} is not the key of {cert_key}"
    if "cert-chain.pem" in secret.data and "ca-cert.pem" in secret.data:
        chain = bundle.load_certificates(secret.data["cert-chain.pem"], name)
        assert chain[0] == bundle.load_certificate(secret.data["ca-cert.pem"], name), \
            f"{name}: cert-chain.pem does not start with ca-cert.pem"


def check_issued(item: base.Resource) -> None:
    """An IssuedCertificate's status is one of the states, with what that state requires."""
    status = item.status
    assert status.get("state") in STATES, f"{item.name}: state {status.get('state')!r}"
    assert int(status.get("round", 0)) >= 1, f"{item.name}: no round in {status}"
    if status["state"] in (istio.State.ISSUED.value, istio.State.FINISHED.value):
        for field in ("serial", "notAfter", "renewAt", "issuedAt", "keySha256"):
            assert status.get(field), f"{item.name} is {status['state']} with no {field}"


async def check_store(url: str) -> list[base.Secret]:
    """Every secret of the store at ``url`` is whole (see ``check_secret``); return them."""
    async with rf.opened(url) as store:
        secrets = await store.list_secrets()
        for secret in secrets:
            check_secret(secret, url)
        for item in await store.list_resources(istio.ISSUED_KIND):
            check_issued(item)
    return secrets


def audit_records(mgmt_url: str) -> list[dict[str, Any]]:
    """``meshtrust audit -o json``, as an operator reads it."""
    code, out, err = isf.cli("audit", "--store", mgmt_url, "-o", "json")
    assert code == 0, err
    records: list[dict[str, Any]] = json.loads(out)
    return records


def recorded(records: list[dict[str, Any]], event: str, cluster: str,
             serial: str) -> dict[str, Any] | None:
    for record in records:
        if (record["event"], record["outcome"], record["cluster"], record["serial"]) == (
                event, "ok", cluster, serial):
            return record
    return None


async def held_certificates(fleet: rf.Fleet, cluster: str) -> dict[str, Any]:
    """The client certificate and Istio CA certificate the cluster's store holds."""
    held: dict[str, Any] = {}
    async with rf.opened(fleet.store_url(cluster)) as store:
        with contextlib.suppress(errors.NotFound):
            client = await store.get_secret(NS, NAMES.relay_client)
            held["client"] = bundle.load_certificate(client.data["tls.crt"])
        with contextlib.suppress(errors.NotFound):
            cacerts = await store.get_secret(isf.ISTIO_NS, isf.CACERTS)
            held["intermediate"] = bundle.load_certificate(cacerts.data["ca-cert.pem"])
    return held


# -- a full or read-only disk -----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for this test alone: a disk that fills up and can turn read-only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "meshtrust-test", str(mount)],
            capture_output=True, text=True, check=False, timeout=30)
    except FileNotFoundError:
        pytest.skip("mount(8) is not installed: a small disk needs it, as root")
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (it needs root with CAP_SYS_ADMIN): "
                    f"{result.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], capture_output=True,
                   check=True, timeout=30)


@contextlib.contextmanager
def filled(disk: Path, room: int) -> Iterator[None]:
    """Fill ``disk`` up to its last ``room`` bytes for the block's duration."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        block = bytes(64 * 1024)
        try:
            while os.write(fd, block):
                pass
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - room))
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


def store_url(kind: str, disk: Path) -> str:
    return {"sqlite": f"sqlite://{disk}/cluster.db", "dir": f"dir://{disk}/cluster"}[kind]


def client_secret(roots: int = 1) -> dict[str, bytes]:
    """``relay-client-tls-secret`` data of a fresh hierarchy; ``ca.crt`` holds ``roots`` roots."""
    data = dict(rf.secret_data(rf.foreign_hierarchy(), "cluster-1", NAMES.relay_client))
    data["ca.crt"] *= roots
    return data


def check_no_partial_versions(disk: Path) -> None:
    """A dir store holds one version directory per secret: the one ``..data`` points to."""
    for data in disk.glob("cluster/*/*/..data"):
        folder = data.parent
        extra = sorted(entry.name for entry in folder.iterdir() if entry.name.startswith("..")
                       and entry.name not in ("..data", os.readlink(data)))
        assert not extra, f"{folder} holds {extra} beside its current version"
    assert not list(disk.glob("cluster/**/.*.tmp")), "a staged file was left behind"


def check_sqlite_file(disk: Path) -> None:
    import sqlite3  # the test reads the file itself, past the store

    with contextlib.closing(sqlite3.connect(disk / "cluster.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.fixture(params=("sqlite", "dir"))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestFullDisk:
    def test_a_write_that_meets_a_full_disk_fails_cleanly_and_never_lands_later(
            self, backend: str, small_disk: Path) -> None:
        """With the disk full at each point of a write in turn, the write fails with a
        StoreUnavailable naming the cause, the previous version stays, reopening the store
        (which redoes a write its writer logged but did not finish) does not bring the failed
        write back, and once there is room the write lands whole."""
        url = store_url(backend, small_disk)
        old, new = client_secret(), client_secret(roots=40)

        async def scenario() -> list[str]:
            failures: list[str] = []
            async with rf.opened(url) as store:
                before = await store.create(base.Secret(
                    namespace=NS, name=NAMES.relay_client, type="kubernetes.io/tls", data=old))
                for room in range(0, 128 * 1024, 4096):
                    with filled(small_disk, room):
                        try:
                            written = await store.update(dataclasses.replace(before, data=new))
                        except errors.StoreUnavailable as exc:
                            failures.append(str(exc))
                            assert re.search(r"No space left on device|database or disk is full",
                                             str(exc)), exc
                            assert str(small_disk) in str(exc), "the message names the store"
                        else:
                            assert written.data == new
                            break
                        still = await store.get_secret(NS, NAMES.relay_client)
                        assert (still.resource_version, still.data) == (
                            before.resource_version, old)
                        if backend == "dir":
                            check_no_partial_versions(small_disk)
                    async with rf.opened(url) as again:
                        assert await again.revision() == before.resource_version
                        still = await again.get_secret(NS, NAMES.relay_client)
                        assert still.data == old, "a write reported as failed landed later"
                else:
                    raise AssertionError(f"the write failed even with {room} bytes free")
            async with rf.opened(url) as again:
                landed = await again.get_secret(NS, NAMES.relay_client)
                assert landed.data == new
                assert landed.resource_version == await again.revision()
                check_secret(landed, url)
            return failures

        failures = asyncio.run(scenario())
        assert len(failures) >= 3, "the disk was never full enough to fail the write"
        if backend == "dir":
            check_no_partial_versions(small_disk)
        else:
            check_sqlite_file(small_disk)


class TestReadOnlyDisk:
    def test_a_store_on_a_read_only_disk_refuses_writes_and_keeps_its_data(
            self, backend: str, small_disk: Path) -> None:
        """A store whose disk turns read-only refuses writes (a running dir store) or refuses
        to open (SQLite, which must write its WAL even to read) with a message that says so,
        and holds its last version when the disk is writable again."""
        url = store_url(backend, small_disk)
        old = client_secret()

        async def scenario() -> None:
            async with rf.opened(url) as store:
                before = await store.create(base.Secret(
                    namespace=NS, name=NAMES.relay_client, type="kubernetes.io/tls", data=old))
                if backend == "dir":  # it holds no file open between writes
                    remount(small_disk, "ro")
                    with pytest.raises(errors.StoreUnavailable,
                                       match=r"dir store .*Read-only file system"):
                        await store.update(dataclasses.replace(before, data=client_secret()))
                    still = await store.get_secret(NS, NAMES.relay_client)
                    assert (still.resource_version, still.data) == (
                        before.resource_version, old)
            if backend == "sqlite":
                remount(small_disk, "ro")
            with pytest.raises(errors.StoreUnavailable, match=(
                    r"Read-only file system" if backend == "dir"
                    else r"is not writable \(a read-only file system")):
                await open_store(url)
            remount(small_disk, "rw")
            async with rf.opened(url) as store:
                still = await store.get_secret(NS, NAMES.relay_client)
                assert (still.resource_version, still.data) == (before.resource_version, old)
                check_secret(still, url)
                await store.update(dataclasses.replace(still, data=client_secret()))

        asyncio.run(scenario())


# -- an agent killed between making a key and storing its certificate -------------------------


@contextlib.contextmanager
def frozen(process: rf.Process) -> Iterator[None]:
    """SIGSTOP ``process`` for the block: its sockets stay open and nothing answers on them."""
    os.killpg(process.popen.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(process.popen.pid, signal.SIGCONT)


def public_of(secret: base.Secret, key: str) -> bytes:
    return keys.public_key_der(keys.load_private_key(secret.data[key]))


async def wait_pending(url: str, name: str, namespace: str = NS, *,
                       timeout: float = 15) -> base.Secret:
    """The pending key the agent persisted before it sent its request."""
    async def pending() -> base.Secret | None:
        async with rf.opened(url) as store:
            with contextlib.suppress(errors.NotFound):
                return await store.get_secret(namespace, name)
        return None
    return await rf.apoll(pending, timeout=timeout, interval=0.02, what=f"{name} in {url}")


async def wait_client_stored(url: str, key: bytes, *, timeout: float = 20) -> base.Secret:
    """``relay-client-tls-secret`` once it holds ``key`` and that key's pending secret is gone.

    A pending secret with another key proves it was gone too: the agent makes a new pending
    key only when there is none.
    """
    async def stored() -> base.Secret | None:
        async with rf.opened(url) as store:
            try:
                client = await store.get_secret(NS, NAMES.relay_client)
            except errors.NotFound:
                return None
            if public_of(client, "tls.key") != key:
                return None
            try:
                pending = await store.get_secret(NS, CLIENT_PENDING)
            except errors.NotFound:
                return client
        return client if public_of(pending, "tls.key") != key else None
    return await rf.apoll(stored, timeout=timeout, interval=0.02,
                          what="the client certificate for the pending key")


def restart(fleet: rf.Fleet, agent: rf.Process) -> rf.Process:
    """SIGKILL ``agent`` (if it still runs) and start it again with the same arguments."""
    agent.kill(signal.SIGKILL)
    return fleet.spawn(f"{agent.name}-again", *agent.argv)


class TestAgentKilledWithAKeyPending:
    def test_bootstrap_and_renewal_reuse_the_key_a_killed_agent_persisted(
            self, fleet: rf.Fleet) -> None:
        """The server is frozen (SIGSTOP) so that the agent's request cannot complete, the agent
        is SIGKILLed once its pending key is stored, and its successor gets its certificate for
        that same key and leaves no pending secret behind: at bootstrap, then at renewal."""
        server = fleet.start_server(client_lifetime="16s")
        fleet.enroll("cluster-1")
        url = fleet.store_url("cluster-1")

        async def scenario() -> None:
            with frozen(server.process):
                agent = fleet.start_agent("cluster-1", grace_ratio=0.75)
                first = await wait_pending(url, CLIENT_PENDING)
                agent.kill(signal.SIGKILL)
            assert not agent.lines("bootstrapped: client certificate")
            agent = restart(fleet, agent)
            client = await wait_client_stored(url, public_of(first, "tls.key"))
            check_secret(client, url)
            bootstrapped = bundle.load_certificate(client.data["tls.crt"])

            # Frozen again before the renewal is due (2 to 3.4 s after the bootstrap, at 75 %
            # of the lifetime before expiry), so that it cannot complete either.
            with frozen(server.process):
                second = await wait_pending(url, CLIENT_PENDING)
                assert public_of(second, "tls.key") != public_of(first, "tls.key")
                agent.kill(signal.SIGKILL)
            agent = restart(fleet, agent)
            renewed = await wait_client_stored(url, public_of(second, "tls.key"))
            check_secret(renewed, url)
            certificate = bundle.load_certificate(renewed.data["tls.crt"])
            assert certificate.serial_number != bootstrapped.serial_number
            await asyncio.to_thread(agent.wait_for_log, "renewed client certificate: serial "
                                    f"{certificate.serial_number:x}", timeout=5)
            await asyncio.to_thread(fleet.wait_connected, "cluster-1")
            assert not agent.lines("bootstrapping"), "the successor renewed, not bootstrapped"

        asyncio.run(scenario())

    def test_an_intermediate_reuses_the_key_a_killed_agent_persisted(
            self, mesh: isf.Mesh) -> None:
        """The agent's CSR is held by a proxy, the agent is SIGKILLed with its cacerts-pending
        key stored, and its successor gets the same work item signed for that same key and
        removes cacerts-pending."""
        mesh.start_server(insecure=True)
        mesh.add_cluster("cluster-1", simulate=False)
        proxy = mesh.proxies["cluster-1"]
        mesh.fleet.wait_connected("cluster-1")
        proxy.hold(b"BEGIN CERTIFICATE REQUEST")
        mesh.apply(isf.policy())

        async def scenario() -> None:
            await rf.apoll(lambda: asyncio.to_thread(proxy.held.is_set), timeout=20,
                           what="the CSR to reach the proxy")
            pending = await mesh.wait_secret("cluster-1", isf.PENDING)
            mesh.agents["cluster-1"].kill(signal.SIGKILL)
            proxy.release()
            item = await mesh.issued("cluster-1")
            assert item is not None and item.status["state"] == istio.State.REQUESTED.value
            assert await mesh.secret("cluster-1") is None, "nothing was signed"
            await asyncio.to_thread(mesh.restart_agent, "cluster-1")
            done = (await mesh.wait_finished(["cluster-1"]))["cluster-1"]
            assert done.status["round"] == 1, "the same work item was finished"
            cacerts = await mesh.secret("cluster-1")
            assert cacerts is not None
            check_secret(cacerts, "cluster-1")
            assert public_of(cacerts, "ca-key.pem") == public_of(pending, "ca-key.pem")
            assert isf.public_der(cacerts.data["ca-cert.pem"]) == public_of(
                pending, "ca-key.pem")
            assert (await mesh.secret("cluster-1", isf.PENDING)) is None

        asyncio.run(scenario())


# -- PostgreSQL restarted under load --------------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[pgserver.Server]:
    """A PostgreSQL server of this test's own, so that restarting it disturbs no other test.

    It is durable (fsync, synchronous commit), as a production one is: an immediate stop then
    loses no committed write.
    """
    try:
        server = pgserver.Server(durable=True)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def fleet_on(root: Path, mgmt_url: str) -> Iterator[rf.Fleet]:
    fleet = rf.Fleet(root, mgmt_url=mgmt_url)
    try:
        yield fleet
    finally:
        fleet.close()
    fleet.assert_no_tokens_in_logs()


async def relay_call_code(fleet: rf.Fleet, cluster: str) -> grpc.StatusCode:
    """The status of one ReportStatus call with the cluster's own client certificate."""
    held = await fleet.aclient_identity(cluster)
    assert held is not None and fleet.server is not None
    async with rf.relay_channel(fleet.server.relay, rf.Credentials.of(held)) as channel:
        try:
            await rf.report(channel)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def bootstrap_code(fleet: rf.Fleet, cluster: str, trust: bytes) -> grpc.StatusCode:
    """The status of one Bootstrap call with a token that was never minted."""
    assert fleet.server is not None
    try:
        await rf.bootstrap(fleet.server.bootstrap, trust, cluster, "mt1.never.minted",
                           rf.request_for(rf.new_key(), cluster))
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def renewals(server: rf.Server, cluster: str) -> int:
    return len(server.process.lines(f"renewed client certificate of cluster {cluster}:"))


async def collect(store: base.Store, kind: str, into: list[base.WatchEvent],
                  started: asyncio.Event) -> None:
    """Follow ``kind`` into ``into``; ``started`` is set once the follower has read the
    revision it follows from (a write after that reaches it)."""
    async def keep(event: base.WatchEvent) -> None:
        into.append(event)

    async def resync() -> None:
        started.set()
    await follow.follow(store, kind, keep, resync=resync)


async def wait_event(events: list[base.WatchEvent], name: str, *, timeout: float) -> None:
    async def seen() -> bool:
        return any(event.object.name == name for event in events)
    await rf.apoll(seen, timeout=timeout, interval=0.02, what=f"an event for {name}")


@pytest.mark.postgres
class TestPostgresRestart:
    def test_the_store_reconnects_its_pool_its_listener_and_its_followers(
            self, own_postgres: pgserver.Server) -> None:
        """After PostgreSQL restarts no call fails on a connection the restart ended, a
        follower that polled through the outage resumes where it was, and one whose store
        polls only every 30 s is woken by NOTIFY again."""
        url = own_postgres.create_database("pool")

        async def scenario() -> None:
            quiet = await open_store(url, interval=30.0)
            polling = await open_store(url, interval=0.05)
            writer = await open_store(url)
            woken: list[base.WatchEvent] = []
            polled: list[base.WatchEvent] = []
            started = [asyncio.Event(), asyncio.Event()]
            followers = [
                asyncio.create_task(collect(quiet, base.SECRET_KIND, woken, started[0])),
                asyncio.create_task(collect(polling, base.SECRET_KIND, polled, started[1]))]
            try:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
                secret = await writer.create(base.Secret(namespace=NS, name="before",
                                                         data={"k": b"v"}))
                await wait_event(woken, "before", timeout=5)
                await wait_event(polled, "before", timeout=5)
                # Every connection of the pool in use at once, so that all of them are open.
                await asyncio.gather(*(quiet.get_secret(NS, "before") for _ in range(12)))
                await asyncio.to_thread(own_postgres.halt, "immediate")
                with pytest.raises(errors.StoreUnavailable, match="cannot connect"):
                    await quiet.get_secret(NS, "before")
                await asyncio.sleep(1.5)  # longer than a follower waits between retries
                await asyncio.to_thread(own_postgres.resume)
                for index in range(12):  # more calls than the pool has connections
                    assert (await quiet.get_secret(NS, "before")).data == secret.data
                    await quiet.create(base.Secret(namespace=NS, name=f"after-{index}",
                                                   data={"k": b"v"}))
                await wait_event(woken, "after-11", timeout=5)
                # The quiet follower waits for a wake-up now: only a NOTIFY brings this soon.
                await writer.create(base.Secret(namespace=NS, name="notified", data={}))
                await wait_event(woken, "notified", timeout=3)
                await wait_event(polled, "notified", timeout=5)
                expected = ["before", *(f"after-{i}" for i in range(12)), "notified"]
                assert [event.object.name for event in woken] == expected
                assert [event.object.name for event in polled] == expected
            finally:
                for task in followers:
                    task.cancel()
                await asyncio.gather(*followers, return_exceptions=True)
                for store in (writer, polling, quiet):
                    await store.close()

        asyncio.run(scenario())

    def test_the_server_rides_out_a_database_restart_under_load(
            self, own_postgres: pgserver.Server, tmp_path: Path) -> None:
        """PostgreSQL is stopped (immediate: every backend ends, as in a crash) while agents
        renew every few seconds: the server keeps running and answers UNAVAILABLE; once the
        database is back its pool and watches reconnect, every agent renews again, a policy
        change is issued and a deregistration closes the cluster's stream at once."""
        clusters = ("cluster-1", "cluster-2", "cluster-3", "cluster-4")
        with fleet_on(tmp_path, own_postgres.create_database("mgmt")) as fleet:
            mesh = isf.Mesh(fleet)
            server = fleet.start_server(client_lifetime="16s", extra=[
                "--reconcile-interval", "1s"])
            for cluster in clusters:
                fleet.enroll(cluster)
                mesh.agents[cluster] = fleet.start_agent(cluster, grace_ratio=0.75)
            mesh.apply(isf.policy(auto_restart_pods=False))

            async def scenario() -> None:
                await mesh.wait_finished(clusters, timeout=30)
                trust = await fleet.relay_root()
                assert await relay_call_code(fleet, "cluster-1") == grpc.StatusCode.OK

                await asyncio.to_thread(own_postgres.halt, "immediate")
                assert await relay_call_code(fleet, "cluster-1") == grpc.StatusCode.UNAVAILABLE
                assert await bootstrap_code(fleet, "cluster-1", trust) == \
                    grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(2)  # agents' renewals, reports and watches fail meanwhile
                assert server.process.alive
                down = {c: renewals(server, c) for c in clusters}
                await asyncio.to_thread(own_postgres.resume)

                async def answered() -> bool:
                    return await relay_call_code(fleet, "cluster-1") == grpc.StatusCode.OK
                await rf.apoll(answered, timeout=10, interval=0.2,
                               what="a relay call to succeed again")

                def renewed_since() -> bool:
                    return all(renewals(server, c) > down[c] for c in clusters)
                await asyncio.to_thread(rf.poll, renewed_since, timeout=20, interval=0.2,
                                        what="every agent to renew after the restart")
                await mesh.aapply(isf.policy(ttl="900s", auto_restart_pods=False))
                await mesh.wait_finished(clusters, timeout=20, check=lambda item: (
                    item.spec["lifetimeSeconds"] == 900))
                code, _, err = await asyncio.to_thread(
                    isf.cli, "cluster", "deregister", "cluster-4", "--store", fleet.mgmt_url)
                assert code == 0, err
                await asyncio.to_thread(server.process.wait_for_log,
                                        "cluster cluster-4 deregistered; closing its streams",
                                        timeout=5)
                for cluster in clusters[:3]:
                    assert (await fleet.acluster_status(cluster) or {}).get("connected")
                    held = await fleet.aclient_identity(cluster)
                    assert held is not None
                    assert held.certificate.not_valid_after_utc > dt.datetime.now(dt.UTC)

            asyncio.run(scenario())
            assert server.process.alive
            assert server.process.lines(r"postgres store .*(connect|terminat|closed)"), \
                "the outage was not seen"
            for cluster in clusters:
                asyncio.run(check_store(fleet.store_url(cluster)))
            asyncio.run(check_store(fleet.mgmt_url))


# -- the server killed during an issuance storm -----------------------------------------------

STORM = tuple(f"cluster-{index}" for index in range(1, 13))
# What each process logs for a certificate it handed out or stored: (event, cluster, serial).
SERVER_ISSUED = (
    (r"bootstrapped cluster (\S+): client certificate ([0-9a-f]+)", "bootstrap"),
    (r"renewed client certificate of cluster (\S+): ([0-9a-f]+)", "renew"),
    (r"signed the Istio intermediate of cluster (\S+) \(\S+\): ([0-9a-f]+)", "issue"),
)
AGENT_STORED = (
    (r"bootstrapped: client certificate ([0-9a-f]+) stored", "bootstrap"),
    (r"renewed client certificate: serial ([0-9a-f]+),", "renew"),
    (r"wrote istio-system/cacerts: intermediate ([0-9a-f]+) for policy", "issue"),
)


def issuances(process: rf.Process, cluster: str | None = None) -> list[tuple[str, str, str]]:
    """Every certificate ``process`` logged as issued (a server) or stored (an agent)."""
    found = []
    for pattern, event in (SERVER_ISSUED if cluster is None else AGENT_STORED):
        for line in process.lines(pattern):
            match = re.search(pattern, line)
            assert match is not None
            if cluster is None:
                found.append((event, match[1], match[2]))
            else:
                found.append((event, cluster, match[1]))
    return found


async def converged(fleet: rf.Fleet, trust: bytes, ttl: int) -> dict[str, dict[str, Any]] | None:
    """Each cluster's state if every one is connected, holds a client certificate that
    verifies now and has an Istio intermediate FINISHED for the policy with ``ttl``."""
    now = dt.datetime.now(dt.UTC)
    roots = bundle.load_certificates(trust)
    found: dict[str, dict[str, Any]] = {}
    async with rf.opened(fleet.mgmt_url) as mgmt:
        for cluster in STORM:
            status = (await mgmt.get_resource(registry.CLUSTER_KIND, NS, cluster)).status
            try:
                item = await mgmt.get_resource(istio.ISSUED_KIND, NS,
                                               istio.issued_name(isf.POLICY, cluster))
            except errors.NotFound:
                return None
            held = await fleet.aclient_identity(cluster)
            if (not status.get("connected") or held is None or held.expired(now)
                    or item.status.get("state") != istio.State.FINISHED.value
                    or item.spec["lifetimeSeconds"] != ttl):
                return None
            chain = bundle.load_certificates(held.chain)
            verify.verify_chain(chain[0], chain[1:], roots, now, client_auth=True)
            found[cluster] = {"status": status, "item": item}
    return found


class TestServerKilledDuringIssuanceStorm:
    def test_agents_converge_and_the_audit_log_covers_every_certificate(
            self, fleet: rf.Fleet, mesh: isf.Mesh) -> None:
        """Twelve agents bootstrap, renew 16-second client certificates and get Istio
        intermediates while the server is SIGKILLed twice (mid-bootstrap, then mid-renewal
        with a policy change re-issuing every intermediate) and restarted on the same ports:
        every agent converges, every secret of every store is whole, and every certificate
        anyone was handed has an audit record."""
        servers = [fleet.start_server(client_lifetime="16s",
                                      extra=["--reconcile-interval", "1s"])]
        mesh.apply(isf.policy(ttl="60s", auto_restart_pods=False))
        for cluster in STORM:
            fleet.enroll(cluster)
        for cluster in STORM:
            mesh.agents[cluster] = fleet.start_agent(cluster, grace_ratio=0.75)

        def restart() -> None:
            old = fleet.server
            assert old is not None and old.bootstrap_port is not None
            old.process.kill(signal.SIGKILL)
            servers.append(fleet.start_server(
                client_lifetime="16s", relay_port=old.relay_port,
                bootstrap_port=old.bootstrap_port, extra=["--reconcile-interval", "1s"]))

        # First crash: in the middle of the bootstraps and first intermediates.
        servers[0].process.wait_for_log(r"bootstrapped cluster", timeout=30, count=4)
        restart()
        # Second crash: agents renewing, and every intermediate re-issued for a new policy.
        servers[1].process.wait_for_log(r"renewed client certificate of cluster", timeout=30,
                                        count=3)
        signed = len(servers[1].process.lines("signed the Istio intermediate"))
        mesh.apply(isf.policy(ttl="90s", auto_restart_pods=False))
        servers[1].process.wait_for_log("signed the Istio intermediate", timeout=20,
                                        count=signed + 3)
        restart()

        async def wait() -> dict[str, dict[str, Any]]:
            trust = await fleet.relay_root()
            try:
                return await rf.apoll(lambda: converged(fleet, trust, 90), timeout=40,
                                      interval=0.3, what="every agent to converge")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{mesh.tail(*STORM, lines=10)}") from None

        state = asyncio.run(wait())
        for agent in mesh.agents.values():
            agent.kill(signal.SIGKILL)
        servers[-1].process.kill(signal.SIGKILL)

        # Nothing torn anywhere, after all those SIGKILLs.
        mgmt_secrets = asyncio.run(check_store(fleet.mgmt_url))
        assert {NAMES.relay_root, NAMES.relay_signing, NAMES.relay_server} <= {
            s.name for s in mgmt_secrets}
        held = {}
        for cluster in STORM:
            asyncio.run(check_store(fleet.store_url(cluster)))
            held[cluster] = asyncio.run(held_certificates(fleet, cluster))

        # The audit log covers every certificate handed out. It may also hold records of
        # certificates nobody holds: a record is written before its certificate is handed
        # out, so a server killed between the two (or an agent killed before it stored the
        # certificate) leaves a record with no delivered certificate. The reverse, a held
        # certificate with no record, would be a hole in the log.
        async def read_back() -> audit.Reading:
            async with rf.opened(fleet.mgmt_url) as mgmt:
                return await audit.read(mgmt)
        assert asyncio.run(read_back()).damaged == []
        records = audit_records(fleet.mgmt_url)
        for cluster in STORM:
            client, intermediate = held[cluster]["client"], held[cluster]["intermediate"]
            record = (recorded(records, "bootstrap", cluster, f"{client.serial_number:x}")
                      or recorded(records, "renew", cluster, f"{client.serial_number:x}"))
            assert record is not None, f"{cluster}'s client certificate has no audit record"
            assert record["fingerprint"] == bundle.fingerprint(client)
            assert record["profile"] == "relay-client"
            record = recorded(records, "issue", cluster, f"{intermediate.serial_number:x}")
            assert record is not None, f"{cluster}'s Istio intermediate has no audit record"
            assert (record["fingerprint"], record["profile"], record["policy"]) == (
                bundle.fingerprint(intermediate), "istio-intermediate", isf.POLICY)
            item = state[cluster]["item"]
            assert recorded(records, "issue", cluster, item.status["serial"])
            assert item.status["serial"] == f"{intermediate.serial_number:x}"
            client_status = state[cluster]["status"]["clientCertificate"]
            assert (recorded(records, "bootstrap", cluster, client_status["serial"])
                    or recorded(records, "renew", cluster, client_status["serial"]))
        logged = [entry for server in servers for entry in issuances(server.process)]
        logged += [entry for cluster, agent in mesh.agents.items()
                   for entry in issuances(agent, cluster)]
        assert {event for event, _, _ in logged} == {"bootstrap", "renew", "issue"}
        missing = [entry for entry in logged if not recorded(records, *entry)]
        assert not missing, f"handed out with no audit record: {missing}"
        assert len(records) >= len({entry for entry in logged})
