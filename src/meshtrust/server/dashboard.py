"""What the server shows about fleet expiry: the certificate gauges, a web page and its JSON.

An operator wants to see at a glance what expires when and what needs
attention, and Prometheus wants one series per certificate. Both come from
``authority.inventory.collect``, which reads the management store. The
server's event loop runs ``Dashboard.run``: it collects the inventory (and
the root rotations' steps) on every relevant store change and at least every
``interval`` seconds, feeds the gauges, and keeps the result as an immutable
``Snapshot``. The HTTP threads of ``metrics.serve`` only read that snapshot;
they never touch the store.

``pages()`` gives the read-only routes: ``/ui`` (one static HTML page that
fetches ``/api/inventory`` every few seconds and builds its DOM with
``textContent`` only) and ``/api/inventory``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import datetime as dt
import hashlib
import importlib.resources
import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import metrics, settings
from meshtrust.authority import inventory, istio, registry, root_rotation, trust_policy
from meshtrust.store import base, follow, manifest

log = logging.getLogger(__name__)

UI_PATH = "/ui"
API_PATH = "/api/inventory"
MIN_GAP = 0.5  # seconds between two refreshes, however often the store changes

_FOLLOWED = (base.SECRET_KIND, registry.CLUSTER_KIND, istio.ISSUED_KIND,
             trust_policy.POLICY_KIND, root_rotation.ROTATION_KIND)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Snapshot:
    """The fleet at one moment: the inventory document, ready to send."""

    generated: dt.datetime
    items: tuple[inventory.Item, ...]
    rotations: tuple[tuple[str, str], ...]  # (policy, step)
    connected: tuple[str, ...]

    def document(self) -> dict[str, Any]:
        """The JSON of ``/api/inventory``."""
        return {"generated": manifest.dump_time(self.generated),
                "items": [item.document() for item in self.items],
                "attention": sum(item.needs_attention for item in self.items),
                "rotations": [{"policy": p, "step": s} for p, s in self.rotations],
                "connected": list(self.connected)}


class Dashboard:
    """Keeps the certificate gauges and the page's snapshot in line with the store."""

    def __init__(self, store: base.Store, clock: clock_module.Clock, meters: metrics.Metrics,
                 *, connected: Callable[[], Sequence[str]] = tuple, interval: float = 5.0,
                 names: settings.SecretNames | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self._store = store
        self._clock = clock
        self._meters = meters
        self._connected = connected
        self._interval = interval
        self._names = names or settings.SecretNames()
        self._body = _json(Snapshot(generated=clock.now(), items=(), rotations=(),
                                    connected=()).document())
        self.snapshot: Snapshot | None = None
        self._page = _load_page()

    async def refresh(self) -> Snapshot:
        """Collect the inventory now; feed the gauges and replace the snapshot."""
        items = tuple(await inventory.collect(self._store, self._clock, names=self._names))
        rotations = tuple(sorted(
            (r.name, str(r.status.get("step") or root_rotation.Step.ADDING_ROOT.value))
            for r in await self._store.list_resources(
                root_rotation.ROTATION_KIND, namespace=self._names.relay_namespace)))
        snapshot = Snapshot(generated=self._clock.now(), items=items, rotations=rotations,
                            connected=tuple(sorted(self._connected())))
        self._meters.fleet(
            (metrics.Certificate(kind=i.kind, cluster=i.cluster, namespace=i.namespace,
                                 secret=i.secret, not_after=i.not_after, renew_at=i.renew_at)
             for i in items if i.not_after is not None),
            states=collections.Counter(i.state.value for i in items))
        self._meters.rotations(dict(rotations), [step.value for step in root_rotation.Step])
        self._body = _json(snapshot.document())  # one reference swap: the HTTP threads see
        self.snapshot = snapshot                 # the old body or the new one, whole
        return snapshot

    async def run(self) -> None:
        """Refresh on every change to what the inventory reads, and every ``interval``."""
        changed = asyncio.Event()

        async def wake(_event: base.WatchEvent | None = None) -> None:
            changed.set()

        followers = [asyncio.create_task(follow.follow(self._store, kind, wake))
                     for kind in _FOLLOWED]
        try:
            while True:
                try:
                    # Not wait_for, which on Python 3.11 can lose the cancellation of stop().
                    async with asyncio.timeout(self._interval):
                        await changed.wait()
                except TimeoutError:
                    pass
                changed.clear()
                try:
                    await self.refresh()
                except Exception:  # noqa: BLE001 - keep the last snapshot; try again
                    log.exception("collecting the certificate inventory failed; retrying")
                await asyncio.sleep(MIN_GAP)
        finally:
            for task in followers:
                task.cancel()
            await asyncio.gather(*followers, return_exceptions=True)

    def pages(self) -> dict[str, metrics.PageHandler]:
        """The read-only routes to serve next to ``/metrics``."""
        return {UI_PATH: lambda: self._page, "/": lambda: self._page,
                API_PATH: lambda: metrics.Page(body=self._body,
                                               content_type="application/json")}


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=1).encode()


def _load_page() -> metrics.Page:
    """The page, with a Content-Security-Policy allowing its own inline script and style only."""
    html = (importlib.resources.files("meshtrust.server") / "ui" / "index.html").read_bytes()
    hashes = {tag: " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"
        for body in re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), html, re.DOTALL))
        for tag in (b"script", b"style")}
    policy = ("default-src 'none'; "
              f"script-src {hashes[b'script']}; style-src {hashes[b'style']}; "
              "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return metrics.Page(body=html, content_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": policy,
                                 "Referrer-Policy": "no-referrer"})
