"""The relay over a cluster's and the server's lifetime: deregistration, crashes, insecure mode."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import relayfleet as rf
from meshtrust.cli import main
from meshtrust.cli.output import Output
from meshtrust.rpc import transport
from meshtrust.server import service


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main.main(list(argv), Output(stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


async def drain(stream: Any) -> tuple[BaseException | None, float]:
    """Read a server stream to its end; return how it ended and when (monotonic)."""
    try:
        while await stream.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc, time.monotonic()
    return None, time.monotonic()


class TestDeregistration:
    def test_deregistered_cluster_is_refused_on_an_open_channel_within_a_second(
            self, fleet: rf.Fleet) -> None:
        """After deregistration an open channel is PERMISSION_DENIED and its stream ends in 1 s."""
        server = fleet.start_server(heartbeat="30s")
        fleet.enroll("cluster-1")
        agent = fleet.start_agent("cluster-1")
        fleet.wait_connected("cluster-1")

        async def scenario() -> tuple[float, float, BaseException | None, str]:
            creds = await rf.bootstrap_credentials(fleet, "cluster-1")
            async with rf.relay_channel(server.relay, creds) as channel:
                await rf.report(channel)
                stream = rf.work(channel)
                first = await stream.read()
                assert first.HasField("heartbeat")
                ended = asyncio.create_task(drain(stream))
                code, out, err = await asyncio.to_thread(
                    cli, "cluster", "deregister", "cluster-1", "--store", fleet.mgmt_url)
                assert code == 0, err
                deregistered = time.monotonic()
                try:
                    await rf.report(channel)
                except grpc.aio.AioRpcError as exc:
                    refusal = f"{exc.code().name}: {exc.details()}"
                else:
                    refusal = "accepted"
                refused_after = time.monotonic() - deregistered
                end, when = await asyncio.wait_for(ended, timeout=5)
                try:  # a new work stream is refused when it records the connection
                    await rf.work(channel).read()
                except grpc.aio.AioRpcError as exc:
                    reopened = f"{exc.code().name}: {exc.details()}"
                else:
                    reopened = "accepted"
                return refused_after, when - deregistered, end, refusal, reopened

        refused_after, ended_after, end, refusal, reopened = asyncio.run(scenario())

        assert refusal == "PERMISSION_DENIED: cluster 'cluster-1' is not registered; register " \
                          "it with `meshtrust cluster register cluster-1`"
        assert reopened == refusal
        assert refused_after < 1.0
        assert rf.status_code(end) is grpc.StatusCode.PERMISSION_DENIED
        assert "cluster 'cluster-1' was deregistered" in str(end)
        assert ended_after < 1.0, f"the work stream ended {ended_after:.2f} s later"
        agent.wait_for_log("the server refused this agent: cluster 'cluster-1' was deregistered",
                           timeout=2)
        assert fleet.cluster_status("cluster-1") is None


class TestServerCrash:
    def test_agents_reconnect_by_themselves_after_the_server_is_killed_and_restarted(
            self, fleet: rf.Fleet) -> None:
        """Agents reconnect by themselves to a server SIGKILLed and restarted on the same ports."""
        server = fleet.start_server()
        clusters = ("cluster-1", "cluster-2")
        agents = {}
        for name in clusters:
            fleet.enroll(name)
            agents[name] = fleet.start_agent(name)
        for name in clusters:
            fleet.wait_connected(name)

        server.process.kill(signal.SIGKILL)
        for agent in agents.values():
            agent.wait_for_log("relay connection to .* ended", timeout=5)
        restarted_at = dt.datetime.now(dt.UTC)
        again = fleet.start_server(relay_port=server.relay_port,
                                   bootstrap_port=server.bootstrap_port or 0)

        for name in clusters:
            again.process.wait_for_log(f"agent of cluster {name} connected", timeout=15)
            status = rf.poll(lambda n=name: (s := fleet.cluster_status(n)) and s.get(
                "connected") and dt.datetime.fromisoformat(s["lastSeen"]) > restarted_at and s,
                timeout=5, what=f"{name} to be seen after the restart")
            assert status["connected"]
            agents[name].wait_for_log(r"connected to \S+ over mTLS", timeout=5, count=2)
            assert len(agents[name].lines("bootstrapping")) == 1
            assert agents[name].alive
        assert not again.process.lines("generated|bootstrapped|refused")


class TestShutdown:
    def test_agent_and_server_exit_cleanly_on_sigterm(self, fleet: rf.Fleet) -> None:
        """A connected agent, then the server, exit with status 0 within 5 s of SIGTERM."""
        server = fleet.start_server()
        fleet.enroll("cluster-1")
        agent = fleet.start_agent("cluster-1")
        fleet.wait_connected("cluster-1")
        agent.wait_for_log(r"connected to \S+ over mTLS", timeout=5)

        for process in (agent, server.process):
            os.killpg(process.popen.pid, signal.SIGTERM)
            assert process.popen.wait(timeout=5) == 0, process.log()[-2000:]
            assert process.lines("INFO .*: stopping")
        # The server says how long Python's garbage collector stopped it in all.
        assert server.process.lines(r"garbage collection took [\d.]+ s in \d+ collections, "
                                    r"the longest \d+ ms")
        status = fleet.cluster_status("cluster-1")
        assert status is not None and status["connected"] is False


class TestInsecureMode:
    def test_insecure_flag_serves_plaintext_to_an_insecure_agent(self, fleet: rf.Fleet) -> None:
        """`server --insecure` serves plaintext, no bootstrap port; `agent --insecure` joins."""
        server = fleet.start_server(insecure=True)
        fleet.register("cluster-1")
        agent = fleet.start_agent("cluster-1", insecure=True)

        fleet.wait_connected("cluster-1")

        assert server.bootstrap_port is None
        assert server.process.lines("INSECURE MODE")
        agent.wait_for_log(r"connected to \S+ over plaintext", timeout=5)

        async def scenario() -> None:
            async with transport.insecure_channel(server.relay) as channel:
                await rf.report(channel, metadata=[(service.INSECURE_CLUSTER_HEADER,
                                                    "cluster-1")])
                with pytest.raises(grpc.aio.AioRpcError,
                                   match="cluster 'cluster-2' is not registered"):
                    await rf.report(channel, metadata=[(service.INSECURE_CLUSTER_HEADER,
                                                        "cluster-2")])

        asyncio.run(scenario())

    def test_server_without_the_flag_refuses_plaintext(self, fleet: rf.Fleet) -> None:
        """A server started without --insecure does not answer plaintext calls."""
        server = fleet.start_server()
        fleet.enroll("cluster-1", install=False)

        async def scenario() -> None:
            async with transport.insecure_channel(server.relay) as channel:
                with pytest.raises(grpc.aio.AioRpcError, match="StatusCode.UNAVAILABLE"):
                    await rf.report(channel, metadata=[(service.INSECURE_CLUSTER_HEADER,
                                                        "cluster-1")])

        asyncio.run(scenario())

    def test_config_file_alone_cannot_turn_on_insecure_mode(self, tmp_path: Path) -> None:
        """A config file saying `insecure: true` without the --insecure flag refuses to start."""
        settings = tmp_path / "server.yaml"
        # A store that cannot be opened: were the refusal missing, the server would stop there
        # with another error instead of running forever inside the test.
        (tmp_path / "not-a-directory").write_text("")
        store = f"sqlite:///{tmp_path / 'not-a-directory' / 'mgmt.db'}"
        settings.write_text(f"store: {store}\ninsecure: true\n")

        code, out, err = cli("server", "--config", str(settings))

        assert code == 1
        assert err.startswith("error: insecure mode needs the --insecure flag on the command "
                              "line"), err
        assert str(settings) in err
