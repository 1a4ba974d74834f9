"""``meshtrust status`` against the store of a running fleet of real processes."""

from __future__ import annotations

import json
from typing import Any

import istiofleet as isf
import relayfleet as rf

CLUSTERS = ("cluster-1", "cluster-2")


class TestStatusOfARunningFleet:
    def test_every_connected_cluster_has_a_healthy_relay_client_item(
            self, fleet: rf.Fleet) -> None:
        """Each agent's client certificate appears as reported, and nothing needs attention."""
        fleet.start_server()
        for cluster in CLUSTERS:
            fleet.enroll(cluster)
            fleet.start_agent(cluster)
        statuses = {c: rf.poll(lambda c=c: _reported(fleet.cluster_status(c)), timeout=15,
                               what=f"{c} to report its certificate") for c in CLUSTERS}

        code, out, err = isf.cli("status", "--store", fleet.mgmt_url, "-o", "json")
        assert code == 0, out + err
        items = json.loads(out)["items"]
        assert [i["kind"] for i in items if i["cluster"] == "mgmt"] == [
            "relay-root", "relay-signing", "relay-server"]
        clients = {i["cluster"]: i for i in items if i["kind"] == "relay-client"}
        assert set(clients) == set(CLUSTERS)
        for cluster, item in clients.items():
            assert item["serial"] == statuses[cluster]["clientCertificate"]["serial"]
            assert item["subject"] == f"CN={cluster}"
            assert item["issuer"] == "CN=relay-signing-ca"
            assert (item["state"], item["managedBy"]) == ("ok", "meshtrust")
            assert item["renewAt"] is not None and item["message"] == ""


def _reported(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """The cluster's status once its agent has reported the certificate the server issued."""
    if not status:
        return None
    issued = status.get("clientCertificate") or {}
    held = status.get("certificates") or []
    return status if issued and any(c.get("serial") == issued.get("serial")
                                    for c in held) else None
