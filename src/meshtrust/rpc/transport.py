"""gRPC for the relay: listeners with hot-reloaded certificates, channels, stubs.

The server has two listeners. The relay listener requires mutual TLS; the
bootstrap listener authenticates only the server, because an agent that is
bootstrapping has no client certificate yet (gRPC in Python cannot ask for a
client certificate without also requiring one). Both take their certificate
from a ``Credentials`` holder: a new certificate put there is used by the
next handshake, with no restart and no effect on open connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from meshtrust import errors
from meshtrust.rpc import status
from meshtrust.rpc._proto import relay_pb2 as messages
from meshtrust.rpc._proto import relay_pb2_grpc as services

__all__ = ["messages", "services"]

T = TypeVar("T")

RETRY_AFTER_MS = "retry-after-ms"  # trailing metadata of RESOURCE_EXHAUSTED: when to retry

# Keepalive so that a dead peer is noticed and a half-open connection is dropped. A busy
# peer answers a ping late, and a connection whose ping times out is closed with every call
# on it; so pings wait 20 s for their answer, and the server, which has every connection to
# check, pings each once a minute (the agent, every 20 s).
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 256 * 1024),
    # TLS records of at most 4 KiB instead of 16: each connection keeps a buffer of this
    # size, so 10,000 agents' connections hold about 70 MiB less (measured in
    # docs/benchmarks.md); the relay's messages are a few KiB, so it costs no speed.
    ("grpc.tsi.max_frame_size", 4096),
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Identity:
    """A certificate chain and key in PEM, with the roots to trust the peer by."""

    chain: bytes
    key: bytes
    trust: bytes
    version: int = 0


class Credentials:
    """The server's current certificate; each listener's next handshake picks it up."""

    def __init__(self, identity: Identity) -> None:
        self._lock = threading.Lock()
        self._identity = identity

    @property
    def identity(self) -> Identity:
        with self._lock:
            return self._identity

    def replace(self, identity: Identity) -> None:
        with self._lock:
            self._identity = identity

    def server_credentials(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        """Dynamic credentials for one listener, reading this holder at each handshake."""
        served: list[Identity] = [self.identity]

        def config(identity: Identity) -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration(
                [(identity.key, identity.chain)],
                root_certificates=identity.trust if require_client_auth else None)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            current = self.identity
            if current is served[0]:
                return None  # unchanged: keep using the configuration we have
            served[0] = current
            return config(current)

        return grpc.dynamic_ssl_server_credentials(
            config(served[0]), fetch, require_client_authentication=require_client_auth)


def relay_stub(channel: Any) -> Any:
    return services.RelayStub(channel)  # type: ignore[no-untyped-call]


def bootstrap_stub(channel: Any) -> Any:
    return services.BootstrapStub(channel)  # type: ignore[no-untyped-call]


def add_services(server: Any, relay: Any, bootstrap: Any) -> None:
    """Register the Relay and Bootstrap servicers on a gRPC server."""
    services.add_RelayServicer_to_server(relay, server)  # type: ignore[no-untyped-call]
    services.add_BootstrapServicer_to_server(bootstrap, server)  # type: ignore[no-untyped-call]


# The most connections one port of a server takes in at once (gRPC closes the rest).
MAX_CONNECTIONS = "grpc.max_allowed_incoming_connections"


def new_server(options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Server:
    """A server with the keepalive and message limits above; ``options`` adds gRPC
    channel arguments (``MAX_CONNECTIONS``, a benchmark's settings to compare)."""
    return grpc.aio.server(options=[*_SERVER_OPTIONS, *options], maximum_concurrent_rpcs=None)


def add_listener(server: grpc.aio.Server, address: str,
                 credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``address`` (``host:port``; port 0 picks one); return the port bound."""
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise errors.ConfigError(f"cannot listen on {address}: the address is in use or invalid")
    return int(port)


def peer_certificate(context: grpc.aio.ServicerContext) -> bytes | None:
    """The client certificate gRPC verified for this call, in PEM, or None."""
    auth = context.auth_context()
    values = auth.get("x509_pem_cert") or []
    return bytes(values[0]) if values else None


def peer_host(context: grpc.aio.ServicerContext) -> str:
    """The peer's address without its port, for rate limits and logs."""
    peer = context.peer() or ""
    if peer.startswith("ipv4:"):
        return peer[5:].rsplit(":", 1)[0]
    if peer.startswith("ipv6:"):
        return peer[5:].rsplit(":", 1)[0].strip("[]")
    return peer


def time_remaining(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds until the caller's deadline, None if it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else float(remaining)


def metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return str(item.value)
    return None


async def abort(context: grpc.aio.ServicerContext, error: errors.MeshTrustError) -> None:
    """End the call with the status code of ``error`` and its message."""
    trailing: Sequence[tuple[str, str]] = ()
    if isinstance(error, errors.RateLimited):
        # Seconds for people and proxies; milliseconds for agents, which wait exactly that.
        trailing = (("retry-after", f"{error.retry_after:.1f}"),
                    (RETRY_AFTER_MS, str(max(1, round(error.retry_after * 1000)))))
    try:
        await context.abort(status.code_of(error), str(error), trailing_metadata=trailing)
    except grpc.aio.InternalError as exc:  # gRPC's ExecuteBatchError, which is not public
        # The status could not be sent: the call is over in gRPC's core (its deadline
        # passed while the server was busy, or the caller hung up). End the handler as a
        # cancelled call ends, which gRPC logs at debug level, rather than with an error
        # that it logs with a traceback whenever it has not noticed the end itself yet.
        raise asyncio.CancelledError(f"the caller is gone; not sent: {error}") from exc


def secure_channel(target: str, *, trust: bytes, chain: bytes | None = None,
                   key: bytes | None = None, server_name: str | None = None) -> grpc.aio.Channel:
    """A channel that verifies the server against ``trust`` and, given a key, presents it."""
    credentials = grpc.ssl_channel_credentials(root_certificates=trust, private_key=key,
                                               certificate_chain=chain)
    options = list(_CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, credentials, options=options)


def insecure_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)


async def call(request: Awaitable[T]) -> T:
    """Await a unary call, turning a gRPC failure into the matching domain error."""
    try:
        return await request
    except grpc.aio.AioRpcError as exc:
        raise translate(exc) from exc


async def iterate(stream: Any) -> AsyncIterator[Any]:
    """Items of a server stream, turning a gRPC failure into the matching domain error."""
    try:
        async for item in stream:
            yield item
    except grpc.aio.AioRpcError as exc:
        raise translate(exc) from exc
    finally:
        stream.cancel()


def translate(exc: BaseException) -> errors.MeshTrustError:
    """The domain error for a gRPC failure (``RPCError`` when the server is away)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return status.error_of(exc.code(), exc.details() or exc.code().name,
                               retry_after=_retry_after(exc))
    return errors.RPCError(str(exc))


def _retry_after(exc: grpc.aio.AioRpcError) -> float | None:
    """The wait a refusing server asked for, in seconds, if it gave a readable one."""
    for item in exc.trailing_metadata() or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if key == RETRY_AFTER_MS:
            try:
                wait = int(value) / 1000
            except (TypeError, ValueError):
                return None
            return wait if wait > 0 else None
    return None




