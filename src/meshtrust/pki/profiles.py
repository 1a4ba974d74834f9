"""Certificate profiles: what each kind of certificate meshtrust issues looks like.

A profile fixes every extension of a certificate. The issuer applies the
profile; a CSR only proposes a key and, where ``name_policy`` allows, names.
The values follow the reference openssl configurations (see design.md).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from meshtrust import errors

DAY = dt.timedelta(days=1)
YEAR = dt.timedelta(days=365)

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH

CA_USAGES = frozenset({"key_cert_sign", "crl_sign"})
LEAF_USAGES = frozenset({"digital_signature", "key_encipherment"})
KEY_USAGES = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
              "key_agreement", "key_cert_sign", "crl_sign")


class Naming(enum.Enum):
    """How a profile decides the subject and subjectAltNames of a certificate."""

    RELAY_ROOT = "relay-root"
    RELAY_SIGNING = "relay-signing"
    SHARED_SIGNING = "shared-signing"
    RELAY_SERVER = "relay-server"
    RELAY_CLIENT = "relay-client"
    ISTIO_ROOT = "istio-root"
    ISTIO_INTERMEDIATE = "istio-intermediate"
    SPIFFE_WORKLOAD = "spiffe-workload"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profile:
    """The fixed shape of one kind of certificate."""

    name: str
    naming: Naming
    is_ca: bool
    path_length: int | None = None
    key_usage: frozenset[str]
    extended_key_usage: tuple[ObjectIdentifier, ...] = ()
    default_lifetime: dt.timedelta
    basic_constraints_critical: bool = True
    key_usage_critical: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.key_usage) - set(KEY_USAGES)
        if unknown:
            raise ValueError(f"unknown key usages {sorted(unknown)}")
        if self.is_ca and "key_cert_sign" not in self.key_usage:
            raise ValueError(f"CA profile {self.name} must allow keyCertSign")
        if not self.is_ca and ("key_cert_sign" in self.key_usage or self.path_length is not None):
            raise ValueError(f"leaf profile {self.name} cannot sign certificates")
        if self.path_length is not None and self.path_length < 0:
            raise ValueError("path_length must be >= 0")
        if self.default_lifetime <= dt.timedelta(0):
            raise ValueError("default_lifetime must be positive")

    def with_path_length(self, path_length: int | None) -> Profile:
        """The same profile allowing ``path_length`` CAs below it."""
        if not self.is_ca:
            raise ValueError(f"{self.name} is not a CA profile")
        return dataclasses.replace(self, path_length=path_length)


RELAY_ROOT = Profile(
    name="relay-root", naming=Naming.RELAY_ROOT, is_ca=True,
    key_usage=CA_USAGES, default_lifetime=10 * YEAR,
    description="self-signed root of the relay PKI",
)
RELAY_SIGNING = Profile(
    name="relay-signing", naming=Naming.RELAY_SIGNING, is_ca=True, path_length=0,
    key_usage=CA_USAGES, default_lifetime=5 * YEAR,
    description="intermediate that signs the relay server and client certificates",
)
SHARED_SIGNING = Profile(
    name="shared-signing", naming=Naming.SHARED_SIGNING, is_ca=True, path_length=1,
    key_usage=CA_USAGES | {"digital_signature"}, default_lifetime=5 * YEAR,
    description="one intermediate for relay and Istio: signs relay leaves and cluster CAs",
)
RELAY_SERVER = Profile(
    name="relay-server", naming=Naming.RELAY_SERVER, is_ca=False,
    key_usage=LEAF_USAGES, extended_key_usage=(SERVER_AUTH, CLIENT_AUTH),
    default_lifetime=YEAR, basic_constraints_critical=False, key_usage_critical=False,
    description="the management server's relay certificate (DNS:*.gloo-mesh + configured names)",
)
RELAY_CLIENT = Profile(
    name="relay-client", naming=Naming.RELAY_CLIENT, is_ca=False,
    key_usage=LEAF_USAGES, extended_key_usage=(CLIENT_AUTH,),
    default_lifetime=YEAR, basic_constraints_critical=False, key_usage_critical=False,
    description="an agent's relay client certificate (CN and DNS:<cluster>)",
)
ISTIO_ROOT = Profile(
    name="istio-root", naming=Naming.ISTIO_ROOT, is_ca=True,
    key_usage=CA_USAGES | {"digital_signature"}, default_lifetime=10 * YEAR,
    description="self-signed root of Istio trust (O=Istio, CN=Root CA)",
)
ISTIO_INTERMEDIATE = Profile(
    name="istio-intermediate", naming=Naming.ISTIO_INTERMEDIATE, is_ca=True, path_length=0,
    key_usage=CA_USAGES | {"digital_signature"}, default_lifetime=YEAR,
    description="a cluster's Istio CA, the cacerts secret (O=Istio, CN=Intermediate CA, "
                "L=<cluster>)",
)
SPIFFE_WORKLOAD = Profile(
    name="spiffe-workload", naming=Naming.SPIFFE_WORKLOAD, is_ca=False,
    key_usage=LEAF_USAGES, extended_key_usage=(SERVER_AUTH, CLIENT_AUTH),
    default_lifetime=DAY, basic_constraints_critical=True, key_usage_critical=True,
    description="a mesh workload certificate with a SPIFFE ID, as istiod issues them",
)

PROFILES: dict[str, Profile] = {
    p.name: p for p in (RELAY_ROOT, RELAY_SIGNING, SHARED_SIGNING, RELAY_SERVER, RELAY_CLIENT,
                        ISTIO_ROOT, ISTIO_INTERMEDIATE, SPIFFE_WORKLOAD)
}


def get_profile(name: str) -> Profile:
    """Look a profile up by name; raise ConfigError naming the choices if unknown."""
    try:
        return PROFILES[name]
    except KeyError:
        raise errors.ConfigError(
            f"unknown profile {name!r}; use one of: {', '.join(PROFILES)}"
        ) from None
