"""The default provider: a CA whose key meshtrust holds (in the management store)."""

from __future__ import annotations

import datetime as dt

from meshtrust.pki import issuer
from meshtrust.providers import base


class LocalProvider:
    """Signs with a CA key at hand; the profile decides every extension."""

    def __init__(self, ca: issuer.CA, *, kind: str = "local",
                 key_location: str = "management store") -> None:
        self.ca = ca
        self._description = base.Description(provider=kind, certificate=ca.certificate,
                                             chain=ca.chain, key_location=key_location)

    async def describe(self) -> base.Description:
        return self._description

    async def sign(self, request: base.SignRequest, now: dt.datetime) -> base.Signed:
        certificate, pem = issuer.issue_pem(request.request, self.ca, request.profile, now,
                                            request.lifetime, request.subject)
        return base.Signed(certificate=certificate, chain=self.ca.path, certificate_pem=pem)
