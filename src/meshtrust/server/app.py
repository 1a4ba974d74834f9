"""The management server process: wire the store, the authority and the listeners.

``run`` opens the store, makes whatever relay PKI is missing, starts the
bootstrap and relay listeners, and follows three things in the store: the
server certificate secret (a new one is used by the next handshake), the
cluster registry (a deregistered cluster's open streams are ended) and the
clusters' intermediates (their streams look for work). Several replicas may
share a store: the loops that write on a timer run only on the holder of the
leader lease (``server.leadership``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import os
import platform
import resource
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from meshtrust import clock as clock_module
from meshtrust import errors, metrics, settings, signals
from meshtrust.authority import registry as registry_module
from meshtrust.authority import (
    audit,
    ca_config,
    istio,
    relay,
    relay_pki,
    root_rotation,
    relay_renewal,
    relay_rotation,
    signers,
    trust_policy,
)
from meshtrust.pki import bundle
from meshtrust.rpc import transport
from meshtrust.server import admission, authn, dashboard, leadership, service
from meshtrust.server.config import ServerConfig
from meshtrust.store import base, follow, open_store

log = logging.getLogger(__name__)

AUDIT_PRUNE_INTERVAL = 3600.0  # seconds between two prunings of the audit log
LAG_SAMPLE = 0.5  # seconds between two measurements of the event loop's lag
LAG_WINDOW = 10.0  # the lag gauge shows the longest lag of this many seconds
LAG_WARN = 1.0  # a lag above this many seconds is logged (at most once per LAG_WINDOW)
# After a reconcile round, rest this many times its duration (at most RECONCILE_REST_MAX
# seconds), so that rounds take at most a tenth of the server's time; with no change, the
# next round comes after RECONCILE_IDLE times its duration, or the reconcile interval.
RECONCILE_REST = 9.0
RECONCILE_REST_MAX = 60.0
RECONCILE_IDLE = 10.0
STREAMS_LEAVING = 10.0  # seconds a stopping server waits for its work streams to end


class Server:
    """A running management server; ``await stop()`` ends it."""

    def __init__(self, config: ServerConfig, store: base.Store,
                 clock: clock_module.Clock | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock or clock_module.SystemClock()
        self.names = settings.SecretNames()
        self.audit = audit.AuditLog(
            store, self.clock, actor=audit.SERVER,
            sinks=[audit.JsonLinesFile(config.audit_log)] if config.audit_log else ())
        self.registry = registry_module.Registry(store, self.clock, audit=self.audit)
        self.signers = signers.Signers(lock=signers.key_lock(config.key_passphrase_file))
        self.authority = relay.RelayAuthority(store, self.clock, self.registry, relay.Options(
            client_lifetime=config.client_lifetime, token_mode=config.token_mode),
            signer_cache=self.signers)
        self.metrics = metrics.Metrics()
        self.istio = istio.IstioAuthority(store, self.clock, self.registry,
                                          signer_cache=self.signers)
        # The intermediates, kept from the watch of them for the leader's reconcile round.
        self.intermediates = istio.Summaries(self.istio.namespace)
        self.renewal = relay_renewal.RelayRenewal(store, self.clock, self.signers,
                                                  relay_renewal.Options(
            grace_ratio=config.ca_grace_ratio, server_lifetime=config.server_lifetime,
            signing_lifetime=config.signing_lifetime))
        self.rotations = root_rotation.RootRotations(store, self.clock, self.istio)
        self.relay_rotations = relay_rotation.RelayRootRotations(store, self.clock,
                                                                 self.registry, self.signers)
        # One budget of issuances for both listeners: they share the CPU and the store.
        self.admission = admission.Admission(admission.Options(
            limit=config.max_issuances, max_wait=config.max_issuance_wait))
        self.relay_service = service.RelayService(self.authority, self.clock, self.metrics,
                                                  insecure=config.insecure,
                                                  heartbeat=config.heartbeat,
                                                  istio_ca=self.istio,
                                                  admission_control=self.admission,
                                                  relay_rotation=self.relay_rotations)
        self.leadership = leadership.Leadership(
            store, self.clock, replica=config.replica or leadership.default_replica(),
            ttl=config.leader_lease_ttl, namespace=self.names.relay_namespace)
        self.relay_service.replica = self.leadership.replica
        self.leadership.on_present_again = self.relay_service.record_connections
        self.leadership.on_change = lambda leading: self.metrics.leader.set(int(leading))
        # The fleet's clusters and which replicas hold their streams, from the store's watch.
        self.members = registry_module.Members()
        # Set when the leader's reconcile should run a round: a policy, an intermediate, a
        # rotation changed, or a cluster came or went.
        self._round_due = asyncio.Event()
        self._pruned_at = 0.0  # event loop time of the last audit prune; 0: none yet
        self.ports: dict[str, int] = {}
        self._grpc = transport.new_server([(transport.MAX_CONNECTIONS,
                                            connection_quota(open_file_limit()))])
        self._tasks: list[asyncio.Task[None]] = []
        self._credentials: transport.Credentials | None = None
        self._metrics_server: object | None = None
        self.dashboard = dashboard.Dashboard(store, self.clock, self.metrics,
                                             connected=lambda: self.members.connected or (),
                                             interval=config.reconcile_interval)

    async def start(self) -> None:
        sealed = await signers.unlock(self.store, self.signers.lock, self.names)
        for name in sealed:
            log.info("sealed the CA key in %s with the key passphrase", name)
        await self._prepare_cas()
        # Streams recorded under this replica's name were left by an earlier process
        # that ended abruptly; other replicas' are theirs (the leader sweeps dead ones).
        await self.registry.forget_replicas(gone=[self.leadership.replica])
        for kind, name in (("relay-root", self.names.relay_root),
                           ("relay-signing", self.names.relay_signing)):
            try:
                secret = await self.store.get_secret(self.names.relay_namespace, name)
            except errors.NotFound:
                continue  # brought CAs may not be in the store at all
            pem = secret.data.get("tls.crt") or secret.data.get("ca.crt")
            if pem:
                self._record_expiry(pem, kind, name)
        transport.add_services(self._grpc, self.relay_service,
                             service.BootstrapService(self.authority, authn.FailureLimiter(),
                                                      self.metrics, self.admission,
                                                      wait=self.config.max_bootstrap_wait))
        if self.config.metrics:
            await self.dashboard.refresh()
            served = self.metrics.serve(self.config.metrics, self.dashboard.pages())
            self._metrics_server = served
            self.ports["metrics"] = served.server_address[1]
            self._tasks.append(asyncio.create_task(self.dashboard.run()))
            host = self.config.metrics.rpartition(":")[0] or "127.0.0.1"
            log.info("metrics on http://%s:%d/metrics, expiry dashboard on http://%s:%d%s",
                     host, self.ports["metrics"], host, self.ports["metrics"],
                     dashboard.UI_PATH)
        if self.config.insecure:
            log.warning("INSECURE MODE: the relay is plaintext and agents are not authenticated;"
                        " never use this outside a demo")
            self.ports["relay"] = transport.add_listener(self._grpc, self.config.listen, None)
        else:
            self._credentials = transport.Credentials(await self._identity())
            self.ports["relay"] = transport.add_listener(
                self._grpc, self.config.listen,
                self._credentials.server_credentials(require_client_auth=True))
            self.ports["bootstrap"] = transport.add_listener(
                self._grpc, self.config.bootstrap_listen,
                self._credentials.server_credentials(require_client_auth=False))
            self._tasks.append(asyncio.create_task(self._follow_server_secret()))
        self._tasks.append(asyncio.create_task(self._follow_registry()))
        self._tasks.append(asyncio.create_task(self._follow_work()))
        # The leases on a thread and a store connection of their own: a busy event loop
        # must not delay their renewal (leadership.py).
        self._tasks.append(asyncio.create_task(self.leadership.run_apart(
            lambda: open_store(self.config.store))))
        self._tasks.append(asyncio.create_task(self._watch_lag()))
        # What writes on a timer runs on the leader only; every replica serves.
        self._tasks.append(asyncio.create_task(self.leadership.while_leading(
            self._reconcile_trust, self._prune_audit, self._sweep_replicas)))
        await self._grpc.start()
        log.info("meshtrust server listening: %s", self.ports)
        if self.config.ready_file:
            _write_ready(Path(self.config.ready_file), {"pid": os.getpid(), **self.ports})

    async def _prepare_cas(self) -> None:
        """Make what relay PKI is missing, or check what `meshtrust init` set up is there."""
        cas = await ca_config.load(self.store)
        if cas is not None:
            self.authority.options = dataclasses.replace(
                self.authority.options, signer=cas.relay_signer, signer_arn=cas.relay_signer_arn)
            log.info("certificate architecture %s, placement %s; relay certificates signed "
                     "by %s", cas.architecture, cas.placement.value, cas.relay_signer.value)
            if not cas.issues_relay:
                log.warning("this server issues no relay certificates: they are brought and "
                            "renewed outside meshtrust, which only watches and reports them")
                return
        made = await relay_pki.ensure(self.store, self.clock, relay_pki.Options(
            key_type=self.config.key_type, server_names=self.config.server_names,
            server_lifetime=self.config.server_lifetime,
            signing_lifetime=self.config.signing_lifetime, generate_cas=cas is None,
            key_lock=self.signers.lock))
        for name in made:
            log.info("generated %s/%s", self.names.relay_namespace, name)
        await audit.relay_pki_made(self.audit, self.store, self.names, made)

    async def _identity(self) -> transport.Identity:
        creds = await relay_pki.server_credentials(self.store, self.names)
        self._record_expiry(creds.certificate_chain, "relay-server", self.names.relay_server)
        return transport.Identity(chain=creds.certificate_chain, key=creds.private_key,
                                  trust=creds.client_trust, version=creds.resource_version)

    def _record_expiry(self, pem: bytes, kind: str, secret: str) -> None:
        try:
            certificate = bundle.load_certificate(pem, secret)
        except errors.ChainError:
            return
        self.metrics.certificate(certificate, kind=kind, cluster="mgmt",
                                 namespace=self.names.relay_namespace, secret=secret)

    async def _follow_server_secret(self) -> None:
        """Put every new relay-server-tls-secret into the listeners' credentials."""
        watched = (self.names.relay_server, self.names.relay_root)

        async def changed(event: base.WatchEvent) -> None:
            if event.object.name in watched:
                await self._reload()

        await follow.follow(self.store, base.SECRET_KIND, changed,
                            namespace=self.names.relay_namespace, resync=self._reload)

    async def _reload(self) -> None:
        assert self._credentials is not None
        try:
            identity = await self._identity()
        except errors.MeshTrustError as exc:
            log.error("keeping the current server certificate: the new one is unusable: %s", exc)
            return
        if identity.version != self._credentials.identity.version:
            self._credentials.replace(identity)
            log.info("server certificate reloaded (resource version %d)", identity.version)

    async def _follow_registry(self) -> None:
        """End the open streams of clusters that are deregistered; note who is connected.

        The connected clusters are the fleet's, to whichever replica: the dashboard of
        any replica shows them all, the leader's sweep finds in them the clusters that a
        stopped replica held (``_sweep_replicas``), and its reconcile the clusters there
        are (``_reconcile_trust``).
        """
        async def changed(event: base.WatchEvent) -> None:
            if event.type is base.EventType.DELETED:
                log.info("cluster %s deregistered; closing its streams", event.object.name)
                self.relay_service.drop(event.object.name)
            if self.members.note(event):  # a cluster came or went: not a status report
                self._round_due.set()

        async def resync() -> None:
            self.members.fill(await self.registry.records())
            self._round_due.set()

        await follow.follow(self.store, registry_module.CLUSTER_KIND, changed,
                            namespace=self.registry.namespace, resync=resync)

    async def _follow_work(self) -> None:
        """Wake a cluster's work streams when its intermediates change, whoever changed them.

        The leader's reconcile, another replica's signature, an agent's report on
        another replica: every replica sees the write. It keeps the index of which
        clusters have work, wakes a cluster's streams when an intermediate of it becomes
        PENDING (new work), and hands out the next cluster's work when one's was signed
        (``service.RelayService.work_changed``); after a gap it lists them all and wakes
        the streams of every cluster with work. It also keeps the summaries the leader's
        reconcile round reads (``istio.Summaries``), and wakes that round after each
        change it noted.
        """
        async def changed(event: base.WatchEvent) -> None:
            self.relay_service.work_changed(event)
            self.intermediates.note(event)
            self._round_due.set()  # after the note: the round reads the summaries

        async def everyone() -> None:
            listed = await self.store.list_resources(istio.ISSUED_KIND,
                                                     namespace=self.istio.namespace)
            self.relay_service.work.fill(listed)
            self.intermediates.fill(listed)
            del listed
            self._round_due.set()
            await self.relay_service.kick_many(self.relay_service.work.clusters)

        await follow.follow(self.store, istio.ISSUED_KIND, changed, resync=everyone)

    async def _sweep_replicas(self) -> None:
        """The leader drops the connection records of replicas that stopped abruptly."""
        async def forget(live: Collection[str]) -> None:
            # Until the watch has listed the clusters, forget_replicas reads them all.
            await self.registry.forget_replicas(live, among=self.members.stale(live))

        await self.leadership.sweeping(forget)

    async def _reconcile_trust(self) -> None:
        """Keep every cluster's Istio intermediate in line with the trust policies.

        Run by the leader only. A round runs on every change to a policy, a rotation,
        an intermediate or the set of clusters, and at least every
        ``reconcile_interval`` seconds for renewals; ``_follow_work`` wakes the agents.
        """
        # Also set by _follow_registry (the clusters) and _follow_work (the intermediates).
        changed = self._round_due
        changed.set()

        async def wake(_event: base.WatchEvent | None = None) -> None:
            changed.set()

        followers = [asyncio.create_task(follow.follow(self.store, kind, wake, resync=wake))
                     for kind in (trust_policy.POLICY_KIND, root_rotation.ROTATION_KIND)]
        took = 0.0  # seconds the last round took
        try:
            while True:
                try:
                    # Not wait_for, which on Python 3.11 can lose the cancellation of stop().
                    # Rounds on the timer alone take at most a tenth of the time.
                    async with asyncio.timeout(max(self.config.reconcile_interval,
                                                   RECONCILE_IDLE * took)):
                        await changed.wait()
                except TimeoutError:
                    pass
                changed.clear()
                if not self.leadership.leading():
                    continue  # the lease is not surely ours: a round could race the new leader
                began = asyncio.get_running_loop().time()
                try:
                    renewed = await self.renewal.check(await self.authority.signer())
                    await audit.relay_pki_made(self.audit, self.store, self.names, renewed,
                                               how="renewed")
                    await self._rotate_relay_root()
                    await self.rotations.advance()
                    await self.istio.reconcile(self.members.names, self.intermediates)
                except Exception:  # noqa: BLE001 - keep reconciling; log and go on
                    log.exception("reconciling the trust policies failed; retrying")
                    await asyncio.sleep(1)
                # A round goes over every selected cluster: with a large fleet, rounds back
                # to back on every intermediate's change would leave little time to serve.
                # Rest a multiple of the round's duration (changes meanwhile make one round).
                took = asyncio.get_running_loop().time() - began
                await asyncio.sleep(min(RECONCILE_REST * took, RECONCILE_REST_MAX))
        finally:
            for task in followers:
                task.cancel()

    async def _watch_lag(self) -> None:
        """Measure how late the event loop runs a timer: the wait every call adds when busy.
        The gauge holds the longest lag of the last ``LAG_WINDOW`` seconds, so that a scrape
        sees a stall that ended before it."""
        loop = asyncio.get_running_loop()
        warned = -LAG_WINDOW
        recent: collections.deque[tuple[float, float]] = collections.deque()
        while True:
            asked = loop.time()
            await asyncio.sleep(LAG_SAMPLE)
            now = loop.time()
            lag = max(0.0, now - asked - LAG_SAMPLE)
            recent.append((now, lag))
            while recent[0][0] < now - LAG_WINDOW:
                recent.popleft()
            self.metrics.loop_lag.set(max(seen for _, seen in recent))
            if lag > LAG_WARN and now - warned >= LAG_WINDOW:
                warned = now
                log.warning("the server is overloaded: its event loop ran %.1f s late (%d "
                            "issuances in flight, %d waiting for a slot)", lag,
                            self.admission.in_flight, self.admission.waiting)

    async def _prune_audit(self) -> None:
        """Keep the audit log within its retention: at start, then every hour (not again
        each time this replica becomes the leader: pruning reads the whole log)."""
        loop = asyncio.get_running_loop()
        while True:
            due = self._pruned_at + AUDIT_PRUNE_INTERVAL - loop.time()
            if self._pruned_at and due > 0:
                await asyncio.sleep(due)
            try:
                removed = await self.audit.prune(max_age=self.config.audit_retention,
                                                 max_events=self.config.audit_max_events)
                if removed:
                    log.info("audit log: removed %d records past the retention", removed)
            except Exception:  # noqa: BLE001 - keep pruning; log and go on
                log.exception("pruning the audit log failed; retrying in an hour")
            self._pruned_at = loop.time()

    async def _rotate_relay_root(self) -> None:
        """Start a relay root rotation when the root is due; move the one under way on."""
        step = await self.relay_rotations.step()
        if step in (None, relay_rotation.Step.DONE) and await self.renewal.root_due():
            await self.relay_rotations.start()
        asked = self.relay_rotations.wanted
        await self.relay_rotations.advance()
        if self.relay_rotations.wanted not in (None, asked):
            # A step that wants new client certificates: ask every agent now, not at its
            # stream's next heartbeat.
            await self.relay_service.kick_many()

    async def stop(self, grace: float = 2.0) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.leadership.release()  # the next replica leads at once
        # gRPC takes no new call from its stop's first step on; the work streams, which
        # would last past any grace, are then ended with a status the agents act on.
        stopping = asyncio.ensure_future(self._grpc.stop(grace))
        await asyncio.sleep(0)
        self.relay_service.close()
        await stopping
        # Each ended stream records that this replica no longer holds it: a store write,
        # which must not be cut off by the store closing or the process ending.
        left = await self.relay_service.closed(STREAMS_LEAVING)
        if left:
            log.warning("%d work streams had not ended %.0f s after the stop; their clusters "
                        "may show as connected until their agents connect again", left,
                        STREAMS_LEAVING)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
            self._metrics_server.server_close()  # type: ignore[attr-defined]


def _write_ready(path: Path, values: dict[str, int]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(values))
    tmp.replace(path)


_UNLIMITED_FILES = 1 << 20  # the soft limit taken when the hard one is unlimited
FILES_KEPT = 512  # open files kept from connections for the store, logs and gRPC itself


def open_file_limit() -> int:
    """This process's soft limit of open files."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft


def connection_quota(files: int) -> int:
    """How many connections each port takes in at most, with ``files`` open files.

    Past it, gRPC closes a new connection at once and the agent retries later.
    Without it, agents holding two connections while they renew can take every
    file, and then the store cannot open its own and every write fails. A tenth of
    the limit is kept, at least ``FILES_KEPT`` (half of a small limit).
    """
    return max(1, files - max(min(FILES_KEPT, files // 2), files // 10))


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the limit.

    Every connected agent holds a connection, two while it moves to a renewed
    certificate, and the soft limit is often 1,024 (systemd's default): a server
    held there refuses agents past a thousand and, once they took every file, fails
    to open its store. Go programs raise it the same way at start.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, _UNLIMITED_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the limit of open files from %d to %d (%s)", soft,
                        wanted, exc)
    return soft


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def map_large_allocations(threshold: int) -> bool:
    """Have the C library give each allocation of ``threshold`` bytes or more pages of its
    own, given back to the system when it is freed; return whether it did. 0, or a C
    library other than glibc, leaves the allocator as it is.

    Each agent's mutual-TLS connection holds six blocks of 8–17 KiB in gRPC's core (the
    TLS library's two BIO buffers, the secure endpoint's two staging buffers, a read
    buffer), and most of their pages are never written: the messages are small. Taken
    from glibc's heap, such a block reuses memory that earlier connections (the agents'
    bootstraps) wrote and freed, so all of it is resident; mapped on its own, only the
    pages written take memory. glibc maps only blocks of 128 KiB or more to start with.
    At 10,000 agents this is about 170 MiB (docs/benchmarks.md). The setting holds for
    the rest of the process.
    """
    if threshold == 0:
        return False
    if platform.libc_ver()[0] != "glibc":
        log.info("mmap-threshold: the C library is not glibc; its allocator is left as it is")
        return False
    if not ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold):
        log.warning("mmap-threshold: glibc refused %d bytes; its allocator is left as it is",
                    threshold)
        return False
    return True


class CollectorTime:
    """Time spent in Python's garbage collector: a ``gc.callbacks`` entry."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._began = 0.0
        self.count = 0
        self.seconds = 0.0
        self.longest = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = self._clock()
            return
        took = self._clock() - self._began
        self.count += 1
        self.seconds += took
        self.longest = max(self.longest, took)


@contextlib.contextmanager
def collecting_less(threshold: int) -> Iterator[CollectorTime]:
    """Collect the youngest objects after ``threshold`` allocations instead of Python's 700,
    leave out of every collection what is alive now, and time the collections; all undone
    at the end.

    A server holding thousands of agents holds hundreds of thousands of objects, which
    each collection of the oldest generation walks, the event loop stopped meanwhile.
    With 700, most of what the calls allocate is collected young although it would be
    freed anyway, and every ten young collections walk the middle generation; collecting
    less often leaves that work undone (docs/benchmarks.md). What ``start`` made (the
    modules, the CAs, the listeners) mostly lives as long as the process.
    """
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(threshold, *before[1:])
    timer = CollectorTime()
    gc.callbacks.append(timer)
    try:
        yield timer
    finally:
        gc.callbacks.remove(timer)
        gc.set_threshold(*before)
        gc.unfreeze()


async def run(config: ServerConfig) -> None:
    """Run the server until SIGINT or SIGTERM."""
    if map_large_allocations(config.mmap_threshold):
        log.info("allocations of %d bytes or more get memory pages of their own",
                 config.mmap_threshold)
    files = raise_open_file_limit()
    log.info("open files: up to %d (an agent holds one connection, two while it renews); "
             "at most %d connections per port", files, connection_quota(files))
    store = await open_store(config.store)
    server = Server(config, store)
    stop = asyncio.Event()
    with signals.handled(lambda _: stop.set()):
        try:
            await server.start()
            with collecting_less(config.gc_threshold) as collected:
                server.metrics.gc_seconds.set_function(lambda: collected.seconds)
                await stop.wait()
            log.info("stopping; garbage collection took %.1f s in %d collections, the longest "
                     "%.0f ms", collected.seconds, collected.count, collected.longest * 1000)
        finally:
            await server.stop()
            await store.close()
