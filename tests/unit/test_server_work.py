"""The index of clusters with Istio work, followed from the store's changes."""

from __future__ import annotations

from meshtrust.authority import istio
from meshtrust.server import work
from meshtrust.store import base


def _item(cluster: str, state: istio.State, version: int = 1) -> base.Resource:
    return base.Resource(api_version=istio.ISSUED_API, kind=istio.ISSUED_KIND,
                         namespace="gloo-mesh", name=f"mesh-{cluster}",
                         labels={"cluster": cluster}, status={"state": state.value},
                         resource_version=version)


def _event(item: base.Resource, kind: base.EventType = base.EventType.MODIFIED
           ) -> base.WatchEvent:
    return base.WatchEvent(type=kind, object=item, resource_version=item.resource_version)


class TestWorkIndex:
    def test_until_filled_every_cluster_may_have_work_and_none_is_new(self) -> None:
        """Before the first full list the streams ask the store, and hand out at once."""
        index = work.WorkIndex()
        assert index.has_work("cluster-1")
        assert not index.has_new_work("cluster-1")

    def test_new_work_is_pending_work_until_handed_out(self) -> None:
        """PENDING is new; REQUESTED and ISSUED are outstanding but handed out; FINISHED is
        neither, and a deleted item leaves the index."""
        index = work.WorkIndex()
        index.fill([_item("cluster-1", istio.State.PENDING),
                    _item("cluster-2", istio.State.ISSUED)])
        assert index.has_new_work("cluster-1") and index.has_work("cluster-1")
        assert not index.has_new_work("cluster-2") and index.has_work("cluster-2")
        assert not index.has_work("cluster-3")
        assert index.note(_event(_item("cluster-1", istio.State.REQUESTED, 2))) is None
        assert not index.has_new_work("cluster-1") and index.has_work("cluster-1")
        assert index.note(_event(_item("cluster-2", istio.State.PENDING, 3))) == "cluster-2"
        assert index.has_new_work("cluster-2")
        index.note(_event(_item("cluster-1", istio.State.FINISHED, 4)))
        assert not index.has_work("cluster-1")
        index.note(_event(_item("cluster-2", istio.State.PENDING, 5), base.EventType.DELETED))
        assert index.clusters == []
