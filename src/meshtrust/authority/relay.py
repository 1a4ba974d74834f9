"""Relay use cases: bootstrap with a token, renew over mTLS, authorize a peer.

Each use case follows one path — authorize, sign, record — and raises a
domain error a user can act on. The caller (the gRPC servicer) supplies the
peer's identity from the verified TLS certificate, never from a request field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import hmac

from cryptography import x509

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import audit as audit_module
from meshtrust.authority import ca_config, relay_pki, signers
from meshtrust.authority import registry as registry_module
from meshtrust.pki import bundle, csr, identity, issuer, profiles
from meshtrust.providers import base as providers
from meshtrust.store import base


class TokenMode(enum.Enum):
    """Which identity tokens bootstrap accepts."""

    SHARED = "shared"    # the reference's one token in relay-identity-token-secret
    CLUSTER = "cluster"  # per-cluster, single-use, expiring tokens only
    ANY = "any"          # either


@dataclasses.dataclass(frozen=True, kw_only=True)
class Issued:
    """A certificate handed to an agent, with what it needs to trust the server."""

    certificate: x509.Certificate
    chain_pem: bytes
    ca_bundle: bytes

    @property
    def serial(self) -> str:
        return f"{self.certificate.serial_number:x}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    client_lifetime: dt.timedelta = profiles.RELAY_CLIENT.default_lifetime
    token_mode: TokenMode = TokenMode.ANY
    names: settings.SecretNames = dataclasses.field(default_factory=settings.SecretNames)
    # Who signs: the key in relay-tls-signing-secret unless `meshtrust init` said otherwise.
    signer: ca_config.RelaySigner = ca_config.RelaySigner.LOCAL
    signer_arn: str = ""


class RelayAuthority:
    """Issues and renews relay client certificates for registered clusters."""

    def __init__(self, store: base.Store, clock: clock_module.Clock,
                 registry: registry_module.Registry, options: Options | None = None,
                 signer_cache: signers.Signers | None = None,
                 audit: audit_module.AuditLog | None = None) -> None:
        self._store = store
        self._clock = clock
        self.registry = registry
        self.audit = audit or registry.audit
        self.options = options or Options()
        self._signers = signer_cache or signers.Signers()
        self._trust: tuple[int, bytes] | None = None

    async def signer(self) -> providers.CAProvider | None:
        """What signs relay certificates; None when this server issues none."""
        if self.options.signer is ca_config.RelaySigner.NONE:
            return None
        return (await self._signer())[0]

    async def _signer(self) -> tuple[providers.CAProvider, bytes]:
        """The relay signer and the trust bundle, reloaded when their secrets change."""
        names = self.options.names
        if self.options.signer is ca_config.RelaySigner.NONE:
            raise errors.ConfigError(
                "this management server does not issue relay certificates: its CAs are "
                "managed outside meshtrust (placement external). Put the cluster's client "
                f"certificate in {names.relay_client} yourself and renew it before it expires")
        signing = await relay_pki.signing_secret(self._store, names)
        if self.options.signer is ca_config.RelaySigner.AWS_PCA:
            provider: providers.CAProvider = self._signers.external(
                self.options.signer.value, self.options.signer_arn)
        else:
            provider = self._signers.local(signing)
        if self._trust is None or self._trust[0] != signing.resource_version:
            self._trust = (signing.resource_version,
                           await relay_pki.trust_bundle(self._store, names))
        return provider, self._trust[1]

    async def bootstrap(self, cluster: str, token: str, csr_pem: bytes, *,
                        peer: str | None = None) -> Issued:
        """Check the token and issue the cluster's first client certificate.

        Accepted or refused, the attempt is recorded in the audit log with the
        caller's address ``peer``; the token never is.
        """
        try:
            registry_module.check_cluster_name(cluster)
            request = csr.load_csr(csr_pem)
            registered = await self.registry.get(cluster)
            # Refuse a bad CSR before the token is spent on it.
            issuer.check(request, profiles.RELAY_CLIENT, issuer.Subject(cluster=cluster))
            await self._check_token(cluster, token, request)
            return await self._issue(registered, request, audit_module.Kind.BOOTSTRAP,
                                     peer=peer)
        except errors.MeshTrustError as exc:
            await self.audit.refused(audit_module.Kind.BOOTSTRAP, exc,
                                     actor=audit_module.ANONYMOUS, cluster=cluster,
                                     profile=profiles.RELAY_CLIENT.name, peer=peer)
            raise

    async def renew(self, cluster: str, csr_pem: bytes) -> Issued:
        """Issue a new client certificate for an authenticated cluster's new key."""
        try:
            request = csr.load_csr(csr_pem)
            return await self._issue(await self.registry.get(cluster), request,
                                     audit_module.Kind.RENEW)
        except errors.MeshTrustError as exc:
            await self.audit.refused(audit_module.Kind.RENEW, exc, actor=cluster,
                                     cluster=cluster, profile=profiles.RELAY_CLIENT.name)
            raise

    async def _check_token(self, cluster: str, token: str, request: csr.Request) -> None:
        mode = self.options.token_mode
        if mode is not TokenMode.SHARED and self.registry.is_cluster_token(token):
            await self.registry.consume_token(cluster, token, request.key_sha256)
            return
        if mode is not TokenMode.CLUSTER:
            names = self.options.names
            try:
                secret = await self._store.get_secret(names.relay_namespace, names.relay_token)
                expected = secret.data.get("token", b"")
            except errors.NotFound:
                expected = b""
            if expected and hmac.compare_digest(expected.strip(), token.encode().strip()):
                return
        raise errors.AuthError(f"identity token rejected for cluster {cluster!r}")

    async def _issue(self, registered: registry_module.Cluster, request: csr.Request,
                     event: audit_module.Kind, *, peer: str | None = None) -> Issued:
        cluster = registered.name
        provider, trust = await self._signer()
        signed = await signers.sign(provider, providers.SignRequest(
            request=request, profile=profiles.RELAY_CLIENT,
            lifetime=self.options.client_lifetime, subject=issuer.Subject(cluster=cluster),
            idempotency_key=f"relay-client/{cluster}/{request.key_sha256}"),
            self._clock.now())
        certificate = signed.certificate
        issued = Issued(certificate=certificate,
                        chain_pem=signed.pem(root=False),
                        ca_bundle=trust)
        # Recorded before it is handed out: no record, no certificate.
        await self.audit.record(event, actor=cluster, cluster=cluster,
                                profile=profiles.RELAY_CLIENT.name, certificate=certificate,
                                peer=peer)
        await self.registry.seen(cluster, read=registered, clientCertificate={
            "serial": issued.serial,
            "notAfter": certificate.not_valid_after_utc.isoformat(),
            # What a relay root rotation checks: which CA signed it, which roots went with it.
            "signer": bundle.fingerprint(signed.chain[0]),
            "trust": bundle.roots_fingerprint(trust)})
        return issued

    async def authorize(self, peer_pem: bytes, *, registered: bool = True) -> str:
        """The registered cluster a verified peer certificate names; AuthError if none.

        ``registered=False`` skips asking the registry, for a caller whose own registry
        access refuses an unregistered cluster.
        """
        cluster = _cluster_named(peer_pem)
        if cluster is None:
            try:
                bundle.load_certificate(peer_pem, "peer certificate")
            except errors.ChainError as exc:
                raise errors.AuthError(
                    "the peer presented no readable client certificate") from exc
            raise errors.AuthError("the client certificate names no cluster (DNS SAN or CN)")
        if registered:  # on every call: a deregistered cluster is refused
            await self.registry.get(cluster)
        return cluster


_NAMED: dict[bytes, str | None] = {}  # SHA-256 of a peer certificate -> the cluster it names
_NAMED_MAX = 32768


def _cluster_named(peer_pem: bytes) -> str | None:
    """The cluster a client certificate in PEM names, None if unreadable or none.

    Every relay call of an agent presents the same certificate, and parsing it
    is a good part of the call's cost; what it names never changes, so it is
    remembered by its digest (the registry is still asked on every call).
    """
    digest = hashlib.sha256(peer_pem).digest()
    if digest in _NAMED:
        return _NAMED[digest]
    try:
        named = cluster_of(bundle.load_certificate(peer_pem, "peer certificate"))
    except errors.ChainError:
        named = None
    if len(_NAMED) >= _NAMED_MAX:
        _NAMED.clear()
    _NAMED[digest] = named
    return named


def cluster_of(cert: x509.Certificate) -> str | None:
    """The cluster a relay client certificate was issued to: its DNS SAN, else its CN."""
    for name in identity.subject_alt_names(cert):
        if isinstance(name, x509.DNSName) and "*" not in name.value:
            return name.value
    return identity.common_name(cert.subject)

