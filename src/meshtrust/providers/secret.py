"""A CA the user brings: certificate, key and chain as files or a secret.

It is checked on load by the rules of ``meshtrust pki verify``: the key
matches, the chain verifies to the root, the certificate is a CA fit for the
profile it will sign under and is not expired. Anything short of that is
refused with every problem listed, before a single certificate is signed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from meshtrust import errors
from meshtrust.pki import bundle, issuer, profiles, verify
from meshtrust.providers import local


def load(files: Mapping[str, bytes], profile: profiles.Profile, now: dt.datetime, *,
         where: str, passphrase: bytes | None = None) -> local.LocalProvider:
    """A provider for the CA in ``files`` (tls.crt/tls.key/ca.crt or the cacerts form)."""
    try:
        found = bundle.load_bundle(files, passphrase)
    except errors.PKIError as exc:
        raise errors.ConfigError(f"{where}: {exc}") from exc
    if not profile.is_ca:
        raise ValueError(f"{profile.name} is not a CA profile")
    problems = verify.check_bundle(profile, found, now)
    below = bundle.path_length(found.certificate)
    if profile.path_length and below is not None and below < profile.path_length:
        problems.append(f"it must allow {profile.path_length} CA level below it to sign "
                        f"cluster CAs, but its pathlen is {below}")
    if problems:
        raise errors.ConfigError(
            f"{where} is not a usable {profile.name} CA: " + "; ".join(problems))
    assert found.key is not None  # check_bundle reports a missing key
    path = bundle.order_chain(found.certificate, [*found.intermediates, *found.roots])
    ca = issuer.CA(certificate=found.certificate, key=found.key, chain=tuple(path[1:]))
    return local.LocalProvider(ca, kind="secret", key_location=where)
