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
new work, not yet handed out, which the streams hand out in turn
(``admission.Admission.schedule``).
"""

from __future__ import annotations

from collections.abc import Iterable

from meshtrust.authority import istio
from meshtrust.store import base

_PENDING = istio.State.PENDING.value
_OUTSTANDING = frozenset({_PENDING, istio.State.REQUESTED.value, istio.State.ISSUED.value})


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
