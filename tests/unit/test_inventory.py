"""The fleet inventory and ``meshtrust status``: every certificate, its expiry and its state."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust import settings
from meshtrust.authority import inventory, istio, registry, relay, relay_pki, root_rotation
from meshtrust.cli import main, status_cmd
from meshtrust.cli.output import Output
from meshtrust.pki import bundle, csr, keys, rotation
from meshtrust.store import base, open_store
from meshtrust.testing import FakeClock, MemoryStore

START = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
NAMES = settings.SecretNames()
NS = NAMES.relay_namespace
State = inventory.State


@dataclasses.dataclass
class World:
    store: MemoryStore
    clock: FakeClock
    registry: registry.Registry
    relay: relay.RelayAuthority
    istio: istio.IstioAuthority

    async def items(self, **options: Any) -> list[inventory.Item]:
        return await inventory.collect(self.store, self.clock, **options)

    async def one(self, kind: str, cluster: str = inventory.MGMT) -> inventory.Item:
        [found] = [i for i in await self.items() if i.kind == kind and i.cluster == cluster]
        return found

    async def issue_client(self, cluster: str) -> relay.Issued:
        key = keys.generate_key(keys.KeyType.EC_P256)
        return await self.relay.renew(cluster, csr.dump_csr(
            csr.build_csr(key, common_name=cluster, names=[cluster])))

    async def report(self, cluster: str, issued: relay.Issued) -> None:
        """What the cluster's agent reports about the client certificate it holds."""
        cert = issued.certificate
        await self.registry.seen(cluster, certificates=[{
            "kind": "relay-client", "namespace": NS, "secret": NAMES.relay_client,
            "serial": issued.serial, "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "notAfter": cert.not_valid_after_utc.isoformat(),
            "renewAt": rotation.renew_at(cert, 0.5).isoformat(), "fingerprint": ""}])

    async def finish_intermediate(self, cluster: str, *, ok: bool = True) -> None:
        """Carry ``cluster``'s pending intermediate through signing to FINISHED (or FAILED)."""
        await self.istio.reconcile()
        [work] = await self.istio.work_for(cluster)
        key = keys.generate_key(keys.KeyType.EC_P256)
        await self.istio.sign(cluster, work.id, csr.dump_csr(csr.build_csr(key, ca=True)))
        await self.istio.report(cluster, work.id, ok=ok, message="" if ok else "istiod crashed")


def run(scenario: Callable[[World], Awaitable[None]], *, pki: bool = True,
        clusters: tuple[str, ...] = ("cluster-1", "cluster-2")) -> None:
    """Run ``scenario`` on a memory store with (by default) a relay PKI and two clusters."""
    async def go() -> None:
        clock = FakeClock(START)
        store = MemoryStore(clock=clock)
        if pki:
            await relay_pki.ensure(store, clock, relay_pki.Options(
                server_lifetime=dt.timedelta(days=10)))
        reg = registry.Registry(store, clock)
        for name in clusters:
            await reg.register(name)
        world = World(store=store, clock=clock, registry=reg,
                      relay=relay.RelayAuthority(store, clock, reg, relay.Options(
                          client_lifetime=dt.timedelta(hours=10))),
                      istio=istio.IstioAuthority(store, clock, reg))
        try:
            await scenario(world)
        finally:
            await store.close()
    asyncio.run(go())


def policy(root: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
            "metadata": {"name": "mesh", "namespace": NS},
            "spec": {"config": {
                "mgmtServerCa": root or {"generated": {"keyType": "ecdsa-p256"}},
                "intermediateCertOptions": {"keyType": "ecdsa-p256", "ttl": "1000s",
                                            "secretRotationGracePeriodRatio": 0.5}}}}


async def replace_secret(store: base.Store, name: str, **changes: Any) -> None:
    secret = await store.get_secret(NS, name)
    await store.update(dataclasses.replace(secret, **changes))


class TestRelayItems:
    def test_a_generated_relay_pki_is_three_ok_items_read_from_the_certificates(self) -> None:
        """Root, signing CA and server certificate carry their own subject, issuer and dates."""
        async def scenario(w: World) -> None:
            items = await w.items()
            relay_items = items[:3]
            assert [i.kind for i in relay_items] == ["relay-root", "relay-signing",
                                                    "relay-server"]
            for item, name in zip(relay_items, (NAMES.relay_root, NAMES.relay_signing,
                                                NAMES.relay_server), strict=True):
                cert = bundle.load_certificate(
                    (await w.store.get_secret(NS, name)).data["tls.crt"])
                assert (item.cluster, item.namespace, item.secret) == ("mgmt", NS, name)
                assert item.serial == f"{cert.serial_number:x}"
                assert item.subject == cert.subject.rfc4514_string()
                assert item.issuer == cert.issuer.rfc4514_string()
                assert item.not_after == cert.not_valid_after_utc
                assert item.renew_at == rotation.renew_at(cert, settings.DEFAULT_GRACE_RATIO)
                assert item.managed_by == "meshtrust"
                assert item.state is State.OK and not item.needs_attention
            root, signing, server = relay_items
            assert root.subject == root.issuer
            assert signing.issuer == root.subject and server.issuer == signing.subject
            assert server.days_left == 10
        run(scenario)

    def test_missing_relay_secrets_are_missing_items_that_need_attention(self) -> None:
        """An empty store gives three missing items with a message, not an error."""
        async def scenario(w: World) -> None:
            items = await w.items()
            assert [(i.kind, i.state) for i in items] == [
                ("relay-root", State.MISSING), ("relay-signing", State.MISSING),
                ("relay-server", State.MISSING)]
            assert all(i.needs_attention for i in items)
            assert "gloo-mesh/relay-server-tls-secret does not exist" in items[2].message
            assert items[2].serial == "" and items[2].not_after is None
        run(scenario, pki=False, clusters=())

    def test_broken_secrets_are_unreadable_items(self) -> None:
        """A certificate that does not parse, or no certificate key at all, is unreadable."""
        async def scenario(w: World) -> None:
            await replace_secret(w.store, NAMES.relay_server,
                                 data={"tls.crt": b"-----BEGIN CERTIFICATE-----\nnope\n"})
            await replace_secret(w.store, NAMES.relay_signing, data={"tls.key": b"x"})
            server = await w.one("relay-server")
            assert server.state is State.UNREADABLE and server.needs_attention
            assert "no readable certificate" in server.message
            assert server.managed_by == "meshtrust"
            signing = await w.one("relay-signing")
            assert signing.state is State.UNREADABLE
            assert signing.message.endswith("has no tls.crt")
            assert (await w.one("relay-root")).state is State.OK
        run(scenario)

    def test_a_root_secret_holding_only_ca_crt_is_read_from_it(self) -> None:
        """A bring-your-own signing CA publishes its root in ca.crt alone; that is read."""
        async def scenario(w: World) -> None:
            secret = await w.store.get_secret(NS, NAMES.relay_root)
            await replace_secret(w.store, NAMES.relay_root, labels={},
                                 data={"ca.crt": secret.data["ca.crt"]})
            root = await w.one("relay-root")
            cert = bundle.load_certificate(secret.data["ca.crt"])
            assert root.serial == f"{cert.serial_number:x}" and root.state is State.OK
            assert root.managed_by == "bring-your-own"
        run(scenario)

    def test_ownership_is_a_hook(self) -> None:
        """The caller can say who manages each secret, e.g. an external CA."""
        async def scenario(w: World) -> None:
            items = await w.items(ownership=lambda secret: f"external:{secret.name}")
            assert items[1].managed_by == "external:relay-tls-signing-secret"
        run(scenario)

    def test_the_grace_ratio_must_be_a_share(self) -> None:
        """A ratio outside (0, 1) is the caller's mistake."""
        async def scenario(w: World) -> None:
            with pytest.raises(ValueError, match="grace_ratio"):
                await w.items(grace_ratio=1.5)
        run(scenario)


class TestTiming:
    def test_days_left_then_renewal_due_then_expired(self) -> None:
        """A 10-day server certificate: ok, due once 90 % has passed, then expired."""
        async def scenario(w: World) -> None:
            w.clock.advance(dt.timedelta(days=8))
            server = await w.one("relay-server")
            assert (server.state, server.days_left) == (State.OK, 2)
            assert server.renew_at is not None
            w.clock.set(server.renew_at)
            server = await w.one("relay-server")
            assert (server.state, server.days_left) == (State.RENEWAL_DUE, 1)
            assert server.needs_attention
            w.clock.advance(dt.timedelta(days=2))
            server = await w.one("relay-server")
            assert (server.state, server.days_left) == (State.EXPIRED, -1)
            assert server.needs_attention
            assert (await w.one("relay-root")).state is State.OK
        run(scenario)


class TestRelayClientItems:
    def test_a_registered_cluster_without_a_certificate_is_missing(self) -> None:
        """Registration alone records no client certificate: the item says so."""
        async def scenario(w: World) -> None:
            item = await w.one("relay-client", "cluster-1")
            assert (item.state, item.namespace, item.secret) == (
                State.MISSING, NS, NAMES.relay_client)
            assert "has not bootstrapped" in item.message and item.needs_attention
        run(scenario)

    def test_an_issued_certificate_not_yet_reported_has_no_invented_fields(self) -> None:
        """From the issuance record: serial and notAfter, but no subject, issuer or renewal."""
        async def scenario(w: World) -> None:
            issued = await w.issue_client("cluster-1")
            item = await w.one("relay-client", "cluster-1")
            assert item.serial == issued.serial
            assert item.not_after == issued.certificate.not_valid_after_utc
            assert (item.subject, item.issuer, item.renew_at) == ("", "", None)
            assert (item.state, item.managed_by) == (State.OK, "meshtrust")
            assert item.message == "not yet reported by the cluster's agent"
            assert (await w.one("relay-client", "cluster-2")).state is State.MISSING
        run(scenario)

    def test_the_agents_report_fills_subject_issuer_and_renewal(self) -> None:
        """Once the agent reports the same serial, its subject, issuer and renewAt are used."""
        async def scenario(w: World) -> None:
            issued = await w.issue_client("cluster-1")
            await w.report("cluster-1", issued)
            item = await w.one("relay-client", "cluster-1")
            cert = issued.certificate
            assert item.subject == "CN=cluster-1" == cert.subject.rfc4514_string()
            assert item.issuer == cert.issuer.rfc4514_string()
            assert item.renew_at == rotation.renew_at(cert, 0.5)
            assert item.message == "" and item.days_left == 0
            w.clock.advance(dt.timedelta(hours=5, seconds=1))
            assert (await w.one("relay-client", "cluster-1")).state is State.RENEWAL_DUE
            w.clock.advance(dt.timedelta(hours=5))
            assert (await w.one("relay-client", "cluster-1")).state is State.EXPIRED
        run(scenario)

    def test_a_renewal_the_agent_has_not_reported_shows_the_new_certificate(self) -> None:
        """When the server issued a later certificate than the one reported, it wins."""
        async def scenario(w: World) -> None:
            first = await w.issue_client("cluster-1")
            await w.report("cluster-1", first)
            w.clock.advance(60)
            second = await w.issue_client("cluster-1")
            item = await w.one("relay-client", "cluster-1")
            assert item.serial == second.serial != first.serial
            assert item.managed_by == "meshtrust" and item.renew_at is None
        run(scenario)

    def test_a_certificate_only_reported_is_bring_your_own(self) -> None:
        """A client certificate the server never issued (cert-manager, by hand) is the user's."""
        async def scenario(w: World) -> None:
            issued = await w.issue_client("cluster-1")
            await w.registry.update_status("cluster-1", clientCertificate=None)
            await w.report("cluster-1", issued)
            item = await w.one("relay-client", "cluster-1")
            assert (item.serial, item.managed_by, item.state) == (
                issued.serial, "bring-your-own", State.OK)
        run(scenario)

    def test_a_garbled_cluster_status_does_not_crash(self) -> None:
        """Wrong shapes read as absent; an unreadable notAfter makes the item unreadable."""
        async def scenario(w: World) -> None:
            await w.registry.update_status("cluster-1", clientCertificate="oops",
                                           certificates="oops")
            await w.registry.update_status("cluster-2", clientCertificate={
                "serial": "ab", "notAfter": "yesterday"}, certificates=[7, None])
            items = {i.cluster: i for i in await w.items() if i.kind == "relay-client"}
            assert items["cluster-1"].state is State.MISSING
            assert (items["cluster-2"].state, items["cluster-2"].serial) == (
                State.UNREADABLE, "ab")
        run(scenario)


class TestIstioItems:
    def test_a_finished_intermediate_and_its_policy_root(self) -> None:
        """FINISHED is ok; serial, notAfter and renewAt come from the IssuedCertificate."""
        async def scenario(w: World) -> None:
            await w.istio.apply(policy())
            await w.finish_intermediate("cluster-1")
            status = (await w.store.get_resource(istio.ISSUED_KIND, NS,
                                                 "mesh.cluster-1")).status
            item = await w.one("istio-intermediate", "cluster-1")
            assert (item.namespace, item.secret, item.policy) == (
                "istio-system", "cacerts", "mesh")
            assert item.serial == status["serial"]
            assert item.not_after == dt.datetime.fromisoformat(status["notAfter"])
            assert item.renew_at == dt.datetime.fromisoformat(status["renewAt"])
            assert (item.state, item.managed_by, item.days_left) == (State.OK, "meshtrust", 0)
            root = await w.one("istio-root")
            secret = await w.store.get_secret(NS, "root-trust.mesh")
            cert = bundle.load_certificate(secret.data["root-cert.pem"])
            assert (root.secret, root.policy, root.managed_by) == (
                "root-trust.mesh", "mesh", "meshtrust")
            assert root.serial == f"{cert.serial_number:x}" and root.subject == root.issuer
            assert root.state is State.OK
        run(scenario)

    def test_lifecycle_states_pending_then_failed(self) -> None:
        """Before signing the item is pending with no certificate; a failed round needs care."""
        async def scenario(w: World) -> None:
            await w.istio.apply(policy())
            await w.istio.reconcile()
            pending = await w.one("istio-intermediate", "cluster-2")
            assert (pending.state, pending.serial, pending.days_left) == (
                State.PENDING, "", None)
            assert not pending.needs_attention
            await w.finish_intermediate("cluster-2", ok=False)
            failed = await w.one("istio-intermediate", "cluster-2")
            assert failed.state is State.FAILED and failed.needs_attention
            assert failed.message == "istiod crashed"
        run(scenario)

    def test_past_renew_at_the_intermediate_is_due_then_expired(self) -> None:
        """The cluster's intermediate is due after renewAt even while a new round is pending."""
        async def scenario(w: World) -> None:
            await w.istio.apply(policy())
            await w.finish_intermediate("cluster-1")
            w.clock.advance(600)
            await w.istio.reconcile()  # sends the cluster back to PENDING: "renewal due"
            item = await w.one("istio-intermediate", "cluster-1")
            assert item.state is State.RENEWAL_DUE and item.message == "renewal due"
            w.clock.advance(500)
            assert (await w.one("istio-intermediate", "cluster-1")).state is State.EXPIRED
        run(scenario)

    def test_an_unknown_state_is_unreadable(self) -> None:
        """A state meshtrust does not know is reported, not guessed."""
        async def scenario(w: World) -> None:
            await w.istio.apply(policy())
            await w.istio.reconcile()
            resource = await w.store.get_resource(istio.ISSUED_KIND, NS, "mesh.cluster-1")
            await w.store.update_status(dataclasses.replace(
                resource, status={**resource.status, "state": "EXPLODED"}))
            item = await w.one("istio-intermediate", "cluster-1")
            assert item.state is State.UNREADABLE and "EXPLODED" in item.message
        run(scenario)

    def test_a_secret_ref_root_is_bring_your_own_or_missing(self) -> None:
        """The root of a secretRef policy is read from that secret, or reported missing."""
        async def scenario(w: World) -> None:
            await w.istio.apply(policy({"secretRef": {"name": "my-root", "namespace": NS}}))
            root = await w.one("istio-root")
            assert (root.secret, root.state) == ("my-root", State.MISSING)
            await w.istio.apply(policy())
            await w.istio.reconcile()
            made = await w.store.get_secret(NS, "root-trust.mesh")
            await w.store.create(base.Secret(namespace=NS, name="my-root", data=made.data))
            await w.istio.apply(policy({"secretRef": {"name": "my-root", "namespace": NS}}))
            root = await w.one("istio-root")
            assert (root.state, root.managed_by) == (State.OK, "bring-your-own")
        run(scenario)

    def test_during_a_root_rotation_both_trusted_roots_are_listed(self) -> None:
        """While old and new roots are trusted, each is an item of its own."""
        async def scenario(w: World) -> None:
            await w.istio.apply(policy())
            await w.istio.reconcile()
            await root_rotation.RootRotations(w.store, w.clock, w.istio).start("mesh")
            roots = [i for i in await w.items() if i.kind == "istio-root"]
            assert len(roots) == 2 and len({r.serial for r in roots}) == 2
            assert roots[1].message == "also trusted by the clusters during a root rotation"
        run(scenario)

    def test_an_invalid_stored_policy_is_unreadable(self) -> None:
        """A policy resource that no longer parses gives an unreadable root item."""
        async def scenario(w: World) -> None:
            await w.store.create(base.Resource(
                api_version="admin.gloo.solo.io/v2", kind="RootTrustPolicy", namespace=NS,
                name="broken", spec={"config": {"mgmtServerCa": {"nonsense": {}}}}))
            root = await w.one("istio-root")
            assert (root.policy, root.state) == ("broken", State.UNREADABLE)
            assert "policy broken is invalid" in root.message
        run(scenario)

    def test_items_are_ordered_management_first_then_by_cluster(self) -> None:
        """Management-side items come first; each cluster's client precedes its intermediate."""
        async def scenario(w: World) -> None:
            await w.istio.apply(policy())
            await w.istio.reconcile()
            assert [(i.kind, i.cluster) for i in await w.items()] == [
                ("relay-root", "mgmt"), ("relay-signing", "mgmt"), ("relay-server", "mgmt"),
                ("istio-root", "mgmt"),
                ("relay-client", "cluster-1"), ("istio-intermediate", "cluster-1"),
                ("relay-client", "cluster-2"), ("istio-intermediate", "cluster-2")]
        run(scenario)


class TestItem:
    def test_times_must_be_timezone_aware(self) -> None:
        """A naive time is the caller's mistake."""
        with pytest.raises(ValueError, match="timezone-aware"):
            inventory.Item(kind="relay-root", cluster="mgmt", namespace=NS, secret="x",
                           state=State.OK, not_after=dt.datetime(2030, 1, 1))

    def test_the_document_is_plain_values(self) -> None:
        """JSON and YAML get strings, numbers and booleans, with needsAttention derived."""
        item = inventory.Item(kind="relay-root", cluster="mgmt", namespace=NS, secret="x",
                              state=State.EXPIRED, not_after=START, days_left=-1)
        assert item.document() == {
            "kind": "relay-root", "cluster": "mgmt", "namespace": NS, "secret": "x",
            "policy": None, "subject": "", "issuer": "", "serial": "",
            "notAfter": "2026-03-01T12:00:00.000000Z", "daysLeft": -1, "renewAt": None,
            "managedBy": None, "state": "expired", "needsAttention": True, "message": ""}


# -- the command line --------------------------------------------------------------------------


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main.main(list(argv), Output(stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


def make_store(path: Path, made_at: dt.datetime | None,
               server_lifetime: dt.timedelta = dt.timedelta(days=365)) -> str:
    """A management store whose relay PKI was made at ``made_at`` (none if None)."""
    url = f"sqlite:{path / 'mgmt.db'}"

    async def go() -> None:
        store = await open_store(url)
        try:
            if made_at is not None:
                await relay_pki.ensure(store, FakeClock(made_at), relay_pki.Options(
                    server_lifetime=server_lifetime))
        finally:
            await store.close()
    asyncio.run(go())
    return url


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables are as wide as the terminal says; give the eleven columns room."""
    monkeypatch.setenv("COLUMNS", "300")


class Recording(Output):
    """An Output that keeps the row styles it was asked for."""

    def table(self, columns: Any, rows: Any, *, title: str | None = None,
              styles: Any = None) -> None:
        self.styles = dict(styles or {})
        super().table(columns, rows, title=title, styles=styles)


@pytest.mark.usefixtures("wide_terminal")
class TestStatusCommand:
    def test_a_healthy_store_exits_zero_with_a_table(self, tmp_path: Path) -> None:
        """Fresh relay certificates: a table of three ok rows and exit status 0."""
        url = make_store(tmp_path, now())
        code, out, err = cli("status", "--store", url)
        assert (code, err) == (0, "")
        for word in ("relay-root", "relay-signing", "relay-server", "meshtrust", "ok",
                     "days left", "renewal due"):
            assert word in out
        assert "need attention" not in out

    def test_an_expired_certificate_exits_non_zero(self, tmp_path: Path) -> None:
        """A server certificate made 400 days ago for a year is expired: exit status 3."""
        url = make_store(tmp_path, now() - dt.timedelta(days=400, hours=1))
        code, out, _ = cli("status", "--store", url, "-o", "json")
        assert code == status_cmd.EXIT_ATTENTION == 3
        items = {i["kind"]: i for i in json.loads(out)["items"]}
        assert set(items) == {"relay-root", "relay-signing", "relay-server"}
        assert items["relay-server"]["state"] == "expired"
        assert items["relay-server"]["needsAttention"] is True
        assert items["relay-server"]["daysLeft"] == -36  # 35 days and an hour ago
        assert items["relay-root"]["state"] == "ok"
        code, table, _ = cli("status", "--store", url)
        assert code == 3 and "1 of 3 certificates need attention" in table

    def test_past_its_renewal_time_exits_non_zero(self, tmp_path: Path) -> None:
        """A server certificate past notAfter − 0.1 × lifetime is due: exit status 3."""
        url = make_store(tmp_path, now() - dt.timedelta(days=9, hours=12),
                         server_lifetime=dt.timedelta(days=10))
        code, out, _ = cli("status", "--store", url, "-o", "yaml")
        assert code == 3
        states = {i["kind"]: i["state"] for i in yaml.safe_load(out)["items"]}
        assert states == {"relay-root": "ok", "relay-signing": "ok",
                          "relay-server": "renewal-due"}

    def test_expired_rows_are_red_and_due_rows_yellow(self, tmp_path: Path) -> None:
        """Colour marks what needs attention: red for expired, yellow for renewal due."""
        async def go(url: str) -> None:
            store = await open_store(url)
            try:
                await replace_secret(store, NAMES.relay_signing, data={"tls.key": b"x"})
            finally:
                await store.close()
        due = make_store(tmp_path, now() - dt.timedelta(days=9, hours=12),
                         server_lifetime=dt.timedelta(days=10))
        out = Recording(stdout=io.StringIO(), stderr=io.StringIO())
        assert main.main(["status", "--store", due], out) == 3
        assert out.styles == {2: "yellow"}
        asyncio.run(go(due))
        assert main.main(["status", "--store", due], out) == 3
        assert out.styles == {1: "red", 2: "yellow"}

    def test_missing_certificates_are_listed_with_their_reason(self, tmp_path: Path) -> None:
        """An empty store: every relay secret missing, each with its message, exit status 3."""
        url = make_store(tmp_path, None)
        code, out, _ = cli("status", "--store", url)
        assert code == 3
        assert "relay-server mgmt gloo-mesh/relay-server-tls-secret: secret " \
               "gloo-mesh/relay-server-tls-secret does not exist" in out

    def test_an_unreadable_store_is_an_error(self, tmp_path: Path) -> None:
        """A store URL that cannot be opened is exit status 1, not a report."""
        code, _, err = cli("status", "--store", "nosuch://x")
        assert code == 1 and err.startswith("error:")

    def test_the_exit_status_is_documented(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help says what the exit status means."""
        with pytest.raises(SystemExit):
            cli("status", "--help")
        assert "exit status: 0 when nothing needs attention; 3 when" in capsys.readouterr().out
