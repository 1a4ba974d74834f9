"""Which clusters have Istio work waiting, kept in memory from the store's watch.

A work stream sends its cluster the intermediates that are PENDING, REQUESTED
or ISSUED. Asking the store for them on every heartbeat of every stream, and
waking every stream of a cluster on each change to one of its intermediates,
costs thousands of reads a second with a fleet of ten thousand clusters, and
almost all of them find nothing. The server follows every IssuedCertificate
change (made by this replica, another one, or the leader's reconcile round)
into this index, so that a stream asks the store only for a cluster that has
work, and is woken only when one of its cluster's intermediates becomes
PENDING: new work. Until the index has been filled from a full list, it
answers "ask the store" for every cluster. It also tells which clusters have
new work, not yet handed out, which the streams hand out in turn (``HandOuts``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from meshtrust.authority import istio
from meshtrust.store import base

_PENDING = istio.State.PENDING.value
_REQUESTED = istio.State.REQUESTED.value
_OUTSTANDING = frozenset({_PENDING, _REQUESTED, istio.State.ISSUED.value})


class WorkIndex:
    """The outstanding intermediates of every cluster, by name."""

    def __init__(self) -> None:
        # Cluster -> its outstanding intermediates' names -> their states.
        self._outstanding: dict[str, dict[str, str]] = {}
        self._filled = False

    def has_work(self, cluster: str) -> bool:
        """Whether ``cluster`` may have work; True for every cluster until filled."""
        return not self._filled or cluster in self._outstanding

    def has_new_work(self, cluster: str) -> bool:
        """Whether ``cluster`` has work not handed out yet (PENDING); False until filled."""
        return self._filled and _PENDING in self._outstanding.get(cluster, {}).values()

    def awaits_csr(self, cluster: str) -> bool:
        """Whether ``cluster`` has work handed out and not yet signed (REQUESTED)."""
        return _REQUESTED in self._outstanding.get(cluster, {}).values()

    def fill(self, items: Iterable[base.Resource]) -> None:
        """Start again from a full list of the IssuedCertificates."""
        self._outstanding = {}
        for item in items:
            self._set(item, gone=False)
        self._filled = True

    def note(self, event: base.WatchEvent) -> str | None:
        """Follow one change; return the cluster to wake if it brought new work."""
        item = event.object
        if not isinstance(item, base.Resource):
            return None
        gone = event.type is base.EventType.DELETED
        self._set(item, gone=gone)
        if not gone and item.status.get("state") == _PENDING:
            return item.labels.get("cluster")
        return None

    @property
    def clusters(self) -> list[str]:
        """The clusters with outstanding work."""
        return sorted(self._outstanding)

    def _set(self, item: base.Resource, *, gone: bool) -> None:
        cluster = item.labels.get("cluster")
        if not cluster:
            return
        names = self._outstanding.get(cluster, {})
        state = item.status.get("state")
        if not gone and state in _OUTSTANDING:
            names[item.name] = state
            self._outstanding[cluster] = names
        else:
            names.pop(item.name, None)
            if not names:
                self._outstanding.pop(cluster, None)


class HandOuts:
    """Which clusters may be handed their new work now: as much as the server can take
    back at once (``room``), the others in the order they came.

    Work handed out comes back as a CSR to sign. A policy over ten thousand clusters
    handed out at once brings ten thousand CSRs within a second, more than the server
    can even refuse before their deadlines; handed out at a rate booked in advance, it
    goes out too slowly once the callers that took the rate are gone, or too fast while
    they come (the calls queued in gRPC, not yet taken in, are seen by no one). So work
    goes out as its CSRs come back: a cluster handed its work counts as on its way until
    it is ``done`` (its intermediate signed, as followed from the store whichever replica
    signed it, its work withdrawn, or its streams ended) or ``hold`` seconds pass (an
    agent that never answers keeps no room); a CSR told to come back later
    (``deferred``) keeps its place that much longer.
    """

    def __init__(self, room: Callable[[], int], *, hold: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._room = room
        self._hold = hold
        self._now = monotonic
        self._out: dict[str, float] = {}  # cluster -> until when it counts as on its way
        self._waiting: dict[str, None] = {}  # clusters in the order they asked

    @property
    def out(self) -> int:
        """Clusters with work on its way."""
        return len(self._out)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def ask(self, cluster: str) -> tuple[bool, list[str]]:
        """Whether ``cluster`` may be handed its new work now, and the other clusters
        whose turn came meanwhile (to be woken). A cluster that may not waits its turn."""
        if self._out.get(cluster, 0.0) > self._now():
            return True, []
        self._waiting.setdefault(cluster, None)
        turns = self._turns()  # drops this cluster's own room too, if its hold passed
        if cluster in turns:
            turns.remove(cluster)
            return True, turns
        return False, turns

    def deferred(self, cluster: str, seconds: float) -> None:
        """The CSR of ``cluster`` was told to come back in ``seconds``: still on its way."""
        if cluster in self._out:
            self._out[cluster] = max(self._out[cluster], self._now() + seconds + self._hold)

    def done(self, cluster: str) -> list[str]:
        """``cluster`` has no work waiting or on its way (its intermediate was signed, its
        work withdrawn, its streams ended); return the clusters whose turn came."""
        self._waiting.pop(cluster, None)
        if self._out.pop(cluster, None) is None:
            return []
        return self._turns()

    def _turns(self) -> list[str]:
        """Hand the room there is to the clusters that asked first; return them."""
        now = self._now()
        for cluster in [c for c, until in self._out.items() if until <= now]:
            del self._out[cluster]
        turns = []
        room = self._room() - len(self._out)
        while room > 0 and self._waiting:
            cluster = next(iter(self._waiting))
            del self._waiting[cluster]
            self._out[cluster] = now + self._hold
            turns.append(cluster)
            room -= 1
        return turns
