"""The gRPC servicers: translate a call into a use case and its result into a reply.

Nothing here decides policy. The peer's cluster comes from the certificate
gRPC verified (``rpc.transport.peer_certificate``); every refusal is a domain
error that ``rpc.transport.abort`` turns into a status code and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors, metrics, rpc, settings
from meshtrust.authority import istio, relay
from meshtrust.authority import relay_rotation as relay_rotation_module
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages
from meshtrust.server import admission, authn, work
from meshtrust.store import base, manifest

log = logging.getLogger(__name__)

INSECURE_CLUSTER_HEADER = "x-meshtrust-cluster"
WAKE_SLICE = 256  # work streams woken in one turn of the event loop (RelayService.kick_many)
# Clusters with work on its way, per slot such work may hold (``Admission.work_limit``):
# while some CSRs are being signed, as many more are on their way (``work.HandOuts``).
HANDED_OUT_PER_SLOT = 2


def _response(issued: relay.Issued) -> messages.CertificateResponse:
    return messages.CertificateResponse(
        certificate_chain=issued.chain_pem, ca_bundle=issued.ca_bundle, serial=issued.serial,
        not_after_unix=int(issued.certificate.not_valid_after_utc.timestamp()))


class BootstrapService(transport.services.BootstrapServicer):
    """Token bootstrap, on the server-authenticated listener."""

    def __init__(self, authority: relay.RelayAuthority, limiter: authn.FailureLimiter,
                 meters: metrics.Metrics,
                 admission_control: admission.Admission | None = None, *,
                 wait: float | None = None) -> None:
        self._authority = authority
        self._limiter = limiter
        self._meters = meters
        self._admission = admission_control or admission.Admission()
        self._wait = wait  # how long a bootstrap may wait for its slot (None: max_wait)

    async def Bootstrap(self, request: Any, context: Any) -> messages.CertificateResponse:
        peer = transport.peer_host(context)
        try:
            with self._meters.bootstrapping():
                _check_version(request)
                self._limiter.check(peer)
                async with self._admission.slot(transport.time_remaining(context),
                                                wait=self._wait):
                    with self._meters.issuing(metrics.RELAY_CLIENT):
                        issued = await self._authority.bootstrap(
                            request.cluster, request.token, request.csr, peer=peer)
        except errors.RateLimited as exc:
            # Busy, or this peer's refusals used up: not a refusal to count against it.
            log.debug("bootstrap of cluster %r from %s deferred: %s", request.cluster, peer, exc)
            await transport.abort(context, exc)
            raise AssertionError("unreachable") from exc
        except errors.AuthError as exc:
            if not isinstance(exc, errors.RateLimited):
                self._limiter.failed(peer)
            log.warning("bootstrap refused for cluster %r from %s: %s", request.cluster, peer, exc)
            await transport.abort(context, exc)
            raise AssertionError("unreachable") from exc
        except errors.MeshTrustError as exc:
            log.warning("bootstrap refused for cluster %r from %s: %s", request.cluster, peer, exc)
            await transport.abort(context, exc)
            raise AssertionError("unreachable") from exc
        _issued(self._meters, issued, request.cluster)
        log.info("bootstrapped cluster %s: client certificate %s", request.cluster, issued.serial)
        return _response(issued)


class RelayService(transport.services.RelayServicer):
    """Everything an agent does once it holds a client certificate."""

    # This server replica's name: the registry records which replicas hold each
    # cluster's work streams.
    replica = "server"

    def __init__(self, authority: relay.RelayAuthority, clock: clock_module.Clock,
                 meters: metrics.Metrics, *, insecure: bool = False,
                 heartbeat: float = 30.0, istio_ca: istio.IstioAuthority | None = None,
                 admission_control: admission.Admission | None = None,
                 relay_rotation: relay_rotation_module.RelayRootRotations | None = None) -> None:
        self._authority = authority
        self._istio = istio_ca
        self._relay_rotation = relay_rotation
        self._admission = admission_control or admission.Admission()
        self._meters = meters
        self._clock = clock
        self._insecure = insecure
        self._heartbeat = heartbeat
        self._streams: dict[str, set[_Stream]] = {}
        self._closing = False  # ``close``: every stream ended, and none taken on
        self._leaving = 0  # streams ended, recording that this replica no longer holds them
        self._all_gone = asyncio.Event()  # closing, and every stream has left
        # Which clusters have Istio work, followed from the store (``work_changed``); a
        # cluster without any is not looked up on each heartbeat.
        self.work = work.WorkIndex()
        # Which clusters may be handed their new work: per cluster, not per stream, as an
        # agent that renews its certificate opens a second stream before it closes the
        # first. Work not answered within a heartbeat gives up its room: the stream sends
        # it again then anyway.
        self.handouts = work.HandOuts(lambda: HANDED_OUT_PER_SLOT * self._admission.work_limit,
                                      hold=heartbeat)

    async def _cluster(self, context: Any, request: Any, *, registered: bool = True) -> str:
        """The calling cluster, from its verified certificate (or the header when insecure).

        With ``registered`` the registry is asked whether the cluster is still registered;
        a caller whose next store access says so anyway passes False and saves a read.
        """
        pem = transport.peer_certificate(context)
        try:
            _check_version(request)
            if pem is not None:
                return await self._authority.authorize(pem, registered=registered)
            if self._insecure:
                name = transport.metadata(context, INSECURE_CLUSTER_HEADER) or ""
                if registered:
                    await self._authority.registry.get(name)
                return name
            raise errors.AuthError("a client certificate is required")
        except errors.MeshTrustError as exc:
            await self._refuse(context, exc)
            raise AssertionError("unreachable") from exc

    @staticmethod
    async def _refuse(context: Any, exc: errors.MeshTrustError) -> None:
        log.warning("relay call refused from %s: %s", transport.peer_host(context), exc)
        await transport.abort(context, exc)

    async def Renew(self, request: Any, context: Any) -> messages.CertificateResponse:
        # The renewal itself refuses an unregistered cluster, once it is this call's turn: a
        # storm's calls that are told to come back later cost no store read.
        cluster = await self._cluster(context, request, registered=False)
        try:
            async with self._admission.slot(transport.time_remaining(context)):
                with self._meters.issuing(metrics.RELAY_CLIENT):
                    issued = await self._authority.renew(cluster, request.csr)
        except errors.RateLimited as exc:
            log.debug("renewal of cluster %s deferred: %s", cluster, exc)
            await transport.abort(context, exc)
            raise AssertionError("unreachable") from exc
        except errors.MeshTrustError as exc:
            log.warning("renewal refused for cluster %s: %s", cluster, exc)
            await transport.abort(context, exc)
            raise AssertionError("unreachable") from exc
        _issued(self._meters, issued, cluster)
        log.info("renewed client certificate of cluster %s: %s", cluster, issued.serial)
        return _response(issued)

    async def ReportStatus(self, request: Any, context: Any) -> messages.StatusAck:
        # The report's own edit of the registry record refuses an unregistered cluster: one
        # read per report, which ten thousand agents send every 30 s.
        cluster = await self._cluster(context, request, registered=False)
        try:
            await self._authority.registry.reported(cluster, **_reported(request))
        except errors.MeshTrustError as exc:  # not registered; the store is unavailable
            await self._refuse(context, exc)
            raise AssertionError("unreachable") from exc
        return messages.StatusAck(server_time_unix=int(self._clock.now().timestamp()))

    async def Work(self, request: Any, context: Any) -> AsyncIterator[messages.WorkItem]:
        # Recording the connection refuses an unregistered cluster: no read before it.
        cluster = await self._cluster(context, request, registered=False)
        if self._closing:  # a stream that came as the server stops: none is taken on
            await transport.abort(context, _STOPPING)
        registry = self._authority.registry
        stream = _Stream()
        streams = self._streams.setdefault(cluster, set())
        # A stream that moves to the agent's renewed connection finds its old one open: this
        # replica's hold on the cluster is recorded already, and a renewal storm would
        # otherwise read and write every cluster's record once more. A stream whose cluster
        # was deregistered is gone: one that comes after it is recorded, and so refused.
        # The status the agent sent with the subscription is recorded with the connection,
        # in one write, and spares the agent its report. (Its dictionary is made only for
        # that write: ten thousand open streams would otherwise each hold one.)
        told = not request.HasField("status")  # whether the agent knows it was recorded
        recorded = any(s.recorded and not s.gone for s in streams)
        streams.add(stream)
        self._meters.connected.set(len(self._streams))
        connected = False
        try:
            try:
                if not recorded or not told:
                    await registry.connect(cluster, self.replica, report=None if told
                                           else _reported(request.status))
                connected = stream.recorded = True
            except errors.MeshTrustError as exc:  # not registered; the store is unavailable
                await self._refuse(context, exc)
            log.info("agent of cluster %s connected (replica %s)", cluster, request.replica)
            beat = -self._heartbeat  # when the last heartbeat went out (monotonic)
            while not stream.gone:
                due = self._work_due(cluster)
                now = time.monotonic()
                # Woken for new work whose turn has not come, the stream stays quiet: a
                # policy over the whole fleet wakes every stream at once. The first item
                # is a heartbeat, which tells the agent its status was recorded.
                if due or now - beat >= self._heartbeat:
                    beat = now
                    yield messages.WorkItem(heartbeat=messages.Heartbeat(
                        server_time_unix=int(self._clock.now().timestamp()),
                        renew_client=await self._renewal_wanted(cluster),
                        status_recorded=not told))
                    told = True
                if due:
                    # Popped, not iterated: a loop variable would keep the last item
                    # (protobuf and its arena) for as long as the stream rests.
                    items = await self._work_items(cluster)
                    while items:
                        yield items.pop(0)
                await stream.rest(beat + self._heartbeat - now)
            await transport.abort(context, stream.ending or errors.UnknownCluster(
                f"cluster {cluster!r} was deregistered"))
        finally:
            streams = self._streams.get(cluster, set())
            streams.discard(stream)
            if streams:  # the agent moved its stream to a new connection (a new certificate)
                log.debug("a work stream of cluster %s ended; %d still open", cluster,
                          len(streams))
            else:
                self._streams.pop(cluster, None)
                self._kick_each(self.handouts.done(cluster))
                self._meters.connected.set(len(self._streams))
                self._leaving += 1
                try:
                    await registry.disconnect(cluster, self.replica)
                except errors.MeshTrustError as exc:  # the store failed, or the record changed
                    log.warning("cannot record that cluster %s has no stream to this "
                                "replica: %s", cluster, exc)
                finally:
                    self._leaving -= 1
                    self._check_gone()
                if connected:
                    log.info("agent of cluster %s disconnected", cluster)

    def _work_due(self, cluster: str) -> bool:
        """Whether to send ``cluster`` its work now, on a stream that looks for it.

        Work already handed out is sent again at once; new work waits for room among
        the work on its way (``work.HandOuts``), so that work for the whole fleet comes
        back as CSRs as fast as the server signs them, not all in the same second. The
        stream is woken when its turn comes.
        """
        if not self.work.has_new_work(cluster):
            return True
        due, turns = self.handouts.ask(cluster)
        self._kick_each(turns)
        return due

    def work_changed(self, event: base.WatchEvent) -> None:
        """Follow one change to an intermediate, whoever made it (``server.app``): wake
        the streams of a cluster with new work, and once a cluster has none waiting or on
        its way (its CSR signed, its work withdrawn), hand out the next."""
        woken = self.work.note(event)
        if woken:
            self.kick(woken)
        cluster = event.object.labels.get("cluster") if isinstance(
            event.object, base.Resource) else None
        if cluster and not self.work.has_new_work(cluster) and not self.work.awaits_csr(
                cluster):
            self._kick_each(self.handouts.done(cluster))

    async def _renewal_wanted(self, cluster: str) -> bool:
        if self._relay_rotation is None:
            return False
        try:
            return await self._relay_rotation.renewal_wanted(cluster)
        except errors.MeshTrustError:
            return False

    async def _work_items(self, cluster: str) -> list[messages.WorkItem]:
        if self._istio is None or not self.work.has_work(cluster):
            return []
        try:
            work = await self._istio.work_for(cluster)
        except errors.MeshTrustError as exc:
            log.warning("cannot list work for cluster %s: %s", cluster, exc)
            return []
        return [messages.WorkItem(id=w.id, issue_intermediate=messages.IssueIntermediate(
            policy=w.policy, key_type=w.key_type, trust_domain=w.trust_domain,
            org=w.organization, form=w.form, auto_restart_pods=w.auto_restart_pods))
            for w in work]

    def _kick_each(self, clusters: Iterable[str]) -> None:
        for cluster in clusters:
            self.kick(cluster)

    def drop(self, cluster: str) -> None:
        """End the open work streams of ``cluster`` (it was deregistered)."""
        for stream in self._streams.get(cluster, ()):
            stream.end()

    def close(self) -> None:
        """End every work stream, and any opened from now on, telling its agent that the
        server is stopping (``UNAVAILABLE``: it connects again, to another replica if
        there is one). Called as the server stops: a stream that gRPC's own stop cancels
        instead may be reported by gRPC as an error, with a traceback, in the log."""
        self._closing = True
        for streams in self._streams.values():
            for stream in streams:
                stream.end(_STOPPING)
        self._check_gone()

    async def closed(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the streams ``close`` ended to have left
        (each records that this replica no longer holds it); return how many have not."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._all_gone.wait()
        return sum(map(len, self._streams.values())) + self._leaving

    def _check_gone(self) -> None:
        if self._closing and not self._streams and not self._leaving:
            self._all_gone.set()

    def kick(self, cluster: str) -> int:
        """Make the work streams of ``cluster`` look for work now; return how many."""
        streams = self._streams.get(cluster, ())
        for stream in streams:
            stream.wake()
        return len(streams)

    async def kick_many(self, clusters: Iterable[str] | None = None) -> None:
        """``kick`` the streams of ``clusters`` (of every cluster if None), a slice at a time.

        Every stream woken runs in the event loop's next turn, and a turn of ten thousand
        streams lasts a second, in which the server takes in hardly a call (a ``grpc.aio``
        server takes in a method's calls one loop turn after another): so the loop gets a
        turn after each ``WAKE_SLICE`` streams.
        """
        woken = 0
        for cluster in list(self._streams) if clusters is None else clusters:
            woken += self.kick(cluster)
            if woken >= WAKE_SLICE:
                woken = 0
                await asyncio.sleep(0)

    @property
    def connected(self) -> list[str]:
        """Clusters with an open work stream to this server replica."""
        return sorted(self._streams)

    async def record_connections(self) -> None:
        """Record again that this replica holds its streams (after the leader dropped them)."""
        lost: errors.Conflict | None = None
        for cluster in self.connected:
            try:
                await self._authority.registry.connect(cluster, self.replica)
            except errors.UnknownCluster:
                pass  # deregistered meanwhile: its streams are being closed
            except errors.Conflict as exc:
                lost = exc  # the others first; then all again, at the next lease renewal
        if lost is not None:
            raise lost

    async def CompleteWork(self, request: Any, context: Any) -> messages.WorkAck:
        # Signing and recording refuse a deregistered cluster, the CSR once it is its turn.
        cluster = await self._cluster(context, request, registered=False)
        try:
            if self._istio is None:
                raise errors.ConfigError(
                    f"no work item {request.id!r} is waiting for this cluster")
            if request.stage in ("", "csr"):
                async with self._admission.slot(transport.time_remaining(context),
                                                handed_out=True):
                    with self._meters.issuing(metrics.ISTIO_INTERMEDIATE):
                        signed = await self._istio.sign(cluster, request.id, request.csr)
                self._meters.certificate(signed.certificate, kind="istio-intermediate",
                                         cluster=cluster, namespace=settings.ISTIO_NAMESPACE,
                                         secret=settings.ISTIO_CA_SECRET)
                log.info("signed the Istio intermediate of cluster %s (%s): %x", cluster,
                         request.id, signed.certificate.serial_number)
                return messages.WorkAck(certificate_chain=signed.chain_pem,
                                        root_bundle=signed.root_bundle)
            ok = request.stage == "finished"
            await self._istio.report(cluster, request.id, ok=ok, message=request.error,
                                     pods=list(request.pods_bounced),
                                     restart_needed=request.restart_needed)
            log.log(logging.INFO if ok else logging.WARNING, "cluster %s %s work %s%s",
                    cluster, "finished" if ok else "failed", request.id,
                    f": {request.error}" if request.error else "")
            return messages.WorkAck()
        except errors.RateLimited as exc:
            self.handouts.deferred(cluster, exc.retry_after)
            log.debug("work %s of cluster %s deferred: %s", request.id, cluster, exc)
            await transport.abort(context, exc)
            raise AssertionError("unreachable") from exc
        except errors.MeshTrustError as exc:
            log.warning("work %s of cluster %s refused: %s", request.id, cluster, exc)
            await transport.abort(context, exc)
            raise AssertionError("unreachable") from exc


_STOPPING = errors.RPCError("the management server is stopping; connect again (to another "
                            "replica, if there is one)")


@dataclasses.dataclass(eq=False, slots=True)
class _Stream:
    """One open work stream: ``wake`` makes it look for work, ``end`` ends it (with
    ``ending``, or as its cluster's deregistration if None); ``recorded`` once the
    registry holds this replica's connection to its cluster. Ten thousand may be open
    at once, so it is kept small: no attribute dictionary, and no ``asyncio.Event``,
    whose list of waiters alone takes about 800 bytes; a future while it waits."""

    gone: bool = False
    recorded: bool = False
    woken: bool = False
    ending: errors.MeshTrustError | None = None
    waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        self.woken = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def end(self, ending: errors.MeshTrustError | None = None) -> None:
        self.ending = self.ending or ending
        self.gone = True
        self.wake()

    async def rest(self, seconds: float) -> None:
        """Wait until woken or for ``seconds``, whichever comes first; then not woken."""
        if not self.woken:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                # Not wait_for, which on Python 3.11 can lose the cancellation of stop().
                async with asyncio.timeout(seconds):
                    await self.waiter
            except TimeoutError:
                pass
            finally:
                self.waiter = None
        self.woken = False


def _check_version(request: Any) -> None:
    """Refuse a request from a newer protocol than this server speaks (0 means unset)."""
    version = getattr(request, "protocol_version", 0)
    if version > rpc.PROTOCOL_VERSION:
        raise errors.ConfigError(
            f"the agent speaks relay protocol {version}, this server at most "
            f"{rpc.PROTOCOL_VERSION}; upgrade the management server first")


def _reported(report: Any) -> dict[str, Any]:
    """A status report (``ReportStatus``, or a work stream's subscription) as the
    registry records it: the certificates the agent holds, and the agent itself."""
    return {
        "certificates": [{
            "kind": c.kind, "namespace": c.namespace, "secret": c.secret, "serial": c.serial,
            "subject": c.subject, "issuer": c.issuer,
            "notAfter": _iso(c.not_after_unix), "renewAt": _iso(c.renew_at_unix),
            "fingerprint": c.fingerprint_sha256, "managed": c.managed,
        } for c in report.certificates],
        "agent": {"version": report.agent_version, "replica": report.replica,
                  "leader": report.leader},
    }


def _iso(unix: int) -> str:
    """A reported Unix time in RFC 3339; empty when unset or not a date (before year 1,
    after 9999), which an agent's report may hold."""
    if not unix:
        return ""
    try:
        return manifest.dump_time(dt.datetime.fromtimestamp(unix, dt.UTC))
    except (OverflowError, OSError, ValueError):
        return ""


def _issued(meters: metrics.Metrics, issued: relay.Issued, cluster: str) -> None:
    meters.certificate(issued.certificate, kind="relay-client", cluster=cluster,
                       namespace=settings.RELAY_NAMESPACE, secret=settings.RELAY_CLIENT_SECRET)
