"""The audit log: one record per action, refusals included, and no room for a secret."""

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

from meshtrust import errors, settings
from meshtrust.authority import audit, istio, registry, relay, relay_pki, root_rotation
from meshtrust.cli import audit_cmd, main
from meshtrust.cli.output import Output
from meshtrust.pki import bundle, csr, keys
from meshtrust.store import base, open_store
from meshtrust.testing import FakeClock, MemoryStore

START = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
NAMES = settings.SecretNames()
POLICY = {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
          "metadata": {"name": "mesh", "namespace": "gloo-mesh"},
          "spec": {"config": {"mgmtServerCa": {"generated": {"keyType": "ecdsa-p256"}},
                              "intermediateCertOptions": {"keyType": "ecdsa-p256"}}}}
# The fields a record has; adding one must be a deliberate change to this test.
FIELDS = ("time", "event", "outcome", "actor", "id", "user", "peer", "cluster", "profile",
          "serial", "fingerprint", "policy", "step", "message")


@dataclasses.dataclass
class World:
    """The server's authorities (actor "server") and an operator's, on one store."""

    store: MemoryStore
    clock: FakeClock
    server: audit.AuditLog
    registry: registry.Registry
    relay: relay.RelayAuthority
    istio: istio.IstioAuthority
    rotations: root_rotation.RootRotations
    operator: registry.Registry
    operator_istio: istio.IstioAuthority
    operator_rotations: root_rotation.RootRotations

    async def records(self) -> list[dict[str, Any]]:
        """Every record so far, oldest first, without its time and id."""
        reading = await audit.read(self.store)
        assert reading.damaged == []
        return [{k: v for k, v in r.document().items() if k not in ("time", "id")}
                for r in reading.records]

    async def new_records(self, action: Callable[[], Awaitable[object]]) -> list[dict[str, Any]]:
        """The records ``action`` wrote (an exception it raises is re-raised)."""
        before = len(await self.records())
        await action()
        return (await self.records())[before:]


def make_world(store: MemoryStore, clock: FakeClock) -> World:
    server = audit.AuditLog(store, clock, actor=audit.SERVER)
    reg = registry.Registry(store, clock, audit=server)
    ist = istio.IstioAuthority(store, clock, reg)
    operator = registry.Registry(store, clock)
    operator_istio = istio.IstioAuthority(store, clock, operator)
    return World(store=store, clock=clock, server=server, registry=reg,
                 relay=relay.RelayAuthority(store, clock, reg),
                 istio=ist, rotations=root_rotation.RootRotations(store, clock, ist),
                 operator=operator, operator_istio=operator_istio,
                 operator_rotations=root_rotation.RootRotations(store, clock, operator_istio))


def run(scenario: Callable[[World], Awaitable[None]], *,
        store: MemoryStore | None = None) -> None:
    async def go() -> None:
        clock = FakeClock(START)
        made = store or MemoryStore(clock=clock)
        await relay_pki.ensure(made, clock)
        await scenario(make_world(made, clock))
    asyncio.run(go())


def expected(event: str, **fields: Any) -> dict[str, Any]:
    """A record's document (without time and id) with every other field absent."""
    document: dict[str, Any] = {field: None for field in FIELDS if field not in ("time", "id")}
    document.update(event=event, outcome="ok", message="")
    document.update(fields)
    return document


def operator(**fields: Any) -> dict[str, Any]:
    return {"actor": "operator", "user": audit.os_user(), **fields}


def client_csr(cluster: str, key: keys.PrivateKey | None = None) -> bytes:
    key = key or keys.generate_key(keys.KeyType.EC_P256)
    return csr.dump_csr(csr.build_csr(key, common_name=cluster, names=[cluster]))


def ca_csr() -> bytes:
    return csr.dump_csr(csr.build_csr(keys.generate_key(keys.KeyType.EC_P256), ca=True))


def certificate_fields(pem: bytes) -> dict[str, str]:
    return audit.certificate_fields(bundle.load_certificate(pem))


async def answer(world: World, cluster: str) -> None:
    """One server round, then ``cluster``'s agent signs and finishes its work."""
    await world.rotations.advance()
    await world.istio.reconcile()
    for work in await world.istio.work_for(cluster):
        await world.istio.sign(cluster, work.id, ca_csr())
        await world.istio.report(cluster, work.id, ok=True)


class TestRecord:
    def test_has_only_explicit_fields_and_no_room_for_more(self) -> None:
        """The record's fields are the fixed safe set; another one, or a new attribute, fails."""
        assert tuple(f.name for f in dataclasses.fields(audit.Record)) == FIELDS
        with pytest.raises(TypeError, match="data"):
            audit.Record(time=START, event=audit.Kind.TOKEN, outcome=audit.Outcome.OK,
                         actor="operator", data={"token": "x"})  # type: ignore[call-arg]
        record = audit.Record(time=START, event=audit.Kind.TOKEN, outcome=audit.Outcome.OK,
                              actor="operator")
        with pytest.raises((AttributeError, TypeError)):
            record.extra = "x"  # type: ignore[attr-defined]

    @pytest.mark.parametrize("field", ["message", "serial", "fingerprint", "cluster", "actor",
                                       "user", "policy", "step", "profile", "peer"])
    def test_a_private_key_fits_in_no_field(self, field: str) -> None:
        """A PEM private key is refused by every text field, the message included."""
        pem = keys.dump_private_key(keys.generate_key(keys.KeyType.EC_P256)).decode()
        fields: dict[str, Any] = {"actor": "operator", field: pem}
        with pytest.raises(ValueError, match=field):
            audit.Record(time=START, event=audit.Kind.ISSUE, outcome=audit.Outcome.OK, **fields)

    @pytest.mark.parametrize("secret", [
        "mt1.0a1b2c3d.Q2hhbmdlIG1lIHRvIGEgcmVhbCB0b2tlbiBwbGVhc2U",   # a cluster token
        "token Xk3v9_pQ-7ZrTt2LmNb8WcYd4sHa1JeFgKuOiPl0qRs given",    # the shared token's shape
        "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----",
        "line one\nline two",
    ])
    def test_a_message_that_could_hold_a_secret_is_refused(self, secret: str) -> None:
        """Tokens, PEM bodies (keys, CSRs) and control characters cannot be a message."""
        with pytest.raises(ValueError, match="message: it may not hold key material"):
            audit.Record(time=START, event=audit.Kind.TOKEN, outcome=audit.Outcome.OK,
                         actor="operator", message=secret)

    def test_safe_message_keeps_names_and_cuts_secrets(self) -> None:
        """Names, serials and times stay; a token, a key body and a long run of base64 go."""
        token = "mt1.0a1b2c3d.Q2hhbmdlIG1lIHRvIGEgcmVhbCB0b2tlbiBwbGVhc2U"
        text = (f"cluster 'prod-eu-west-1-primary-mesh-cluster' serial "
                f"3fa9c0d1e2b4a5968778695a4b3c2d1e at 2026-11-22T12:00:00.000000Z token {token}")
        safe = audit.safe_message(text)
        assert "prod-eu-west-1-primary-mesh-cluster" in safe
        assert "3fa9c0d1e2b4a5968778695a4b3c2d1e" in safe and "2026-11-22T12:00:00" in safe
        assert token not in safe and token.rsplit(".", 1)[1] not in safe
        assert audit.safe_message("x" * 1000).endswith("…")
        assert len(audit.safe_message("x" * 1000)) == audit.MESSAGE_LIMIT

    def test_loads_back_what_it_stored(self) -> None:
        """A stored record reads back equal; a damaged one is reported by name, not shown."""
        async def scenario(w: World) -> None:
            server = await w.store.get_secret("gloo-mesh", NAMES.relay_server)
            written = await w.server.record(
                audit.Kind.ISSUE, profile="relay-server", message="generated",
                certificate=bundle.load_certificate(server.data["tls.crt"]))
            await w.store.create(base.Resource(
                api_version=audit.API, kind=audit.KIND, namespace="gloo-mesh",
                name="20260101-000000-000000-00000000", spec={"event": "nonsense"}))
            reading = await audit.read(w.store)
            assert reading.records == [written]
            assert reading.damaged == ["20260101-000000-000000-00000000"]
        run(scenario)


class TestEvents:
    def test_register_token_and_deregister(self) -> None:
        """Registering, minting a token (its id only), deregistering: one record each."""
        async def scenario(w: World) -> None:
            assert await w.new_records(lambda: w.operator.register("c1")) == [
                expected("register", cluster="c1", message="registered", **operator())]
            assert await w.new_records(lambda: w.operator.register("c1")) == []  # no change
            tokens: list[str] = []

            async def mint() -> None:
                tokens.append(await w.operator.create_token("c1", dt.timedelta(hours=1)))
            [minted] = await w.new_records(mint)
            token_id = tokens[0].split(".")[1]
            assert minted == expected(
                "token", cluster="c1", **operator(),
                message=f"token {token_id} minted, single-use, expires 2026-11-22T13:00:00.000000Z")
            assert await w.new_records(lambda: w.operator.deregister("c1")) == [expected(
                "deregister", cluster="c1", **operator(),
                message="deregistered, its certificates refused from now on; 1 unused token(s) "
                        "removed")]
            with pytest.raises(errors.UnknownCluster):
                await w.operator.deregister("c1")
            [refused] = (await w.records())[-1:]
            assert refused == expected("deregister", outcome="refused", cluster="c1",
                                       message="cluster 'c1' is not registered", **operator())
            dumped = json.dumps(await w.records())
            assert tokens[0].rsplit(".", 1)[1] not in dumped
        run(scenario)

    def test_bootstrap_accepted_and_refused(self) -> None:
        """An accepted bootstrap records the certificate; a bad token or name, the refusal."""
        async def scenario(w: World) -> None:
            await w.operator.register("c1")
            token = await w.operator.create_token("c1")
            issued: list[relay.Issued] = []

            async def bad_token() -> None:
                with pytest.raises(errors.AuthError):
                    await w.relay.bootstrap("c1", token + "x", client_csr("c1"), peer="10.0.0.7")
            assert await w.new_records(bad_token) == [expected(
                "bootstrap", outcome="refused", actor="anonymous", cluster="c1",
                profile="relay-client", peer="10.0.0.7",
                message="identity token rejected for cluster 'c1'")]

            async def bad_name() -> None:
                with pytest.raises(errors.ConfigError):
                    await w.relay.bootstrap(token, token, client_csr("c1"), peer="10.0.0.7")
            [refused] = await w.new_records(bad_name)
            assert refused["cluster"] is None and refused["outcome"] == "refused"
            assert token.rsplit(".", 1)[1] not in json.dumps(refused)

            async def good() -> None:
                issued.append(await w.relay.bootstrap("c1", token, client_csr("c1"),
                                                      peer="10.0.0.7"))
            assert await w.new_records(good) == [expected(
                "bootstrap", actor="c1", cluster="c1", profile="relay-client",
                peer="10.0.0.7", **audit.certificate_fields(issued[0].certificate))]
        run(scenario)

    def test_renewal_and_its_refusal(self) -> None:
        """A renewal records the new certificate as the cluster's act; a bad CSR, a refusal."""
        async def scenario(w: World) -> None:
            await w.operator.register("c1")
            issued: list[relay.Issued] = []

            async def renew() -> None:
                issued.append(await w.relay.renew("c1", client_csr("c1")))
            assert await w.new_records(renew) == [expected(
                "renew", actor="c1", cluster="c1", profile="relay-client",
                **audit.certificate_fields(issued[0].certificate))]

            async def garbage() -> None:
                with pytest.raises(errors.InvalidCSR):
                    await w.relay.renew("c1", b"not a csr")
            [refused] = await w.new_records(garbage)
            assert refused["event"] == "renew" and refused["outcome"] == "refused"
            assert refused["actor"] == "c1" and "CSR" in refused["message"]
        run(scenario)

    def test_policy_apply_and_istio_issuance(self) -> None:
        """Apply, the generated root, each intermediate and a refused CSR: one record each."""
        async def scenario(w: World) -> None:
            await w.operator.register("c1")
            assert await w.new_records(lambda: w.operator_istio.apply(POLICY)) == [expected(
                "policy", policy="mesh", message="created in gloo-mesh (generation 1)",
                **operator())]
            assert await w.new_records(lambda: w.operator_istio.apply(POLICY)) == [expected(
                "policy", policy="mesh", message="configured in gloo-mesh (generation 1)",
                **operator())]
            bad = {**POLICY, "spec": {"config": {"mgmtServerCa": {"nonsense": {}}}}}
            with pytest.raises(errors.ConfigError):
                await w.operator_istio.apply(bad)
            [refused] = (await w.records())[-1:]
            assert (refused["event"], refused["outcome"], refused["policy"]) == (
                "policy", "refused", "mesh")

            [root] = await w.new_records(w.istio.reconcile)
            secret = await w.store.get_secret("gloo-mesh", "root-trust.mesh")
            assert root == expected("issue", actor="server", profile="istio-root",
                                    policy="mesh", message="generated in gloo-mesh/root-trust.mesh",
                                    **certificate_fields(secret.data["root-cert.pem"]))
            [work] = await w.istio.work_for("c1")
            signed: list[istio.Signed] = []

            async def sign() -> None:
                signed.append(await w.istio.sign("c1", work.id, ca_csr()))
            assert await w.new_records(sign) == [expected(
                "issue", actor="c1", cluster="c1", profile="istio-intermediate", policy="mesh",
                message=f"work {work.id}", **audit.certificate_fields(signed[0].certificate))]

            async def stale() -> None:
                with pytest.raises(errors.ConfigError, match="stale"):
                    await w.istio.sign("c1", "mesh.c1/9/9", ca_csr())
            [refused] = await w.new_records(stale)
            assert refused == expected(
                "issue", outcome="refused", actor="c1", cluster="c1",
                profile="istio-intermediate", policy="mesh",
                message="work item 'mesh.c1/9/9' is stale; the server sends a newer one")
        run(scenario)

    def test_each_root_rotation_step(self) -> None:
        """Start (operator), each advance (server), rollback (operator): one record each."""
        async def scenario(w: World) -> None:
            await w.operator.register("c1")
            await w.operator_istio.apply(POLICY)
            await answer(w, "c1")
            [started] = await w.new_records(lambda: w.operator_rotations.start("mesh"))
            secret = await w.store.get_secret("gloo-mesh", "root-trust.mesh")
            assert started == expected(
                "rotation", policy="mesh", step="ADDING_ROOT", profile="istio-root",
                message="started: new root generated; clusters now trust old and new",
                **certificate_fields(secret.data["new-root-cert.pem"]), **operator())
            with pytest.raises(errors.ConfigError, match="under way"):
                await w.operator_rotations.start("mesh")
            [refused] = (await w.records())[-1:]
            assert (refused["event"], refused["outcome"], refused["step"]) == (
                "rotation", "refused", "ADDING_ROOT")

            async def rounds() -> None:
                await answer(w, "c1")
                await answer(w, "c1")
            advanced = [r for r in await w.new_records(rounds) if r["event"] == "rotation"]
            assert advanced == [expected("rotation", actor="server", policy="mesh",
                                         step="REISSUING",
                                         message="ADDING_ROOT confirmed by every cluster")]
            assert await w.new_records(lambda: w.operator_rotations.rollback("mesh")) == [
                expected("rotation", policy="mesh", step="ROLLING_BACK",
                         message="rollback from REISSUING", **operator())]
        run(scenario)

    def test_the_relay_pki_the_server_generates(self) -> None:
        """Each relay CA and certificate the server makes is recorded, and the shared token."""
        async def go() -> None:
            clock = FakeClock(START)
            store = MemoryStore(clock=clock)
            log = audit.AuditLog(store, clock, actor=audit.SERVER)
            made = await relay_pki.ensure(store, clock)
            await audit.relay_pki_made(log, store, NAMES, made)
            records = (await audit.read(store)).records
            assert [(r.event.value, r.profile) for r in records] == [
                ("issue", "relay-root"), ("issue", "relay-signing"), ("issue", "relay-server"),
                ("token", None)]
            server = await store.get_secret("gloo-mesh", NAMES.relay_server)
            assert records[2].fingerprint == bundle.fingerprint(
                bundle.load_certificate(server.data["tls.crt"]))
            assert all(r.actor == "server" and r.user is None for r in records)
            assert records[2].message == "generated in gloo-mesh/relay-server-tls-secret"
            await audit.relay_pki_made(log, store, NAMES, [NAMES.relay_server], how="renewed")
            [renewed] = (await audit.read(store)).records[4:]
            assert (renewed.profile, renewed.message) == (
                "relay-server", "renewed in gloo-mesh/relay-server-tls-secret")
        asyncio.run(go())


class NoAuditStore(MemoryStore):
    """A store that takes every write but audit records."""

    async def create(self, obj: base.ObjectT) -> base.ObjectT:
        if obj.kind == audit.KIND:
            raise errors.StoreUnavailable("disk full")
        return await super().create(obj)


class TestDurability:
    def test_no_record_no_certificate_or_token(self, caplog: pytest.LogCaptureFixture) -> None:
        """When the store refuses the record, the certificate and token are not handed out."""
        async def scenario(w: World) -> None:
            reg = registry.Registry(w.store, w.clock)
            await w.store.create(base.Resource(
                api_version=registry.CLUSTER_API, kind=registry.CLUSTER_KIND,
                namespace="gloo-mesh", name="c1"))
            with pytest.raises(errors.StoreUnavailable, match="audit log: cannot record token"):
                await reg.create_token("c1")
            with pytest.raises(errors.StoreUnavailable, match="audit log: cannot record renew"):
                await w.relay.renew("c1", client_csr("c1"))
            # The refusal that follows could not be recorded either: logged, not raised.
            assert "audit log: cannot record renew (error" in caplog.text
        run(scenario, store=NoAuditStore(clock=FakeClock(START)))

    def test_file_sink_gets_each_record_as_a_json_line(self, tmp_path: Path) -> None:
        """With a file sink, each record is also one JSON line of the file."""
        async def go() -> None:
            clock = FakeClock(START)
            store = MemoryStore(clock=clock)
            path = tmp_path / "audit.jsonl"
            log = audit.AuditLog(store, clock, actor=audit.SERVER,
                                 sinks=[audit.JsonLinesFile(str(path))])
            one = await log.record(audit.Kind.REGISTER, cluster="c1")
            two = await log.record(audit.Kind.DEREGISTER, cluster="c1")
            lines = path.read_text().splitlines()
            assert [json.loads(line) for line in lines] == [one.document(), two.document()]
            assert path.stat().st_mode & 0o777 == 0o600
        asyncio.run(go())


class TestRetention:
    def test_prune_by_age_and_by_count(self) -> None:
        """Records past the age go, then all but the newest N; the newest stay."""
        async def go() -> None:
            clock = FakeClock(START)
            store = MemoryStore(clock=clock)
            log = audit.AuditLog(store, clock, actor=audit.SERVER)
            for day in range(10):
                await log.record(audit.Kind.REGISTER, cluster=f"c{day}")
                clock.advance(dt.timedelta(days=1))
            assert await log.prune(max_age=dt.timedelta(days=5), max_events=None) == 5
            kept = [r.cluster for r in (await audit.read(store)).records]
            assert kept == ["c5", "c6", "c7", "c8", "c9"]
            assert await log.prune(max_age=None, max_events=2) == 3
            assert [r.cluster for r in (await audit.read(store)).records] == ["c8", "c9"]
            assert await log.prune() == 0
        asyncio.run(go())


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main.main(list(argv), Output(stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


class TestAuditCommand:
    def test_reads_filters_and_formats(self, tmp_path: Path) -> None:
        """`meshtrust audit` prints records oldest first, filtered, as table, JSON, YAML, lines."""
        url = f"sqlite:///{tmp_path}/mgmt.db"

        async def fill() -> None:
            store = await open_store(url)
            try:
                reg = registry.Registry(store, FakeClock(START))
                await reg.register("c1")
                await reg.register("c2")
                log = audit.AuditLog(store, FakeClock(START - dt.timedelta(days=30)))
                await log.record(audit.Kind.POLICY, policy="old")
            finally:
                await store.close()
        asyncio.run(fill())
        code, out, _ = cli("audit", "--store", url, "-o", "json")
        assert code == 0
        assert [(d["event"], d["cluster"] or d["policy"]) for d in json.loads(out)] == [
            ("policy", "old"), ("register", "c1"), ("register", "c2")]
        code, out, _ = cli("audit", "--store", url, "-o", "jsonl", "--cluster", "c2")
        assert [json.loads(line)["cluster"] for line in out.splitlines()] == ["c2"]
        code, out, _ = cli("audit", "--store", url, "-o", "yaml", "--event", "policy")
        assert [d["policy"] for d in yaml.safe_load(out)] == ["old"]
        code, out, _ = cli("audit", "--store", url, "-o", "json", "--since",
                           "2026-11-01T00:00:00Z")
        assert [d["cluster"] for d in json.loads(out)] == ["c1", "c2"]
        code, out, _ = cli("audit", "--store", url, "--outcome", "ok")
        assert code == 0 and "register" in out and "operator" in out
        code, _, err = cli("audit", "--store", url, "--since", "yesterday")
        assert code == 1 and "--since: 'yesterday' is neither a duration" in err

    def test_since_takes_a_duration_or_a_time(self) -> None:
        """--since 2h is two hours before now; an RFC 3339 time is taken as it is."""
        assert audit_cmd.parse_since("2h", START) == START - dt.timedelta(hours=2)
        assert audit_cmd.parse_since("2026-01-02T03:04:05+01:00", START) == dt.datetime(
            2026, 1, 2, 2, 4, 5, tzinfo=dt.UTC)
