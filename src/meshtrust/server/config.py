"""The server's settings: one frozen value, read from a YAML mapping and flags.

Every field has a sane default; an unknown or invalid field raises
``ConfigError`` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from meshtrust import errors, settings
from meshtrust.authority import audit, relay
from meshtrust.pki import keys, profiles
from meshtrust.server import admission, leadership

DEFAULT_LISTEN = "127.0.0.1:9900"
DEFAULT_BOOTSTRAP_LISTEN = "127.0.0.1:9901"
# Python collects its youngest generation of objects after this many allocations (its own
# default is 700): a server holding thousands of agents then spends about a fifth of the
# time collecting, in fewer and longer pauses (docs/benchmarks.md).
DEFAULT_GC_THRESHOLD = 50_000
# Allocations of this many bytes or more get pages of their own from glibc (its
# M_MMAP_THRESHOLD, 128 KiB to start): the TLS buffers of each agent's connection then
# take memory only where they are written (docs/benchmarks.md). 0 leaves glibc as it is.
DEFAULT_MMAP_THRESHOLD = 8192
MMAP_THRESHOLD_RANGE = (4096, 32 * 1024 * 1024)  # glibc's documented maximum is 32 MiB


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    store: str
    listen: str = DEFAULT_LISTEN
    bootstrap_listen: str = DEFAULT_BOOTSTRAP_LISTEN
    insecure: bool = False
    client_lifetime: dt.timedelta = profiles.RELAY_CLIENT.default_lifetime
    server_lifetime: dt.timedelta = profiles.RELAY_SERVER.default_lifetime
    signing_lifetime: dt.timedelta = profiles.RELAY_SIGNING.default_lifetime
    # The server certificate and signing CA meshtrust made are renewed when this share of
    # their lifetime is left (the grace-ratio rule of the Istio intermediates).
    ca_grace_ratio: float = settings.DEFAULT_GRACE_RATIO
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    key_type: keys.KeyType = keys.KeyType.EC_P256
    token_mode: relay.TokenMode = relay.TokenMode.ANY
    heartbeat: float = 30.0
    reconcile_interval: float = 5.0
    # Issuances signed at once; callers past that wait up to max_issuance_wait seconds
    # (as many as can be served in that time), the rest are told when to retry.
    max_issuances: int = admission.DEFAULT_LIMIT
    max_issuance_wait: float = 1.0
    # A bootstrap may wait longer: its agent has nothing to do meanwhile, and a call that
    # waits costs the server memory only, where one told to come back costs a call more.
    max_bootstrap_wait: float = 10.0
    ready_file: str | None = None
    metrics: str | None = None
    audit_log: str | None = None  # also append each audit record to this file
    audit_retention: dt.timedelta = audit.DEFAULT_RETENTION
    audit_max_events: int = audit.DEFAULT_MAX_EVENTS
    # CA keys in the store are kept encrypted with the passphrase in this file (or in
    # $MESHTRUST_KEY_PASSPHRASE); the server opens them at start.
    key_passphrase_file: str | None = None
    # Replicas on one store: the timed loops run on the holder of the leader lease.
    leader_lease_ttl: int = leadership.DEFAULT_TTL  # seconds; renewed every third of it
    replica: str | None = None  # this replica's name (default: host name and process id)
    gc_threshold: int = DEFAULT_GC_THRESHOLD
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD

    def __post_init__(self) -> None:
        for name in ("listen", "bootstrap_listen"):
            value = getattr(self, name)
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise errors.ConfigError(
                    f"{name}: {value!r} is not host:port, such as 127.0.0.1:9900")
        if min(self.client_lifetime, self.server_lifetime,
               self.signing_lifetime) <= dt.timedelta(0):
            raise errors.ConfigError("lifetimes must be positive")
        if not 0 < self.ca_grace_ratio < 1:
            raise errors.ConfigError("ca-grace-ratio must be between 0 and 1, such as 0.1")
        if self.heartbeat <= 0 or self.reconcile_interval <= 0:
            raise errors.ConfigError("heartbeat and reconcile-interval must be positive")
        if self.max_issuances < 1:
            raise errors.ConfigError(f"max-issuances must be at least 1, such as "
                                     f"{admission.DEFAULT_LIMIT}")
        for name in _WAITS:
            if not 0 <= getattr(self, name) < 15:
                raise errors.ConfigError(f"{name.replace('_', '-')} must be from 0 to less "
                                         f"than the agents' 15 s call deadline, such as "
                                         f"{_DEFAULTS[name]:g}s")
        if self.audit_retention <= dt.timedelta(0) or self.audit_max_events < 1:
            raise errors.ConfigError("audit-retention and audit-max-events must be positive")
        if (isinstance(self.leader_lease_ttl, bool) or not isinstance(self.leader_lease_ttl, int)
                or self.leader_lease_ttl < 1):
            raise errors.ConfigError("leader-lease-ttl must be a whole number of seconds, at "
                                     "least 1s, such as 10s")
        if self.replica is not None:
            leadership.check_replica(self.replica)
        if not 1 <= self.gc_threshold <= 10_000_000:
            raise errors.ConfigError("gc-threshold must be from 1 to 10000000 allocations, such "
                                     f"as {DEFAULT_GC_THRESHOLD} (700 is Python's default)")
        low, high = MMAP_THRESHOLD_RANGE
        if self.mmap_threshold != 0 and not low <= self.mmap_threshold <= high:
            raise errors.ConfigError(f"mmap-threshold must be 0 (glibc's own) or from {low} to "
                                     f"{high} bytes, such as {DEFAULT_MMAP_THRESHOLD}")


_FIELDS = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(ServerConfig)}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
_WAITS = ("max_issuance_wait", "max_bootstrap_wait")  # durations where a bare 0 means none


def from_mapping(values: Mapping[str, Any]) -> ServerConfig:
    """A ServerConfig from a mapping such as a YAML file (keys may use - or _)."""
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("_", "-")
        if key not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise errors.ConfigError(f"unknown server setting {raw_key!r}; known settings: {known}")
        name = _FIELDS[key]
        if value is not None:
            kwargs[name] = _convert(name, key, value)
    if "store" not in kwargs:
        raise errors.ConfigError("store: give the management store URL, e.g. "
                                 "--store sqlite:///var/lib/meshtrust/mgmt.db")
    return ServerConfig(**kwargs)


def _convert(name: str, key: str, value: Any) -> Any:
    """One setting's value from YAML or a flag, checked; ConfigError names ``key``."""
    if name == "ca_grace_ratio":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise errors.ConfigError(f"{key}: give a number between 0 and 1") from None
    if name in ("client_lifetime", "server_lifetime", "signing_lifetime", "audit_retention"):
        return settings.parse_duration(value, key)
    if name in ("audit_max_events", "max_issuances", "gc_threshold", "mmap_threshold"):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise errors.ConfigError(f"{key}: give a whole number such as "
                                     f"{_DEFAULTS[name]}") from None
    if name in _WAITS and str(value).strip() in ("0", "0s", "0.0"):
        return 0.0  # no waiting: refuse at once
    if name in ("heartbeat", "reconcile_interval", *_WAITS):
        return settings.parse_duration(value, key).total_seconds()
    if name == "leader_lease_ttl":
        seconds = settings.parse_duration(value, key).total_seconds()
        if seconds != int(seconds):
            raise errors.ConfigError(f"{key}: give whole seconds, such as 10s")
        return int(seconds)
    if name == "server_names":
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)):
            return tuple(str(v) for v in value)
        raise errors.ConfigError(f"{key}: give a list of names")
    if name == "key_type":
        return keys.KeyType.parse(str(value))
    if name == "token_mode":
        try:
            return relay.TokenMode(str(value))
        except ValueError:
            raise errors.ConfigError(
                f"{key}: {value!r} is not one of shared, cluster, any") from None
    if name == "insecure" and not isinstance(value, bool):
        raise errors.ConfigError(f"{key}: give true or false")
    text_settings = ("store", "listen", "bootstrap_listen", "ready_file", "metrics", "audit_log",
                     "key_passphrase_file", "replica")
    if name in text_settings and not isinstance(value, str):
        raise errors.ConfigError(f"{key}: give a string")
    return value
