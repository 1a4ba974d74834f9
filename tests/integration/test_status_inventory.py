"""``meshtrust status`` against the store of a running fleet of real processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import istiofleet as isf
import relayfleet as rf

from meshtrust import settings
from meshtrust.pki import bundle, issuer, keys, profiles
from meshtrust.store import base

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


class TestReportsOnChange:
    def test_a_replaced_istio_ca_is_reported_at_once_not_at_the_interval(
            self, fleet: rf.Fleet) -> None:
        """With reports every 300 s, a cacerts someone else wrote reaches the server's
        record of the cluster within seconds: the agent reports on every change."""
        fleet.start_server()
        fleet.enroll("cluster-1")
        fleet.start_agent("cluster-1", extra=["--status-interval", "300"])
        rf.poll(lambda: _reported(fleet.cluster_status("cluster-1")), timeout=15,
                what="the first report, on connecting")
        root = issuer.new_root(keys.KeyType.EC_P256, profiles.ISTIO_ROOT,
                               dt.datetime.now(dt.UTC))

        async def replace() -> None:
            async with rf.opened(fleet.store_url("cluster-1")) as store:
                await store.create(base.Secret(
                    namespace=settings.ISTIO_NAMESPACE, name=settings.ISTIO_CA_SECRET,
                    data={"ca-cert.pem": bundle.dump_certificate(root.certificate),
                          "ca-key.pem": keys.dump_private_key(root.key),
                          "root-cert.pem": bundle.dump_certificate(root.certificate)}))

        asyncio.run(replace())
        serial = f"{root.certificate.serial_number:x}"

        def held_istio_ca() -> dict[str, Any] | None:
            status = fleet.cluster_status("cluster-1") or {}
            return next((c for c in status.get("certificates") or []
                         if c.get("kind") == "istio-intermediate"
                         and c.get("serial") == serial), None)

        held = rf.poll(held_istio_ca, timeout=10, what="the new cacerts in the report")
        assert held["managed"] is False  # written by someone else: the user's to renew


def _reported(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """The cluster's status once its agent has reported the certificate the server issued."""
    if not status:
        return None
    issued = status.get("clientCertificate") or {}
    held = status.get("certificates") or []
    return status if issued and any(c.get("serial") == issued.get("serial")
                                    for c in held) else None
