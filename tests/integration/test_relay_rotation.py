"""Certificates that change under a running relay: client rotation, server reload, replicas, BYO."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import re
import time
from pathlib import Path

import grpc.aio

import relayfleet as rf
from meshtrust.pki import bundle, rotation

PROBLEMS = r" (WARNING|ERROR|CRITICAL) |status report failed|relay connection to .* ended|Traceback"


RENEWED_BY_AGENT = r"renewed client certificate: serial ([0-9a-f]+)"
RENEWED_BY_SERVER = r"renewed client certificate of cluster cluster-1: ([0-9a-f]+)"


def serials(process: rf.Process, pattern: str) -> list[str]:
    """The serials that ``pattern``'s group captures in the process's log."""
    return [m.group(1) for line in process.lines(pattern)
            if (m := re.search(pattern, line))]


class Load:
    """Counts relay calls and keeps every failure with what was being done."""

    def __init__(self) -> None:
        self.calls = 0
        self.failures: list[str] = []

    async def call(self, what: str, channel: grpc.aio.Channel) -> None:
        try:
            await rf.report(channel)
        except grpc.aio.AioRpcError as exc:
            self.failures.append(f"{what}: {exc.code().name} {exc.details()}")
        self.calls += 1


class TestClientRotation:
    def test_rotation_over_several_rounds_loses_no_rpc(self, fleet: rf.Fleet) -> None:
        """6 s certificates rotate at least 3 times while every RPC, new or long-open, succeeds."""
        server = fleet.start_server(client_lifetime="6s")
        fleet.enroll("cluster-1")
        agent = fleet.start_agent("cluster-1", extra=["--log-level", "debug"])
        fleet.wait_connected("cluster-1")
        load = Load()

        async def scenario() -> tuple[set[str], rf.Credentials]:
            held = await fleet.aclient_identity("cluster-1")
            assert held is not None
            first = rf.Credentials.of(held)
            seen = {first.serial}
            expiry = first.certificate.not_valid_after_utc
            deadline = time.monotonic() + 30
            async with rf.relay_channel(server.relay, first) as pinned:
                while len(seen) < 4 or dt.datetime.now(dt.UTC) < expiry + dt.timedelta(
                        seconds=1):
                    assert time.monotonic() < deadline, f"only {len(seen) - 1} rotations"
                    held = await fleet.aclient_identity("cluster-1")
                    assert held is not None
                    current = rf.Credentials.of(held)
                    seen.add(current.serial)
                    async with rf.relay_channel(server.relay, current) as fresh:
                        await load.call(f"new connection with {current.serial}", fresh)
                    await load.call("connection opened with the first certificate", pinned)
                    await asyncio.sleep(0.05)
            return seen, first

        seen, first = asyncio.run(scenario())

        assert load.failures == [], load.failures[:5]
        assert load.calls > 50
        renewed = serials(agent, RENEWED_BY_AGENT)
        assert len(renewed) >= 3
        assert set(serials(server.process, RENEWED_BY_SERVER))\
            >= set(renewed)
        assert not agent.lines(PROBLEMS), agent.lines(PROBLEMS)[:5]
        assert not server.process.lines("refused|WARNING|ERROR")
        # The agent's work stream moved to each new certificate's connection (one connection
        # for the stream and the calls) and was opened before the old one ended: the server
        # never saw the cluster go.
        opened = server.process.lines("agent of cluster cluster-1 connected")
        assert 2 <= len(opened) <= len(renewed) + 1, opened
        assert not server.process.lines("agent of cluster cluster-1 disconnected")
        assert first.serial in seen and len(seen) >= 4


class TestServerCertificate:
    def test_replaced_server_certificate_reaches_new_handshakes_with_no_failed_rpc(
            self, fleet: rf.Fleet, tmp_path: Path) -> None:
        """A new server certificate reaches new handshakes while no RPC fails, open or new."""
        server = fleet.start_server()
        fleet.enroll("cluster-1")
        agent = fleet.start_agent("cluster-1", extra=["--log-level", "debug"])
        fleet.wait_connected("cluster-1")
        held = fleet.client_identity("cluster-1")
        assert held is not None
        creds = rf.Credentials.of(held)
        old = rf.served_certificate(server.relay, tmp_path, creds)
        load = Load()

        async def scenario() -> str:
            stop = asyncio.Event()

            async def on_one_channel() -> None:
                async with rf.relay_channel(server.relay, creds) as channel:
                    while not stop.is_set():
                        await load.call("open connection", channel)

            async def on_new_channels() -> None:
                while not stop.is_set():
                    async with rf.relay_channel(server.relay, creds) as channel:
                        await load.call("new connection", channel)

            tasks = [asyncio.create_task(job()) for job in (on_one_channel, on_new_channels)]
            await asyncio.sleep(0.5)
            data = rf.server_certificate(await fleet.signing_ca())
            await rf.put_secret(fleet.mgmt_url, rf.NAMES.relay_server, data)
            await rf.apoll(lambda: asyncio.to_thread(server.process.lines,
                                                     "server certificate reloaded"),
                           timeout=5, what="the server to reload its certificate")
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
            return f"{bundle.load_certificate(data['tls.crt']).serial_number:x}"

        new_serial = asyncio.run(scenario())

        assert load.failures == [], load.failures[:5]
        assert load.calls > 20
        assert f"{old.serial_number:x}" != new_serial
        for address in (server.relay, server.bootstrap):
            served = rf.served_certificate(address, tmp_path, creds)
            assert f"{served.serial_number:x}" == new_serial, address
        assert not agent.lines(PROBLEMS), agent.lines(PROBLEMS)[:5]
        assert server.process.alive


class TestReplicas:
    def test_only_the_leader_rotates_and_a_follower_takes_over_after_sigkill(
            self, fleet: rf.Fleet) -> None:
        """Only the leader replica renews; after it is SIGKILLed the other leads and renews."""
        server = fleet.start_server(client_lifetime="6s")
        fleet.enroll("cluster-1")
        lease_ttl = 2
        first = fleet.start_agent("cluster-1", replica="replica-a", lease_ttl=lease_ttl)
        first.wait_for_log("replica replica-a is now the leader", timeout=10)
        second = fleet.start_agent("cluster-1", replica="replica-b", lease_ttl=lease_ttl)
        second.wait_for_log(r"connected to \S+ over mTLS", timeout=10)
        done = len(first.wait_for_log("renewed client certificate", timeout=15, count=2))

        first.wait_for_log("renewed client certificate", timeout=10, count=done + 1)
        first.kill(signal.SIGKILL)
        killed = time.monotonic()

        assert not second.lines("renewed client certificate|bootstrapping|now the leader")
        led_by_first = set(serials(first, RENEWED_BY_AGENT))
        assert set(serials(server.process, RENEWED_BY_SERVER)) \
            == led_by_first
        second.wait_for_log("replica replica-b is now the leader", timeout=5 * lease_ttl)
        takeover = time.monotonic() - killed
        assert takeover < 3 * lease_ttl, f"takeover took {takeover:.1f} s"
        second.wait_for_log("renewed client certificate", timeout=10)
        led_by_second = set(serials(second, RENEWED_BY_AGENT))
        assert led_by_second and not led_by_second & led_by_first
        held = rf.poll(lambda: (h := fleet.client_identity("cluster-1")) and
                       h.serial in led_by_second and h, timeout=5,
                       what="the store to hold the new leader's certificate")
        assert held.managed


class TestBringYourOwnCertificate:
    def test_provided_certificate_is_used_as_is_and_replacements_are_picked_up(
            self, fleet: rf.Fleet) -> None:
        """A certificate put there by hand is used without bootstrap or renewal, and replaced."""
        server = fleet.start_server()
        fleet.register("cluster-1")
        ca = asyncio.run(fleet.signing_ca())
        provided = rf.client_certificate(ca, "cluster-1", dt.timedelta(seconds=8))
        asyncio.run(rf.put_secret(fleet.store_url("cluster-1"), rf.NAMES.relay_client,
                                  provided))
        cert = bundle.load_certificate(provided["tls.crt"])
        agent = fleet.start_agent("cluster-1", grace_ratio=0.5)

        def reported() -> str | None:
            status = fleet.cluster_status("cluster-1") or {}
            held = status.get("certificates") or [{}]
            return held[0].get("serial")

        fleet.wait_connected("cluster-1")
        due = rotation.renew_at(cert, 0.5)
        rf.poll(lambda: dt.datetime.now(dt.UTC) > due + dt.timedelta(seconds=1), timeout=10,
                what="the provided certificate's renewal time to pass")
        assert reported() == f"{cert.serial_number:x}"
        assert not agent.lines("renewed|bootstrapping|bootstrap failed")
        assert not server.process.lines("renewed client certificate|bootstrapped")

        replacement = rf.client_certificate(ca, "cluster-1", dt.timedelta(hours=1))
        asyncio.run(rf.put_secret(fleet.store_url("cluster-1"), rf.NAMES.relay_client,
                                  replacement))
        new_serial = f"{bundle.load_certificate(replacement['tls.crt']).serial_number:x}"

        rf.poll(lambda: reported() == new_serial, timeout=5,
                what="the agent to report the replacement certificate")
        held = fleet.client_identity("cluster-1")
        assert held is not None and not held.managed and held.serial == new_serial
        assert not agent.lines("renewed|bootstrapping")
        status = fleet.cluster_status("cluster-1")
        assert status is not None and "clientCertificate" not in status
