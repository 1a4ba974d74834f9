"""Proof of federation: workloads of two clusters complete mTLS through the shared root.

``workload`` issues a SPIFFE workload certificate from a cluster's ``cacerts``,
as istiod would; ``handshake`` runs a real TLS 1.3 handshake on 127.0.0.1
between two such workloads, each side trusting only its own cluster's
``root-cert.pem`` and checking the peer's SPIFFE ID, as Envoy does. Clusters
under one root (or during a root rotation, under a bundle that holds both
roots) succeed; a cluster under another root is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping

from cryptography import x509

from meshtrust import errors, settings
from meshtrust.pki import bundle, csr, identity, issuer, keys, profiles


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    cluster: str
    spiffe_id: str
    chain: bytes   # leaf + the cluster's intermediate
    key: bytes
    roots: bytes   # the cluster's root-cert.pem: the only trust it has


def workload(cluster: str, cacerts: Mapping[str, bytes], now: dt.datetime, *,
             namespace: str = "default", service_account: str = "sleep",
             trust_domain: str = settings.DEFAULT_TRUST_DOMAIN,
             lifetime: dt.timedelta = dt.timedelta(hours=1)) -> Workload:
    """A workload certificate issued by the cluster's Istio CA (its ``cacerts``)."""
    found = bundle.load_bundle(cacerts)
    if found.key is None:
        raise errors.ChainError(f"the cacerts of {cluster} has no CA key")
    chain = bundle.load_certificates(cacerts.get("cert-chain.pem")
                                     or cacerts.get("tls.crt", b""), "cert-chain.pem")
    ca = issuer.CA(certificate=found.certificate, key=found.key, chain=tuple(chain[1:]))
    key = keys.generate_key(keys.KeyType.EC_P256)
    leaf = issuer.issue(csr.Request(csr=csr.build_csr(key), public_key=key.public_key()), ca,
                        profiles.SPIFFE_WORKLOAD, now, lifetime,
                        issuer.Subject(trust_domain=trust_domain, namespace=namespace,
                                       service_account=service_account))
    roots = cacerts.get("root-cert.pem") or cacerts.get("ca.crt", b"")
    return Workload(cluster=cluster,
                    spiffe_id=identity.spiffe_id(trust_domain, namespace, service_account),
                    chain=bundle.dump_certificates([leaf, *chain[:-1]]),
                    key=keys.dump_private_key(key), roots=roots)


@contextlib.contextmanager
def _context(side: Workload, purpose: ssl.Purpose) -> Iterator[ssl.SSLContext]:
    context = ssl.create_default_context(purpose, cadata=side.roots.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # peers are named by SPIFFE ID, checked below
    context.verify_mode = ssl.CERT_REQUIRED
    with tempfile.TemporaryDirectory(prefix="meshtrust-tls-") as folder:
        cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(side.chain)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(side.key)
        context.load_cert_chain(cert_path, key_path)
    yield context


def _peer_id(transport: asyncio.BaseTransport) -> str:
    sslobj = transport.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        raise errors.ChainError("the peer presented no certificate")
    names = identity.subject_alt_names(x509.load_der_x509_certificate(der))
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    return uris[0] if uris else ""


async def handshake(client: Workload, server: Workload, timeout: float = 5.0) -> str:
    """Run mTLS from ``client`` to ``server``; return the server's SPIFFE ID seen by the client.

    Raises ChainError when either side refuses the other.
    """
    seen_by_server: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen_by_server.append(_peer_id(writer.transport))
            writer.write(b"hello from " + server.spiffe_id.encode() + b"\n")
            await writer.drain()
        except (errors.ChainError, ConnectionError):
            pass
        finally:
            writer.close()

    with _context(server, ssl.Purpose.CLIENT_AUTH) as server_ctx, \
            _context(client, ssl.Purpose.SERVER_AUTH) as client_ctx:
        listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
        port = listener.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=None), timeout)
            try:
                server_id = _peer_id(writer.transport)
                line = await asyncio.wait_for(reader.readline(), timeout)
            finally:
                writer.close()
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
            raise errors.ChainError(
                f"mTLS from {client.cluster} to {server.cluster} failed: {exc}") from exc
        finally:
            listener.close()
            await listener.wait_closed()
    if not line:
        raise errors.ChainError(f"{server.cluster} refused the certificate of {client.cluster}")
    if server_id != server.spiffe_id or seen_by_server[:1] != [client.spiffe_id]:
        raise errors.ChainError(f"unexpected peer identities: {server_id!r}, {seen_by_server!r}")
    return server_id
