"""Defaults shared by every layer: secret names, namespaces and lifetimes.

The names and keys come from the reference documentation (``relay-root-tls-secret``
in ``gloo-mesh``, ``cacerts`` in ``istio-system`` and so on). They are the
defaults; every component takes them as settings so they can be changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

from meshtrust import errors

RELAY_NAMESPACE = "gloo-mesh"
ISTIO_NAMESPACE = "istio-system"

RELAY_ROOT_SECRET = "relay-root-tls-secret"
RELAY_SIGNING_SECRET = "relay-tls-signing-secret"
RELAY_SERVER_SECRET = "relay-server-tls-secret"
RELAY_TOKEN_SECRET = "relay-identity-token-secret"
RELAY_CLIENT_SECRET = "relay-client-tls-secret"
ISTIO_CA_SECRET = "cacerts"
ISTIO_SIGNING_SECRET = "istio-tls-signing-secret"  # a local CA that signs cluster CAs
ROOT_TRUST_SECRET_PREFIX = "root-trust."

MANAGED_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = {MANAGED_LABEL: "meshtrust"}  # the label on everything meshtrust writes

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_POLICY_NAME = "default"
DEFAULT_GRACE_RATIO = 0.1


def bootstrap_address(relay: str) -> str:
    """The bootstrap listener that goes with a relay address: the same host, port + 1."""
    host, _, port = relay.rpartition(":")
    return f"{host}:{int(port) + 1}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecretNames:
    """Where each piece of relay and Istio material is kept."""

    relay_namespace: str = RELAY_NAMESPACE
    istio_namespace: str = ISTIO_NAMESPACE
    relay_root: str = RELAY_ROOT_SECRET
    relay_signing: str = RELAY_SIGNING_SECRET
    relay_server: str = RELAY_SERVER_SECRET
    relay_token: str = RELAY_TOKEN_SECRET
    relay_client: str = RELAY_CLIENT_SECRET
    istio_ca: str = ISTIO_CA_SECRET
    istio_signing: str = ISTIO_SIGNING_SECRET

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"SecretNames.{field.name} must be a non-empty string")

    @staticmethod
    def root_trust(policy: str) -> str:
        """The secret that holds the generated Istio root of a trust policy."""
        return ROOT_TRUST_SECRET_PREFIX + policy


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}


def parse_duration(text: str | float, field: str) -> dt.timedelta:
    """``90s``, ``15m``, ``12h``, ``365d``, ``1y`` or a number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    elif isinstance(text, str) and text.strip():
        value = text.strip().lower()
        unit = value[-1]
        try:
            seconds = (float(value[:-1]) * _DURATION_UNITS[unit] if unit in _DURATION_UNITS
                       else float(value))
        except ValueError:
            seconds = -1
    else:
        seconds = -1
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 1000 * 365 * 86400:
        raise errors.ConfigError(
            f"{field}: {text!r} is not a positive duration such as 90s, 15m, 12h, 365d or 1y")
    return dt.timedelta(seconds=seconds)
