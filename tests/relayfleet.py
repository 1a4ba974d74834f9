"""A relay fleet of real processes on 127.0.0.1, for the relay's integration tests.

``Fleet`` starts ``meshtrust server`` and ``meshtrust agent`` as subprocesses,
each in its own process group with its log in the test's temporary directory,
and kills them all at teardown. Clusters are enrolled in-process with
``authority.enrollment``; every store is a SQLite file next to the logs.

The module also holds a small direct gRPC client (``bootstrap``, ``report``,
``relay_channel``) for tests that speak the protocol themselves, and ``poll``
/ ``apoll`` to wait for a condition with a deadline instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from meshtrust import clock as clock_module
from meshtrust import rpc, settings
from meshtrust.agent import identity as agent_identity
from meshtrust.agent import watcher
from meshtrust.agent.provider import ClientIdentity
from meshtrust.authority import enrollment, registry, relay_pki
from meshtrust.pki import bundle, csr, hierarchy, issuer, keys, profiles
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages
from meshtrust.store import base, open_store

T = TypeVar("T")

NAMES = settings.SecretNames()
NS = NAMES.relay_namespace
CALL_TIMEOUT = 5.0


def poll(check: Callable[[], T], *, timeout: float, what: str,
         interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def apoll(check: Callable[[], Awaitable[T]], *, timeout: float, what: str,
                interval: float = 0.05) -> T:
    """``poll`` for coroutines."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[base.Store]:
    store = await open_store(url, interval=0.02)
    try:
        yield store
    finally:
        await store.close()


class Process:
    """One meshtrust subprocess in its own process group, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        with log_path.open("ab") as sink:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "meshtrust", *argv], stdout=sink,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, pattern: str) -> list[str]:
        """The log lines that match the regular expression ``pattern``."""
        found = re.compile(pattern)
        return [line for line in self.log().splitlines() if found.search(line)]

    def wait_for_log(self, pattern: str, *, timeout: float, count: int = 1) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; fail if the process dies first."""
        def check() -> list[str]:
            lines = self.lines(pattern)
            if len(lines) >= count:
                return lines
            if not self.alive:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode} before "
                                     f"logging {pattern!r}:\n{self.log()[-3000:]}")
            return []
        return poll(check, timeout=timeout, what=f"{count} x {pattern!r} in {self.name}'s log")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process group and reap the process."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        # Whatever the group still holds (nothing, normally) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


@dataclasses.dataclass
class Server:
    process: Process
    relay_port: int
    bootstrap_port: int | None

    @property
    def relay(self) -> str:
        return f"127.0.0.1:{self.relay_port}"

    @property
    def bootstrap(self) -> str:
        assert self.bootstrap_port is not None, "an insecure server has no bootstrap listener"
        return f"127.0.0.1:{self.bootstrap_port}"


class Fleet:
    """A management server, enrolled clusters and their agents, under ``root``."""

    def __init__(self, root: Path, *, mgmt_url: str | None = None) -> None:
        self.root = root
        self._mgmt_url = mgmt_url
        self.processes: list[Process] = []
        self.server: Server | None = None
        self.tokens: set[str] = set()
        self._servers = 0

    # -- stores -----------------------------------------------------------------------------

    def store_url(self, name: str) -> str:
        return f"sqlite:///{self.root / name}.db"

    @property
    def mgmt_url(self) -> str:
        """The management store: a SQLite file next to the logs unless one was given."""
        return self._mgmt_url or self.store_url("mgmt")

    # -- processes --------------------------------------------------------------------------

    def spawn(self, name: str, *argv: str) -> Process:
        process = Process(name, argv, self.root / f"{name}.log")
        self.processes.append(process)
        return process

    def start_server(self, *, client_lifetime: str = "1h", heartbeat: str = "1s",
                     insecure: bool = False, relay_port: int = 0, bootstrap_port: int = 0,
                     extra: Sequence[str] = ()) -> Server:
        """Start ``meshtrust server`` and wait until it serves (its ready file exists)."""
        self._servers += 1
        name = "server" if self._servers == 1 else f"server-{self._servers}"
        ready = self.root / f"{name}.ready"
        argv = ["server", "--store", self.mgmt_url, "--listen", f"127.0.0.1:{relay_port}",
                "--bootstrap-listen", f"127.0.0.1:{bootstrap_port}", "--ready-file", str(ready),
                "--client-lifetime", client_lifetime, "--heartbeat", heartbeat,
                *(["--insecure"] if insecure else []), *extra]
        process = self.spawn(name, *argv)

        def started() -> dict[str, int] | None:
            if not process.alive:
                raise AssertionError(f"{name} exited with {process.popen.returncode}:\n"
                                     f"{process.log()[-3000:]}")
            return json.loads(ready.read_text()) if ready.exists() else None

        ports = poll(started, timeout=20, what=f"{name} to serve")
        self.server = Server(process=process, relay_port=ports["relay"],
                             bootstrap_port=ports.get("bootstrap"))
        return self.server

    def start_agent(self, cluster: str, *, replica: str | None = None,
                    grace_ratio: float = 0.5, lease_ttl: int = 2, insecure: bool = False,
                    extra: Sequence[str] = ()) -> Process:
        """Start ``meshtrust agent`` for ``cluster`` against the current server."""
        assert self.server is not None, "start the server first"
        replica = replica or f"{cluster}-a"
        argv = ["agent", "--cluster", cluster, "--server", self.server.relay,
                "--store", self.store_url(cluster), "--replica", replica,
                "--grace-ratio", str(grace_ratio), "--status-interval", "1", "--renew-spread", "1",
                "--lease-ttl", str(lease_ttl), *extra]
        if insecure:
            argv.append("--insecure")
        else:
            argv += ["--bootstrap-server", self.server.bootstrap]
        return self.spawn(f"agent-{replica}", *argv)

    def close(self) -> None:
        for process in self.processes:
            if process.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.popen.pid, signal.SIGTERM)
        for process in self.processes:
            process.stop()

    def logs(self) -> dict[str, str]:
        return {process.name: process.log() for process in self.processes}

    def assert_no_tokens_in_logs(self) -> None:
        """No token minted or read by this fleet appears in any process's log."""
        for name, text in self.logs().items():
            for token in self.tokens:
                secret = token.rsplit(".", 1)[-1]
                assert secret not in text, f"a bootstrap token appears in {name}'s log"

    # -- enrolment and state -----------------------------------------------------------------

    def enroll(self, cluster: str, *, token_ttl: dt.timedelta = registry.DEFAULT_TOKEN_TTL,
               shared_token: bool = False, install: bool = True) -> enrollment.Enrollment:
        """Register ``cluster``, mint its token and (by default) put both in its store."""
        return asyncio.run(self.aenroll(cluster, token_ttl=token_ttl,
                                        shared_token=shared_token, install=install))

    async def aenroll(self, cluster: str, *,
                      token_ttl: dt.timedelta = registry.DEFAULT_TOKEN_TTL,
                      shared_token: bool = False, install: bool = True) -> enrollment.Enrollment:
        server = self.server.relay if self.server else "127.0.0.1:1"
        boot = self.server.bootstrap if self.server and self.server.bootstrap_port else server
        async with opened(self.mgmt_url) as mgmt:
            enrolled = await enrollment.enroll(mgmt, clock_module.SystemClock(), cluster,
                                               server=server, bootstrap_server=boot,
                                               shared_token=shared_token, token_ttl=token_ttl)
        self.tokens.add(enrolled.token)
        if install:
            async with opened(self.store_url(cluster)) as store:
                await enrollment.install(store, enrolled)
        return enrolled

    def register(self, cluster: str) -> None:
        """Register ``cluster`` with no token: for bring-your-own certificates and insecure mode."""
        async def go() -> None:
            async with opened(self.mgmt_url) as mgmt:
                await relay_pki.ensure(mgmt, clock_module.SystemClock())
                await registry.Registry(mgmt, clock_module.SystemClock()).register(cluster)
        asyncio.run(go())

    async def token(self, cluster: str, ttl: dt.timedelta = registry.DEFAULT_TOKEN_TTL) -> str:
        async with opened(self.mgmt_url) as mgmt:
            token = await registry.Registry(mgmt, clock_module.SystemClock()).create_token(
                cluster, ttl)
        self.tokens.add(token)
        return token

    def cluster_status(self, cluster: str) -> dict[str, Any] | None:
        """The status of the cluster's KubernetesCluster resource, None if not registered."""
        return asyncio.run(self.acluster_status(cluster))

    async def acluster_status(self, cluster: str) -> dict[str, Any] | None:
        async with opened(self.mgmt_url) as mgmt:
            try:
                resource = await mgmt.get_resource(registry.CLUSTER_KIND, NS, cluster)
            except Exception:  # noqa: BLE001 - NotFound or a store mid-write: not yet
                return None
        return dict(resource.status)

    def client_identity(self, cluster: str) -> ClientIdentity | None:
        return asyncio.run(self.aclient_identity(cluster))

    async def aclient_identity(self, cluster: str) -> ClientIdentity | None:
        """What the cluster's store holds in relay-client-tls-secret, if usable."""
        async with opened(self.store_url(cluster)) as store:
            return await watcher.read_identity(store, NAMES)

    async def relay_root(self) -> bytes:
        async with opened(self.mgmt_url) as mgmt:
            return await relay_pki.trust_bundle(mgmt)

    async def signing_ca(self) -> issuer.CA:
        async with opened(self.mgmt_url) as mgmt:
            return await relay_pki.load_signing_ca(mgmt)

    def wait_connected(self, cluster: str, *, timeout: float = 15) -> dict[str, Any]:
        return poll(lambda: _connected(self.cluster_status(cluster)), timeout=timeout,
                    what=f"{cluster} to be connected")


def _connected(status: dict[str, Any] | None) -> dict[str, Any] | None:
    return status if status and status.get("connected") else None


# -- a direct client -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A client certificate chain, its key and the relay root, as PEM."""

    chain: bytes
    key: bytes
    trust: bytes

    @property
    def certificate(self) -> Any:
        return bundle.load_certificate(self.chain)

    @property
    def serial(self) -> str:
        return f"{self.certificate.serial_number:x}"

    @classmethod
    def of(cls, held: ClientIdentity) -> Credentials:
        return cls(chain=held.chain, key=held.key, trust=held.trust)


def new_key() -> keys.PrivateKey:
    return keys.generate_key(keys.KeyType.EC_P256)


def request_for(key: keys.PrivateKey, cluster: str) -> bytes:
    """A CSR naming ``cluster`` exactly as the agent builds it."""
    return agent_identity.request_for(key, cluster)


def relay_channel(address: str, credentials: Credentials | None = None, *,
                  trust: bytes | None = None) -> grpc.aio.Channel:
    """A channel to the relay (mTLS with ``credentials``) or bootstrap listener."""
    if credentials is None:
        assert trust is not None
        return transport.secure_channel(address, trust=trust)
    return transport.secure_channel(address, trust=credentials.trust, chain=credentials.chain,
                                    key=credentials.key)


async def bootstrap(address: str, trust: bytes, cluster: str, token: str,
                    csr_pem: bytes) -> Any:
    """One Bootstrap call on a fresh channel; raises ``grpc.aio.AioRpcError`` if refused."""
    async with relay_channel(address, trust=trust) as channel:
        return await transport.bootstrap_stub(channel).Bootstrap(messages.BootstrapRequest(
            protocol_version=rpc.PROTOCOL_VERSION, cluster=cluster, token=token, csr=csr_pem),
            timeout=CALL_TIMEOUT)


async def bootstrap_credentials(fleet: Fleet, cluster: str,
                                token: str | None = None) -> Credentials:
    """A client certificate for ``cluster`` got over Bootstrap, as an agent would."""
    assert fleet.server is not None
    token = token or await fleet.token(cluster)
    trust = await fleet.relay_root()
    key = new_key()
    response = await bootstrap(fleet.server.bootstrap, trust, cluster, token,
                               request_for(key, cluster))
    return Credentials(chain=bytes(response.certificate_chain), key=keys.dump_private_key(key),
                       trust=bytes(response.ca_bundle))


async def report(channel: grpc.aio.Channel, *, replica: str = "test",
                 metadata: Sequence[tuple[str, str]] = ()) -> Any:
    """One ReportStatus call; raises ``grpc.aio.AioRpcError`` if refused."""
    return await transport.relay_stub(channel).ReportStatus(
        messages.StatusReport(protocol_version=rpc.PROTOCOL_VERSION, replica=replica),
        timeout=CALL_TIMEOUT, metadata=tuple(metadata))


async def renew(channel: grpc.aio.Channel, csr_pem: bytes) -> Any:
    return await transport.relay_stub(channel).Renew(
        messages.RenewRequest(protocol_version=rpc.PROTOCOL_VERSION, csr=csr_pem),
        timeout=CALL_TIMEOUT)


def work(channel: grpc.aio.Channel, *, replica: str = "test") -> Any:
    """The server's work stream (an async iterator of WorkItem)."""
    return transport.relay_stub(channel).Work(messages.WorkSubscribe(
        protocol_version=rpc.PROTOCOL_VERSION, replica=replica))


# -- certificates made offline ------------------------------------------------------------------


def client_certificate(ca: issuer.CA, cluster: str, lifetime: dt.timedelta) -> dict[str, bytes]:
    """``relay-client-tls-secret`` data for ``cluster`` signed by ``ca`` (as cert-manager would)."""
    key = new_key()
    request = csr.Request(csr=csr.build_csr(key, common_name=cluster, names=[cluster]),
                          public_key=key.public_key())
    cert = issuer.issue(request, ca, profiles.RELAY_CLIENT, dt.datetime.now(dt.UTC), lifetime,
                        issuer.Subject(cluster=cluster))
    return hierarchy.tls_data(cert, key, ca)


def server_certificate(ca: issuer.CA, names: Sequence[str] = ("localhost", "127.0.0.1"),
                       lifetime: dt.timedelta = dt.timedelta(days=1)) -> dict[str, bytes]:
    """``relay-server-tls-secret`` data signed by ``ca``."""
    key = new_key()
    request = csr.Request(csr=csr.build_csr(key), public_key=key.public_key())
    cert = issuer.issue(request, ca, profiles.RELAY_SERVER, dt.datetime.now(dt.UTC), lifetime,
                        issuer.Subject(names=tuple(names)))
    return hierarchy.tls_data(cert, key, ca)


def foreign_hierarchy(cluster: str = "cluster-1") -> hierarchy.Hierarchy:
    """A complete relay PKI of its own, with a root the fleet has never seen."""
    return hierarchy.build(hierarchy.Options(architecture=hierarchy.Architecture.SPLIT,
                                             clusters=(cluster,),
                                             istio_key_type=keys.KeyType.EC_P256),
                           dt.datetime.now(dt.UTC))


def secret_data(made: hierarchy.Hierarchy, cluster: str, name: str) -> dict[str, bytes]:
    return next(s.data for s in made.secrets if s.cluster == cluster and s.name == name)


async def put_secret(url: str, name: str, data: dict[str, bytes], *,
                     labels: dict[str, str] | None = None,
                     type: str = "kubernetes.io/tls") -> base.Secret:
    """Create or replace the secret ``gloo-mesh/name`` in the store at ``url``."""
    async with opened(url) as store:
        secret = base.Secret(namespace=NS, name=name, type=type, data=data, labels=labels or {})
        try:
            current = await store.get_secret(NS, name)
        except Exception:  # noqa: BLE001 - NotFound: create it
            return await store.create(secret)
        return await store.update(dataclasses.replace(
            secret, resource_version=current.resource_version))


def served_certificate(address: str, tmp: Path, credentials: Credentials | None = None) -> Any:
    """The leaf certificate a listener shows a new handshake, as openssl s_client sees it."""
    args = ["openssl", "s_client", "-connect", address, "-servername", "localhost",
            "-alpn", "h2", "-showcerts"]
    if credentials is not None:
        (tmp / "client.crt").write_bytes(credentials.chain)
        (tmp / "client.key").write_bytes(credentials.key)
        args += ["-cert", str(tmp / "client.crt"), "-cert_chain", str(tmp / "client.crt"),
                 "-key", str(tmp / "client.key")]
    # Bytes, not text: after the handshake the server's HTTP/2 preface may be echoed too.
    proc = subprocess.run(args, input=b"", capture_output=True, timeout=20, check=False)
    stdout = proc.stdout.decode("latin-1")
    certificates = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                              stdout, re.S)
    assert certificates, f"openssl s_client got no certificate:\n{stdout}\n{proc.stderr!r}"
    return bundle.load_certificate(certificates[0].encode())


def status_code(exc: BaseException) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None


@contextlib.contextmanager
def fleet_in(root: Path) -> Iterator[Fleet]:
    fleet = Fleet(root)
    try:
        yield fleet
    finally:
        fleet.close()
