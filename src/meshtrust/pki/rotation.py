"""When to renew: the grace-ratio rule of the reference documentation.

A certificate with lifetime L is renewed at ``notAfter - ratio × L``; a
365-day certificate with ratio 0.1 is renewed 36.5 days before it expires.
Jitter moves the moment earlier by a random part of the grace window, so a
fleet issued at once does not come back at once.
"""

from __future__ import annotations

import datetime as dt
import random

from cryptography import x509


def renew_at(
    certificate: x509.Certificate,
    grace_ratio: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> dt.datetime:
    """The time to start renewing ``certificate``.

    ``grace_ratio`` in (0, 1) is the share of the lifetime left when renewal
    starts. ``jitter`` in [0, 1) moves the time earlier by up to that share of
    the grace window, drawn from ``rng``, but never before notBefore.
    """
    return renewal_time(certificate.not_valid_before_utc, certificate.not_valid_after_utc,
                        grace_ratio, jitter, rng)


def renewal_time(
    not_before: dt.datetime,
    not_after: dt.datetime,
    grace_ratio: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> dt.datetime:
    """``renew_at`` for a validity window given as two times."""
    if not 0.0 < grace_ratio < 1.0:
        raise ValueError(f"grace_ratio must be between 0 and 1, got {grace_ratio}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    lifetime = not_after - not_before
    if lifetime <= dt.timedelta(0):
        raise ValueError("not_after must be later than not_before")
    grace = lifetime * grace_ratio
    spread = (rng or random.Random()).random() * jitter if jitter else 0.0
    return max(not_before, not_after - grace * (1.0 + spread))

