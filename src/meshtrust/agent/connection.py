"""The agent's gRPC client: channels built from the provider's current certificate.

The work stream and the unary calls share one channel, made from the identity
the provider holds; when the identity changes, the next user gets a new channel
and the old one is closed after a grace period, so calls in flight finish. The
agent moves its work stream to the new channel as soon as the identity changes
(``agent.app``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from meshtrust import errors, rpc
from meshtrust.agent.config import AgentConfig
from meshtrust.agent.provider import ClientIdentity, Provider
from meshtrust.pki import bundle
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages

log = logging.getLogger(__name__)

CALL_TIMEOUT = 15.0
# A replaced connection is closed after the deadline of any call on it has passed: a call
# that a busy server answers late is answered, not cut off.
CLOSE_GRACE = CALL_TIMEOUT + 5.0


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
        self._closing: set[asyncio.Task[None]] = set()
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
            self._retire(self._channel)
            self._channel = None
            self._channel_identity = None

    def _retire(self, channel: Any) -> None:
        task = asyncio.create_task(_close_later(channel))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def channel(self) -> Any:
        """The connection for the provider's current identity, shared by the work stream
        and the calls; a new identity or address gets a new one, and the old one is
        closed after ``CLOSE_GRACE`` seconds, so that calls in flight on it finish."""
        identity = self._provider.current
        if (self._channel is None or identity != self._channel_identity
                or self.address != self._channel_address):
            old = self._channel
            self._channel = self._open_channel(identity)
            self._channel_identity = identity
            self._channel_address = self.address
            if old is not None:
                self._retire(old)
        return self._channel

    async def renew(self, csr_pem: bytes) -> Any:
        stub = transport.relay_stub(self.channel())
        return await transport.call(stub.Renew(
            messages.RenewRequest(protocol_version=rpc.PROTOCOL_VERSION, csr=csr_pem),
            timeout=CALL_TIMEOUT, metadata=self._metadata()))

    async def report(self, report: Any) -> Any:
        stub = transport.relay_stub(self.channel())
        return await transport.call(stub.ReportStatus(report, timeout=CALL_TIMEOUT,
                                                      metadata=self._metadata()))

    async def complete_work(self, result: Any) -> Any:
        """Answer a work item: send its CSR (the reply holds the certificate) or its outcome."""
        stub = transport.relay_stub(self.channel())
        return await transport.call(stub.CompleteWork(result, timeout=CALL_TIMEOUT,
                                                      metadata=self._metadata()))

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

    async def work(self, channel: Any, leader: bool) -> AsyncIterator[Any]:
        """Items of the server's work stream on ``channel``; raises a domain error at its end."""
        stub = transport.relay_stub(channel)
        stream = stub.Work(messages.WorkSubscribe(protocol_version=rpc.PROTOCOL_VERSION,
                                                  replica=self._config.replica, leader=leader),
                           metadata=self._metadata())
        async for item in transport.iterate(stream):
            yield item

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._kept is not None:
            await self._kept[1].close()
            self._kept = None
        for task in list(self._closing):
            task.cancel()


async def _close_later(channel: Any) -> None:
    await asyncio.sleep(CLOSE_GRACE)
    await channel.close()
