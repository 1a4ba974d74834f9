"""The agent process: wires the provider, watcher, rotator and gRPC client together.

One agent runs per workload cluster, possibly as several replicas sharing the
cluster's store. They elect a leader with a lease; only the leader bootstraps
and rotates, every replica holds a relay connection and reports its status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import random
import re
from typing import Any

from cryptography import x509

from meshtrust import __version__, errors, metrics, rpc, settings, signals
from meshtrust import clock as clock_module
from meshtrust.agent import backoff as retry
from meshtrust.agent import bounce, identity, istio, simulation
from meshtrust.agent.config import AgentConfig
from meshtrust.agent.connection import RelayClient, describe_trust
from meshtrust.agent.provider import ClientIdentity, Provider
from meshtrust.agent.rotator import Rotator
from meshtrust.agent.watcher import Watcher, read_trust
from meshtrust.pki import bundle, keys, rotation
from meshtrust.rpc.transport import messages
from meshtrust.store import base, follow, lease, open_store

log = logging.getLogger(__name__)

REPORT_RETRY = 2.0  # seconds before a failed status report is sent again, doubling
_TLS_FAILURE = re.compile(r"handshake|certificate_verify_failed|ssl", re.IGNORECASE)


class Agent:
    """A running agent; ``run()`` until cancelled."""

    def __init__(self, config: AgentConfig, store: base.Store,
                 clock: clock_module.Clock | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock or clock_module.SystemClock()
        self.provider = Provider()
        self.leader = asyncio.Event()
        self.connected = asyncio.Event()
        self.client = RelayClient(config, self.provider)
        self.watcher = Watcher(store, self.provider, config.names)
        self.metrics = metrics.Metrics()
        self.rotator = Rotator(config, store, self.provider, self.client, self.leader,
                               self.clock, meters=self.metrics)
        self._leases = lease.Leases(store, namespace=config.names.relay_namespace,
                                    clock=self.clock)
        self._lease_name = f"meshtrust-agent-{config.cluster}"

        self._said: set[str] = set()
        self.istio = istio.IstioCA(store, config.cluster, config.names)
        self.pods = simulation.StorePods(store, clock=self.clock)
        self._working: set[str] = set()
        self._done: set[str] = set()
        self._work_tasks: set[asyncio.Task[None]] = set()
        self._recorded = RecordedStatus()

    async def run(self) -> None:
        jobs = [self.watcher.run(), self._lead(), self._connect(), self._report(),
                self._export()]
        served = self.metrics.serve(self.config.metrics) if self.config.metrics else None
        if self.config.simulate_pods:
            if not await self.pods.list():
                await simulation.seed(self.store, clock=self.clock)
            jobs.append(simulation.SimulatedIstio(self.store, clock=self.clock,
                                                  ready_after=1.0).run(0.2))
        if not self.config.insecure:
            jobs.append(self._bootstrap())
            if self.config.rotate is not False:
                jobs.append(self.rotator.run())
        tasks = [asyncio.create_task(job) for job in jobs]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in [*tasks, *self._work_tasks]:
                task.cancel()
            await asyncio.gather(*tasks, *self._work_tasks, return_exceptions=True)
            if self.leader.is_set():
                await self._leases.release(self._lease_name, self.config.replica)
            await self.client.close()
            if served is not None:
                served.shutdown()
                served.server_close()

    def _say_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)

    async def _lead(self) -> None:
        """Hold or seek the cluster's agent lease."""
        ttl = self.config.lease_ttl
        while True:
            try:
                held = await self._leases.acquire(self._lease_name, self.config.replica, ttl)
            except errors.MeshTrustError as exc:
                log.warning("leader election failed: %s", exc)
                held = False
            if held and not self.leader.is_set():
                log.info("replica %s is now the leader of cluster %s", self.config.replica,
                         self.config.cluster)
                self.leader.set()
            elif not held and self.leader.is_set():
                log.info("replica %s lost the lease", self.config.replica)
                self.leader.clear()
            await asyncio.sleep(ttl / 3)

    async def _bootstrap(self) -> None:
        """With no usable certificate and a token, get one; else say what is needed.

        The first bootstrap waits a random part of ``bootstrap_spread`` first (a fleet
        rolled out at once), and looks again afterwards: a certificate put in meanwhile
        is used instead.
        """
        backoff = 1.0
        spread = self.config.bootstrap_spread
        while True:
            current = self.provider.current
            now = self.clock.now()
            if (current is None or current.expired(now)) and self.leader.is_set():
                if spread:
                    wait, spread = random.uniform(0, spread), 0.0
                    log.info("bootstrapping in %.1f s (a random part of the bootstrap spread, "
                             "%g s)", wait, self.config.bootstrap_spread)
                    await asyncio.sleep(wait)
                    continue
                try:
                    if await self._try_bootstrap(current):
                        backoff = 1.0
                except errors.MeshTrustError as exc:
                    wait = retry.delay(exc, backoff)
                    log.log(logging.INFO if retry.busy(exc) else logging.WARNING,
                            "bootstrap failed: %s; retrying in %.1f s", exc, wait)
                    await asyncio.sleep(wait)
                    backoff = retry.next_backoff(exc, backoff, self.config.reconnect_max)
            await self.provider.wait_for_change(current, timeout=1.0)

    async def _try_bootstrap(self, current: ClientIdentity | None) -> bool:
        names = self.config.names
        token = await self._token()
        trust = await read_trust(self.store, names)
        where = f"{names.relay_namespace}/"
        if token is None or trust is None:
            missing = (f"{where}{names.relay_token} (key token)" if token is None
                       else f"{where}{names.relay_root} (key ca.crt)")
            if current is None:
                self._say_once("no-cert", "no client certificate in %s%s and no %s: register "
                               "the cluster with `meshtrust cluster register %s` and put what it "
                               "prints here, or provide a client certificate yourself",
                               where, names.relay_client, missing, self.config.cluster)
            else:
                self._say_once("expired", "the client certificate in %s%s expired at %s and "
                               "%s is missing: put a fresh certificate there, or mint a token "
                               "with `meshtrust cluster token %s`", where, names.relay_client,
                               current.certificate.not_valid_after_utc.isoformat(), missing,
                               self.config.cluster)
            return False
        key, key_pem = await identity.pending_key(self.store, names, self.config.key_type)
        log.info("bootstrapping cluster %s at %s", self.config.cluster,
                 self.config.bootstrap_address)
        try:
            response = await self.client.bootstrap(
                trust, token, identity.request_for(key, self.config.cluster))
        except errors.RPCError as exc:
            if _TLS_FAILURE.search(str(exc)):
                raise errors.RPCError(
                    f"TLS handshake with {self.config.bootstrap_address} failed: the server's "
                    f"certificate does not chain to the relay root in {where}{names.relay_root};"
                    f" this agent expects the server to chain to {describe_trust(trust)}"
                ) from exc
            raise
        chain = bytes(response.certificate_chain)
        if not keys.key_matches(bundle.load_certificate(chain, "certificate chain"), key):
            raise errors.RPCError("the server returned a certificate for another key")
        await identity.store_certificate(self.store, names, chain=chain, key_pem=key_pem,
                                         trust=bytes(response.ca_bundle) or trust)
        log.info("bootstrapped: client certificate %s stored in %s%s", response.serial, where,
                 names.relay_client)
        await self.watcher.refresh()
        return True

    async def _token(self) -> str | None:
        names = self.config.names
        try:
            secret = await self.store.get_secret(names.relay_namespace, names.relay_token)
        except errors.NotFound:
            return None
        token = secret.data.get("token", b"").decode("utf-8", "replace").strip()
        return token or None

    async def _connect(self) -> None:
        """Hold the work stream open, reconnecting with backoff and the current certificate.

        The stream and the calls share one connection (``RelayClient.channel``): a
        server holding ten thousand agents holds ten thousand connections, not twice
        as many. When the certificate changes (a renewal), a stream is opened on the
        new certificate's connection and the old stream is ended once the new one
        answers, so the server never sees the cluster go; the old connection is
        closed once the calls on it have had time to finish.
        """
        backoff = 0.5
        held: asyncio.Task[None] | None = None  # the stream in use
        try:
            while True:
                current = None if self.config.insecure else await self.provider.wait_ready()
                if current is not None and current.expired(self.clock.now()):
                    await self.provider.wait_for_change(current, timeout=1.0)
                    continue
                opened = asyncio.Event()
                stream = asyncio.create_task(self._hold(self.client.channel(), opened,
                                                        current))
                old, held = held, stream
                if old is not None:  # a new certificate: the old stream ends when this answers
                    try:
                        await first_done(stream, asyncio.ensure_future(opened.wait()))
                    finally:
                        _end(old)
                changed = None if current is None else asyncio.ensure_future(
                    self.provider.wait_for_change(current))
                await first_done(stream, changed)
                if not stream.done():
                    continue  # the certificate changed under a working stream: move it
                held = None
                try:
                    stream.result()
                except errors.MeshTrustError as exc:
                    self._log_connect_failure(exc, current)
                self.connected.clear()
                self.client.reset()
                self.client.next_server()  # with several addresses, try the next replica
                if opened.is_set():
                    backoff = 0.5
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, self.config.reconnect_max)
        finally:
            if held is not None:
                _end(held)

    async def _hold(self, channel: Any, opened: asyncio.Event,
                    current: ClientIdentity | None) -> None:
        """Follow one work stream on ``channel`` until it ends; ``opened`` once it answers.

        The subscription carries the agent's status: the server records it with the
        connection, and says so in the stream's first item, which spares the report.
        """
        status = await self._status(current)
        async for item in self.client.work(channel, self.leader.is_set(), status):
            if item.heartbeat.status_recorded:
                self._recorded.note(status)
            opened.set()
            if item.HasField("issue_intermediate"):
                self._start_work(item)
            elif item.heartbeat.renew_client and self.leader.is_set():
                self.rotator.renew_now()
            if not self.connected.is_set():
                log.info("connected to %s over %s", self.client.address,
                         "plaintext" if self.config.insecure else "mTLS")
                self.connected.set()
                self._said.discard("connect")

    def _start_work(self, item: Any) -> None:
        """Handle an issuance work item once, on the leader, in the background."""
        if not self.leader.is_set() or item.id in self._working or item.id in self._done:
            return
        self._working.add(item.id)
        task = asyncio.create_task(self._work(item))
        self._work_tasks.add(task)
        task.add_done_callback(self._work_tasks.discard)

    async def _work(self, item: Any) -> None:
        spec = item.issue_intermediate
        try:
            request = istio.Request(id=item.id, policy=spec.policy,
                                    key_type=keys.KeyType.parse(spec.key_type),
                                    organization=spec.org or "Istio", form=spec.form or "cacerts",
                                    trust_domain=spec.trust_domain or settings.DEFAULT_TRUST_DOMAIN,
                                    auto_restart_pods=spec.auto_restart_pods)

            async def sign(csr_pem: bytes) -> tuple[bytes, bytes]:
                ack = await retry.while_busy(lambda: self.client.complete_work(
                    messages.WorkResult(id=item.id, csr=csr_pem, stage="csr")),
                    what=f"work item {item.id}")
                return bytes(ack.certificate_chain), bytes(ack.root_bundle)

            outcome = await self.istio.handle(request, sign, self._bounce)
            if outcome.ok and request.auto_restart_pods and self.config.bounce_dry_run:
                outcome = dataclasses.replace(outcome, pods=(), restart_needed=True, message=(
                    "--bounce-dry-run: no pod was restarted; restart istiod, then the "
                    "gateways and workloads, to use the new CA"))
            await self.client.complete_work(messages.WorkResult(
                id=item.id, stage="finished" if outcome.ok else "failed",
                error=outcome.message, pods_bounced=list(outcome.pods),
                restart_needed=outcome.restart_needed))
            self._done.add(item.id)
        except errors.MeshTrustError as exc:
            log.warning("work item %s failed: %s; the server sends it again", item.id, exc)
        finally:
            self._working.discard(item.id)

    async def _bounce(self, new_root: bytes) -> list[str]:
        if not await self.pods.list():
            return []
        result = await bounce.Bouncer(self.pods, progress=_log_bounce).bounce(
            new_root, dry_run=self.config.bounce_dry_run)
        return list(result.planned if result.dry_run else result.bounced)

    def _log_connect_failure(self, exc: errors.MeshTrustError,
                             current: ClientIdentity | None) -> None:
        if current is not None and _TLS_FAILURE.search(str(exc)):
            log.warning("TLS handshake with %s failed (%s); this agent expects the server to "
                        "chain to %s", self.client.address, exc, describe_trust(current.trust))
        elif isinstance(exc, errors.AuthError):
            log.warning("the server refused this agent: %s", exc)
        else:
            log.info("relay connection to %s ended: %s", self.client.address, exc)

    async def _export(self) -> None:
        """Keep the certificate gauges equal to the certificate the provider holds."""
        names = self.config.names
        while True:
            current = self.provider.current
            if current is not None:
                self.metrics.certificate(
                    current.certificate, kind="relay-client", cluster=self.config.cluster,
                    namespace=names.relay_namespace, secret=names.relay_client,
                    renew_at=self.rotator.due_at(current))
            await self.provider.wait_for_change(current, timeout=None)

    async def _report(self) -> None:
        """Tell the server what the agent holds: on connecting, as soon as its client
        certificate or its Istio CA (``cacerts``, whoever wrote it) changes, and every
        ``status_interval`` otherwise. A failed report is sent again with backoff (at a
        busy server's time), not only at the next interval: a relay root rotation waits
        for the report of the renewed certificate.

        What the server recorded with the work stream's subscription counts as a report:
        the same status is not sent again until the interval has passed since."""
        interval = self.config.status_interval
        names = self.config.names
        cacerts = asyncio.Event()

        async def changed(event: base.WatchEvent) -> None:
            if event.object.name == names.istio_ca:
                cacerts.set()

        follower = asyncio.create_task(follow.follow(
            self.store, base.SECRET_KIND, changed, namespace=names.istio_namespace))
        failure_backoff = REPORT_RETRY
        try:
            while True:
                if not self.connected.is_set():
                    try:
                        async with asyncio.timeout(interval):
                            await self.connected.wait()
                    except TimeoutError:
                        pass
                    continue
                current = self.provider.current
                wait = interval
                if current is not None or self.config.insecure:
                    cacerts.clear()
                    try:
                        status = await self._status(current)
                        since = self._recorded.age(status)
                        if since < interval:
                            wait = interval - since
                        else:
                            await self.client.report(status)
                            self._recorded.note(status)
                        failure_backoff = REPORT_RETRY
                    except errors.MeshTrustError as exc:
                        log.debug("status report failed: %s", exc)
                        wait = min(retry.delay(exc, failure_backoff), interval)
                        failure_backoff = retry.next_backoff(exc, failure_backoff, interval)
                waits = [asyncio.ensure_future(self.provider.wait_for_change(current,
                                                                             timeout=wait)),
                         asyncio.ensure_future(cacerts.wait())]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    async def _istio_ca_held(self) -> list[messages.HeldCertificate]:
        """The Istio CA in ``cacerts``, as the server's inventory should see it.

        A ``cacerts`` meshtrust did not write is the user's to renew: the agent
        says so in its log once it is due, and reports it all the same.
        """
        names = self.config.names
        try:
            secret = await self.store.get_secret(names.istio_namespace, names.istio_ca)
            cert = bundle.load_bundle(secret.data).certificate
        except (errors.NotFound, errors.PKIError):
            return []
        managed = secret.labels.get(settings.MANAGED_LABEL) == "meshtrust"
        renew_at = rotation.renew_at(cert, self.config.grace_ratio)
        if not managed and renew_at <= self.clock.now():
            self._say_once(f"cacerts-due-{cert.serial_number:x}",
                           "%s/%s (serial %x) is past its renewal time and expires at %s; it is "
                           "not managed by meshtrust, so renew it yourself",
                           names.istio_namespace, names.istio_ca, cert.serial_number,
                           cert.not_valid_after_utc.isoformat())
        return [_held("istio-intermediate", names.istio_namespace, names.istio_ca, cert,
                      renew_at, managed)]

    async def _status(self, current: ClientIdentity | None) -> messages.StatusReport:
        """What the agent holds: its client certificate ``current`` and its Istio CA."""
        held = []
        if current is not None:
            names = self.config.names
            held.append(_held("relay-client", names.relay_namespace, names.relay_client,
                              current.certificate, self.rotator.due_at(current),
                              current.managed))
        held += await self._istio_ca_held()
        return messages.StatusReport(protocol_version=rpc.PROTOCOL_VERSION,
                                     agent_version=__version__, replica=self.config.replica,
                                     leader=self.leader.is_set(), certificates=held)


class RecordedStatus:
    """The last status the server recorded, by a report or with a work stream's
    subscription, and when (the event loop's clock)."""

    def __init__(self) -> None:
        self._last: tuple[messages.StatusReport, float] | None = None

    def note(self, status: messages.StatusReport) -> None:
        self._last = (status, asyncio.get_running_loop().time())

    def age(self, status: messages.StatusReport) -> float:
        """Seconds since the server recorded ``status`` (infinite if it did not)."""
        if self._last is None or self._last[0] != status:
            return float("inf")
        return asyncio.get_running_loop().time() - self._last[1]


def _held(kind: str, namespace: str, secret: str, cert: x509.Certificate,
          renew_at: dt.datetime, managed: bool) -> messages.HeldCertificate:
    return messages.HeldCertificate(
        kind=kind, namespace=namespace, secret=secret, serial=f"{cert.serial_number:x}",
        subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
        not_before_unix=_unix(cert.not_valid_before_utc),
        not_after_unix=_unix(cert.not_valid_after_utc), renew_at_unix=_unix(renew_at),
        fingerprint_sha256=bundle.fingerprint(cert), managed=managed)


def _unix(value: dt.datetime) -> int:
    return int(value.timestamp())


async def run(config: AgentConfig) -> None:
    """Run an agent until SIGINT or SIGTERM."""
    store = await open_store(config.store)
    agent = Agent(config, store)
    task = asyncio.current_task()
    assert task is not None
    with signals.handled(lambda _: task.cancel()):
        try:
            await agent.run()
        except asyncio.CancelledError:
            log.info("stopping")
        finally:
            await store.close()


def _log_bounce(event: bounce.Event) -> None:
    log.info("pod restart: %s", event)


async def first_done(stream: asyncio.Task[Any], helper: asyncio.Future[Any] | None) -> None:
    """Wait until ``stream`` ends or ``helper`` is done; the helper is cancelled either way."""
    waits: set[asyncio.Future[Any]] = {stream} if helper is None else {stream, helper}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if helper is not None:
            helper.cancel()


def _end(stream: asyncio.Task[Any]) -> None:
    """Cancel a stream that is no longer used; how it ended no longer matters."""
    stream.cancel()
    stream.add_done_callback(lambda task: task.cancelled() or task.exception())
