"""The agent's status goes with its work stream's subscription, and is not sent twice.

A real agent (plaintext, in this process) against a gRPC relay server on loopback that
records what it is sent: the subscription carries the agent's status, and a server that
says it recorded it (``status_recorded`` in the first heartbeat) gets no separate
``ReportStatus`` until the status changes or the interval passes. A server that predates
the field never says so, and gets the report at once, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from meshtrust import rpc
from meshtrust.agent.app import Agent
from meshtrust.agent.config import AgentConfig
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages
from meshtrust.testing import MemoryStore


class Relay(transport.services.RelayServicer):  # type: ignore[misc]
    """Records the subscriptions and reports; acknowledges the status if ``acknowledge``."""

    def __init__(self, acknowledge: bool) -> None:
        self.acknowledge = acknowledge
        self.subscriptions: list[Any] = []
        self.reports: list[tuple[float, Any]] = []

    async def ReportStatus(self, request: Any, context: Any) -> messages.StatusAck:
        self.reports.append((time.monotonic(), request))
        return messages.StatusAck(server_time_unix=int(time.time()))

    async def Work(self, request: Any, context: Any) -> AsyncIterator[messages.WorkItem]:
        self.subscriptions.append(request)
        yield messages.WorkItem(heartbeat=messages.Heartbeat(
            server_time_unix=int(time.time()),
            status_recorded=self.acknowledge and request.HasField("status")))
        await asyncio.Event().wait()  # held open until the test ends


async def run_agent(relay: Relay, seconds: float, *, interval: float = 300.0) -> float:
    """Run an agent against ``relay`` for ``seconds`` after it subscribed; return when it did."""
    server = transport.new_server()
    transport.add_services(server, relay, transport.services.BootstrapServicer())
    port = transport.add_listener(server, "127.0.0.1:0", None)
    await server.start()
    agent = Agent(AgentConfig(cluster="c1", server=f"127.0.0.1:{port}", store="memory:",
                              insecure=True, status_interval=interval, replica="agent-a"),
                  MemoryStore())
    task = asyncio.create_task(agent.run())
    try:
        deadline = time.monotonic() + 15
        while not relay.subscriptions:
            assert time.monotonic() < deadline, "the agent did not open its work stream"
            await asyncio.sleep(0.02)
        subscribed = time.monotonic()
        await asyncio.sleep(seconds)
        return subscribed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(None)


def test_a_recorded_subscription_spares_the_report() -> None:
    """The status rides on the subscription; acknowledged, no report follows it."""
    relay = Relay(acknowledge=True)
    asyncio.run(run_agent(relay, 1.5))
    subscription = relay.subscriptions[0]
    assert subscription.HasField("status")
    assert subscription.status.protocol_version == rpc.PROTOCOL_VERSION
    assert subscription.status.replica == "agent-a"
    assert relay.reports == []


def test_a_server_that_does_not_record_it_gets_the_report_at_once() -> None:
    """A server before the field leaves status_recorded false: the agent reports at once,
    and the report says what the subscription said."""
    relay = Relay(acknowledge=False)
    subscribed = asyncio.run(run_agent(relay, 1.5))
    assert len(relay.reports) == 1
    when, report = relay.reports[0]
    assert when - subscribed < 1.0
    assert report == relay.subscriptions[0].status


def test_the_interval_counts_from_the_recorded_subscription() -> None:
    """With reports every 1 s, the first report comes about 1 s after the subscription
    was recorded, not at once, and the reports go on at the interval."""
    relay = Relay(acknowledge=True)
    subscribed = asyncio.run(run_agent(relay, 3.2, interval=1.0))
    times = [when - subscribed for when, _ in relay.reports]
    assert 2 <= len(times) <= 4, times
    assert 0.8 <= times[0] <= 2.0, times
    assert times[1] - times[0] >= 0.8, times
    assert all(report == relay.subscriptions[0].status for _, report in relay.reports)
