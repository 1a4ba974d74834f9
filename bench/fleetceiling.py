"""The ceiling for bench/fleet.py: the relay protocol served with nothing but gRPC and signing.

``bench/fleet.py --ceiling`` runs this in place of ``meshtrust server``, with the same
simulated agents, to measure what this machine allows at best: a ``grpc.aio`` server
with meshtrust's server options, the same relay certificate and mutual TLS, and the
same signing code (``pki.issuer`` through the local provider), but no store, no
tokens, no registry, no audit log, no admission control and no schedule.

* ``Bootstrap``: the CSR is signed as the cluster's relay client certificate (the
  token is not looked at).
* ``Work``: the cluster's Istio work item, sent again every 30 s until the cluster
  reports it finished, a heartbeat every 30 s after that; SIGUSR1 gives every cluster
  a new work item and sends it at once (as a changed policy does). With
  ``--no-work``, heartbeats only until then (``bench/fleet.py --no-policy``).
* ``CompleteWork``: the CSR is signed as the cluster's Istio intermediate, under a root
  made when the process starts; the outcome is acknowledged.
* ``ReportStatus``, and the status a work stream's subscription carries: acknowledged.
  ``Renew``: signed as ``Bootstrap``.

The cluster of a relay call is the CN of the certificate gRPC verified. Garbage is
collected as the server collects it (``--gc-threshold``'s default, the heap frozen at
the start), and large allocations mapped as the server maps them (``--mmap-threshold``'s
default).

    python bench/fleetceiling.py --store sqlite:///mgmt.db --listen 127.0.0.1:0 \\
        --bootstrap-listen 127.0.0.1:0 --ready-file ready.json

The ready file gets ``{"relay": port, "bootstrap": port}``, as ``meshtrust server``
writes it; SIGINT or SIGTERM stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from meshtrust import clock, settings
from meshtrust.authority import relay_pki
from meshtrust.pki import bundle, csr, issuer, keys, profiles
from meshtrust.providers import base as providers
from meshtrust.providers import local
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages
from meshtrust.server import app as server_app
from meshtrust.server import config as server_config
from meshtrust.store import open_store

HEARTBEAT = server_config.ServerConfig.heartbeat  # seconds, the server's default
INTERMEDIATE_LIFETIME = dt.timedelta(hours=720)  # the fleet benchmark's policy
CLOCK = clock.SystemClock()


class Ceiling(transport.services.RelayServicer, transport.services.BootstrapServicer):
    def __init__(self, relay_ca: issuer.CA, trust: bytes, *, work: bool = True) -> None:
        self._relay = local.LocalProvider(relay_ca)
        self._trust = trust
        root = issuer.new_root(keys.KeyType.EC_P256, profiles.ISTIO_ROOT, CLOCK.now(),
                               subject=issuer.Subject(organization="Istio"))
        self._istio = local.LocalProvider(root)
        self._istio_root = bundle.dump_certificate(root.certificate)
        self._changed = asyncio.Event()  # set (and replaced) when there is new work
        self._generation = 0 if work else -1  # -1: no work until SIGUSR1
        self._finished: dict[str, int] = {}  # cluster -> the last generation it finished

    async def _client_certificate(self, cluster: str, csr_pem: bytes
                                  ) -> messages.CertificateResponse:
        signed = await self._relay.sign(providers.SignRequest(
            request=csr.load_csr(csr_pem), profile=profiles.RELAY_CLIENT,
            lifetime=profiles.RELAY_CLIENT.default_lifetime,
            subject=issuer.Subject(cluster=cluster), idempotency_key=""), CLOCK.now())
        return messages.CertificateResponse(
            certificate_chain=signed.pem(root=False), ca_bundle=self._trust,
            serial=f"{signed.certificate.serial_number:x}",
            not_after_unix=int(signed.certificate.not_valid_after_utc.timestamp()))

    @staticmethod
    def _cluster(context: Any) -> str:
        names = context.auth_context().get("x509_common_name") or [b""]
        return bytes(names[0]).decode()

    async def Bootstrap(self, request: Any, context: Any) -> messages.CertificateResponse:
        return await self._client_certificate(request.cluster, request.csr)

    async def Renew(self, request: Any, context: Any) -> messages.CertificateResponse:
        return await self._client_certificate(self._cluster(context), request.csr)

    async def ReportStatus(self, request: Any, context: Any) -> messages.StatusAck:
        return messages.StatusAck(server_time_unix=int(CLOCK.now().timestamp()))

    def new_work(self) -> None:
        """Send every stream a new work item (the policy changed)."""
        changed, self._changed = self._changed, asyncio.Event()
        self._generation += 1
        changed.set()

    async def Work(self, request: Any, context: Any) -> AsyncIterator[messages.WorkItem]:
        # As the server: the work item until the cluster reports it finished, sent again
        # with each heartbeat (an agent whose call on it failed waits for it).
        # The first item is a heartbeat that acknowledges the subscription's status.
        cluster = self._cluster(context)
        yield messages.WorkItem(heartbeat=messages.Heartbeat(
            server_time_unix=int(CLOCK.now().timestamp()),
            status_recorded=request.HasField("status")))
        while True:
            changed = self._changed
            if self._finished.get(cluster, -1) < self._generation:
                yield messages.WorkItem(
                    id=f"ceiling-{cluster}-{self._generation}",
                    issue_intermediate=messages.IssueIntermediate(
                        policy="fleet", key_type="ecdsa-p256", org="Istio", form="cacerts",
                        trust_domain=settings.DEFAULT_TRUST_DOMAIN, auto_restart_pods=False))
            else:
                yield messages.WorkItem(heartbeat=messages.Heartbeat(
                    server_time_unix=int(CLOCK.now().timestamp())))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT):
                    await changed.wait()

    async def CompleteWork(self, request: Any, context: Any) -> messages.WorkAck:
        if request.stage not in ("", "csr"):
            if request.stage == "finished":
                cluster, generation = self._cluster(context), int(request.id.rsplit("-", 1)[1])
                self._finished[cluster] = max(generation, self._finished.get(cluster, -1))
            return messages.WorkAck()
        signed = await self._istio.sign(providers.SignRequest(
            request=csr.load_csr(request.csr), profile=profiles.ISTIO_INTERMEDIATE,
            lifetime=INTERMEDIATE_LIFETIME, subject=issuer.Subject(
                cluster=self._cluster(context), trust_domain=settings.DEFAULT_TRUST_DOMAIN,
                organization="Istio"), idempotency_key=""), CLOCK.now())
        return messages.WorkAck(certificate_chain=signed.pem(root=True),
                                root_bundle=self._istio_root)


async def serve(args: argparse.Namespace) -> None:
    store = await open_store(args.store)
    try:
        creds = await relay_pki.server_credentials(store)
        relay_ca = await relay_pki.load_signing_ca(store)
        trust = await relay_pki.trust_bundle(store)
    finally:
        await store.close()
    ceiling = Ceiling(relay_ca, trust, work=not args.no_work)
    server = transport.new_server([(transport.MAX_CONNECTIONS, server_app.connection_quota(
        server_app.raise_open_file_limit()))])
    transport.add_services(server, ceiling, ceiling)
    credentials = transport.Credentials(transport.Identity(
        chain=creds.certificate_chain, key=creds.private_key, trust=creds.client_trust))
    ports = {"relay": transport.add_listener(
                 server, args.listen, credentials.server_credentials(require_client_auth=True)),
             "bootstrap": transport.add_listener(
                 server, args.bootstrap_listen,
                 credentials.server_credentials(require_client_auth=False))}
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, ceiling.new_work)
    Path(args.ready_file).write_text(json.dumps(ports))
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True,
                        help="the management store holding the relay PKI")
    parser.add_argument("--listen", required=True, help="the relay's mutual-TLS address")
    parser.add_argument("--bootstrap-listen", required=True,
                        help="the bootstrap's server-authenticated TLS address")
    parser.add_argument("--ready-file", required=True,
                        help="where to write the bound ports once serving")
    parser.add_argument("--no-work", action="store_true",
                        help="no Istio work item until SIGUSR1: heartbeats only")
    args = parser.parse_args()
    server_app.map_large_allocations(server_config.DEFAULT_MMAP_THRESHOLD)
    with server_app.collecting_less(server_config.DEFAULT_GC_THRESHOLD):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
