"""The Prometheus collectors, their HTTP listener and the dashboard's inventory snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshtrust import errors, metrics, settings
from meshtrust.authority import istio, registry, relay_pki, root_rotation
from meshtrust.pki import issuer, keys, profiles
from meshtrust.server import dashboard
from meshtrust.store import base, manifest
from meshtrust.testing import FakeClock, MemoryStore

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
NS = settings.RELAY_NAMESPACE
EXPIRATION = "meshtrust_certificate_expiration_timestamp_seconds"
RENEWAL = "meshtrust_certificate_renewal_timestamp_seconds"


def samples(meters: metrics.Metrics) -> Samples:
    """Every sample of the registry, parsed by prometheus_client's own parser."""
    text = meters.exposition().body.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def where(kind: str, cluster: str, namespace: str = NS, secret: str = "s"
          ) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"kind": kind, "cluster": cluster, "namespace": namespace,
                         "secret": secret}.items()))


def cert(kind: str, cluster: str, days: float, renew_days: float | None = None,
         secret: str = "s") -> metrics.Certificate:
    return metrics.Certificate(
        kind=kind, cluster=cluster, namespace=NS, secret=secret,
        not_after=T0 + dt.timedelta(days=days),
        renew_at=None if renew_days is None else T0 + dt.timedelta(days=renew_days))


class TestFleetGauges:
    def test_series_follow_the_inventory(self) -> None:
        """Each certificate gets its expiry and renewal series; one that disappears loses both."""
        meters = metrics.Metrics()
        meters.fleet([cert("relay-root", "mgmt", 3650, 3285), cert("relay-client", "c1", 1, 0.5)],
                     states={"ok": 2})
        found = samples(meters)
        assert found[(EXPIRATION, where("relay-client", "c1"))] == (
            T0 + dt.timedelta(days=1)).timestamp()
        assert found[(RENEWAL, where("relay-client", "c1"))] == (
            T0 + dt.timedelta(days=0.5)).timestamp()
        assert found[("meshtrust_certificates", (("state", "ok"),))] == 2
        meters.fleet([cert("relay-root", "mgmt", 3650)], states={"expired": 1})
        found = samples(meters)
        assert (EXPIRATION, where("relay-client", "c1")) not in found
        assert (RENEWAL, where("relay-client", "c1")) not in found
        assert (RENEWAL, where("relay-root", "mgmt")) not in found  # no renewal time given
        assert ("meshtrust_certificates", (("state", "ok"),)) not in found
        assert found[("meshtrust_certificates", (("state", "expired"),))] == 1

    def test_one_secret_shows_the_certificate_expiring_first(self) -> None:
        """Two roots trusted in one secret during a rotation share a series: the earlier expiry."""
        meters = metrics.Metrics()
        meters.fleet([cert("istio-root", "mgmt", 3650), cert("istio-root", "mgmt", 100)])
        assert samples(meters)[(EXPIRATION, where("istio-root", "mgmt"))] == (
            T0 + dt.timedelta(days=100)).timestamp()

    def test_an_issuance_is_dropped_when_the_inventory_no_longer_has_it(self) -> None:
        """A series set at issuance (``certificate``) goes at the next inventory without it."""
        meters = metrics.Metrics()
        meters.fleet([cert("relay-root", "mgmt", 3650)])
        meters.certificate(_x509(), kind="relay-client", cluster="gone", namespace=NS,
                           secret="s")
        assert (EXPIRATION, where("relay-client", "gone")) in samples(meters)
        meters.fleet([cert("relay-root", "mgmt", 3650)])
        assert (EXPIRATION, where("relay-client", "gone")) not in samples(meters)

    def test_an_issuance_keeps_the_renewal_time_it_does_not_give(self) -> None:
        """``certificate`` without a renewal time updates the expiry and leaves the
        renewal series the inventory set; with one, it replaces it."""
        meters = metrics.Metrics()
        meters.fleet([cert("relay-client", "c1", 1, 0.5)])
        issued = _x509()
        meters.certificate(issued, kind="relay-client", cluster="c1", namespace=NS, secret="s")
        found = samples(meters)
        assert found[(EXPIRATION, where("relay-client", "c1"))] == (
            issued.not_valid_after_utc.timestamp())
        assert found[(RENEWAL, where("relay-client", "c1"))] == (
            T0 + dt.timedelta(days=0.5)).timestamp()
        meters.certificate(issued, kind="relay-client", cluster="c1", namespace=NS, secret="s",
                           renew_at=T0 + dt.timedelta(days=2))
        assert samples(meters)[(RENEWAL, where("relay-client", "c1"))] == (
            T0 + dt.timedelta(days=2)).timestamp()

    def test_rotation_step(self) -> None:
        """Each policy has one series per step, 1 for the current one; a policy gone loses all."""
        meters = metrics.Metrics()
        steps = [s.value for s in root_rotation.Step]
        meters.rotations({"mesh": "REISSUING"}, steps)
        found = samples(meters)
        values = {dict(labels)["step"]: v for (name, labels), v in found.items()
                  if name == "meshtrust_root_rotation_step"}
        assert values == {s: (1.0 if s == "REISSUING" else 0.0) for s in steps}
        meters.rotations({}, steps)
        assert not [k for k in samples(meters) if k[0] == "meshtrust_root_rotation_step"]


class TestIssuanceOutcomes:
    @pytest.mark.parametrize(("raised", "outcome"), [
        (None, "ok"),
        (errors.InvalidCSR("bad"), "refused"),
        (errors.AuthError("no"), "refused"),
        (errors.StoreUnavailable("down"), "error"),
        (RuntimeError("bug"), "error"),
    ])
    def test_counted_and_timed_by_outcome(self, raised: Exception | None, outcome: str) -> None:
        """The issuance counter and histogram get one sample under the outcome of the block."""
        meters = metrics.Metrics()
        expect = pytest.raises(type(raised)) if raised else contextlib.nullcontext()
        with expect, meters.issuing(metrics.RELAY_CLIENT):
            if raised:
                raise raised
        found = samples(meters)
        labels = (("outcome", outcome), ("profile", "relay-client"))
        assert found[("meshtrust_issuance_total", labels)] == 1
        assert found[("meshtrust_issuance_duration_seconds_count", labels)] == 1

    def test_cancelled_call_is_not_counted(self) -> None:
        """A call cancelled by its client is neither an issuance nor a failure."""
        meters = metrics.Metrics()
        with pytest.raises(asyncio.CancelledError), meters.issuing(metrics.ISTIO_INTERMEDIATE):
            raise asyncio.CancelledError
        assert not [k for k in samples(meters) if k[0] == "meshtrust_issuance_total"]

    @pytest.mark.parametrize(("raised", "outcome"), [
        (None, "accepted"),
        (errors.AuthError("token"), "refused"),
        (errors.RateLimited("slow down", retry_after=1.0), "rate_limited"),
        (errors.ProfileViolation("too much"), "invalid"),
        (errors.StoreUnavailable("down"), "error"),
    ])
    def test_bootstrap_attempts(self, raised: Exception | None, outcome: str) -> None:
        """Each bootstrap attempt is counted once, under its outcome."""
        meters = metrics.Metrics()
        expect = pytest.raises(type(raised)) if raised else contextlib.nullcontext()
        with expect, meters.bootstrapping():
            if raised:
                raise raised
        found = {dict(k[1])["outcome"]: v for k, v in samples(meters).items()
                 if k[0] == "meshtrust_bootstrap_attempts_total"}
        assert found == {outcome: 1}


class TestListener:
    @pytest.fixture
    def served(self) -> Iterator[tuple[metrics.Metrics, int]]:
        meters = metrics.Metrics()
        page = metrics.Page(body=b"<p>hi</p>", content_type="text/html",
                            headers={"X-Extra": "yes"})
        server = meters.serve("127.0.0.1:0", {"/page": lambda: page})
        try:
            yield meters, server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()

    @staticmethod
    def request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def test_metrics_and_pages(self, served: tuple[metrics.Metrics, int]) -> None:
        """``/metrics`` is the text format; a page is sent with its own headers."""
        meters, port = served
        meters.connected.set(3)
        status, headers, body = self.request(port, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        parsed = {s.name: s.value for f in text_string_to_metric_families(body.decode())
                  for s in f.samples}
        assert parsed["meshtrust_connected_agents"] == 3
        status, headers, body = self.request(port, "GET", "/page?x=1")
        assert (status, body, headers["X-Extra"]) == (200, b"<p>hi</p>", "yes")
        assert headers["X-Content-Type-Options"] == "nosniff"

    def test_read_only_and_nothing_else(self, served: tuple[metrics.Metrics, int]) -> None:
        """Unknown paths are 404 and every method that could change something is 405."""
        _, port = served
        assert self.request(port, "GET", "/nothing")[0] == 404
        assert self.request(port, "HEAD", "/metrics")[2] == b""
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert self.request(port, method, "/metrics")[0] == 405

    def test_bad_address(self) -> None:
        """An address that is not host:port is a configuration error."""
        with pytest.raises(errors.ConfigError, match="not host:port"):
            metrics.Metrics().serve("localhost")


class TestDashboard:
    def test_snapshot_and_gauges_follow_the_store(self) -> None:
        """Refresh reads the store: every certificate, its state, the rotation; then the removal."""
        asyncio.run(self._scenario())

    async def _scenario(self) -> None:
        store, clock, meters = MemoryStore(), FakeClock(T0), metrics.Metrics()
        await relay_pki.ensure(store, clock)
        await registry.Registry(store, clock).register("cluster-1")
        issued = await store.create(base.Resource(
            api_version=istio.ISSUED_API, kind=istio.ISSUED_KIND, namespace=NS,
            name=istio.issued_name("mesh", "cluster-1"),
            spec={"cluster": "cluster-1", "policy": "mesh"}))
        await store.update_status(dataclasses.replace(issued, status={
            "state": "FINISHED", "serial": "ab",
            "notAfter": manifest.dump_time(T0 - dt.timedelta(minutes=1)),
            "renewAt": manifest.dump_time(T0 - dt.timedelta(minutes=5))}))
        await store.create(base.Resource(
            api_version=root_rotation.ROTATION_API, kind=root_rotation.ROTATION_KIND,
            namespace=NS, name="mesh", status={"step": "REISSUING"}))
        board = dashboard.Dashboard(store, clock, meters, connected=lambda: ["cluster-1"])
        snapshot = await board.refresh()
        document = json.loads(board.pages()[dashboard.API_PATH]().body)
        assert document["rotations"] == [{"policy": "mesh", "step": "REISSUING"}]
        assert document["connected"] == ["cluster-1"]
        states = {(i["kind"], i["cluster"]): i["state"] for i in document["items"]}
        assert states[("istio-intermediate", "cluster-1")] == "expired"
        assert states[("relay-client", "cluster-1")] == "missing"
        assert document["attention"] == 2 == sum(i.needs_attention for i in snapshot.items)
        found = samples(meters)
        kinds = {dict(labels)["kind"] for name, labels in found if name == EXPIRATION}
        assert kinds == {"relay-root", "relay-signing", "relay-server", "istio-intermediate"}
        assert found[(EXPIRATION, where("istio-intermediate", "cluster-1",
                                        settings.ISTIO_NAMESPACE, "cacerts"))] == (
            T0 - dt.timedelta(minutes=1)).timestamp()
        assert found[("meshtrust_root_rotation_step", (("policy", "mesh"),
                                                       ("step", "REISSUING")))] == 1
        await store.delete(istio.ISSUED_KIND, NS, issued.name)
        await board.refresh()
        assert "istio-intermediate" not in {dict(labels)["kind"]
                                            for name, labels in samples(meters)
                                            if name == EXPIRATION}

    def test_page_allows_only_its_own_script(self) -> None:
        """The page's Content-Security-Policy names the hash of its one inline script."""
        board = dashboard.Dashboard(MemoryStore(), FakeClock(T0), metrics.Metrics())
        page = board.pages()[dashboard.UI_PATH]()
        policy = page.headers["Content-Security-Policy"]
        assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
        assert "connect-src 'self'" in policy and "default-src 'none'" in policy
        assert b"innerHTML" not in page.body and b"http" not in page.body.split(b"<script>")[1]


def _x509() -> Any:
    return issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT, T0,
                           dt.timedelta(days=1)).certificate
