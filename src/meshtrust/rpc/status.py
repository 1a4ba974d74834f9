"""One table from domain errors to gRPC status codes, and back.

The server aborts a call with the code of the error's class and the error's
own message; the agent turns a failed call back into the same domain error,
so both ends speak in ``meshtrust.errors``.
"""

from __future__ import annotations

import grpc

from meshtrust import errors

# Most specific first: the first class that matches decides the code.
_TABLE: tuple[tuple[type[errors.MeshTrustError], grpc.StatusCode], ...] = (
    (errors.RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnknownCluster, grpc.StatusCode.PERMISSION_DENIED),
    (errors.AuthError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.InvalidCSR, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.KeyPolicyError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ProfileViolation, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ChainError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ProviderError, grpc.StatusCode.UNAVAILABLE),
    (errors.RPCError, grpc.StatusCode.UNAVAILABLE),  # the relay failed (as _BACK reads it)
)

_BACK: dict[grpc.StatusCode, type[errors.MeshTrustError]] = {
    grpc.StatusCode.UNAVAILABLE: errors.RPCError,
    grpc.StatusCode.PERMISSION_DENIED: errors.AuthError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.RateLimited,
    grpc.StatusCode.INVALID_ARGUMENT: errors.ProfileViolation,
    grpc.StatusCode.FAILED_PRECONDITION: errors.ConfigError,
}


def code_of(error: errors.MeshTrustError) -> grpc.StatusCode:
    """The gRPC status code for a domain error."""
    for kind, code in _TABLE:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_of(code: grpc.StatusCode, details: str, *,
             retry_after: float | None = None) -> errors.MeshTrustError:
    """The domain error for a failed call, keeping the server's message.

    ``retry_after`` is the wait the server asked for (seconds), when it gave one.
    """
    kind = _BACK.get(code, errors.RPCError)
    if kind is errors.RateLimited:
        return errors.RateLimited(details, retry_after=retry_after or 1.0)
    return kind(details)
