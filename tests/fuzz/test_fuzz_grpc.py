"""Fuzzing a real server over real TLS: raw, damaged protobuf bytes to every relay method.

The function-level suites (``test_fuzz_relay_rpc``) run ten thousand examples
per servicer; this one sends fewer, end to end: a server started in this
process on 127.0.0.1, its bootstrap listener (server-authenticated TLS) and
its relay listener (mutual TLS, with a client certificate the test
bootstrapped), with the bytes of each call sent as they are, so gRPC's own
decoding is in the path. The properties: no call ends in ``UNKNOWN`` (what
gRPC answers when a servicer raises) except gRPC's own refusal of bytes that
do not decode, every failure carries a message, and the server still answers a
valid call afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from hypothesis import given

import fuzzkit
import fuzzworld
from meshtrust import clock as clock_module
from meshtrust.agent import identity as agent_identity
from meshtrust.authority import enrollment, istio, registry
from meshtrust.pki import keys
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages
from meshtrust.server import app, config
from meshtrust.store import open_store

CALL_TIMEOUT = 10.0
METHODS = ("/meshtrust.relay.v1.Bootstrap/Bootstrap", "/meshtrust.relay.v1.Relay/Renew",
           "/meshtrust.relay.v1.Relay/ReportStatus", "/meshtrust.relay.v1.Relay/Work",
           "/meshtrust.relay.v1.Relay/CompleteWork")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# gRPC answers bytes that do not decode as the request message with UNKNOWN and this,
# before a servicer is called.
UNDECODABLE = "Unexpected <class 'google.protobuf.message.DecodeError'>"


def _raw(data: bytes) -> bytes:
    return data


@dataclasses.dataclass
class Live:
    """A running server, a channel to each listener, and a valid message per method."""

    runner: fuzzkit.Loop
    bootstrap: grpc.aio.Channel
    relay: grpc.aio.Channel
    seeds: dict[str, tuple[bytes, ...]]

    async def call(self, method: str, data: bytes) -> str:
        channel = self.bootstrap if method.endswith("/Bootstrap") else self.relay
        try:
            if method.endswith("/Work"):
                stream = channel.unary_stream(method, request_serializer=_raw,
                                              response_deserializer=_raw)(
                    data, timeout=CALL_TIMEOUT)
                try:
                    await anext(aiter(stream))
                finally:
                    stream.cancel()
            else:
                await channel.unary_unary(method, request_serializer=_raw,
                                          response_deserializer=_raw)(data, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if (exc.details() or "").startswith(UNDECODABLE):
                return "undecodable"  # refused by gRPC's decoding, before any servicer
            assert exc.code() is not grpc.StatusCode.UNKNOWN, \
                f"{method} raised in the servicer: {exc.details()}"
            assert exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung"
            assert (exc.details() or "").strip(), f"{method}: {exc.code()} without a message"
            return str(exc.code().name)
        return "OK"


@contextlib.asynccontextmanager
async def serving(tmp: Path) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel,
                                                     dict[str, tuple[bytes, ...]]]]:
    cfg = config.ServerConfig(store=f"sqlite:///{tmp / 'mgmt.db'}",
                              listen=f"127.0.0.1:{_port()}",
                              bootstrap_listen=f"127.0.0.1:{_port()}", reconcile_interval=0.2)
    store = await open_store(cfg.store)
    clock = clock_module.SystemClock()
    enrolled = await enrollment.enroll(store, clock, "c1", server=cfg.listen,
                                       bootstrap_server=cfg.bootstrap_listen)
    await istio.IstioAuthority(store, clock, registry.Registry(store, clock)).apply(
        fuzzworld.POLICY)
    server = app.Server(cfg, store)
    await server.start()
    bootstrap = transport.secure_channel(cfg.bootstrap_listen, trust=enrolled.ca_cert,
                                         server_name="localhost")
    relay: grpc.aio.Channel | None = None
    try:
        key = keys.generate_key(keys.KeyType.EC_P256)
        request = agent_identity.request_for(key, "c1")
        issued = await transport.call(transport.bootstrap_stub(bootstrap).Bootstrap(
            messages.BootstrapRequest(protocol_version=1, cluster="c1", token=enrolled.token,
                                      csr=request), timeout=CALL_TIMEOUT))
        relay = transport.secure_channel(cfg.listen, trust=enrolled.ca_cert,
                                         chain=issued.certificate_chain,
                                         key=keys.dump_private_key(key), server_name="localhost")
        intermediate = fuzzworld.intermediate_csr("c1")
        seeds: dict[str, tuple[bytes, ...]] = {
            METHODS[0]: (messages.BootstrapRequest(protocol_version=1, cluster="c1",
                                                   token=enrolled.token + "x",
                                                   csr=request).SerializeToString(),),
            METHODS[1]: (messages.RenewRequest(protocol_version=1,
                                               csr=request).SerializeToString(),),
            METHODS[2]: (messages.StatusReport(
                protocol_version=1, agent_version="fuzz", replica="r", leader=True,
                certificates=[messages.HeldCertificate(
                    kind="relay-client", not_after_unix=2**62)]).SerializeToString(),),
            METHODS[3]: (messages.WorkSubscribe(protocol_version=1,
                                                replica="r").SerializeToString(),),
            METHODS[4]: (messages.WorkResult(id="mesh.c1/1/1", csr=intermediate,
                                             stage="csr").SerializeToString(),
                         messages.WorkResult(id="mesh.c1/1/1", stage="failed",
                                             error="fuzz").SerializeToString()),
        }
        yield bootstrap, relay, seeds
    finally:
        if relay is not None:
            await relay.close()
        await bootstrap.close()
        await server.stop(0)
        await store.close()


@pytest.fixture
def live(runner: fuzzkit.Loop, tmp_path: Path) -> Any:
    context = serving(tmp_path)
    bootstrap, relay, seeds = runner.run(context.__aenter__())
    try:
        yield Live(runner=runner, bootstrap=bootstrap, relay=relay, seeds=seeds)
    finally:
        runner.run(context.__aexit__(None, None, None))


class TestRealServer:
    def test_raw_messages_over_tls(self, live: Live) -> None:
        """Damaged and random message bytes to every method never make a servicer raise."""
        tally = fuzzkit.Tally()

        @fuzzkit.scaled(300)
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            method = pick.choice(METHODS)
            kind = pick.integer(0, 3)
            seeds = live.seeds[method]
            body = (pick.choice(seeds) if kind == 0 else pick.bytes(64) if kind == 3
                    else pick.mutated(seeds, 3, structured=False))
            with fuzzkit.watchdog():
                code = live.runner.run(live.call(method, body))
            tally.add(f"{method.rsplit('/', 1)[-1]}: {code}")

        example()
        print(f"real server: {tally}")
        # Alive and still serving a valid call.
        code = live.runner.run(live.call(METHODS[2], live.seeds[METHODS[2]][0]))
        assert code == "OK"
        assert tally["ReportStatus: OK"] + tally["Renew: OK"] > 0
