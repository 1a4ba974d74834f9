"""Federated Istio trust over a real relay: the server, agents and simulated pods as processes."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import istiofleet as isf
import openssl_cli
import relayfleet as rf
from meshtrust.agent import bounce
from meshtrust.agent import istio as agent_istio
from meshtrust.pki import bundle, keys, rotation
from meshtrust.store import base

CLUSTERS = ("cluster-1", "cluster-2", "cluster-3")


@pytest.fixture
def mesh(fleet: rf.Fleet) -> Iterator[isf.Mesh]:
    made = isf.Mesh(fleet)
    try:
        yield made
    finally:
        made.close()


class TestIssuance:
    def test_every_cluster_gets_a_verifying_intermediate_and_bounces_pods_in_order(
            self, mesh: isf.Mesh, tmp_path: Path) -> None:
        """Three clusters reach FINISHED with verifying intermediates; pods bounce in order."""
        mesh.start_server()
        for cluster in CLUSTERS:
            mesh.add_cluster(cluster)
        mesh.apply(isf.policy())

        async def scenario() -> None:
            items = await mesh.wait_finished(CLUSTERS, timeout=40)
            for cluster in CLUSTERS:
                cacerts = await mesh.secret(cluster)
                assert cacerts is not None
                folder = isf.write_cacerts(tmp_path / cluster, cacerts.data)
                openssl_cli.run("verify", "-CAfile", folder / "root-cert.pem",
                                folder / "cert-chain.pem")
                openssl_cli.run("verify", "-CAfile", folder / "root-cert.pem",
                                folder / "ca-cert.pem")
                key_pub = openssl_cli.run("pkey", "-in", folder / "ca-key.pem", "-pubout").stdout
                cert_pub = openssl_cli.run("x509", "-in", folder / "ca-cert.pem", "-noout",
                                           "-pubkey").stdout
                assert key_pub == cert_pub
                cert = x509.load_pem_x509_certificate(cacerts.data["ca-cert.pem"])
                subject = {a.oid: a.value for a in cert.subject}
                assert subject == {NameOID.ORGANIZATION_NAME: "Istio",
                                   NameOID.COMMON_NAME: "Intermediate CA",
                                   NameOID.LOCALITY_NAME: cluster}
                assert items[cluster].status["serial"] == f"{cert.serial_number:x}"

                bounced = items[cluster].status["bouncedPods"]
                pods = await mesh.pods(cluster)
                assert sorted(bounced) == sorted(pods), "every mesh pod restarts once"
                order = isf.roles(bounced, pods)
                assert order == sorted(order, key=bounce.ORDER.index), order
                assert order[0] is bounce.Role.ISTIOD
                # The root-cert sync each step waited for: istiod published the new root.
                for namespace in {key.split("/")[0] for key in bounced}:
                    synced = await mesh.root_cert_configmap(cluster, namespace)
                    assert synced == cacerts.data["root-cert.pem"], (cluster, namespace)
                istiod = pods[bounced[0]].status
                # Gateways and workloads restart only after the new istiod is up.
                up = _when(istiod["startedAt"])
                assert up > _when(istiod["restartedAt"])
                for key in bounced[1:]:
                    assert _when(pods[key].status["restartedAt"]) >= up, key

        asyncio.run(scenario())
        code, out, err = isf.cli("trust", "status", "--store", mesh.fleet.mgmt_url, "-o", "yaml")
        assert code == 0, err
        status = {i["cluster"]: i for i in yaml.safe_load(out)}
        assert {c: status[c]["state"] for c in CLUSTERS} == dict.fromkeys(CLUSTERS, "FINISHED")


def _when(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp)


def _key_material(key_pem: bytes) -> dict[str, bytes]:
    """Every form in which a private key could cross the wire, by name."""
    key = keys.load_private_key(key_pem)
    assert isinstance(key, ec.EllipticCurvePrivateKey), "the suite uses ECDSA keys"
    der = base64.b64decode(b"".join(line for line in key_pem.splitlines()
                                    if not line.startswith(b"-----")))
    forms = {"PEM": key_pem, "DER": der, "base64 of the DER": base64.b64encode(der),
             "private scalar": key.private_numbers().private_value.to_bytes(32, "big")}
    for index, line in enumerate(key_pem.splitlines()):
        if not line.startswith(b"-----") and len(line) >= 32:
            forms[f"PEM line {index}"] = line
    return forms


class TestRelayCarriesNoPrivateKey:
    def test_the_relay_stream_holds_csrs_and_certificates_but_no_ca_key(
            self, mesh: isf.Mesh) -> None:
        """Every byte between agent and server, recorded by a proxy, lacks the cluster's CA key."""
        mesh.start_server(insecure=True)
        mesh.add_cluster("cluster-1", simulate=False)
        proxy = mesh.proxies["cluster-1"]
        mesh.apply(isf.policy())

        async def scenario() -> None:
            await mesh.wait_finished(["cluster-1"])
            cacerts = await mesh.secret("cluster-1")
            assert cacerts is not None
            to_server, to_client = proxy.captured()
            # The recording saw the exchange: the CSR going up, the certificate coming down.
            assert b"-----BEGIN CERTIFICATE REQUEST-----" in to_server
            cert_line = cacerts.data["ca-cert.pem"].splitlines()[3]
            assert cert_line in to_client
            for name, value in _key_material(cacerts.data["ca-key.pem"]).items():
                assert value not in to_server, f"the CA key's {name} went to the server"
                assert value not in to_client, f"the CA key's {name} came from the server"
            for stream in (to_server, to_client):
                assert b"PRIVATE KEY" not in stream

        asyncio.run(scenario())


class TestRetryAfterServerCrash:
    def test_a_retry_after_the_server_died_mid_issuance_reuses_the_stored_key(
            self, mesh: isf.Mesh) -> None:
        """The server is killed while the CSR is in flight; the retry signs the same key."""
        server = mesh.start_server(insecure=True)
        mesh.add_cluster("cluster-1", simulate=False)
        proxy = mesh.proxies["cluster-1"]
        mesh.fleet.wait_connected("cluster-1")
        # The proxy swallows the first CSR: the server sent the work, the agent stored its key.
        proxy.hold(b"BEGIN CERTIFICATE REQUEST")
        mesh.apply(isf.policy())

        async def scenario() -> None:
            await rf.apoll(lambda: asyncio.to_thread(proxy.held.is_set), timeout=20,
                           what="the first CSR to reach the proxy")
            pending = await mesh.wait_secret("cluster-1", isf.PENDING)
            item = await mesh.issued("cluster-1")
            assert item is not None and item.status["state"] == "REQUESTED"
            mesh.kill_server()
            assert not server.process.lines("signed the Istio intermediate")
            assert (await mesh.secret("cluster-1")) is None, "nothing was signed"

            await asyncio.to_thread(mesh.start_server, insecure=True, same_ports=True)
            done = await mesh.wait_finished(["cluster-1"])
            cacerts = await mesh.secret("cluster-1")
            assert cacerts is not None
            assert done["cluster-1"].status["round"] == 1, "the same work item was retried"
            assert (isf.public_der(cacerts.data["ca-cert.pem"])
                    == isf.public_der(cacerts.data["ca-key.pem"])
                    == isf.public_der(pending.data["ca-key.pem"]))
            assert done["cluster-1"].status["keySha256"] == hashlib.sha256(
                isf.public_der(pending.data["ca-key.pem"])).hexdigest()
            assert cacerts.annotations[agent_istio.WORK_ANNOTATION] == \
                pending.annotations[agent_istio.WORK_ANNOTATION]
            assert (await mesh.secret("cluster-1", isf.PENDING)) is None

        asyncio.run(scenario())


class TestSpecChange:
    def test_a_changed_policy_issues_a_new_intermediate_in_a_new_round(
            self, mesh: isf.Mesh) -> None:
        """A new intermediate ttl sends the cluster through another round with a new serial."""
        mesh.start_server()
        mesh.add_cluster("cluster-1", simulate=False)
        mesh.apply(isf.policy(ttl="600s"))

        async def scenario() -> None:
            first = (await mesh.wait_finished(["cluster-1"]))["cluster-1"]
            before = await mesh.secret("cluster-1")
            assert before is not None
            await mesh.aapply(isf.policy(ttl="900s"))
            second = (await mesh.wait_finished(
                ["cluster-1"], after_round=first.status["round"]))["cluster-1"]
            after = await mesh.wait_secret(
                "cluster-1", isf.CACERTS,
                check=lambda s: s.resource_version != before.resource_version)
            old = bundle.load_certificate(before.data["ca-cert.pem"])
            new = bundle.load_certificate(after.data["ca-cert.pem"])
            assert second.status["round"] > first.status["round"]
            assert second.status["serial"] == f"{new.serial_number:x}" != first.status["serial"]
            assert new.serial_number != old.serial_number
            # The lifetime asked for, plus NotBefore backdated by a twentieth of it.
            assert old.not_valid_after_utc - old.not_valid_before_utc == dt.timedelta(
                seconds=600 * 21 / 20)
            assert new.not_valid_after_utc - new.not_valid_before_utc == dt.timedelta(
                seconds=900 * 21 / 20)
            assert isf.public_der(after.data["ca-key.pem"]) != isf.public_der(
                before.data["ca-key.pem"]), "a new round makes a new key"

        asyncio.run(scenario())


class TestForeignCacerts:
    def test_a_cacerts_meshtrust_did_not_write_is_left_alone_and_reported(
            self, mesh: isf.Mesh) -> None:
        """An unlabelled cacerts fails its cluster's issuance with a message and stays as it was."""
        mesh.start_server()
        mesh.add_cluster("cluster-1", simulate=False)
        mesh.add_cluster("cluster-2", simulate=False)
        theirs = base.Secret(namespace=isf.ISTIO_NS, name=isf.CACERTS, data={
            "ca-cert.pem": b"theirs", "ca-key.pem": b"their key", "root-cert.pem": b"root",
            "cert-chain.pem": b"chain"}, labels={"owner": "platform-team"})

        async def scenario() -> None:
            async with rf.opened(mesh.fleet.store_url("cluster-1")) as store:
                made = await store.create(theirs)
            await mesh.aapply(isf.policy())
            await mesh.wait_finished(["cluster-2"])

            async def failed() -> base.Resource | None:
                item = await mesh.issued("cluster-1")
                return item if item is not None and item.status.get("state") == "FAILED" \
                    else None
            item = await rf.apoll(failed, timeout=20, what="cluster-1 to fail")
            assert "left alone" in item.status["message"]
            assert "istio-system/cacerts" in item.status["message"]
            now = await mesh.secret("cluster-1")
            assert now is not None
            assert (now.resource_version, dict(now.data), dict(now.labels)) == (
                made.resource_version, dict(made.data), dict(made.labels))
            assert (await mesh.secret("cluster-1", isf.PENDING)) is None, "no key was made"

        asyncio.run(scenario())


async def _pod_states(mesh: isf.Mesh, cluster: str) -> dict[str, dict[str, object]]:
    return {key: dict(pod.status) for key, pod in (await mesh.pods(cluster)).items()}


class TestBounceDryRun:
    def test_a_dry_run_agent_writes_cacerts_and_restarts_no_pod(self, mesh: isf.Mesh) -> None:
        """With --bounce-dry-run the new cacerts is written and every pod runs on untouched."""
        mesh.start_server()
        mesh.add_cluster("cluster-1", extra=["--bounce-dry-run"])

        async def scenario() -> None:
            before = await _pod_states(mesh, "cluster-1")
            assert len(before) == 7
            await mesh.aapply(isf.policy(auto_restart_pods=True))
            item = (await mesh.wait_finished(["cluster-1"]))["cluster-1"]
            assert await mesh.secret("cluster-1") is not None
            after = await _pod_states(mesh, "cluster-1")
            assert after == before
            assert all("restartedAt" not in status for status in after.values())
            # The status tells the truth: nothing was restarted, and a restart is still due.
            assert item.status["bouncedPods"] == []
            assert item.status["restartNeeded"] is True
            agent = mesh.agents["cluster-1"]
            assert len(agent.lines(r"pod restart: .*: planned ")) == len(before)

        asyncio.run(scenario())


class TestNoAutoRestart:
    def test_without_auto_restart_the_status_asks_for_a_restart_and_no_pod_restarts(
            self, mesh: isf.Mesh) -> None:
        """autoRestartPods false: cacerts is written, restartNeeded is true, pods untouched."""
        mesh.start_server()
        mesh.add_cluster("cluster-1")

        async def scenario() -> None:
            before = await _pod_states(mesh, "cluster-1")
            await mesh.aapply(isf.policy(auto_restart_pods=False))
            item = (await mesh.wait_finished(["cluster-1"]))["cluster-1"]
            assert item.status["restartNeeded"] is True
            assert item.status["bouncedPods"] == []
            assert "autoRestartPods" in item.status["message"]
            assert await mesh.secret("cluster-1") is not None
            assert await _pod_states(mesh, "cluster-1") == before

        asyncio.run(scenario())


class TestIntermediateRotation:
    def test_short_lived_intermediates_are_renewed_round_after_round(
            self, mesh: isf.Mesh, tmp_path: Path) -> None:
        """An 8 s intermediate with ratio 0.5 is renewed at least twice, each one verifying."""
        mesh.start_server()
        mesh.add_cluster("cluster-1", simulate=False)
        mesh.apply(isf.policy(ttl="8s", ratio=0.5))

        async def scenario() -> None:
            seen: dict[int, x509.Certificate] = {}
            rounds: set[int] = set()

            async def three() -> bool:
                cacerts = await mesh.secret("cluster-1")
                if cacerts is not None:
                    cert = bundle.load_certificate(cacerts.data["ca-cert.pem"])
                    if cert.serial_number not in seen:
                        folder = isf.write_cacerts(tmp_path / f"{len(seen)}", cacerts.data)
                        openssl_cli.run("verify", "-CAfile", folder / "root-cert.pem",
                                        folder / "cert-chain.pem")
                        assert keys.key_matches(
                            cert, keys.load_private_key(cacerts.data["ca-key.pem"]))
                        seen[cert.serial_number] = cert
                        item = await mesh.issued("cluster-1")
                        assert item is not None
                        rounds.add(int(item.status["round"]))
                return len(seen) >= 3

            await rf.apoll(three, timeout=30, interval=0.2, what="three intermediates")
            certs = sorted(seen.values(), key=lambda c: c.not_valid_before_utc)
            for older, newer in zip(certs, certs[1:], strict=False):
                # Renewed before expiry, and not before the grace window opened (NotBefore
                # is backdated a little and cut to whole seconds: allow two).
                assert newer.not_valid_before_utc < older.not_valid_after_utc
                assert newer.not_valid_before_utc >= rotation.renew_at(
                    older, 0.5) - dt.timedelta(seconds=2)
                assert newer.not_valid_after_utc > older.not_valid_after_utc
                assert keys.public_key_der(newer.public_key()) != keys.public_key_der(
                    older.public_key()), "each round makes a new key"
            assert len(rounds) >= 3, rounds

        asyncio.run(scenario())


class TestAgentCrash:
    def test_an_agent_killed_mid_bounce_finishes_the_work_after_restart(
            self, mesh: isf.Mesh) -> None:
        """SIGKILL the agent while it restarts pods: its successor finishes, with the same key."""
        mesh.start_server()
        agent = mesh.add_cluster("cluster-1")
        mesh.apply(isf.policy())

        async def scenario() -> None:
            written = await mesh.wait_secret("cluster-1", isf.CACERTS)
            await asyncio.to_thread(agent.wait_for_log, r"pod restart: istiod: restarted",
                                    timeout=20)
            item = await mesh.issued("cluster-1")
            assert item is not None and item.status["state"] == "ISSUED"
            again = await asyncio.to_thread(mesh.restart_agent, "cluster-1")
            done = (await mesh.wait_finished(["cluster-1"], timeout=30))["cluster-1"]
            assert done.status["round"] == 1
            assert sorted(done.status["bouncedPods"]) == sorted(await mesh.pods("cluster-1"))
            cacerts = await mesh.secret("cluster-1")
            assert cacerts is not None
            assert isf.public_der(cacerts.data["ca-key.pem"]) == isf.public_der(
                written.data["ca-key.pem"]), "the work item kept its key"
            assert again.lines(r"pod restart: istiod: restarted")

        asyncio.run(scenario())


class TestLostOutcome:
    def test_an_outcome_lost_while_the_server_was_down_is_completed_after_restart(
            self, mesh: isf.Mesh) -> None:
        """cacerts written but the server dead when the agent reports: it still ends FINISHED."""
        server = mesh.start_server(insecure=True)
        mesh.add_cluster("cluster-1", simulate=False)
        proxy = mesh.proxies["cluster-1"]
        mesh.fleet.wait_connected("cluster-1")
        # The proxy swallows the agent's report that the work item is finished.
        proxy.hold(rb"finished")
        mesh.apply(isf.policy())

        async def scenario() -> None:
            written = await mesh.wait_secret("cluster-1", isf.CACERTS)
            await rf.apoll(lambda: asyncio.to_thread(proxy.held.is_set), timeout=20,
                           what="the agent's report to reach the proxy")
            item = await mesh.issued("cluster-1")
            assert item is not None and item.status["state"] == "ISSUED"
            mesh.kill_server()
            agent = mesh.agents["cluster-1"]
            await asyncio.to_thread(agent.wait_for_log, r"work item \S+ failed", timeout=20)
            await asyncio.to_thread(mesh.start_server, insecure=True, same_ports=True)

            done = (await mesh.wait_finished(["cluster-1"], timeout=15))["cluster-1"]
            assert done.status["round"] == 1
            cacerts = await mesh.secret("cluster-1")
            assert cacerts is not None
            assert isf.public_der(cacerts.data["ca-key.pem"]) == isf.public_der(
                written.data["ca-key.pem"]), "the work item kept its key"
            assert not server.process.alive

        asyncio.run(scenario())
