"""Federated Istio trust on a relay fleet of real processes, for the Istio integration tests.

``Mesh`` drives a ``relayfleet.Fleet``: it starts the server with a short
reconcile interval, enrols clusters and starts their agents (over mTLS, or in
insecure mode through a ``RecordingProxy``), applies RootTrustPolicy documents
with the command line, and reads what the stores hold — each cluster's
``IssuedCertificate`` in the management store, its ``cacerts`` and simulated
pods in the cluster's store. Every wait polls with a deadline.

``RecordingProxy`` is a plaintext TCP proxy on 127.0.0.1 that keeps every
byte it forwards, and can hold back a client's bytes from the first match of
a pattern on, so a test can stop a request in flight: in insecure mode each
agent talks to the server through one, and ``work_pattern`` matches the
CompleteWork calls of one round of a cluster's intermediate.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

import relayfleet as rf
from meshtrust import errors, settings
from meshtrust.agent import bounce, simulation
from meshtrust.authority import istio, root_rotation
from meshtrust.cli import main
from meshtrust.cli.output import Output
from meshtrust.pki import bundle, keys
from meshtrust.store import base

POLICY = "mesh"
NS = settings.RELAY_NAMESPACE
ISTIO_NS = settings.ISTIO_NAMESPACE
CACERTS = settings.ISTIO_CA_SECRET
PENDING = f"{CACERTS}-pending"


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``meshtrust ARGV`` in this process; return the exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = main.main(list(argv), Output(stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


def work_pattern(cluster: str, round_: int, policy_name: str = POLICY) -> bytes:
    """Matches the work item ID of ``round_`` of ``cluster``'s intermediate on the wire."""
    name = re.escape(istio.issued_name(policy_name, cluster).encode())
    return name + rb"/[0-9]+/" + str(round_).encode() + rb"(?![0-9])"


def policy(*, ttl: str = "600s", ratio: float = 0.5,
           auto_restart_pods: bool = True) -> dict[str, Any]:
    """The RootTrustPolicy ``mesh``: a generated ECDSA root, ECDSA intermediates."""
    return {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
            "metadata": {"name": POLICY, "namespace": NS},
            "spec": {"config": {
                "mgmtServerCa": {"generated": {"keyType": "ecdsa-p256"}},
                "intermediateCertOptions": {"keyType": "ecdsa-p256", "ttl": ttl,
                                            "secretRotationGracePeriodRatio": ratio},
                "autoRestartPods": auto_restart_pods}}}


def public_der(pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo DER of a private key or certificate in PEM."""
    if b"PRIVATE KEY" in pem:
        return keys.public_key_der(keys.load_private_key(pem))
    return bundle.load_certificate(pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprints(pem: bytes) -> list[str]:
    """The SHA-256 fingerprints of the certificates in a PEM bundle, in order."""
    return [bundle.fingerprint(c) for c in bundle.load_certificates(pem, "bundle")]


def write_cacerts(folder: Path, data: Mapping[str, bytes]) -> Path:
    """Write a ``cacerts`` secret's keys as files in ``folder``, as istiod mounts them."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in data.items():
        (folder / key).write_bytes(value)
    return folder


class Mesh:
    """A management server and agents with simulated pods, all real processes."""

    def __init__(self, fleet: rf.Fleet) -> None:
        self.fleet = fleet
        self.agents: dict[str, rf.Process] = {}
        self.insecure = False
        self.proxies: dict[str, RecordingProxy] = {}

    # -- processes --------------------------------------------------------------------------

    def start_server(self, *, insecure: bool = False, same_ports: bool = False) -> rf.Server:
        """Start (or, with ``same_ports``, restart) the server; trust rounds every second."""
        old = self.fleet.server
        relay_port = bootstrap_port = 0
        if same_ports:
            assert old is not None
            relay_port, bootstrap_port = old.relay_port, old.bootstrap_port or 0
        self.insecure = insecure
        return self.fleet.start_server(heartbeat="1s", insecure=insecure,
                                       relay_port=relay_port, bootstrap_port=bootstrap_port,
                                       extra=["--reconcile-interval", "1s"])

    def kill_server(self) -> None:
        """SIGKILL the server: no shutdown, no flush, as a crash."""
        assert self.fleet.server is not None
        self.fleet.server.process.kill(signal.SIGKILL)

    def add_cluster(self, cluster: str, *, pods: int = 4, simulate: bool = True,
                    extra: Sequence[str] = ()) -> rf.Process:
        """Register ``cluster`` and start its agent.

        ``pods`` workloads (besides istiod and two gateways) are seeded in the
        cluster's store first; ``simulate`` runs the agent with simulated pods.
        In insecure mode the agent reaches the server through a new proxy.
        """
        if self.insecure:
            self.fleet.register(cluster)
        else:
            self.fleet.enroll(cluster)
        if simulate:
            async def seed() -> None:
                async with rf.opened(self.fleet.store_url(cluster)) as store:
                    await simulation.seed(store, workloads_per_namespace=pods)
            asyncio.run(seed())
        argv = [*(["--simulate-pods"] if simulate else []), *extra]
        if self.insecure:
            assert self.fleet.server is not None
            proxy = self.proxies[cluster] = RecordingProxy(self.fleet.server.relay_port)
            agent = self.fleet.spawn(
                f"agent-{cluster}", "agent", "--cluster", cluster, "--server",
                proxy.address, "--store", self.fleet.store_url(cluster), "--insecure",
                "--replica", f"{cluster}-a", "--lease-ttl", "2", "--status-interval", "1",
                "--renew-spread", "1", *argv)
        else:
            agent = self.fleet.start_agent(cluster, extra=argv)
        self.agents[cluster] = agent
        return agent

    def restart_agent(self, cluster: str) -> rf.Process:
        """SIGKILL the agent of ``cluster`` and start it again with the same arguments."""
        old = self.agents[cluster]
        old.kill(signal.SIGKILL)
        again = self.fleet.spawn(f"{old.name}-again", *old.argv)
        self.agents[cluster] = again
        return again

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()

    # -- policies ---------------------------------------------------------------------------

    def apply(self, document: Mapping[str, Any]) -> None:
        """``meshtrust apply -f`` the document, as a user would."""
        path = self.fleet.root / "policy.yaml"
        path.write_text(yaml.safe_dump(dict(document)))
        code, out, err = cli("apply", "-f", str(path), "--store", self.fleet.mgmt_url)
        assert code == 0, err
        assert f"roottrustpolicy/{document['metadata']['name']}" in out

    async def aapply(self, document: Mapping[str, Any]) -> None:
        """``apply`` from inside a running event loop."""
        await asyncio.to_thread(self.apply, document)

    # -- reading state ----------------------------------------------------------------------

    async def issued(self, cluster: str, policy_name: str = POLICY) -> base.Resource | None:
        async with rf.opened(self.fleet.mgmt_url) as mgmt:
            with contextlib.suppress(errors.NotFound):
                return await mgmt.get_resource(istio.ISSUED_KIND, NS,
                                               istio.issued_name(policy_name, cluster))
        return None

    async def secret(self, cluster: str, name: str = CACERTS) -> base.Secret | None:
        async with rf.opened(self.fleet.store_url(cluster)) as store:
            with contextlib.suppress(errors.NotFound):
                return await store.get_secret(ISTIO_NS, name)
        return None

    async def rotation(self, policy_name: str = POLICY) -> base.Resource | None:
        async with rf.opened(self.fleet.mgmt_url) as mgmt:
            with contextlib.suppress(errors.NotFound):
                return await mgmt.get_resource(root_rotation.ROTATION_KIND, NS, policy_name)
        return None

    async def step(self, policy_name: str = POLICY) -> str | None:
        """The step the root rotation is at, None if there is none."""
        found = await self.rotation(policy_name)
        return None if found is None else found.status.get("step")

    async def root_trust(self, policy_name: str = POLICY) -> base.Secret:
        async with rf.opened(self.fleet.mgmt_url) as mgmt:
            return await mgmt.get_secret(NS, settings.SecretNames.root_trust(policy_name))

    async def pods(self, cluster: str) -> dict[str, base.Resource]:
        """The simulated pods of ``cluster`` by ``namespace/name``."""
        async with rf.opened(self.fleet.store_url(cluster)) as store:
            found = await store.list_resources(simulation.POD_KIND)
        return {f"{p.namespace}/{p.name}": p for p in found}

    async def root_cert_configmap(self, cluster: str, namespace: str) -> bytes | None:
        """``root-cert.pem`` of the ``istio-ca-root-cert`` ConfigMap istiod keeps in a namespace."""
        async with rf.opened(self.fleet.store_url(cluster)) as store:
            return await simulation.StorePods(store).root_cert(namespace)

    async def wait_finished(self, clusters: Sequence[str], *, timeout: float = 30,
                            after_round: int = 0,
                            check: Callable[[base.Resource], bool] | None = None
                            ) -> dict[str, base.Resource]:
        """Wait until every cluster is FINISHED in a round after ``after_round``.

        Fail at once, with the message, if one goes FAILED; ``check`` can ask more
        of the finished resource (such as a signer).
        """
        async def done() -> dict[str, base.Resource] | None:
            found = {}
            for cluster in clusters:
                item = await self.issued(cluster)
                if item is None:
                    return None
                state = item.status.get("state")
                if state == istio.State.FAILED.value:
                    raise AssertionError(f"{cluster} FAILED: {item.status.get('message')}\n"
                                         f"{self.tail(cluster)}")
                if (state != istio.State.FINISHED.value
                        or int(item.status.get("round", 0)) <= after_round
                        or (check is not None and not check(item))):
                    return None
                found[cluster] = item
            return found

        try:
            return await rf.apoll(done, timeout=timeout, interval=0.1,
                                  what=f"{', '.join(clusters)} to finish")
        except AssertionError as exc:
            states = {c: (i.status if (i := await self.issued(c)) else None) for c in clusters}
            raise AssertionError(f"{exc}; states: {states}\n{self.tail(*clusters)}") from None

    async def wait_secret(self, cluster: str, name: str, *, timeout: float = 20,
                          check: Callable[[base.Secret], bool] | None = None) -> base.Secret:
        async def found() -> base.Secret | None:
            secret = await self.secret(cluster, name)
            return secret if secret is not None and (check is None or check(secret)) else None
        return await rf.apoll(found, timeout=timeout, interval=0.02,
                              what=f"{ISTIO_NS}/{name} in {cluster}")

    async def wait_step(self, *steps: root_rotation.Step, timeout: float = 60,
                        interval: float = 0.05) -> base.Resource:
        """Wait until the root rotation is at one of ``steps``."""
        wanted = {s.value for s in steps}

        async def at() -> base.Resource | None:
            found = await self.rotation()
            return found if found is not None and found.status.get("step") in wanted else None
        try:
            return await rf.apoll(at, timeout=timeout, interval=interval,
                                  what=f"the root rotation to reach {'/'.join(sorted(wanted))}")
        except AssertionError as exc:
            current = await self.rotation()
            raise AssertionError(f"{exc}; it is at "
                                 f"{current.status if current else None}\n"
                                 f"{self.tail(*self.agents)}") from None

    def tail(self, *clusters: str, lines: int = 40) -> str:
        """The last log lines of the server and the named agents, for failure messages."""
        logs = self.fleet.logs()
        names = [n for n in logs if n.startswith("server")]
        names += [self.agents[c].name for c in clusters if c in self.agents]
        return "\n".join(f"--- {n}\n" + "\n".join(logs.get(n, "").splitlines()[-lines:])
                         for n in names)


def roles(bounced: Sequence[str], pods: Mapping[str, base.Resource]) -> list[bounce.Role | None]:
    """The bounce role of each ``namespace/name`` by the stored pod's labels."""
    return [bounce.role_of(pods[key].labels) if key in pods else None for key in bounced]


class RecordingProxy:
    """A plaintext TCP proxy on 127.0.0.1 that records every byte, in its own thread.

    ``hold(pattern)`` makes it stop forwarding a client's bytes from the first
    chunk that matches the regular expression ``pattern`` (one connection,
    once); ``held`` is set then. ``release()`` closes that connection, so the
    client sees a lost call and retries.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.held = threading.Event()
        self._to_server = bytearray()
        self._to_client = bytearray()
        self._pattern: re.Pattern[bytes] | None = None
        self._held_writers: list[asyncio.StreamWriter] = []
        self._lock = threading.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="recording-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the recording proxy did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold(self, pattern: bytes) -> None:
        """Hold the first client stream whose bytes match ``pattern`` from then on."""
        with self._lock:
            self._pattern = re.compile(pattern)
            self.held.clear()

    def release(self) -> None:
        """Close the held connection; its held bytes are lost. A pattern armed since stays."""
        with self._lock:
            writers, self._held_writers = self._held_writers, []
        self._call(lambda: _close_all(writers))

    def captured(self) -> tuple[bytes, bytes]:
        """Everything forwarded so far: (client → server, server → client)."""
        with self._lock:
            return bytes(self._to_server), bytes(self._to_client)

    def close(self) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, action: Callable[[], object]) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                action()
            finally:
                done.set()
        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        pair = (writer, up_writer)
        self._writers.update(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer, self._to_server, pair),
                                 self._pump(up_reader, writer, self._to_client, None),
                                 return_exceptions=True)
        finally:
            for each in pair:
                each.close()
                self._writers.discard(each)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    record: bytearray,
                    holdable: tuple[asyncio.StreamWriter, ...] | None) -> None:
        """Copy ``reader`` to ``writer``; a client's stream (``holdable``) may be held."""
        tail = b""
        holding = False
        try:
            while chunk := await reader.read(65536):
                if holding:
                    continue  # swallowed: the server never sees the rest of this stream
                if holdable is not None:
                    with self._lock:
                        if self._pattern is not None and self._pattern.search(tail + chunk):
                            self._pattern = None
                            self._held_writers.extend(holdable)
                            holding = True
                    if holding:
                        self.held.set()
                        continue
                with self._lock:
                    record.extend(chunk)
                tail = (tail + chunk)[-512:]
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side ended: end the other, so each peer sees the connection go.
            writer.close()


def _close_all(writers: Sequence[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
