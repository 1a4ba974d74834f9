"""Simulated agents for bench/fleet.py: many real relay clients in one asyncio process.

Each simulated agent speaks the real protocol with the real messages over
real mutual TLS: it bootstraps with its own token and a CSR for its own key
(on a channel of its own, as the agent does), holds a ``Relay.Work`` stream
(on the one connection it also makes its calls on, as the agent does),
answers Istio work items through the agent's own ``IstioCA`` (the key is made
here, only a CSR is sent, ``cacerts`` is written to an in-memory store), reports
its certificates with ``ReportStatus``, and renews over mTLS when told to. A
busy server (RESOURCE_EXHAUSTED) is answered the way the agent answers it,
with ``meshtrust.agent.backoff``, and so is a failed call on a work item: the
item ends, and is done again when the server sends it again.

What it leaves out of the agent: the lease, the watcher and the on-disk store.
Keys are P-256, made before the clock starts, so that the simulator costs
little CPU next to the server.

A worker process runs ``main(spec, events, commands)``; it reports what
happens as batches of ``(kind, monotonic time, value)`` on ``events`` and
takes ``("go", t0)``, ``("storm", spread)``, ``("stop",)`` on ``commands``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import logging
import random
import resource
import threading
import time
from typing import Any

import grpc
import grpc.aio

from meshtrust import errors, federation, rpc, settings
from meshtrust.agent import app, backoff, connection
from meshtrust.agent import identity as agent_identity
from meshtrust.agent import istio as agent_istio
from meshtrust.pki import bundle, keys
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages
from meshtrust.server import config as server_config
from meshtrust.testing import MemoryStore

SERVER_NAME = "localhost"  # a SAN of the generated relay server certificate
CALL_TIMEOUT = connection.CALL_TIMEOUT  # the agent's
FLUSH_EVERY = 0.2  # seconds between two event batches to the driver
LAG_EVERY = 0.1  # seconds between two measurements of the worker's own event loop lag


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    name: str
    token: str


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    index: int
    clusters: list[ClusterSpec]
    relay: str
    bootstrap: str
    trust: bytes
    report_interval: float  # seconds between status reports (0: only the first)
    separate_unary_channel: bool  # one channel for the stream and one for calls, not one
    renew_keys: bool  # make a second key and CSR per cluster for the storm
    handshakes: bool  # run cross-cluster mTLS handshakes between workloads continuously
    seed: int
    bootstrap_spread: float = 0.0  # as the agent's --bootstrap-spread


class Events:
    """Buffers events and sends them to the driver in batches."""

    def __init__(self, queue: Any, worker: int) -> None:
        self._queue = queue
        self._worker = worker
        self._buffer: list[tuple[str, float, float]] = []

    def add(self, kind: str, value: float = 0.0) -> None:
        self._buffer.append((kind, time.monotonic(), value))

    def flush(self) -> None:
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self._queue.put(("batch", self._worker, batch))


def _code(exc: grpc.aio.AioRpcError) -> str:
    return exc.code().name if exc.code() is not None else "UNKNOWN"


class SimAgent:
    """One cluster's agent."""

    def __init__(self, spec: WorkerSpec, cluster: ClusterSpec, events: Events,
                 rng: random.Random) -> None:
        self.spec = spec
        self.name = cluster.name
        self.token = cluster.token
        self.events = events
        self.rng = rng
        self.key = keys.generate_key(keys.KeyType.EC_P256)
        self.csr = agent_identity.request_for(self.key, self.name)
        self.next_key: keys.PrivateKey | None = None
        self.next_csr = b""
        if spec.renew_keys:
            self.next_key = keys.generate_key(keys.KeyType.EC_P256)
            self.next_csr = agent_identity.request_for(self.next_key, self.name)
        self.chain = b""
        self.key_pem = keys.dump_private_key(self.key)
        self.trust = spec.trust
        self.stream_channel: Any = None
        self.unary_channel: Any = None
        self.retirement = connection.Retirement()
        self.store = MemoryStore(history=16)
        self.istio = agent_istio.IstioCA(self.store, self.name)
        self.working: set[str] = set()
        self.done: set[str] = set()
        self.connected = asyncio.Event()
        self.cacerts: dict[str, bytes] | None = None
        self.cacerts_version = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.reported_codes: set[str] = set()  # the first error of each kind is logged
        self.moved = asyncio.Event()  # set when the certificate changed: move the stream
        self.held_changed = asyncio.Event()  # a new certificate or cacerts: report now
        self.was_connected = False
        self.recorded = app.RecordedStatus()  # as the agent

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, what: str, make: Any, *, again_on_failure: bool = True) -> Any:
        """One unary call, again while the server is busy; returns the reply.

        A failure is tried again with backoff too, unless ``again_on_failure`` is False:
        then it is raised, as the agent raises a failed call on a work item and does the
        item again when the server sends it again.
        An error's event holds how long the failed call ran.
        """
        failure_backoff = 1.0
        while True:
            began = time.monotonic()
            try:
                reply = await make()
                self.events.add(f"call:{what}", time.monotonic() - began)
                return reply
            except grpc.aio.AioRpcError as exc:
                error = transport.translate(exc)
                if isinstance(error, errors.RateLimited):
                    self.events.add(f"busy:{what}")
                    wait = backoff.delay(error, failure_backoff, self.rng)
                else:
                    self.events.add(f"error:{what}:{_code(exc)}", time.monotonic() - began)
                    if _code(exc) not in self.reported_codes:
                        self.reported_codes.add(_code(exc))
                        logging.getLogger("fleetsim").warning(
                            "%s of %s: %s: %s (%s)", what, self.name, _code(exc),
                            exc.details(), exc.debug_error_string())
                    if not again_on_failure:
                        raise
                    wait = backoff.delay(error, failure_backoff, self.rng)
                    failure_backoff = backoff.next_backoff(error, failure_backoff, 30.0)
                if self.stopping:
                    raise
                await asyncio.sleep(wait)

    def _relay_channel(self) -> Any:
        return transport.secure_channel(self.spec.relay, trust=self.trust, chain=self.chain,
                                        key=self.key_pem, server_name=SERVER_NAME)

    async def _rpc(self, method: str, request: Any) -> Any:
        """One unary relay call, on the connection the agent would use for it."""
        channel = self.unary_channel or self.stream_channel
        with self.retirement.using(channel):  # as the agent's RelayClient
            stub = getattr(transport.relay_stub(channel), method)
            return await stub(request, timeout=CALL_TIMEOUT)

    # -- life --------------------------------------------------------------------------------

    async def run(self) -> None:
        # As the agent: the first bootstrap waits a random part of the spread. The
        # latencies start after it; the time to converge counts it.
        await asyncio.sleep(self.rng.uniform(0, self.spec.bootstrap_spread))
        began = time.monotonic()
        await self.bootstrap()
        self.events.add("bootstrapped", time.monotonic() - began)
        self.stream_channel = self._relay_channel()
        if self.spec.separate_unary_channel:
            self.unary_channel = self._relay_channel()
        reporter = asyncio.create_task(self.report_loop())
        try:
            await self.hold_stream(began)
        finally:
            reporter.cancel()

    async def bootstrap(self) -> None:
        request = messages.BootstrapRequest(protocol_version=rpc.PROTOCOL_VERSION,
                                            cluster=self.name, token=self.token, csr=self.csr)

        kept: list[Any] = []

        async def attempt() -> Any:
            # As the agent's RelayClient.bootstrap: a channel for the attempt, kept for
            # the next one only while the server is busy, closed otherwise.
            channel = kept.pop() if kept else transport.secure_channel(
                self.spec.bootstrap, trust=self.trust, server_name=SERVER_NAME)
            try:
                response = await transport.bootstrap_stub(channel).Bootstrap(
                    request, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and not self.stopping:
                    kept.append(channel)
                else:
                    await channel.close()
                raise
            await channel.close()
            return response

        response = await self._call("bootstrap", attempt)
        self.chain = bytes(response.certificate_chain)
        self.trust = bytes(response.ca_bundle) or self.trust
        self.certificate = bundle.load_certificate(self.chain, "certificate chain")

    async def hold_stream(self, began: float) -> None:
        """As the agent's ``_connect``: hold the work stream, and when the certificate
        changes, open a stream on the new connection and end the old one once it answers."""
        failure_backoff = 0.5
        held: asyncio.Task[None] | None = None
        try:
            while not self.stopping:
                self.moved.clear()
                opened = asyncio.Event()
                stream = asyncio.create_task(self._follow(self.stream_channel, opened, began))
                old, held = held, stream
                if old is not None:
                    await app.first_done(stream, asyncio.ensure_future(opened.wait()))
                    old.cancel()
                    # Not kept until the next renewal: the ended task's traceback holds
                    # _follow_on's frame, whose call object holds the old connection open
                    # (the agent's stream generator lets go of its call when closed).
                    old = None
                await app.first_done(stream, asyncio.ensure_future(self.moved.wait()))
                if not stream.done():
                    continue  # a new certificate: move the stream
                held = None
                exc = stream.exception()
                if self.stopping:
                    return
                if isinstance(exc, grpc.aio.AioRpcError):
                    self.events.add(f"error:work:{_code(exc)}")
                elif exc is not None:
                    raise exc
                else:
                    self.events.add("error:work:ENDED")
                self.connected.clear()
                self.events.add("drop")
                if opened.is_set():
                    failure_backoff = 0.5
                await asyncio.sleep(failure_backoff * (1 + self.rng.random() / 2))
                failure_backoff = min(failure_backoff * 2, 30.0)
        finally:
            if held is not None:
                held.cancel()

    async def _follow(self, channel: Any, opened: asyncio.Event, began: float) -> None:
        with self.retirement.using(channel):
            await self._follow_on(channel, opened, began)

    async def _follow_on(self, channel: Any, opened: asyncio.Event, began: float) -> None:
        # As the agent: the subscription carries the status, which the server records.
        status = self._status()
        stream = transport.relay_stub(channel).Work(messages.WorkSubscribe(
            protocol_version=rpc.PROTOCOL_VERSION, replica=f"{self.name}-sim", leader=True,
            status=status))
        async for item in stream:
            if item.heartbeat.status_recorded:
                self.recorded.note(status)
            opened.set()
            if not self.connected.is_set():
                self.connected.set()
                if not self.was_connected:
                    self.was_connected = True
                    self.events.add("connected", time.monotonic() - began)
            if item.HasField("issue_intermediate"):
                self._start_work(item)

    async def report_loop(self) -> None:
        """As the agent's ``_report``: on connecting, when what it holds changed, and every
        interval otherwise; a failed report again after a backoff (or the busy server's time).
        A status the server recorded with the work stream is not sent again within the
        interval."""
        failure_backoff = app.REPORT_RETRY
        while True:
            await self.connected.wait()
            report = self._status()
            began = time.monotonic()
            wait = self.spec.report_interval * (0.5 + self.rng.random())
            since = self.recorded.age(report)
            try:
                if since < self.spec.report_interval:
                    wait = self.spec.report_interval - since
                else:
                    await self._rpc("ReportStatus", report)
                    self.events.add("call:report", time.monotonic() - began)
                    self.recorded.note(report)
                failure_backoff = app.REPORT_RETRY
            except grpc.aio.AioRpcError as exc:
                if self.stopping:
                    return
                self.events.add(f"error:report:{_code(exc)}", time.monotonic() - began)
                error = transport.translate(exc)
                wait = min(backoff.delay(error, failure_backoff, self.rng), wait)
                failure_backoff = backoff.next_backoff(error, failure_backoff, wait)
            if self.spec.report_interval <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.held_changed.wait()
            self.held_changed.clear()

    def _status(self) -> Any:
        return messages.StatusReport(
            protocol_version=rpc.PROTOCOL_VERSION, agent_version="bench",
            replica=f"{self.name}-sim", leader=True, certificates=self._held())

    def _held(self) -> list[Any]:
        cert = self.certificate
        return [messages.HeldCertificate(
            kind="relay-client", namespace=settings.RELAY_NAMESPACE,
            secret=settings.RELAY_CLIENT_SECRET, serial=f"{cert.serial_number:x}",
            subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
            not_before_unix=int(cert.not_valid_before_utc.timestamp()),
            not_after_unix=int(cert.not_valid_after_utc.timestamp()),
            renew_at_unix=int(cert.not_valid_after_utc.timestamp()),
            fingerprint_sha256=bundle.fingerprint(cert), managed=True)]

    # -- work items --------------------------------------------------------------------------

    def _start_work(self, item: Any) -> None:
        if item.id in self.working or item.id in self.done:
            return
        self.working.add(item.id)
        task = asyncio.create_task(self._work(item))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _work(self, item: Any) -> None:
        began = time.monotonic()
        spec = item.issue_intermediate
        request = agent_istio.Request(
            id=item.id, policy=spec.policy, key_type=keys.KeyType.parse(spec.key_type),
            organization=spec.org or "Istio", form=spec.form or "cacerts",
            trust_domain=spec.trust_domain or settings.DEFAULT_TRUST_DOMAIN,
            auto_restart_pods=spec.auto_restart_pods)

        # As the agent's: a CSR is sent again while the server is busy, at the times it
        # gives; any other failure ends the work item, which the server sends again (with
        # the stream's next heartbeat), and the key made for it is used again then.
        async def sign(csr_pem: bytes) -> tuple[bytes, bytes]:
            ack = await self._call("intermediate", lambda: self._rpc("CompleteWork",
                messages.WorkResult(id=item.id, csr=csr_pem, stage="csr")),
                again_on_failure=False)
            return bytes(ack.certificate_chain), bytes(ack.root_bundle)

        try:
            outcome = await self.istio.handle(request, sign, None)
            await self._call("finished", lambda: self._rpc("CompleteWork",
                messages.WorkResult(id=item.id, stage="finished" if outcome.ok else "failed",
                                    error=outcome.message, restart_needed=True)),
                again_on_failure=False)
        except grpc.aio.AioRpcError:
            return  # counted by _call
        except errors.MeshTrustError as exc:
            if not self.stopping:
                self.events.add(f"error:work-item:{type(exc).__name__}")
            return
        finally:
            self.working.discard(item.id)
        self.done.add(item.id)
        secret = await self.store.get_secret(settings.ISTIO_NAMESPACE, settings.ISTIO_CA_SECRET)
        self.cacerts = dict(secret.data)
        self.cacerts_version += 1
        self.held_changed.set()
        self.events.add("intermediate", time.monotonic() - began)

    # -- storm -------------------------------------------------------------------------------

    async def renew(self, spread: float) -> None:
        """Renew the client certificate, after a random part of ``spread`` seconds."""
        await asyncio.sleep(self.rng.random() * spread)
        began = time.monotonic()
        assert self.next_key is not None, "start the worker with renew_keys"
        request = messages.RenewRequest(protocol_version=rpc.PROTOCOL_VERSION,
                                        csr=self.next_csr)
        response = await self._call("renew", lambda: self._rpc("Renew", request))
        chain = bytes(response.certificate_chain)
        if not keys.key_matches(bundle.load_certificate(chain, "certificate chain"),
                                self.next_key):
            self.events.add("error:renew:WRONG_KEY")
            return
        self.events.add("renewed", time.monotonic() - began)
        self.key, self.chain = self.next_key, chain
        self.key_pem = keys.dump_private_key(self.key)
        self.certificate = bundle.load_certificate(chain, "certificate chain")
        # As the agent: later calls use a channel with the new certificate, and the work
        # stream moves to it (with --channels 2, the older two-connection agent, it stays).
        if self.spec.separate_unary_channel:
            old, self.unary_channel = self.unary_channel, self._relay_channel()
        else:
            old, self.stream_channel = self.stream_channel, self._relay_channel()
            self.moved.set()
        self.retirement.retire(old)  # closed once the calls and stream on it are done
        self.held_changed.set()

    async def close(self) -> None:
        self.stopping = True
        for channel in (self.stream_channel, self.unary_channel):
            if channel is not None:
                await channel.close(grace=None)
        await self.retirement.close()
        await self.store.close()


async def handshakes(agents: list[SimAgent], events: Events, rng: random.Random) -> None:
    """Cross-cluster mTLS between workloads of two clusters, one pair after another.

    Each side's workload certificate is issued from its cluster's current
    ``cacerts`` (again whenever that changes, as istiod would after the pods
    restart) and trusts only its cluster's current ``root-cert.pem``.
    """
    issued: dict[str, tuple[int, federation.Workload]] = {}

    def workload(agent: SimAgent) -> federation.Workload | None:
        if agent.cacerts is None:
            return None
        held = issued.get(agent.name)
        if held is None or held[0] != agent.cacerts_version:
            made = federation.workload(agent.name, agent.cacerts, dt.datetime.now(dt.UTC),
                                       service_account=f"sa-{agent.name}")
            held = (agent.cacerts_version, made)
            issued[agent.name] = held
        return held[1]

    while True:
        await asyncio.sleep(0.02)
        a, b = rng.sample(agents, 2)
        left, right = workload(a), workload(b)
        if left is None or right is None:
            continue
        try:
            await federation.handshake(left, right, timeout=5.0)
            events.add("handshake_ok")
        except errors.MeshTrustError as exc:
            events.add("handshake_fail")
            logging.getLogger("fleetsim").warning("handshake %s -> %s failed: %s",
                                                  a.name, b.name, exc)


async def lag_probe(events: Events) -> None:
    """How late this worker's event loop runs a timer (event ``simlag``, in seconds).

    A call's latency is measured here, so it includes the time its reply waited for
    this loop: the driver reports this lag next to the latencies.
    """
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(LAG_EVERY)
        events.add("simlag", max(0.0, loop.time() - asked - LAG_EVERY))


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _run(spec: WorkerSpec, queue: Any, commands: Any) -> None:
    loop = asyncio.get_running_loop()
    events = Events(queue, spec.index)
    rng = random.Random(spec.seed)
    agents = [SimAgent(spec, c, events, random.Random(rng.random())) for c in spec.clusters]
    _collect_less(events)
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def read_commands() -> None:
        while True:
            command = commands.get()
            loop.call_soon_threadsafe(inbox.put_nowait, command)
            if command[0] == "stop":
                return

    threading.Thread(target=read_commands, daemon=True).start()
    queue.put(("ready", spec.index, len(agents)))

    async def flusher() -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            events.flush()

    background = [asyncio.create_task(flusher()), asyncio.create_task(lag_probe(events))]
    lives: list[asyncio.Task[None]] = []
    while True:
        command = await inbox.get()
        if command[0] == "go":
            await asyncio.sleep(max(0.0, command[1] - time.monotonic()))
            lives = [asyncio.create_task(agent.run()) for agent in agents]
            if spec.handshakes and len(agents) >= 2:
                background.append(asyncio.create_task(handshakes(agents, events, rng)))
        elif command[0] == "storm":
            for agent in agents:
                task = asyncio.create_task(agent.renew(command[1]))
                agent.tasks.add(task)
                task.add_done_callback(agent.tasks.discard)
        elif command[0] == "stop":
            break
    for agent in agents:
        agent.stopping = True
    for task in [*lives, *background, *(t for a in agents for t in a.tasks)]:
        task.cancel()
    await asyncio.gather(*lives, *background, return_exceptions=True)
    for agent in agents:
        await agent.close()
    events.flush()
    queue.put(("stopped", spec.index, 0))


def _collect_less(events: Events) -> None:
    """As the server does (``server.app.collecting_less``): collect young objects after
    as many allocations as the server, leave the agents made so far out of every
    collection, and report how long each collection stopped the loop (``simgc``). A
    collection stops every agent of the worker at once, and each pause is part of every
    latency they measure."""
    began = 0.0

    def timed(phase: str, info: dict[str, int]) -> None:
        nonlocal began
        if phase == "start":
            began = time.perf_counter()
        else:
            events.add("simgc", time.perf_counter() - began)

    gc.freeze()
    gc.set_threshold(server_config.DEFAULT_GC_THRESHOLD, *gc.get_threshold()[1:])
    gc.callbacks.append(timed)


def main(spec: WorkerSpec, queue: Any, commands: Any) -> None:
    """A worker process's entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(message)s")
    _raise_file_limit()
    asyncio.run(_run(spec, queue, commands))
