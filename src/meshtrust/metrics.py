"""Prometheus metrics of the server and the agent, named in cert-manager's style.

Each process owns one ``Metrics`` with its own registry (so tests can run
several in one interpreter) and serves it with ``serve(address)``: a small
HTTP listener of our own that answers ``/metrics`` and whatever read-only
``pages`` the process adds (the server's expiry dashboard). It is the only
module that imports ``prometheus_client``.

The HTTP threads only read: the registry (whose collectors lock themselves, or take
the metrics' lock) and the pages' callables, which must return bytes prepared elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import http.server
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import prometheus_client as prom
from prometheus_client import core as prom_core
from cryptography import x509

from meshtrust import errors

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

RELAY_CLIENT = "relay-client"
ISTIO_INTERMEDIATE = "istio-intermediate"

OK, REFUSED, ERROR = "ok", "refused", "error"

_CERTIFICATE_LABELS = ("kind", "cluster", "namespace", "secret")
_LabelValues = tuple[str, str, str, str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Page:
    """One HTTP response body: what a page handler hands the listener."""

    body: bytes
    content_type: str
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


PageHandler = Callable[[], Page]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Certificate:
    """Where a certificate is kept and when it expires and is renewed, for the gauges."""

    kind: str
    cluster: str
    namespace: str
    secret: str
    not_after: dt.datetime
    renew_at: dt.datetime | None = None

    @property
    def labels(self) -> _LabelValues:
        return (self.kind, self.cluster, self.namespace, self.secret)


def outcome_of(exc: BaseException) -> str:
    """``refused`` when the caller asked for what it may not have, else ``error``."""
    if isinstance(exc, (errors.AuthError, errors.PKIError, errors.ConfigError)):
        return REFUSED
    return ERROR


class Metrics:
    """One process's collectors, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        # One series per certificate of the fleet, two per cluster: kept as the
        # certificates themselves and turned into samples when scraped, not as a gauge
        # object per series (about 1 KB each), which ten thousand clusters would make
        # tens of megabytes.
        self._certificates: dict[_LabelValues, Certificate] = {}
        self.registry.register(_CertificateGauges(self))
        self.states = prom.Gauge(
            "meshtrust_certificates", "Certificates of the fleet, by inventory state.",
            ["state"], registry=self.registry)
        self.bootstraps = prom.Counter(
            "meshtrust_bootstrap_attempts", "Token bootstrap attempts, by outcome.",
            ["outcome"], registry=self.registry)
        self.issuance = prom.Counter(
            "meshtrust_issuance", "Certificate issuances, by profile and outcome.",
            ["profile", "outcome"], registry=self.registry)
        self.issuance_seconds = prom.Histogram(
            "meshtrust_issuance_duration_seconds",
            "Time to authorize, sign and record one certificate, by profile and outcome.",
            ["profile", "outcome"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.connected = prom.Gauge(
            "meshtrust_connected_agents", "Agents holding a relay stream to this process.",
            registry=self.registry)
        self.leader = prom.Gauge(
            "meshtrust_server_leader",
            "1 while this server replica holds the leader lease and runs the timed loops.",
            registry=self.registry)
        self.loop_lag = prom.Gauge(
            "meshtrust_server_event_loop_lag_seconds",
            "How late the server's event loop ran a timer, at most, in the last 10 s (sampled "
            "every half second): above a second the server is overloaded and calls wait that "
            "long more.",
            registry=self.registry)
        self.gc_seconds = prom.Gauge(
            "meshtrust_server_gc_seconds",
            "Seconds the server has spent in Python's garbage collector since it started, "
            "its event loop stopped meanwhile (see --gc-threshold).",
            registry=self.registry)
        self.rotation_step = prom.Gauge(
            "meshtrust_root_rotation_step",
            "1 for the step each policy's root rotation is at, 0 for the others.",
            ["policy", "step"], registry=self.registry)
        self.renewals = prom.Counter(
            "meshtrust_rotation", "Client certificate renewals by this agent, by outcome.",
            ["outcome"], registry=self.registry)
        self._lock = threading.RLock()
        self._states: set[str] = set()
        self._rotations: set[tuple[str, str]] = set()

    # -- certificates -------------------------------------------------------------------------

    def certificate(self, certificate: x509.Certificate, *, kind: str, cluster: str,
                    namespace: str, secret: str, renew_at: dt.datetime | None = None) -> None:
        """Record when a certificate expires and, if known, when it will be renewed (if
        not, a renewal time recorded before stays)."""
        cert = Certificate(kind=kind, cluster=cluster, namespace=namespace, secret=secret,
                           not_after=certificate.not_valid_after_utc, renew_at=renew_at)
        with self._lock:
            held = self._certificates.get(cert.labels)
            if renew_at is None and held is not None:
                cert = dataclasses.replace(cert, renew_at=held.renew_at)
            self._certificates[cert.labels] = cert

    def fleet(self, certificates: Iterable[Certificate],
              states: Mapping[str, int] | None = None) -> None:
        """Make the certificate gauges say exactly ``certificates``; drop every other series.

        Two certificates kept in one secret (both roots trusted during a root
        rotation) share a series, which shows the one that expires first.
        """
        chosen: dict[_LabelValues, Certificate] = {}
        for cert in certificates:
            held = chosen.get(cert.labels)
            if held is None or cert.not_after < held.not_after:
                chosen[cert.labels] = cert
        with self._lock:
            self._certificates = chosen
            if states is not None:
                for state in self._states - states.keys():
                    self.states.remove(state)
                for state, count in states.items():
                    self.states.labels(state).set(count)
                self._states = set(states)

    def certificates(self) -> list[Certificate]:
        """The certificates the gauges show now."""
        with self._lock:
            return list(self._certificates.values())

    def rotations(self, current: Mapping[str, str], steps: Sequence[str]) -> None:
        """Set the rotation-step gauges: one series per policy and step, 1 for ``current``."""
        wanted = {(policy, step) for policy in current for step in steps}
        with self._lock:
            for gone in self._rotations - wanted:
                self.rotation_step.remove(*gone)
            for policy, at in current.items():
                for step in steps:
                    self.rotation_step.labels(policy, step).set(1 if step == at else 0)
            self._rotations = wanted

    # -- issuance -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def issuing(self, profile: str) -> Iterator[None]:
        """Count and time the issuance in the ``with`` block, by how it ended.

        ``ok`` when it ends normally, ``refused`` or ``error`` by the
        exception (``outcome_of``), which goes on. A cancelled call counts not.
        """
        started = time.perf_counter()
        outcome = ERROR
        try:
            yield
            outcome = OK
        except Exception as exc:
            outcome = outcome_of(exc)
            raise
        except BaseException:
            outcome = ""
            raise
        finally:
            if outcome:
                self.issuance.labels(profile, outcome).inc()
                self.issuance_seconds.labels(profile, outcome).observe(
                    time.perf_counter() - started)

    @contextlib.contextmanager
    def bootstrapping(self) -> Iterator[None]:
        """Count the bootstrap attempt in the ``with`` block by how it ended.

        ``accepted``; ``refused`` (token or cluster), ``rate_limited``,
        ``invalid`` (a bad request) or ``error`` by the exception, which goes on.
        """
        outcome = "accepted"
        try:
            yield
        except errors.RateLimited:
            outcome = "rate_limited"
            raise
        except errors.AuthError:
            outcome = "refused"
            raise
        except (errors.PKIError, errors.ConfigError):
            outcome = "invalid"
            raise
        except Exception:
            outcome = ERROR
            raise
        except BaseException:
            outcome = ""
            raise
        finally:
            if outcome:
                self.bootstraps.labels(outcome).inc()

    # -- exposition ---------------------------------------------------------------------------

    def exposition(self) -> Page:
        """The registry in the Prometheus text format."""
        return Page(body=prom.generate_latest(self.registry),
                    content_type=prom.CONTENT_TYPE_LATEST)

    def serve(self, address: str,
              pages: Mapping[str, PageHandler] | None = None) -> http.server.ThreadingHTTPServer:
        """Serve ``/metrics`` and ``pages`` on ``host:port`` in a background thread.

        Stop it with ``shutdown()`` then ``server_close()``; ``server_address``
        gives the port bound (for a port of 0).
        """
        host, port = _host_port(address)
        routes: dict[str, PageHandler] = {**(pages or {}), "/metrics": self.exposition}
        handler = type("Handler", (_Handler,), {"routes": routes})
        kind = _IPv6Server if ":" in host else http.server.ThreadingHTTPServer
        try:
            server = kind((host, port), handler)
        except OSError as exc:
            raise errors.ConfigError(f"cannot serve metrics on {address}: {exc}") from exc
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server


class _CertificateGauges:
    """The collector of the certificate gauges, read from ``Metrics.certificates`` (which
    takes the metrics' lock: a scrape runs on the HTTP thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    @staticmethod
    def _families() -> tuple[Any, Any]:
        return (prom_core.GaugeMetricFamily(
                    "meshtrust_certificate_expiration_timestamp_seconds",
                    "The date after which the certificate expires, as a Unix timestamp.",
                    labels=_CERTIFICATE_LABELS),
                prom_core.GaugeMetricFamily(
                    "meshtrust_certificate_renewal_timestamp_seconds",
                    "The date after which the certificate will be renewed, as a Unix "
                    "timestamp.", labels=_CERTIFICATE_LABELS))

    def describe(self) -> Iterator[Any]:
        """The families' names, for the registry to refuse another collector of them."""
        yield from self._families()

    def collect(self) -> Iterator[Any]:
        expiration, renewal = self._families()
        for cert in self._metrics.certificates():
            expiration.add_metric(cert.labels, cert.not_after.timestamp())
            if cert.renew_at is not None:
                renewal.add_metric(cert.labels, cert.renew_at.timestamp())
        yield expiration
        yield renewal


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise errors.ConfigError(f"metrics address {address!r} is not host:port, "
                                 "such as 127.0.0.1:9090")
    return host.strip("[]") or "127.0.0.1", int(port)


class _IPv6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers GET and HEAD for the known paths; nothing else, and it changes nothing."""

    routes: Mapping[str, PageHandler] = {}
    server_version = "meshtrust"
    sys_version = ""

    def do_GET(self) -> None:  # the name http.server calls
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        route = self.routes.get(path)
        if route is None:
            self._send(404, Page(body=b"not found\n", content_type="text/plain"), body)
            return
        try:
            page = route()
        except Exception:  # noqa: BLE001 - one bad page must not end the listener
            log.exception("serving %s failed", path)
            self._send(500, Page(body=b"internal error\n", content_type="text/plain"), body)
            return
        self._send(200, page, body)

    def _send(self, code: int, page: Page, body: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", page.content_type)
        self.send_header("Content-Length", str(len(page.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in page.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(page.body)

    def do_POST(self) -> None:
        self.send_error(405, "read-only")

    do_PUT = do_DELETE = do_PATCH = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
