"""The agent's settings, one frozen value with sane defaults."""

from __future__ import annotations

import dataclasses
import os
import socket

from meshtrust import errors, settings
from meshtrust.pki import keys

# Seconds between two status reports that nothing prompted: a report also goes as soon as
# the client certificate or the Istio CA changes, so this only refreshes the server's view.
DEFAULT_STATUS_INTERVAL = 300.0
# Seconds over which an overdue renewal is spread at random: a whole fleet finds its
# certificates due at once after an outage, or when a relay root rotation asks them all.
# The server's longest "come back later" is as long (server.admission.Options.max_retry):
# ten thousand agents over 30 s came faster than one server can even take calls in
# (docs/benchmarks.md). Never more than a tenth of the time the certificate has left.
DEFAULT_RENEW_SPREAD = 300.0
# Seconds over which the first bootstrap is spread at random (0: at once). An agent rolled
# out alone should not wait; a fleet rolled out at once should, by about its size divided
# by the rate at which the server bootstraps (docs/benchmarks.md): ten thousand agents
# calling in the same second leave most of their calls in gRPC's backlog until they time out.
DEFAULT_BOOTSTRAP_SPREAD = 0.0


def default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentConfig:
    cluster: str
    server: str
    store: str
    bootstrap_server: str | None = None
    server_name: str | None = None
    insecure: bool = False
    grace_ratio: float = settings.DEFAULT_GRACE_RATIO
    jitter: float = 0.1
    renew_spread: float = DEFAULT_RENEW_SPREAD
    bootstrap_spread: float = DEFAULT_BOOTSTRAP_SPREAD
    key_type: keys.KeyType = keys.KeyType.EC_P256
    replica: str = dataclasses.field(default_factory=default_replica)
    lease_ttl: float = 15.0
    # Reports also go at once when what the agent holds changes (agent.app._report).
    status_interval: float = DEFAULT_STATUS_INTERVAL
    reconnect_max: float = 30.0
    rotate: bool | None = None  # None: rotate unless bring-your-own is detected
    metrics: str | None = None  # host:port to serve Prometheus metrics on
    simulate_pods: bool = False  # seed and run simulated istiod/gateway/workload pods (demo)
    bounce_dry_run: bool = False  # say which pods would restart, restart none
    names: settings.SecretNames = dataclasses.field(default_factory=settings.SecretNames)

    def __post_init__(self) -> None:
        if not 0 < self.grace_ratio < 1:
            raise errors.ConfigError(
                "clientTlsSecretRotationGracePeriodRatio must be between 0 and 1, e.g. 0.1")
        if not 0 <= self.jitter < 1:
            raise errors.ConfigError("jitter must be in [0, 1)")
        for name in ("renew_spread", "bootstrap_spread"):
            if not 0 <= getattr(self, name) <= 3600:
                raise errors.ConfigError(f"{name.replace('_', ' ')} must be from 0 to 3600 "
                                         "seconds")
        for name in ("server", *(("bootstrap_server",) if self.bootstrap_server else ())):
            value = getattr(self, name)
            for address in _addresses(value):
                host, sep, port = address.rpartition(":")
                if not sep or not host or not port.isdigit():
                    raise errors.ConfigError(
                        f"{name}: {address!r} is not host:port (several are comma-separated: "
                        "host-a:9900,host-b:9900)")
        if self.lease_ttl <= 0 or self.status_interval <= 0 or self.reconnect_max <= 0:
            raise errors.ConfigError("lease TTL, status interval and reconnect backoff must be "
                                     "positive")

    @property
    def servers(self) -> tuple[str, ...]:
        """The relay addresses, tried in turn: several server replicas may serve one fleet."""
        return _addresses(self.server)

    @property
    def bootstrap_servers(self) -> tuple[str, ...]:
        """Where to bootstrap, tried in turn: as given, else each relay port + 1."""
        if self.bootstrap_server:
            return _addresses(self.bootstrap_server)
        return tuple(settings.bootstrap_address(address) for address in self.servers)

    @property
    def bootstrap_address(self) -> str:
        """The bootstrap addresses as one string, for messages."""
        return ",".join(self.bootstrap_servers)


def _addresses(value: str) -> tuple[str, ...]:
    """``host:port`` addresses from a comma-separated list; at least one (maybe empty)."""
    return tuple(part.strip() for part in value.split(",") if part.strip()) or (value,)
