"""Rotating the relay root without loss of trust, the way an Istio root is rotated.

The reference leaves the relay root unrenewed. Here it is rotated in recorded
steps; every step is written to the ``RelayRootRotation`` resource before its
effect, and the effect — the content of the relay secrets — is derived from
the step, so a crash anywhere resumes where it stopped:

1. ``ADDING_ROOT``  — a new root and a new signing CA under it are made; the
   server and, through their next certificate, the agents trust old + new;
   the old signing CA still signs;
2. ``REISSUING``    — the new signing CA signs: the server certificate is
   re-issued under it and every agent renews;
3. ``DROPPING_OLD`` — once every agent holds a certificate of the new root, the
   old root is trusted no more; agents renew once more to drop it too;
4. ``DONE``.

A step is complete when every registered cluster holds a client certificate
from the step's signing CA delivered with the step's trust bundle: the server
records both at issuance, and the agent's report says which certificate it
holds. Until then the server asks the cluster's agent to renew (a flag on the
heartbeat of its work stream).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import audit as audit_module
from meshtrust.authority import registry as registry_module
from meshtrust.authority import relay_renewal, root_rotation, signers
from meshtrust.pki import bundle, csr, identity, issuer, keys, profiles
from meshtrust.store import base, manifest

log = logging.getLogger(__name__)

ROTATION_KIND = "RelayRootRotation"
ROTATION_API = "meshtrust.io/v1"
NAME = "relay"


# The steps, what signs in each and which roots are trusted: as an Istio root rotation,
# without the rollback (the relay root has none yet).
Step = root_rotation.Step
LAYOUT, NEXT = root_rotation.LAYOUT, root_rotation.NEXT
_WORKING = ("old-tls.crt", "old-tls.key", "new-tls.crt", "new-tls.key")


class RelayRootRotations:
    """Starts and advances the rotation of the relay root; says which agents must renew."""

    def __init__(self, store: base.Store, clock: clock_module.Clock,
                 registry: registry_module.Registry, cache: signers.Signers, *,
                 names: settings.SecretNames | None = None,
                 audit: audit_module.AuditLog | None = None) -> None:
        self._store = store
        self._clock = clock
        self._registry = registry
        self._lock = cache.lock
        self.names = names or settings.SecretNames()
        self.audit = audit or registry.audit
        self._wanted: tuple[str, str] | None = None  # (signer, trust) while one is under way

    # -- the operator's side ------------------------------------------------------------------

    async def start(self) -> base.Resource:
        """Begin a rotation; refuse one under way, or a root whose key meshtrust lacks."""
        current = await self._get()
        if current is not None and current.status.get("step") != Step.DONE.value:
            raise errors.ConfigError(f"a relay root rotation is under way (step "
                                     f"{current.status.get('step')}); wait for it to finish")
        root_secret, signing_secret = await self._secrets()
        for secret in (root_secret, signing_secret):
            if (secret.labels.get(settings.MANAGED_LABEL) != "meshtrust"
                    or "tls.key" not in secret.data):
                raise errors.ConfigError(
                    f"{secret.namespace}/{secret.name} was not made by meshtrust or holds no "
                    "key, so meshtrust cannot rotate the relay root: rotate it where its key is")
        old_root = signers.ca_from_secret(root_secret, self._lock)
        old_signing = signers.ca_from_secret(signing_secret, self._lock)
        now = self._clock.now()
        lifetime = old_root.certificate.not_valid_after_utc - \
            old_root.certificate.not_valid_before_utc
        kt = keys.key_type_of(old_root.key) or keys.KeyType.EC_P256
        new_root = issuer.new_root(kt, profiles.RELAY_ROOT, now, lifetime, issuer.Subject(
            common_name=identity.common_name(old_root.certificate.subject)))
        signing_life = (old_signing.certificate.not_valid_after_utc
                        - old_signing.certificate.not_valid_before_utc)
        new_signing = issuer.new_intermediate(
            kt, new_root, relay_renewal.signing_profile(old_signing), now, signing_life,
            issuer.Subject(
                common_name=identity.common_name(old_signing.certificate.subject)))
        await self._store.update(dataclasses.replace(root_secret, data={
            **_plain(root_secret.data),
            "old-tls.crt": bundle.dump_certificate(old_root.certificate),
            "old-tls.key": root_secret.data["tls.key"],
            "new-tls.crt": bundle.dump_certificate(new_root.certificate),
            "new-tls.key": self._lock.seal(new_root.key)}))
        await self._store.update(dataclasses.replace(signing_secret, data={
            **_plain(signing_secret.data),
            "old-tls.crt": signing_secret.data["tls.crt"],
            "old-tls.key": signing_secret.data["tls.key"],
            "new-tls.crt": bundle.dump_certificates(new_signing.path[:-1]),
            "new-tls.key": self._lock.seal(new_signing.key)}))
        status = {"step": Step.ADDING_ROOT.value, "history": [self._entry(Step.ADDING_ROOT)],
                  "oldRoot": bundle.fingerprint(old_root.certificate),
                  "newRoot": bundle.fingerprint(new_root.certificate)}
        if current is None:
            current = await self._store.create(base.Resource(
                api_version=ROTATION_API, kind=ROTATION_KIND,
                namespace=self.names.relay_namespace, name=NAME, spec={}))
        made = await self._store.update_status(dataclasses.replace(current, status=status))
        await self._apply(Step.ADDING_ROOT)
        log.info("relay root rotation started: new root %s", status["newRoot"][:16])
        await self.audit.record(audit_module.Kind.ROTATION, step=Step.ADDING_ROOT.value,
                                profile=profiles.RELAY_ROOT.name,
                                certificate=new_root.certificate,
                                message="relay root rotation started: new root generated; "
                                        "the server and agents now trust old and new")
        return made

    async def step(self) -> Step | None:
        current = await self._get()
        return Step(current.status["step"]) if current and current.status.get("step") else None

    # -- the server's side --------------------------------------------------------------------

    async def advance(self) -> None:
        """Re-apply the current step (idempotent) and move on once every cluster has it."""
        current = await self._get()
        step = Step(current.status["step"]) if current and current.status.get("step") else None
        if current is None or step is None or step is Step.DONE:
            self._wanted = None
            return
        await self._apply(step)
        self._wanted = await self._target(step)
        if not await self._converged():
            return
        following = NEXT[step]
        status = {**current.status, "step": following.value,
                  "history": [*current.status.get("history", []), self._entry(following)]}
        await self._store.update_status(dataclasses.replace(current, status=status))
        await self._apply(following)
        self._wanted = None if following is Step.DONE else await self._target(following)
        log.info("relay root rotation: %s done, now %s", step.value, following.value)
        await self.audit.record(audit_module.Kind.ROTATION, step=following.value,
                                profile=profiles.RELAY_ROOT.name,
                                message=f"relay root rotation: {step.value} done")

    @property
    def wanted(self) -> tuple[str, str] | None:
        """The (signer, trust) fingerprints every client certificate must have, if any."""
        return self._wanted

    async def renewal_wanted(self, cluster: str) -> bool:
        """Whether ``cluster``'s agent must renew for the rotation under way."""
        if self._wanted is None:
            return False
        try:
            found = await self._store.get_resource(registry_module.CLUSTER_KIND,
                                                   self.names.relay_namespace, cluster)
        except errors.NotFound:
            return False
        return not _holds(found.status, self._wanted)

    # -- how each step looks in the secrets ---------------------------------------------------

    async def _apply(self, step: Step) -> None:
        """Make the relay secrets say what ``step`` signs with and trusts."""
        root_secret, signing_secret = await self._secrets()
        if not all(k in root_secret.data for k in _WORKING):
            return  # finished and cleaned up already
        signer, trusted = LAYOUT[step]
        trust = b"".join(root_secret.data[f"{name}-tls.crt"] for name in trusted)
        final = step is Step.DONE
        root_data = {**(_plain(root_secret.data) if final else root_secret.data),
                     "ca.crt": trust, "tls.crt": root_secret.data[f"{signer}-tls.crt"],
                     "tls.key": root_secret.data[f"{signer}-tls.key"]}
        signing_data = {**(_plain(signing_secret.data) if final else signing_secret.data),
                        "ca.crt": trust, "tls.crt": signing_secret.data[f"{signer}-tls.crt"],
                        "tls.key": signing_secret.data[f"{signer}-tls.key"]}
        # Trust first, then the signer: nobody is handed a certificate the others distrust.
        await self._replace(root_secret, root_data)
        await self._replace(signing_secret, signing_data)
        await self._server_certificate(signing_data, trust)

    async def _server_certificate(self, signing_data: dict[str, bytes], trust: bytes) -> None:
        """The server's certificate: from the signing CA of the step, trusting its roots."""
        ns = self.names.relay_namespace
        try:
            secret = await self._store.get_secret(ns, self.names.relay_server)
        except errors.NotFound:
            return
        data = {**secret.data, "ca.crt": trust}
        signing = bundle.load_certificates(signing_data["tls.crt"])[0]
        current = bundle.load_certificates(secret.data["tls.crt"])[0]
        if (secret.labels.get(settings.MANAGED_LABEL) == "meshtrust"
                and not bundle.issued_by(current, signing)):
            ca = signers.ca_from_secret(dataclasses.replace(
                secret, name=self.names.relay_signing, data=signing_data), self._lock)
            key = keys.generate_key(keys.key_type_of(current.public_key())  # type: ignore[arg-type]
                                    or keys.KeyType.EC_P256)
            kept = tuple(identity.format_name(g).split(":", 1)[1]
                         for g in identity.subject_alt_names(current)
                         if identity.format_name(g) != f"DNS:{issuer.RELAY_SERVER_WILDCARD}")
            request = csr.Request(csr=csr.build_csr(key), public_key=key.public_key())
            made = issuer.issue(request, ca, profiles.RELAY_SERVER, self._clock.now(),
                                current.not_valid_after_utc - current.not_valid_before_utc,
                                issuer.Subject(names=kept))
            data |= {"tls.crt": bundle.dump_certificates([made, *ca.path[:-1]]),
                     "tls.key": keys.dump_private_key(key)}
            log.info("relay root rotation: server certificate re-issued under the new root")
        await self._replace(secret, data)

    async def _replace(self, secret: base.Secret, data: dict[str, bytes]) -> None:
        if data != dict(secret.data):
            await self._store.update(dataclasses.replace(secret, data=data))

    # -- convergence --------------------------------------------------------------------------

    async def _target(self, step: Step) -> tuple[str, str]:
        """The signer and trust fingerprints every client certificate must have in ``step``."""
        root_secret, signing_secret = await self._secrets()
        signing = bundle.load_certificates(signing_secret.data["tls.crt"])[0]
        return bundle.fingerprint(signing), bundle.roots_fingerprint(root_secret.data["ca.crt"])

    async def _converged(self) -> bool:
        if self._wanted is None:
            return True
        # A cluster that never bootstrapped gets the current trust when it does.
        clusters = await self._store.list_resources(registry_module.CLUSTER_KIND,
                                                    namespace=self.names.relay_namespace)
        return all(_holds(c.status, self._wanted) for c in clusters
                   if c.status.get("clientCertificate"))

    # -- helpers ------------------------------------------------------------------------------

    async def _get(self) -> base.Resource | None:
        try:
            return await self._store.get_resource(ROTATION_KIND, self.names.relay_namespace,
                                                  NAME)
        except errors.NotFound:
            return None

    async def _secrets(self) -> tuple[base.Secret, base.Secret]:
        ns = self.names.relay_namespace
        try:
            return (await self._store.get_secret(ns, self.names.relay_root),
                    await self._store.get_secret(ns, self.names.relay_signing))
        except errors.NotFound as exc:
            raise errors.ConfigError(f"the relay PKI is incomplete: {exc}") from exc

    def _entry(self, step: Step) -> dict[str, Any]:
        return {"step": step.value, "at": manifest.dump_time(self._clock.now())}


def _holds(status: dict[str, Any], wanted: tuple[str, str]) -> bool:
    """Whether the cluster's agent holds a certificate from ``wanted`` signer and trust."""
    issued = status.get("clientCertificate") or {}
    if (issued.get("signer"), issued.get("trust")) != wanted:
        return False
    reported = [c for c in status.get("certificates") or []
                if isinstance(c, dict) and c.get("kind") == "relay-client"]
    return bool(reported) and reported[0].get("serial") == issued.get("serial")


def _plain(data: Any) -> dict[str, bytes]:
    return {k: v for k, v in data.items() if k not in _WORKING}


