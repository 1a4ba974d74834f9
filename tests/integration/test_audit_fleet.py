"""The audit log over a real fleet: every action recorded, readable, and free of secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import istiofleet as isf
import relayfleet as rf
from meshtrust import settings
from meshtrust.authority import root_rotation
from meshtrust.pki import bundle

NAMES = settings.SecretNames()
NS = NAMES.relay_namespace


@pytest.fixture
def mesh(fleet: rf.Fleet) -> Iterator[isf.Mesh]:
    made = isf.Mesh(fleet)
    try:
        yield made
    finally:
        made.close()


async def stored_secrets(fleet: rf.Fleet, clusters: tuple[str, ...]) -> list[bytes]:
    """Every private key and token the stores hold: what must never be logged or recorded."""
    found: list[bytes] = []
    async with rf.opened(fleet.mgmt_url) as mgmt:
        for secret in await mgmt.list_secrets():
            found += [value for key, value in secret.data.items()
                      if key.endswith(("key.pem", "tls.key")) or key == "token"]
    for cluster in clusters:
        async with rf.opened(fleet.store_url(cluster)) as store:
            for secret in await store.list_secrets():
                found += [value for key, value in secret.data.items()
                          if key.endswith(("key.pem", "tls.key")) or key == "token"]
    return found


def fragments(secret: bytes) -> list[str]:
    """What would betray ``secret`` in a text: a PEM's body and each of its lines, or the token."""
    text = secret.decode().strip()
    if "-----BEGIN" not in text:
        return [text, text.rsplit(".", 1)[-1]]
    lines = [line for line in text.splitlines() if line and not line.startswith("-----")]
    return ["".join(lines), *(line for line in lines if len(line) >= 16)]


def by(records: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in fields.items())]


class TestAuditLog:
    def test_a_fleet_records_every_action_and_leaks_no_secret(
            self, mesh: isf.Mesh, fleet: rf.Fleet, tmp_path: Path,
            caplog: pytest.LogCaptureFixture) -> None:
        """Bootstrap (both ways), renewal, policy, Istio issuance, a rotation step and a
        deregistration appear in `meshtrust audit`; no token or private key appears in any log
        or in the audit output."""
        caplog.set_level(logging.DEBUG)
        audit_file = tmp_path / "audit.jsonl"
        server = fleet.start_server(heartbeat="1s", extra=[
            "--reconcile-interval", "1s", "--audit-log", str(audit_file)])
        mesh.add_cluster("cluster-1", pods=1)
        fleet.enroll("cluster-2", install=False)

        async def scenario() -> dict[str, Any]:
            # A refused bootstrap: cluster-1's fresh token offered for cluster-2.
            stolen = await fleet.token("cluster-1")
            with pytest.raises(grpc.aio.AioRpcError, match="identity token rejected"):
                await rf.bootstrap(server.bootstrap, await fleet.relay_root(), "cluster-2",
                                   stolen, rf.request_for(rf.new_key(), "cluster-2"))
            await asyncio.to_thread(fleet.wait_connected, "cluster-1")
            held = await fleet.aclient_identity("cluster-1")
            assert held is not None
            # A renewal over mTLS with the agent's certificate.
            async with rf.relay_channel(server.relay, rf.Credentials.of(held)) as channel:
                renewed = await rf.renew(channel, rf.request_for(rf.new_key(), "cluster-1"))
            # cluster-2 never runs an agent: deregistered, it does not hold the rotation up.
            code, out, err = await asyncio.to_thread(
                isf.cli, "cluster", "deregister", "cluster-2", "--store", fleet.mgmt_url)
            assert code == 0, err
            await mesh.aapply(isf.policy(auto_restart_pods=False))
            await mesh.wait_finished(["cluster-1"], timeout=20)
            before_rotation = await stored_secrets(fleet, ("cluster-1",))
            code, out, err = await asyncio.to_thread(
                isf.cli, "rotate", "root", "--policy", isf.POLICY, "--store", fleet.mgmt_url)
            assert code == 0, err
            await mesh.wait_step(root_rotation.Step.DONE, timeout=20)
            cacerts = await mesh.secret("cluster-1")
            assert cacerts is not None
            return {"stolen": stolen, "before rotation": before_rotation,
                    "bootstrap": bundle.load_certificate(held.chain),
                    "renew": bundle.load_certificate(bytes(renewed.certificate_chain)),
                    "intermediate": bundle.load_certificate(cacerts.data["ca-cert.pem"])}

        certificates = asyncio.run(scenario())
        stolen = certificates.pop("stolen")
        before_rotation = certificates.pop("before rotation")
        code, out, err = isf.cli("audit", "--store", fleet.mgmt_url, "-o", "json")
        assert code == 0, err
        records = json.loads(out)

        def cert_fields(name: str) -> dict[str, str]:
            cert = certificates[name]
            return {"serial": f"{cert.serial_number:x}",
                    "fingerprint": bundle.fingerprint(cert)}

        assert [r["time"] for r in records] == sorted(r["time"] for r in records)
        assert by(records, event="bootstrap", outcome="ok", actor="cluster-1",
                  cluster="cluster-1", profile="relay-client", **cert_fields("bootstrap"))
        [refusal] = by(records, event="bootstrap", outcome="refused")
        assert (refusal["actor"], refusal["cluster"], refusal["peer"]) == (
            "anonymous", "cluster-2", "127.0.0.1")
        assert refusal["message"] == "identity token rejected for cluster 'cluster-2'"
        assert by(records, event="renew", outcome="ok", actor="cluster-1",
                  profile="relay-client", **cert_fields("renew"))
        assert by(records, event="register", actor="operator", cluster="cluster-2")
        assert len(by(records, event="token", actor="operator", cluster="cluster-1")) == 2
        assert by(records, event="policy", outcome="ok", actor="operator", policy="mesh")
        assert by(records, event="issue", actor="server", profile="istio-root", policy="mesh")
        assert by(records, event="issue", actor="cluster-1", cluster="cluster-1",
                  profile="istio-intermediate", policy="mesh", **cert_fields("intermediate"))
        assert [r["profile"] for r in by(records, event="issue", actor="server")
                if r["profile"].startswith("relay")] == [
            "relay-root", "relay-signing", "relay-server"]
        assert by(records, event="rotation", actor="operator", step="ADDING_ROOT")
        assert [(r["step"], r["message"]) for r in by(records, event="rotation", actor="server")
                ] == [("REISSUING", "ADDING_ROOT confirmed by every cluster"),
                      ("DROPPING_OLD", "REISSUING confirmed by every cluster"),
                      ("DONE", "DROPPING_OLD confirmed by every cluster")]
        assert by(records, event="deregister", outcome="ok", actor="operator",
                  cluster="cluster-2")

        # The server's file holds exactly the records the server wrote, the same way.
        in_file = [json.loads(line) for line in audit_file.read_text().splitlines()]
        server_written = [r for r in records if r["actor"] != "operator"]
        assert sorted(in_file, key=lambda r: r["id"]) == sorted(server_written,
                                                                key=lambda r: r["id"])

        code, jsonl, _ = isf.cli("audit", "--store", fleet.mgmt_url, "-o", "jsonl",
                                 "--cluster", "cluster-1", "--event", "renew")
        assert [json.loads(line)["event"] for line in jsonl.splitlines()] == ["renew"]
        code, table, _ = isf.cli("audit", "--store", fleet.mgmt_url)

        texts = {**fleet.logs(), "this test's log": caplog.text, "audit -o json": out,
                 "audit -o jsonl": jsonl, "audit table": table,
                 "audit file": audit_file.read_text()}
        # Relay root, signing CA, server, client; the old and new Istio roots; cacerts.
        secrets = [*before_rotation, *asyncio.run(stored_secrets(fleet, ("cluster-1",)))]
        assert len({s for s in secrets if b"PRIVATE KEY" in s}) >= 7
        def leaks(texts: dict[str, str]) -> list[tuple[str, str]]:
            return [(name, fragment[:12])
                    for secret in [*secrets, *map(str.encode, fleet.tokens)]
                    for fragment in fragments(secret) for name, text in texts.items()
                    if fragment in text]
        # The scan finds a key or a token where there is one (a wrapped line will do)...
        control = {"control": "x " + secrets[0].decode().replace("\n", "\n  ") + " " + stolen}
        assert len(leaks(control)) > 2
        # ... and finds none in any log or in the audit output.
        assert leaks(texts) == []
        assert not any(re.search(r"mt1\.[0-9a-f]{8}\.", text) for text in texts.values())
