"""A running fleet's metrics and expiry dashboard, scraped over HTTP and seen in headless Chromium.

One fleet of real processes serves the module: a server with ``--metrics``
and two agents under a trust policy. cluster-1's agent serves its own
metrics; cluster-2's agent renews nothing (``--no-rotate``) and plans its
renewal at 3 % of its client certificate's life, so that certificate soon
needs attention and stays so for the rest of the module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html.parser
import json
import os
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import istiofleet as isf
import relayfleet as rf
from meshtrust import clock as clock_module
from meshtrust import metrics, settings
from meshtrust.authority import istio, registry, relay_pki, root_rotation
from meshtrust.pki import bundle
from meshtrust.server import dashboard
from meshtrust.store import base
from meshtrust.testing import MemoryStore

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
NAMES = settings.SecretNames()
NS = settings.RELAY_NAMESPACE
EXPIRATION = "meshtrust_certificate_expiration_timestamp_seconds"
RENEWAL = "meshtrust_certificate_renewal_timestamp_seconds"
CLUSTERS = ("cluster-1", "cluster-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return bytes(response.read())


def scrape(port: int) -> Samples:
    """The endpoint's samples, parsed by prometheus_client's own parser."""
    text = fetch(port, "/metrics").decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series(kind: str, cluster: str, namespace: str, secret: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"kind": kind, "cluster": cluster, "namespace": namespace,
                         "secret": secret}.items()))


@dataclasses.dataclass
class Running:
    mesh: isf.Mesh
    metrics_port: int
    agent_port: int

    @property
    def fleet(self) -> rf.Fleet:
        return self.mesh.fleet

    def inventory(self) -> dict[str, Any]:
        return dict(json.loads(fetch(self.metrics_port, dashboard.API_PATH)))

    def not_after(self) -> dict[tuple[str, str, str, str], float]:
        """The notAfter of every certificate, read from the secrets that hold it."""
        return asyncio.run(self._not_after())

    async def _not_after(self) -> dict[tuple[str, str, str, str], float]:
        found: dict[tuple[str, str, str, str], float] = {}
        async with rf.opened(self.fleet.mgmt_url) as mgmt:
            for kind, name in (("relay-root", NAMES.relay_root),
                               ("relay-signing", NAMES.relay_signing),
                               ("relay-server", NAMES.relay_server)):
                secret = await mgmt.get_secret(NS, name)
                found[(kind, "mgmt", NS, name)] = _end(secret.data["tls.crt"])
            root = NAMES.root_trust(isf.POLICY)
            found[("istio-root", "mgmt", NS, root)] = _end(
                (await mgmt.get_secret(NS, root)).data["root-cert.pem"])
        for cluster in CLUSTERS:
            held = await self.fleet.aclient_identity(cluster)
            assert held is not None, cluster
            found[("relay-client", cluster, NS, NAMES.relay_client)] = (
                held.certificate.not_valid_after_utc.timestamp())
            cacerts = await self.mesh.secret(cluster)
            assert cacerts is not None, cluster
            found[("istio-intermediate", cluster, NAMES.istio_namespace, NAMES.istio_ca)] = (
                _end(cacerts.data["ca-cert.pem"]))
        return found


def _end(pem: bytes) -> float:
    return bundle.load_certificate(pem).not_valid_after_utc.timestamp()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The module's fleet, once both clusters run their Istio intermediates."""
    root = tmp_path_factory.mktemp("fleet")
    with rf.fleet_in(root) as fleet:
        mesh = isf.Mesh(fleet)
        try:
            fleet.start_server(client_lifetime="120s", heartbeat="1s",
                               extra=["--reconcile-interval", "1s", "--metrics", "127.0.0.1:0"])
            ports = json.loads((root / "server.ready").read_text())
            agent_port = free_port()
            mesh.add_cluster("cluster-1", extra=["--metrics", f"127.0.0.1:{agent_port}"])
            mesh.add_cluster("cluster-2", extra=["--grace-ratio", "0.97", "--no-rotate"])
            mesh.apply(isf.policy())
            asyncio.run(mesh.wait_finished(list(CLUSTERS)))
            yield Running(mesh=mesh, metrics_port=ports["metrics"], agent_port=agent_port)
        finally:
            mesh.close()
    fleet.assert_no_tokens_in_logs()


class TestServerMetrics:
    def test_every_certificate_has_its_series(self, running: Running) -> None:
        """Expiry series match each certificate's notAfter and the inventory, one per cert."""
        expected = running.not_after()

        def consistent() -> Samples | None:
            found = scrape(running.metrics_port)
            have = {tuple(dict(labels)[k] for k in ("kind", "cluster", "namespace", "secret")):
                    value for (name, labels), value in found.items() if name == EXPIRATION}
            return found if have == expected else None

        found = rf.poll(consistent, timeout=10, interval=0.2,
                        what=f"expiration series equal to {expected}")
        items = running.inventory()["items"]
        assert len(items) == len(expected)
        for item in items:
            assert item["renewAt"], item
            key = series(item["kind"], item["cluster"], item["namespace"], item["secret"])
            assert found[(RENEWAL, key)] < found[(EXPIRATION, key)]
        states = {dict(labels)["state"]: v for (name, labels), v in found.items()
                  if name == "meshtrust_certificates"}
        assert sum(states.values()) == len(items)

    def test_bootstraps_issuance_and_connections(self, running: Running) -> None:
        """Two bootstraps, timed issuances of both profiles, two agents connected."""
        found = scrape(running.metrics_port)
        bootstraps = {dict(labels)["outcome"]: v for (name, labels), v in found.items()
                      if name == "meshtrust_bootstrap_attempts_total"}
        assert bootstraps == {"accepted": 2}
        for profile in (metrics.RELAY_CLIENT, metrics.ISTIO_INTERMEDIATE):
            labels = (("outcome", "ok"), ("profile", profile))
            assert found[("meshtrust_issuance_total", labels)] >= 2
            assert found[("meshtrust_issuance_duration_seconds_count", labels)] == (
                found[("meshtrust_issuance_total", labels)])
            assert found[("meshtrust_issuance_duration_seconds_sum", labels)] > 0
        assert found[("meshtrust_connected_agents", ())] == 2

    def test_root_rotation_step(self, running: Running) -> None:
        """After ``meshtrust rotate root`` the step gauge names the rotation's current step."""
        code, out, err = isf.cli("rotate", "root", "--policy", isf.POLICY,
                                 "--store", running.fleet.mgmt_url)
        assert code == 0, out + err
        steps = {s.value for s in root_rotation.Step}

        def current() -> str | None:
            found = {dict(labels)["step"]: v for (name, labels), v in
                     scrape(running.metrics_port).items()
                     if name == "meshtrust_root_rotation_step"
                     and dict(labels)["policy"] == isf.POLICY}
            on = [step for step, value in found.items() if value == 1]
            return on[0] if set(found) == steps and len(on) == 1 else None

        assert rf.poll(current, timeout=10, interval=0.2, what="a rotation step") in steps


class TestAgentMetrics:
    def test_client_certificate_expiry_and_renewal(self, running: Running) -> None:
        """The agent exports the certificate it holds: its notAfter and planned renewal."""
        held = running.fleet.client_identity("cluster-1")
        assert held is not None
        key = series("relay-client", "cluster-1", NS, NAMES.relay_client)
        found = scrape(running.agent_port)
        end = held.certificate.not_valid_after_utc.timestamp()
        assert found[(EXPIRATION, key)] == end
        start = held.certificate.not_valid_before_utc.timestamp()
        assert start < found[(RENEWAL, key)] < end


# -- the page, in a real browser ------------------------------------------------------------


class Element:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.text = ""

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class DOM(html.parser.HTMLParser):
    """Every element of a dumped DOM, with the text directly inside it."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append(element)
        if tag not in ("meta", "link", "br", "img", "input"):
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1].text += data

    def find(self, cls: str) -> list[Element]:
        return [e for e in self.elements if cls in e.classes]


def chromium(tmp: Path, url: str, *extra: str) -> str:
    """Run headless Chromium from Debian on ``url``, with every outside connection off."""
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(binary):
        if os.geteuid() == 0:
            pytest.fail("chromium is missing; scripts/system-deps installs it")
        pytest.skip("chromium is not installed and installing it needs root "
                    "(scripts/system-deps installs it)")
    profile = tmp / f"chromium-{len(list(tmp.glob('chromium-*')))}"
    proc = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
         "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


class TestDashboardPage:
    def test_fleet_grouped_with_attention_highlighted(self, running: Running,
                                                      tmp_path: Path) -> None:
        """Both clusters appear after mgmt, and the certificate past its renewal is marked."""
        def due() -> dict[str, Any] | None:
            document = running.inventory()
            states = {(i["kind"], i["cluster"]): i["state"] for i in document["items"]}
            return document if states.get(("relay-client", "cluster-2")) == "renewal-due" \
                else None

        document = rf.poll(due, timeout=20, interval=0.2,
                           what="cluster-2's client certificate to be due for renewal")
        url = f"http://127.0.0.1:{running.metrics_port}{dashboard.UI_PATH}"
        dom = DOM(chromium(tmp_path, url, "--dump-dom"))
        sections = [e.attrs["data-cluster"] for e in dom.find("cluster") if e.tag == "section"]
        assert sections == ["mgmt", *CLUSTERS]
        assert len(dom.find("cert")) == len(document["items"])
        rows = {(e.attrs["data-kind"], e.attrs["data-cluster"]): e for e in dom.find("cert")}
        due_row = rows[("relay-client", "cluster-2")]
        assert {"attention", "state-renewal-due"} <= due_row.classes
        assert "attention" not in rows[("relay-client", "cluster-1")].classes
        assert [e for e in dom.find("renew")], "renewal points are marked on the timeline"
        assert not [e for e in dom.elements if e.attrs.get("id") == "problem"
                    and "hidden" not in e.attrs]
        shot = tmp_path / "dashboard.png"
        chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1400,900",
                 "--hide-scrollbars")
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    def test_store_text_is_shown_as_text(self, tmp_path: Path) -> None:
        """Markup an agent reports (a failure message) is displayed, never parsed as HTML."""
        evil = '<img src=x onerror="document.title=\'owned\'"><b>bold</b>'
        meters = metrics.Metrics()
        board = asyncio.run(_board_with_message(meters, evil))
        server = meters.serve("127.0.0.1:0", board.pages())
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}{dashboard.UI_PATH}"
            dom = DOM(chromium(tmp_path, url, "--dump-dom"))
        finally:
            server.shutdown()
            server.server_close()
        assert not [e for e in dom.elements if e.tag in ("img", "b")]
        assert evil in [e.text for e in dom.find("message")]
        [row] = [e for e in dom.find("cert") if e.attrs["data-kind"] == "istio-intermediate"]
        assert {"attention", "state-failed"} <= row.classes
        assert [e.text for e in dom.elements if e.tag == "title"] == [
            "meshtrust · certificate expiry"]


async def _board_with_message(meters: metrics.Metrics, message: str) -> dashboard.Dashboard:
    """A dashboard over an in-memory store whose one intermediate failed with ``message``."""
    store = MemoryStore()
    clock = clock_module.SystemClock()
    await relay_pki.ensure(store, clock)
    await registry.Registry(store, clock).register("cluster-1")
    made = await store.create(base.Resource(
        api_version=istio.ISSUED_API, kind=istio.ISSUED_KIND, namespace=NS,
        name=istio.issued_name(isf.POLICY, "cluster-1"),
        spec={"cluster": "cluster-1", "policy": isf.POLICY}))
    await store.update_status(dataclasses.replace(
        made, status={"state": istio.State.FAILED.value, "message": message}))
    board = dashboard.Dashboard(store, clock, meters)
    await board.refresh()
    return board
