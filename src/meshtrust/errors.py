"""One tree of domain errors, so callers can catch by concern.

Untrusted input (CSRs, tokens, peer certificates, YAML, URLs) raises one of
these, with a message that says what was wrong and what to do. A caller's
misuse of an API raises ``TypeError`` or ``ValueError`` instead. Third-party
errors are translated at the adapter boundary with ``raise ... from exc``.

    MeshTrustError
    ├── ConfigError                  bad settings, flags or policy documents
    ├── PKIError
    │   ├── InvalidCSR               unparsable, oversize, bad signature
    │   ├── KeyPolicyError           weak or unsupported key type / curve
    │   ├── ProfileViolation         a request the profile does not allow
    │   └── ChainError               a chain that does not verify
    ├── StoreError
    │   ├── NotFound
    │   ├── AlreadyExists
    │   ├── Conflict                 compare-and-swap lost a race
    │   ├── StoreUnavailable         cannot reach or open the backend
    │   └── SchemaError              written by a newer meshtrust
    ├── ProviderError                an external CA refused or failed
    ├── AuthError                    token or peer identity refused
    │   ├── UnknownCluster           not registered, or deregistered
    │   └── RateLimited              too many refusals from one peer
    └── RPCError                     the relay failed
"""

from __future__ import annotations


class MeshTrustError(Exception):
    """The root of every error meshtrust raises on purpose."""


class ConfigError(MeshTrustError):
    """Settings, flags or a policy document are invalid."""


class PKIError(MeshTrustError):
    """A certificate, key or request cannot be used."""


class InvalidCSR(PKIError):
    """A certificate signing request is malformed, oversize or badly signed."""


class KeyPolicyError(PKIError):
    """A key is of a type, size or curve that meshtrust does not accept."""


class ProfileViolation(PKIError):
    """A request asks for something its certificate profile does not allow."""


class ChainError(PKIError):
    """A certificate chain does not verify."""


class StoreError(MeshTrustError):
    """A state store operation failed."""


class NotFound(StoreError):
    """The object does not exist."""


class AlreadyExists(StoreError):
    """An object with that name exists already."""


class Conflict(StoreError):
    """The object changed since it was read (stale resource version)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached, opened or written."""


class SchemaError(StoreError):
    """The store was written by a newer meshtrust, or is not a meshtrust store."""


class ProviderError(MeshTrustError):
    """An external certificate authority refused or failed a request."""


class AuthError(MeshTrustError):
    """A token or a peer identity was refused."""


class UnknownCluster(AuthError):
    """The cluster is not registered (or was deregistered)."""


class RateLimited(AuthError):
    """Too many refused attempts from one peer; it must wait."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RPCError(MeshTrustError):
    """A relay call failed."""
