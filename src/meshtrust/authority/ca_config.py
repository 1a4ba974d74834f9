"""Which certificate architecture the management store runs, and who signs the relay.

``meshtrust init`` records it once as a ``CertificateAuthorities`` resource;
the server reads it at start. With no such resource the server keeps the
reference's behaviour: it generates whatever relay CA is missing and signs
with it. Istio signing is said by each RootTrustPolicy (``generated``,
``secretRef`` or ``awsPca``), so it is not repeated here.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from meshtrust import errors, settings
from meshtrust.store import base

CONFIG_KIND = "CertificateAuthorities"
CONFIG_API = "meshtrust.io/v1"
CONFIG_NAME = "meshtrust"


class Placement(enum.Enum):
    """Where the CA keys live (the seeds' three placements)."""

    INTERNAL = "internal"  # every CA key in the management store
    HYBRID = "hybrid"      # roots (and the split relay intermediate) at the external CA
    EXTERNAL = "external"  # every CA key at the external CA, or outside meshtrust altogether

    @classmethod
    def parse(cls, text: str) -> Placement:
        try:
            return cls(text)
        except ValueError:
            raise errors.ConfigError(
                f"unknown placement {text!r}; use internal, hybrid or external") from None


class RelaySigner(enum.Enum):
    """Who signs relay server and client certificates."""

    LOCAL = "local"      # the key in relay-tls-signing-secret
    AWS_PCA = "aws-pca"  # an AWS Private CA subordinate CA
    NONE = "none"        # nobody: certificates are brought and renewed by the user


@dataclasses.dataclass(frozen=True, kw_only=True)
class CAConfig:
    architecture: str
    placement: Placement
    relay_signer: RelaySigner = RelaySigner.LOCAL
    relay_signer_arn: str = ""

    @property
    def issues_relay(self) -> bool:
        return self.relay_signer is not RelaySigner.NONE

    def to_spec(self) -> dict[str, Any]:
        signer: dict[str, Any] = {"provider": self.relay_signer.value}
        if self.relay_signer_arn:
            signer["certificateAuthorityArn"] = self.relay_signer_arn
        return {"architecture": self.architecture, "placement": self.placement.value,
                "relaySigner": signer}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CAConfig:
        try:
            signer = spec.get("relaySigner") or {}
            return cls(architecture=str(spec["architecture"]),
                       placement=Placement.parse(str(spec["placement"])),
                       relay_signer=RelaySigner(signer.get("provider", "local")),
                       relay_signer_arn=str(signer.get("certificateAuthorityArn", "")))
        except (KeyError, ValueError, AttributeError) as exc:
            raise errors.ConfigError(
                f"the {CONFIG_KIND}/{CONFIG_NAME} resource is damaged ({exc}); run "
                "`meshtrust init --force` again") from None


async def load(store: base.Store,
               namespace: str = settings.RELAY_NAMESPACE) -> CAConfig | None:
    """The recorded configuration, or None for a store ``meshtrust init`` never set up."""
    try:
        resource = await store.get_resource(CONFIG_KIND, namespace, CONFIG_NAME)
    except errors.NotFound:
        return None
    return CAConfig.from_spec(dict(resource.spec))


async def save(store: base.Store, config: CAConfig,
               namespace: str = settings.RELAY_NAMESPACE) -> None:
    spec = config.to_spec()
    try:
        current = await store.get_resource(CONFIG_KIND, namespace, CONFIG_NAME)
    except errors.NotFound:
        await store.create(base.Resource(api_version=CONFIG_API, kind=CONFIG_KIND,
                                         namespace=namespace, name=CONFIG_NAME, spec=spec))
        return
    await store.update(dataclasses.replace(current, spec=spec))
