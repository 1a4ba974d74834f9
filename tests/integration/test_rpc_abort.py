"""Ending a call whose caller is gone: it ends as a cancelled call, nothing sent.

A busy server may get to a call only after its deadline has passed: the call
is over in gRPC's core before the handler sends its status, and sending it
fails. gRPC logs that failure as an ERROR with a traceback when it has not yet
noticed the end of the call itself (a race of the busy server's event loop,
which a test cannot force), and a cancelled call at debug level only.
``transport.abort`` makes such a call end as a cancelled call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
import grpc.aio
import pytest

from meshtrust import errors
from meshtrust.rpc import transport

_METHOD = "/meshtrust.test.Abort/Call"


async def _serve(handler: Any) -> tuple[grpc.aio.Server, int]:
    server = transport.new_server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "meshtrust.test.Abort",
        {"Call": grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=bytes, response_serializer=bytes)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _call(port: int, timeout: float) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(_METHOD, request_serializer=bytes,
                                   response_deserializer=bytes)
        try:
            await call(b"", timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_abort_after_the_deadline_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    ended: list[str] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # The event loop is held past the deadline, as a busy server's is: the call ends
        # in gRPC's core before the handler, or gRPC's own cancellation, runs again.
        time.sleep(0.5)
        try:
            await transport.abort(context, errors.RateLimited("busy", retry_after=1.0))
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        except grpc.aio.AbortError:
            ended.append("aborted")
            raise
        except BaseException as exc:  # noqa: BLE001 - the test reports what it was
            ended.append(repr(exc))
            raise
        return b""

    async def scenario() -> grpc.StatusCode:
        server, port = await _serve(handler)
        try:
            code = await _call(port, timeout=0.2)
            for _ in range(50):  # the handler ends after the client gave up
                if ended:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            return code
        finally:
            await server.stop(None)

    with caplog.at_level(logging.DEBUG, logger="grpc"):
        code = asyncio.run(scenario())
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert ended == ["cancelled"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_abort_of_a_live_call_sends_the_status() -> None:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await transport.abort(context, errors.UnknownCluster("cluster 'x' is not registered"))
        return b""

    async def scenario() -> grpc.StatusCode:
        server, port = await _serve(handler)
        try:
            return await _call(port, timeout=5.0)
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) is grpc.StatusCode.PERMISSION_DENIED
