"""The agent's gRPC client: channels built from the provider's current certificate.

The work stream and the unary calls share one channel, made from the identity
the provider holds; when the identity changes, the next user gets a new channel
and the old one is closed as soon as no call or stream uses it any more (at
the latest after a grace period), so calls in flight finish and a fleet that
renews at once does not hold twice its connections. The agent moves its work
stream to the new channel as soon as the identity changes (``agent.app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

from meshtrust import errors, rpc
from meshtrust.agent.config import AgentConfig
from meshtrust.agent.provider import ClientIdentity, Provider
from meshtrust.pki import bundle
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages

log = logging.getLogger(__name__)

CALL_TIMEOUT = 15.0
# A replaced connection still in use is closed at the latest after the deadline of any call
# on it has passed: a call that a busy server answers late is answered, not cut off.
CLOSE_GRACE = CALL_TIMEOUT + 5.0


class Retirement:
    """Counts the calls and streams on each channel; closes a replaced one once unused.

    ``using(channel)`` around each call or stream; ``retire(channel)`` when a new
    channel replaces it: it is closed at once if nothing uses it, else when the
    last user is done, and after ``grace`` seconds whatever still uses it.
    """

    def __init__(self, grace: float = CLOSE_GRACE) -> None:
        self._grace = grace
        self._uses: dict[int, int] = {}  # id(channel) -> its users, while it has any
        self._retired: dict[int, tuple[Any, asyncio.Task[None]]] = {}  # -> its deadline
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def retired(self) -> int:
        """Replaced channels not closed yet."""
        return len(self._retired)

    @contextlib.contextmanager
    def using(self, channel: Any) -> Iterator[Any]:
        key = id(channel)
        self._uses[key] = self._uses.get(key, 0) + 1
        try:
            yield channel
        finally:
            self._uses[key] -= 1
            if not self._uses[key]:
                del self._uses[key]
                if key in self._retired:
                    self._close(key)

    def retire(self, channel: Any) -> None:
        key = id(channel)
        if key in self._retired:
            return
        self._retired[key] = (channel, self._spawn(self._close_later(key)))
        if key not in self._uses:
            self._close(key)

    async def close(self) -> None:
        """Close every replaced channel now (the agent stops)."""
        for key in list(self._retired):
            self._close(key)
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _close(self, key: int) -> None:
        channel, deadline = self._retired.pop(key)
        deadline.cancel()
        self._spawn(channel.close())

    async def _close_later(self, key: int) -> None:
        await asyncio.sleep(self._grace)
        channel, _ = self._retired.pop(key)
        await channel.close()

    def _spawn(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(job)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task


def describe_trust(trust: bytes) -> str:
    """Which CA the agent expects the server to chain to, for error messages."""
    try:
        roots = bundle.load_certificates(trust, "ca.crt")
    except errors.ChainError:
        return "an unreadable ca.crt"
    return "; ".join(f"{c.subject.rfc4514_string()} (SHA-256 {bundle.fingerprint(c)[:23]}…)"
                     for c in roots)


class RelayClient:
    def __init__(self, config: AgentConfig, provider: Provider) -> None:
        self._config = config
        self._provider = provider
        self._channel: Any = None
        self._channel_identity: ClientIdentity | None = None
        self._channel_address = ""
        self._retirement = Retirement()
        self._server = 0     # which of config.servers the relay channels go to
        self._bootstrap = 0  # which of config.bootstrap_servers answered last
        # The bootstrap channel kept while a busy server has the agent wait: (address,
        # trust) and the channel.
        self._kept: tuple[tuple[str, bytes], Any] | None = None

    @property
    def address(self) -> str:
        """The relay address in use: one of ``--server``'s comma-separated addresses."""
        servers = self._config.servers
        return servers[self._server % len(servers)]

    def next_server(self) -> None:
        """Use the next relay address from now on (the current one failed or ended)."""
        self._server = (self._server + 1) % len(self._config.servers)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._config.insecure:
            return (("x-meshtrust-cluster", self._config.cluster),)
        return ()

    def _open_channel(self, identity: ClientIdentity | None) -> Any:
        """A new channel to the relay listener with ``identity``'s certificate."""
        if self._config.insecure:
            return transport.insecure_channel(self.address)
        if identity is None:
            raise errors.RPCError("no client certificate yet")
        return transport.secure_channel(self.address, trust=identity.trust,
                                        chain=identity.chain, key=identity.key,
                                        server_name=self._config.server_name)

    def reset(self) -> None:
        """Forget the channel (the stream on it failed): the next user opens a new one, so
        that reconnecting does not wait for the old channel's own reconnect backoff."""
        if self._channel is not None:
            self._retirement.retire(self._channel)
            self._channel = None
            self._channel_identity = None

    def channel(self) -> Any:
        """The connection for the provider's current identity, shared by the work stream
        and the calls; a new identity or address gets a new one, and the old one is
        closed once the calls and the stream on it are done (``Retirement``)."""
        identity = self._provider.current
        if (self._channel is None or identity != self._channel_identity
                or self.address != self._channel_address):
            old = self._channel
            self._channel = self._open_channel(identity)
            self._channel_identity = identity
            self._channel_address = self.address
            if old is not None:
                self._retirement.retire(old)
        return self._channel

    async def _call(self, method: str, request: Any) -> Any:
        """One unary relay call on the current connection."""
        with self._retirement.using(self.channel()) as channel:
            stub = getattr(transport.relay_stub(channel), method)
            return await transport.call(stub(request, timeout=CALL_TIMEOUT,
                                             metadata=self._metadata()))

    async def renew(self, csr_pem: bytes) -> Any:
        return await self._call("Renew", messages.RenewRequest(
            protocol_version=rpc.PROTOCOL_VERSION, csr=csr_pem))

    async def report(self, report: Any) -> Any:
        return await self._call("ReportStatus", report)

    async def complete_work(self, result: Any) -> Any:
        """Answer a work item: send its CSR (the reply holds the certificate) or its outcome."""
        return await self._call("CompleteWork", result)

    async def bootstrap(self, trust: bytes, token: str, csr_pem: bytes) -> Any:
        """Call Bootstrap over server-authenticated TLS on a bootstrap listener.

        Addresses are tried in turn, from the one that answered last, while they
        cannot be reached; an answer, even a refusal, ends the search.
        """
        addresses = self._config.bootstrap_servers
        for attempt in range(len(addresses)):
            index = (self._bootstrap + attempt) % len(addresses)
            try:
                response = await self._bootstrap_at(addresses[index], trust, token, csr_pem)
            except errors.RPCError as exc:
                if type(exc) is not errors.RPCError or attempt == len(addresses) - 1:
                    raise
                log.info("bootstrap at %s failed: %s; trying %s", addresses[index], exc,
                         addresses[(index + 1) % len(addresses)])
                continue
            self._bootstrap = index
            return response
        raise AssertionError("unreachable")

    async def _bootstrap_at(self, address: str, trust: bytes, token: str,
                            csr_pem: bytes) -> Any:
        # A server that was busy is asked again on the same connection: a TLS handshake
        # for each retry would cost it more than answering the retry.
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == (address, trust):
            channel = kept[1]
        else:
            if kept is not None:
                await kept[1].close()
            channel = transport.secure_channel(address, trust=trust,
                                               server_name=self._config.server_name)
        try:
            stub = transport.bootstrap_stub(channel)
            response = await transport.call(stub.Bootstrap(messages.BootstrapRequest(
                protocol_version=rpc.PROTOCOL_VERSION, cluster=self._config.cluster,
                token=token, csr=csr_pem), timeout=CALL_TIMEOUT))
        except errors.RateLimited:
            self._kept = ((address, trust), channel)
            raise
        except BaseException:
            await channel.close()
            raise
        await channel.close()
        return response

    async def work(self, channel: Any, leader: bool,
                   status: Any = None) -> AsyncIterator[Any]:
        """Items of the server's work stream on ``channel``; raises a domain error at its end.

        ``status``: the agent's status report, for the server to record with the stream.
        """
        with self._retirement.using(channel):
            stub = transport.relay_stub(channel)
            stream = stub.Work(messages.WorkSubscribe(
                protocol_version=rpc.PROTOCOL_VERSION, replica=self._config.replica,
                leader=leader, status=status), metadata=self._metadata())
            async for item in transport.iterate(stream):
                yield item

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._kept is not None:
            await self._kept[1].close()
            self._kept = None
        await self._retirement.close()
