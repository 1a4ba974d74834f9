"""Prometheus metrics of the server and the agent, named in cert-manager's style.

Each process owns one ``Metrics`` with its own registry (so tests can run
several in one interpreter) and serves it with ``serve(address)``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import prometheus_client as prom
from cryptography import x509

from meshtrust import errors

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        self.expiration = prom.Gauge(
            "meshtrust_certificate_expiration_timestamp_seconds",
            "The date after which the certificate expires, as a Unix timestamp.",
            ["kind", "cluster", "namespace", "secret"], registry=self.registry)
        self.renewal = prom.Gauge(
            "meshtrust_certificate_renewal_timestamp_seconds",
            "The date after which the certificate will be renewed, as a Unix timestamp.",
            ["kind", "cluster", "namespace", "secret"], registry=self.registry)
        self.bootstraps = prom.Counter(
            "meshtrust_bootstrap_attempts", "Token bootstrap attempts, by outcome.",
            ["outcome"], registry=self.registry)
        self.issuance = prom.Counter(
            "meshtrust_issuance", "Certificate issuances, by profile and outcome.",
            ["profile", "outcome"], registry=self.registry)
        self.issuance_seconds = prom.Histogram(
            "meshtrust_issuance_duration_seconds",
            "Time to authorize, sign and record one certificate, by profile.",
            ["profile"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.connected = prom.Gauge(
            "meshtrust_connected_agents", "Agents holding a relay stream to this process.",
            registry=self.registry)
        self.renewals = prom.Counter(
            "meshtrust_rotation", "Client certificate renewals by this agent, by outcome.",
            ["outcome"], registry=self.registry)

    def certificate(self, certificate: x509.Certificate, *, kind: str, cluster: str,
                    namespace: str, secret: str, renew_at: dt.datetime | None = None) -> None:
        """Record when a certificate expires and, if known, when it will be renewed."""
        labels = {"kind": kind, "cluster": cluster, "namespace": namespace, "secret": secret}
        self.expiration.labels(**labels).set(certificate.not_valid_after_utc.timestamp())
        if renew_at is not None:
            self.renewal.labels(**labels).set(renew_at.timestamp())

    def serve(self, address: str) -> Any:
        """Serve ``/metrics`` on ``host:port`` in a background thread; return the server."""
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise errors.ConfigError(f"metrics address {address!r} is not host:port")
        try:
            server, _thread = prom.start_http_server(int(port), addr=host or "127.0.0.1",
                                                      registry=self.registry)
        except OSError as exc:
            raise errors.ConfigError(f"cannot serve metrics on {address}: {exc}") from exc
        return server
