"""Root rotation without loss of trust, one recorded step at a time.

``start`` makes a new root for a generated policy and records a
``RootRotation`` resource; ``advance`` (run by the server every reconcile
round) moves it on once every selected cluster has confirmed the step:

1. ``ADDING_ROOT``  — the old root still signs; every cluster's ``root-cert.pem``
   becomes old + new;
2. ``REISSUING``    — the new root signs; intermediates are re-issued under it,
   still with both roots trusted;
3. ``DROPPING_OLD`` — once every cluster runs an intermediate of the new root,
   ``root-cert.pem`` becomes the new root alone;
4. ``DONE``.

Every step is written to the resource's status before its effect, and the
effect — the content of ``root-trust.<policy>`` — is derived from the step, so
a crash anywhere resumes where it stopped. Before step 3, ``rollback``
returns to the old root the same way, in reverse.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import audit as audit_module
from meshtrust.authority import istio, trust_policy
from meshtrust.pki import bundle, issuer, profiles
from meshtrust.store import base, manifest

log = logging.getLogger(__name__)

ROTATION_KIND = "RootRotation"
ROTATION_API = "meshtrust.io/v1"
OLD, NEW = "old", "new"


class Step(enum.Enum):
    ADDING_ROOT = "ADDING_ROOT"
    REISSUING = "REISSUING"
    DROPPING_OLD = "DROPPING_OLD"
    DONE = "DONE"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"


# What each step signs with and which roots clusters trust.
LAYOUT: dict[Step, tuple[str, tuple[str, ...]]] = {
    Step.ADDING_ROOT: (OLD, (OLD, NEW)),
    Step.REISSUING: (NEW, (OLD, NEW)),
    Step.DROPPING_OLD: (NEW, (NEW,)),
    Step.DONE: (NEW, (NEW,)),
    Step.ROLLING_BACK: (OLD, (OLD, NEW)),
    Step.ROLLED_BACK: (OLD, (OLD,)),
}
NEXT = {Step.ADDING_ROOT: Step.REISSUING, Step.REISSUING: Step.DROPPING_OLD,
         Step.DROPPING_OLD: Step.DONE, Step.ROLLING_BACK: Step.ROLLED_BACK}
FINAL = (Step.DONE, Step.ROLLED_BACK)
_CAS_ATTEMPTS = 5




class RootRotations:
    def __init__(self, store: base.Store, clock: clock_module.Clock,
                 authority: istio.IstioAuthority, *,
                 namespace: str = settings.RELAY_NAMESPACE,
                 audit: audit_module.AuditLog | None = None) -> None:
        self._store = store
        self._clock = clock
        self._istio = authority
        self._ns = namespace
        self.audit = audit or authority.audit

    async def start(self, policy_name: str) -> base.Resource:
        """Begin rotating the root of a generated policy; refuse if one is under way."""
        try:
            return await self._start(policy_name)
        except errors.MeshTrustError as exc:
            await self.audit.refused(audit_module.Kind.ROTATION, exc, policy=policy_name,
                                     step=Step.ADDING_ROOT.value)
            raise

    async def _start(self, policy_name: str) -> base.Resource:
        _, policy = await self._istio.policy(policy_name)
        if isinstance(policy.root, trust_policy.SecretRoot):
            raise errors.ConfigError(
                f"policy {policy_name} uses a root from secret {policy.root.name}; rotate it "
                "by pointing secretRef at a secret with the new root")
        if isinstance(policy.root, trust_policy.ExternalRoot):
            raise errors.ConfigError(
                f"policy {policy_name} signs at the external CA {policy.root.arn}; rotate it "
                "by pointing awsPca at the new CA")
        try:
            current = await self._store.get_resource(ROTATION_KIND, self._ns, policy_name)
        except errors.NotFound:
            current = None
        if current is not None and Step(current.status.get("step")) not in FINAL:
            raise errors.ConfigError(
                f"a root rotation of policy {policy_name} is under way (step "
                f"{current.status.get('step')}); wait for it or roll it back")
        secret = await self._istio.root_secret(policy)
        new = issuer.new_root(policy.root.key_type, profiles.ISTIO_ROOT, self._clock.now(),
                              policy.root.lifetime,
                              issuer.Subject(organization=policy.root.organization))
        data = {**_plain(secret.data),
                "old-root-cert.pem": secret.data["root-cert.pem"],
                "old-key.pem": secret.data["key.pem"],
                "new-root-cert.pem": bundle.dump_certificate(new.certificate),
                "new-key.pem": self._istio.key_lock.seal(new.key)}
        await self._store.update(dataclasses.replace(secret, data=data))
        status = {"step": Step.ADDING_ROOT.value, "history": [self._entry(Step.ADDING_ROOT)],
                  "oldRoot": bundle.fingerprint(bundle.load_certificate(data["old-root-cert.pem"])),
                  "newRoot": bundle.fingerprint(new.certificate)}
        spec = {"policy": policy_name}
        if current is None:
            made = await self._store.create(base.Resource(
                api_version=ROTATION_API, kind=ROTATION_KIND, namespace=self._ns,
                name=policy_name, spec=spec))
        else:
            made = await self._store.update(dataclasses.replace(current, spec=spec))
        made = await self._store.update_status(dataclasses.replace(made, status=status))
        await self._apply(policy, Step.ADDING_ROOT)
        log.info("root rotation of policy %s started", policy_name)
        await self.audit.record(audit_module.Kind.ROTATION, policy=policy_name,
                                step=Step.ADDING_ROOT.value, profile=profiles.ISTIO_ROOT.name,
                                certificate=new.certificate,
                                message="started: new root generated; clusters now trust old "
                                        "and new")
        return made

    async def rollback(self, policy_name: str) -> base.Resource:
        """Return to the old root; only before the old root is dropped."""
        try:
            return await self._rollback(policy_name)
        except errors.MeshTrustError as exc:
            await self.audit.refused(audit_module.Kind.ROTATION, exc, policy=policy_name)
            raise

    async def _rollback(self, policy_name: str) -> base.Resource:
        current = await self._get(policy_name)
        step = Step(current.status["step"])
        if step in (Step.DROPPING_OLD, Step.DONE):
            raise errors.ConfigError(
                f"the old root of policy {policy_name} is being or was dropped; it cannot be "
                "rolled back — rotate again instead")
        if step in (Step.ROLLING_BACK, Step.ROLLED_BACK):
            return current
        # From ADDING_ROOT nothing is signed by the new root yet: trust the old one alone.
        target = Step.ROLLED_BACK if step is Step.ADDING_ROOT else Step.ROLLING_BACK
        updated = await self._record(current, target)
        _, policy = await self._istio.policy(policy_name)
        await self._apply(policy, target)
        await self.audit.record(audit_module.Kind.ROTATION, policy=policy_name,
                                step=target.value, message=f"rollback from {step.value}")
        return updated

    async def advance(self) -> None:
        """Move every rotation on whose step every cluster has confirmed."""
        for listed in await self._store.list_resources(ROTATION_KIND, namespace=self._ns):
            step = Step(listed.status.get("step", Step.ADDING_ROOT.value))
            if step in FINAL:
                continue
            try:
                _, policy = await self._istio.policy(listed.name)
            except errors.ConfigError:
                continue
            await self._apply(policy, step)  # idempotent: resumes after a crash
            if not await self._converged(policy):
                continue
            following = NEXT[step]
            await self._record(listed, following)
            await self._apply(policy, following)
            log.info("root rotation of policy %s: %s done, now %s", policy.name, step.value,
                     following.value)
            await self.audit.record(audit_module.Kind.ROTATION, policy=policy.name,
                                    step=following.value,
                                    message=f"{step.value} confirmed by every cluster")

    async def _converged(self, policy: trust_policy.TrustPolicy) -> bool:
        """True when every selected cluster finished under the current signer and roots."""
        current = await self._istio.signer(policy)
        signer = bundle.fingerprint(current.ca.certificate)
        trust = istio.bundle_fingerprint(current.roots)
        items = await self._store.list_resources(istio.ISSUED_KIND,
                                                 labels={"policy": policy.name})
        return all(i.spec.get("signerFingerprint") == signer
                   and i.spec.get("bundleFingerprint") == trust
                   and i.status.get("state") == istio.State.FINISHED.value for i in items)

    async def _apply(self, policy: trust_policy.TrustPolicy, step: Step) -> None:
        """Make ``root-trust.<policy>`` say what ``step`` signs with and trusts.

        The server and a ``meshtrust rotate`` command may both write it at once:
        on a Conflict it is read again and the layout worked out anew.
        """
        for _ in range(_CAS_ATTEMPTS - 1):
            try:
                return await self._apply_once(policy, step)
            except errors.Conflict:
                continue
        await self._apply_once(policy, step)

    async def _apply_once(self, policy: trust_policy.TrustPolicy, step: Step) -> None:
        secret = await self._istio.root_secret(policy)
        data = dict(secret.data)
        if "old-root-cert.pem" not in data or "new-root-cert.pem" not in data:
            return  # already finished and cleaned up
        signer, trusted = LAYOUT[step]
        data["root-cert.pem"] = data[f"{signer}-root-cert.pem"]
        data["key.pem"] = data[f"{signer}-key.pem"]
        data[istio.TRUST_BUNDLE_KEY] = b"".join(data[f"{name}-root-cert.pem"] for name in trusted)
        if step in FINAL:
            data = _plain(data) | {"root-cert.pem": data["root-cert.pem"],
                                   "key.pem": data["key.pem"]}
        if data != secret.data:
            await self._store.update(dataclasses.replace(secret, data=data))

    async def _get(self, policy_name: str) -> base.Resource:
        try:
            return await self._store.get_resource(ROTATION_KIND, self._ns, policy_name)
        except errors.NotFound:
            raise errors.ConfigError(f"no root rotation of policy {policy_name}; start one "
                                     f"with `meshtrust rotate root --policy {policy_name}`") \
                from None

    def _entry(self, step: Step) -> dict[str, Any]:
        return {"step": step.value, "at": manifest.dump_time(self._clock.now())}

    async def _record(self, rotation: base.Resource, step: Step) -> base.Resource:
        status = {**rotation.status, "step": step.value,
                  "history": [*rotation.status.get("history", []), self._entry(step)]}
        return await self._store.update_status(dataclasses.replace(rotation, status=status))


def _plain(data: dict[str, bytes] | Any) -> dict[str, bytes]:
    """The secret's data without the rotation's working keys."""
    return {k: v for k, v in data.items()
            if k not in ("old-root-cert.pem", "old-key.pem", "new-root-cert.pem", "new-key.pem",
                         istio.TRUST_BUNDLE_KEY)}
