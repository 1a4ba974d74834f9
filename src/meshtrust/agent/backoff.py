"""How long an agent waits before it asks the server again.

A busy server refuses an issuance with ``errors.RateLimited`` and says when
to come back (``server.admission`` gives every refused agent its own slot).
The agent waits that long, plus a little jitter so that agents given the same
moment do not arrive together; the wait does not grow its own backoff, since
the server's schedule already accounts for everyone waiting. Any other
failure backs off exponentially with jitter, as before.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from meshtrust import errors

log = logging.getLogger(__name__)

T = TypeVar("T")

JITTER = 0.2  # a busy server's time is stretched by up to this share
MAX_HINT = 300.0  # never wait longer than this for a busy server (seconds)
BUSY_DEADLINE = 900.0  # ``while_busy`` gives up after this long (seconds)


def delay(exc: errors.MeshTrustError, backoff: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after ``exc``: the server's time if it gave one, else ``backoff``.

    Both get jitter: up to ``JITTER`` more of the server's time, or up to half
    more of the backoff.
    """
    rng = rng or random.Random()
    if isinstance(exc, errors.RateLimited):
        return min(exc.retry_after, MAX_HINT) * (1 + JITTER * rng.random())
    return backoff * (1 + rng.random() / 2)


def busy(exc: BaseException) -> bool:
    """Whether ``exc`` is a server asking to be called later, rather than a failure."""
    return isinstance(exc, errors.RateLimited)


def next_backoff(exc: errors.MeshTrustError, backoff: float, ceiling: float) -> float:
    """The backoff after ``exc``: unchanged when the server was only busy, else doubled."""
    return backoff if busy(exc) else min(backoff * 2, ceiling)


async def while_busy(call: Callable[[], Awaitable[T]], *, what: str,
                     rng: random.Random | None = None,
                     deadline: float = BUSY_DEADLINE) -> T:
    """Run ``call``, again each time the server is busy, at the times it gives.

    Other errors, and a busy server past ``deadline`` seconds, are raised.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    while True:
        try:
            return await call()
        except errors.RateLimited as exc:
            wait = delay(exc, 0.0, rng)
            if loop.time() + wait > give_up:
                raise
            log.info("%s: the server is busy; retrying in %.1f s", what, wait)
            await asyncio.sleep(wait)
