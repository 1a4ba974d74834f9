"""The relay root rotates with no loss of trust: server, agents and every handshake on the way.

Two agents hold relay connections; `meshtrust rotate relay-root --wait` starts the
rotation and the server carries it out, asking each agent to renew in each step.
All along, a probe makes a fresh mTLS handshake with cluster-1's current
certificate and reports it: not one may fail. At the end only the new root is
trusted, the server presents a certificate of it, and a client certificate of
the old root is refused.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest

import istiofleet as im
import openssl_cli
import relayfleet as rf
from meshtrust import rpc, settings
from meshtrust.authority import relay_rotation
from meshtrust.pki import bundle
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages

pytestmark = pytest.mark.slow

CLUSTERS = ("cluster-1", "cluster-2")
NS = settings.RELAY_NAMESPACE


def _report_of(creds: rf.Credentials) -> messages.StatusReport:
    """The status report cluster-1's agent would send for the certificate it holds."""
    cert = creds.certificate
    return messages.StatusReport(
        protocol_version=rpc.PROTOCOL_VERSION, replica="probe", leader=False,
        certificates=[messages.HeldCertificate(
            kind="relay-client", namespace=NS, secret=settings.RELAY_CLIENT_SECRET,
            serial=creds.serial, not_after_unix=int(cert.not_valid_after_utc.timestamp()),
            not_before_unix=int(cert.not_valid_before_utc.timestamp()),
            renew_at_unix=int(cert.not_valid_after_utc.timestamp()),
            fingerprint_sha256=bundle.fingerprint(cert), managed=True)])


def test_relay_root_rotation_keeps_every_handshake(fleet: rf.Fleet, tmp_path: Path) -> None:
    server = fleet.start_server(client_lifetime="1h",
                                extra=["--reconcile-interval", "0.5s"])
    agents = {}
    for cluster in CLUSTERS:
        fleet.enroll(cluster)
        agents[cluster] = fleet.start_agent(cluster)
    for cluster in CLUSTERS:
        fleet.wait_connected(cluster)
    old_root = bundle.load_certificate(asyncio.run(fleet.relay_root()))
    before = fleet.client_identity(CLUSTERS[0])
    assert before is not None

    stop = threading.Event()
    outcome: dict[str, object] = {}

    def probe() -> None:
        async def go() -> None:
            calls, failures = 0, []
            while not stop.is_set():
                held = await fleet.aclient_identity(CLUSTERS[0])
                assert held is not None
                creds = rf.Credentials.of(held)
                try:
                    async with rf.relay_channel(server.relay, creds) as channel:
                        await transport_report(channel, creds)
                    calls += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{creds.serial}: {exc.code()}: {exc.details()}")
                await asyncio.sleep(0.2)
            outcome["calls"], outcome["failures"] = calls, failures

        asyncio.run(go())

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        code, out, err = im.cli("rotate", "relay-root", "--store", fleet.mgmt_url,
                                "--wait", "60")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert code == 0, out + err + server.process.log()[-3000:]
    assert "step DONE" in out
    assert outcome["failures"] == [], outcome["failures"]
    assert isinstance(outcome["calls"], int) and outcome["calls"] > 10

    async def trusted() -> bytes:
        async with rf.opened(fleet.mgmt_url) as mgmt:
            secret = await mgmt.get_secret(NS, settings.RELAY_ROOT_SECRET)
            assert not set(secret.data) & {"old-tls.crt", "new-tls.crt"}  # cleaned up
            return secret.data["ca.crt"]

    roots = bundle.load_certificates(asyncio.run(trusted()))
    assert len(roots) == 1 and roots[0] != old_root
    new_root = roots[0]
    served = openssl_cli.run("s_client", "-connect", server.relay, "-servername", "localhost",
                             "-showcerts", input=b"", check=False).stdout
    chain = bundle.load_certificates(served.encode(), "s_client output")
    openssl_cli.verify(tmp_path, chain[0], new_root, tuple(chain[1:]), purpose="sslserver")
    assert openssl_cli.verify(tmp_path, chain[0], old_root, tuple(chain[1:]),
                              check=False).returncode != 0
    for cluster in CLUSTERS:
        held = fleet.client_identity(cluster)
        assert held is not None
        certs = bundle.load_certificates(held.chain)
        openssl_cli.verify(tmp_path, certs[0], new_root, tuple(certs[1:]), purpose="sslclient")
        assert bundle.load_certificates(held.trust) == [new_root]
        assert len(agents[cluster].lines("bootstrapping cluster")) == 1
        fleet.wait_connected(cluster)
    # A certificate of the old root is refused now.

    async def old_refused() -> grpc.StatusCode:
        creds = rf.Credentials.of(before)
        try:
            async with rf.relay_channel(server.relay, creds) as channel:
                await transport_report(channel, creds)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    assert asyncio.run(old_refused()) == grpc.StatusCode.UNAVAILABLE
    steps = server.process.lines("relay root rotation")
    assert any(relay_rotation.Step.DONE.value in line for line in steps), steps


async def transport_report(channel: grpc.aio.Channel, creds: rf.Credentials) -> None:
    await transport.relay_stub(channel).ReportStatus(_report_of(creds), timeout=rf.CALL_TIMEOUT)
