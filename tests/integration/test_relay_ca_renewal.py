"""The server certificate and the relay signing CA renew themselves, under traffic.

Seconds-long lifetimes: a signing CA of 14 s and a server certificate of 6 s,
both renewed at half their life, while two agents renew their own 6 s client
certificates and a probe client makes a fresh mTLS handshake and two RPCs every
tenth of a second. Not one RPC may fail, no agent may fall back to bootstrap,
and what is issued after a renewal chains through the new CA.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

import openssl_cli
import relayfleet as rf
from meshtrust import settings
from meshtrust.pki import bundle, keys

pytestmark = pytest.mark.slow

CLUSTERS = ("cluster-1", "cluster-2")
PROBE = "probe"
TRAFFIC_SECONDS = 18.0


def test_server_certificate_and_signing_ca_renew_with_no_failed_rpc(
        fleet: rf.Fleet, tmp_path: Path) -> None:
    server = fleet.start_server(client_lifetime="6s", extra=[
        "--server-lifetime", "6s", "--signing-lifetime", "14s", "--ca-grace-ratio", "0.5",
        "--reconcile-interval", "0.5s"])
    agents = {}
    for cluster in CLUSTERS:
        fleet.enroll(cluster)
        agents[cluster] = fleet.start_agent(cluster, grace_ratio=0.5)
    for cluster in CLUSTERS:
        fleet.wait_connected(cluster)
    fleet.register(PROBE)
    first_server = _served(server.relay)

    async def traffic() -> tuple[int, list[str], list[rf.Credentials]]:
        creds = await rf.bootstrap_credentials(fleet, PROBE)
        issued = [creds]
        calls, failures = 0, []
        deadline = time.monotonic() + TRAFFIC_SECONDS
        while time.monotonic() < deadline:
            try:
                async with rf.relay_channel(server.relay, creds) as channel:
                    await rf.report(channel)
                    key = rf.new_key()
                    response = await rf.renew(channel, rf.request_for(key, PROBE))
                calls += 2
                creds = rf.Credentials(chain=bytes(response.certificate_chain),
                                       key=keys.dump_private_key(key),
                                       trust=bytes(response.ca_bundle))
                issued.append(creds)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")
            await asyncio.sleep(0.1)
        return calls, failures, issued

    calls, failures, issued = asyncio.run(traffic())
    assert failures == [], failures[:5]
    assert calls > 50
    server_renewals = server.process.lines(
        f"renewed {settings.RELAY_NAMESPACE}/{settings.RELAY_SERVER_SECRET}")
    signing_renewals = server.process.lines(
        f"renewed {settings.RELAY_NAMESPACE}/{settings.RELAY_SIGNING_SECRET}")
    assert len(server_renewals) >= 3, server.process.log()[-3000:]
    assert len(signing_renewals) >= 1, server.process.log()[-3000:]
    # What the server serves now is a renewed certificate, and it verifies.
    last_server = _served(server.relay)
    assert last_server.serial_number != first_server.serial_number
    root = bundle.load_certificate(asyncio.run(fleet.relay_root()))
    signers = {bundle.load_certificates(c.chain)[1].serial_number for c in issued}
    assert len(signers) >= 2  # client certificates came from the old and the new signing CA
    chain = bundle.load_certificates(issued[-1].chain)
    openssl_cli.verify(tmp_path, chain[0], root, tuple(chain[1:]), purpose="sslclient")
    # The agents renewed their own certificates all along, and never fell back to bootstrap.
    for cluster, agent in agents.items():
        assert len(agent.lines("bootstrapping cluster")) == 1, agent.log()[-2000:]
        assert not agent.lines("failed"), agent.log()[-2000:]
        assert len(agent.lines("renewed client certificate")) >= 3, cluster
    assert not server.process.lines("Traceback| ERROR meshtrust")


def _served(address: str) -> x509.Certificate:
    """The certificate the server presents on a new handshake, read with openssl s_client."""
    done = openssl_cli.run("s_client", "-connect", address, "-servername", "localhost",
                           input=b"", check=False)
    return bundle.load_certificates(done.stdout.encode(), "s_client output")[0]
