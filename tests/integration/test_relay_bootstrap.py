"""Bootstrap over the real relay: tokens, CSRs and roots, against a server process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509

import openssl_cli
import relayfleet as rf
from meshtrust.authority import registry
from meshtrust.cli import main
from meshtrust.cli.output import Output
from meshtrust.pki import bundle, csr, identity, keys
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages

DENIED = grpc.StatusCode.PERMISSION_DENIED


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main.main(list(argv), Output(stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


def _logged_at(line: str) -> dt.datetime:
    """When a log line was written (the logging format's asctime)."""
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def refused(code: grpc.StatusCode, match: str) -> Any:
    """``pytest.raises`` for a call ended with ``code`` and details matching ``match``."""
    return pytest.raises(grpc.aio.AioRpcError, match=rf"(?s)StatusCode\.{code.name}.*{match}")


class TestBootstrap:
    def test_agent_bootstraps_with_its_token_and_connects_over_mtls(
            self, fleet: rf.Fleet, tmp_path: Path) -> None:
        """An agent with only a token bootstraps, openssl verifies its certificate, it uses mTLS."""
        fleet.start_server()
        fleet.enroll("cluster-1")
        agent = fleet.start_agent("cluster-1")

        status = fleet.wait_connected("cluster-1")

        held = fleet.client_identity("cluster-1")
        assert held is not None and held.managed
        leaf, *intermediates = bundle.load_certificates(held.chain)
        root = bundle.load_certificate(asyncio.run(fleet.relay_root()))
        result = openssl_cli.verify(tmp_path, leaf, root, tuple(intermediates),
                                    purpose="sslclient")
        assert result.stdout.strip().endswith("cert.pem: OK")
        assert identity.subject_alt_names(leaf) == [x509.DNSName("cluster-1")]
        assert bundle.load_certificate(held.trust) == root
        assert status["clientCertificate"]["serial"] == held.serial
        reported = rf.poll(lambda: (fleet.cluster_status("cluster-1") or {}).get("agent"),
                           timeout=5, what="the agent's first status report")
        assert reported["replica"] == "cluster-1-a" and reported["leader"] is True
        agent.wait_for_log(r"connected to 127\.0\.0\.1:\d+ over mTLS", timeout=5)

    def test_first_bootstrap_waits_a_random_part_of_the_spread(self, fleet: rf.Fleet) -> None:
        """With --bootstrap-spread the agent says how long it waits, and calls only then."""
        fleet.start_server()
        fleet.enroll("cluster-1")
        agent = fleet.start_agent("cluster-1", extra=["--bootstrap-spread", "3"])

        fleet.wait_connected("cluster-1")

        (said,) = agent.wait_for_log(r"bootstrapping in \d+\.\d s", timeout=5)
        (called,) = agent.wait_for_log(r"bootstrapping cluster cluster-1 at", timeout=5)
        wait = float(re.search(r"bootstrapping in (\d+\.\d) s", said).group(1))  # type: ignore[union-attr]
        assert 0 <= wait <= 3
        waited = (_logged_at(called) - _logged_at(said)).total_seconds()
        assert waited >= wait - 0.1, f"bootstrapped {waited:.2f} s after saying {wait} s"


class TestBootstrapTokens:
    def test_wrong_tokens_are_refused_naming_the_cluster(self, fleet: rf.Fleet) -> None:
        """Tokens not cluster-1's own are PERMISSION_DENIED naming it; its own one still works."""
        server = fleet.start_server()
        ours = fleet.enroll("cluster-1", install=False)
        theirs = fleet.enroll("cluster-2", install=False)
        _, token_id, secret = ours.token.split(".")
        forged = f"{registry.TOKEN_PREFIX}.{token_id}.{secret[::-1]}"

        async def scenario() -> None:
            request = rf.request_for(rf.new_key(), "cluster-1")
            for token in (theirs.token, forged, "not-a-token"):
                with refused(DENIED, "identity token rejected for cluster 'cluster-1'"):
                    await rf.bootstrap(server.bootstrap, ours.ca_cert, "cluster-1", token,
                                       request)
            issued = await rf.bootstrap(server.bootstrap, ours.ca_cert, "cluster-1", ours.token,
                                        request)
            assert issued.serial

        asyncio.run(scenario())

    def test_expired_token_is_refused_saying_it_expired(self, fleet: rf.Fleet) -> None:
        """A token with a 1 s TTL is refused once the second has passed, saying it expired."""
        server = fleet.start_server()
        enrolled = fleet.enroll("cluster-1", install=False)
        code, out, err = cli("cluster", "token", "cluster-1", "--store", fleet.mgmt_url,
                             "--token-ttl", "1s", "-o", "json")
        assert code == 0, err
        token = json.loads(out)["token"]
        fleet.tokens.add(token)
        time.sleep(1.1)

        async def scenario() -> None:
            with refused(DENIED, r"identity token for cluster 'cluster-1' expired; mint a new "
                                 r"one with `meshtrust cluster token cluster-1`"):
                await rf.bootstrap(server.bootstrap, enrolled.ca_cert, "cluster-1", token,
                                   rf.request_for(rf.new_key(), "cluster-1"))

        asyncio.run(scenario())

    def test_used_token_is_refused_for_another_key_and_accepted_for_the_same_key(
            self, fleet: rf.Fleet) -> None:
        """A used token is refused for a new key and accepted again for the key it was used with."""
        server = fleet.start_server()
        enrolled = fleet.enroll("cluster-1", install=False)
        first_key, other_key = rf.new_key(), rf.new_key()

        async def scenario() -> None:
            first = await rf.bootstrap(server.bootstrap, enrolled.ca_cert, "cluster-1",
                                       enrolled.token, rf.request_for(first_key, "cluster-1"))
            with refused(DENIED, "identity token for cluster 'cluster-1' was already used"):
                await rf.bootstrap(server.bootstrap, enrolled.ca_cert, "cluster-1",
                                   enrolled.token, rf.request_for(other_key, "cluster-1"))
            again = await rf.bootstrap(server.bootstrap, enrolled.ca_cert, "cluster-1",
                                       enrolled.token, rf.request_for(first_key, "cluster-1"))
            for response in (first, again):
                cert = bundle.load_certificate(bytes(response.certificate_chain))
                assert keys.key_matches(cert, first_key)

        asyncio.run(scenario())

    def test_one_token_raced_by_100_bootstraps_yields_exactly_one_certificate(
            self, fleet: rf.Fleet) -> None:
        """100 concurrent bootstraps with one token and 100 keys yield exactly one certificate."""
        server = fleet.start_server()
        enrolled = fleet.enroll("cluster-1", install=False)
        candidates = [rf.new_key() for _ in range(100)]

        async def scenario() -> list[object]:
            async with rf.relay_channel(server.bootstrap, trust=enrolled.ca_cert) as channel:
                stub = transport.bootstrap_stub(channel)
                calls = [stub.Bootstrap(messages.BootstrapRequest(
                    protocol_version=1, cluster="cluster-1", token=enrolled.token,
                    csr=rf.request_for(key, "cluster-1")), timeout=30) for key in candidates]
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(scenario())

        winners = [r for r in results if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) == 1, f"{len(winners)} bootstraps got a certificate"
        assert {rf.status_code(r) for r in losers} <= {
            DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}, losers[:3]
        assert any("was already used" in str(r) for r in losers)
        winner: Any = winners[0]
        cert = bundle.load_certificate(bytes(winner.certificate_chain))
        assert sum(keys.key_matches(cert, key) for key in candidates) == 1
        status = fleet.cluster_status("cluster-1")
        assert status is not None
        assert status["clientCertificate"]["serial"] == f"{cert.serial_number:x}"

    def test_repeated_refusals_from_one_peer_are_rate_limited(self, fleet: rf.Fleet) -> None:
        """After 5 refusals from one address even the right token gets RESOURCE_EXHAUSTED."""
        server = fleet.start_server()
        enrolled = fleet.enroll("cluster-1", install=False)
        request = rf.request_for(rf.new_key(), "cluster-1")

        async def scenario() -> None:
            for _ in range(5):
                with refused(DENIED, "identity token rejected"):
                    await rf.bootstrap(server.bootstrap, enrolled.ca_cert, "cluster-1", "guess",
                                       request)
            for token in ("guess", enrolled.token):
                with refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             "too many refused bootstrap attempts from 127.0.0.1") as info:
                    await rf.bootstrap(server.bootstrap, enrolled.ca_cert, "cluster-1", token,
                                       request)
                retry_after = dict(info.value.trailing_metadata() or ())["retry-after"]
                assert 0 < float(retry_after) <= 60

        asyncio.run(scenario())
        status = fleet.cluster_status("cluster-1")
        assert status is not None and "clientCertificate" not in status


class TestCertificateRequests:
    def test_bootstrap_csr_for_another_cluster_is_invalid_argument(self, fleet: rf.Fleet) -> None:
        """Bootstrapping cluster-1 with a CSR naming cluster-2 is INVALID_ARGUMENT naming both."""
        server = fleet.start_server()
        enrolled = fleet.enroll("cluster-1", install=False)
        fleet.enroll("cluster-2", install=False)

        async def scenario() -> None:
            with refused(grpc.StatusCode.INVALID_ARGUMENT,
                         "the CSR's common name 'cluster-2' is not the cluster name 'cluster-1'"):
                await rf.bootstrap(server.bootstrap, enrolled.ca_cert, "cluster-1",
                                   enrolled.token, rf.request_for(rf.new_key(), "cluster-2"))

        asyncio.run(scenario())

    def test_bootstrap_for_an_impossible_cluster_name_is_refused_clearly(
            self, fleet: rf.Fleet) -> None:
        """A bootstrap naming an impossible cluster (upper case, dots) is refused saying why."""
        server = fleet.start_server()
        enrolled = fleet.enroll("cluster-1", install=False)

        async def scenario() -> None:
            for name in ("Cluster-1", "cluster-1.example"):
                with refused(grpc.StatusCode.FAILED_PRECONDITION,
                             f"cluster name '{name}' is invalid; use lower-case letters"):
                    await rf.bootstrap(server.bootstrap, enrolled.ca_cert, name,
                                       enrolled.token, rf.request_for(rf.new_key(), "cluster-1"))

        asyncio.run(scenario())
        assert not server.process.lines("Traceback|Unexpected")

    def test_renewal_csr_for_another_cluster_is_invalid_argument(self, fleet: rf.Fleet) -> None:
        """Renewal CSRs naming cluster-2 or asking for CA:true are INVALID_ARGUMENT over mTLS."""
        server = fleet.start_server()
        fleet.enroll("cluster-1", install=False)
        fleet.enroll("cluster-2", install=False)

        async def scenario() -> None:
            creds = await rf.bootstrap_credentials(fleet, "cluster-1")
            key = rf.new_key()
            san_only = csr.dump_csr(csr.build_csr(key, names=["cluster-2"]))
            as_ca = csr.dump_csr(csr.build_csr(key, common_name="cluster-1",
                                               names=["cluster-1"], ca=True))
            async with rf.relay_channel(server.relay, creds) as channel:
                with refused(grpc.StatusCode.INVALID_ARGUMENT,
                             "the CSR's common name 'cluster-2' is not the cluster name"):
                    await rf.renew(channel, rf.request_for(key, "cluster-2"))
                with refused(grpc.StatusCode.INVALID_ARGUMENT,
                             "the CSR names DNS:cluster-2, but this cluster is registered as "
                             "'cluster-1'"):
                    await rf.renew(channel, san_only)
                with refused(grpc.StatusCode.INVALID_ARGUMENT, "the CSR asks for CA:true"):
                    await rf.renew(channel, as_ca)
                renewed = await rf.renew(channel, rf.request_for(key, "cluster-1"))
            cert = bundle.load_certificate(bytes(renewed.certificate_chain))
            assert identity.subject_alt_names(cert) == [x509.DNSName("cluster-1")]

        asyncio.run(scenario())


class TestForeignRoots:
    def test_client_certificate_from_another_root_fails_the_handshake(
            self, fleet: rf.Fleet) -> None:
        """A client certificate from another root is refused at the handshake (UNAVAILABLE)."""
        server = fleet.start_server()
        fleet.enroll("cluster-1", install=False)
        foreign = rf.secret_data(rf.foreign_hierarchy(), "cluster-1", rf.NAMES.relay_client)

        async def scenario() -> None:
            ours = await rf.bootstrap_credentials(fleet, "cluster-1")
            theirs = rf.Credentials(chain=foreign["tls.crt"], key=foreign["tls.key"],
                                    trust=ours.trust)
            async with rf.relay_channel(server.relay, ours) as channel:
                await rf.report(channel)
            async with rf.relay_channel(server.relay, theirs) as channel:
                with refused(grpc.StatusCode.UNAVAILABLE, ""):
                    await rf.report(channel)

        asyncio.run(scenario())
        assert not server.process.lines("relay call refused"), "refused after the handshake"

    def test_agent_trusting_a_foreign_root_logs_which_ca_it_expected(
            self, fleet: rf.Fleet) -> None:
        """An agent with a foreign relay root logs the CA it expects the server to chain to."""
        fleet.start_server()
        fleet.enroll("cluster-1")
        made = rf.foreign_hierarchy()
        foreign_root = made.relay_root.certificate
        asyncio.run(rf.put_secret(fleet.store_url("cluster-1"), rf.NAMES.relay_root,
                                  {"ca.crt": bundle.dump_certificate(foreign_root)},
                                  type="Opaque"))
        agent = fleet.start_agent("cluster-1")

        line, = agent.wait_for_log("expects the server to chain to", timeout=10)[:1]

        assert foreign_root.subject.rfc4514_string() in line
        assert bundle.fingerprint(foreign_root)[:23] in line
        assert fleet.client_identity("cluster-1") is None

    def test_agent_whose_certificate_trusts_a_foreign_root_logs_which_ca_it_expected(
            self, fleet: rf.Fleet) -> None:
        """An agent whose certificate's ca.crt is foreign logs the CA it expected on connect."""
        fleet.start_server()
        fleet.enroll("cluster-1", install=False)
        foreign_root = rf.foreign_hierarchy().relay_root.certificate

        async def provision() -> None:
            data = rf.client_certificate(await fleet.signing_ca(), "cluster-1",
                                         dt.timedelta(hours=1))
            data["ca.crt"] = bundle.dump_certificate(foreign_root)
            await rf.put_secret(fleet.store_url("cluster-1"), rf.NAMES.relay_client, data)

        asyncio.run(provision())
        agent = fleet.start_agent("cluster-1")

        line, = agent.wait_for_log("expects the server to chain to", timeout=10)[:1]

        assert "TLS handshake with" in line
        assert f"{foreign_root.subject.rfc4514_string()} (SHA-256 " in line
        status = fleet.cluster_status("cluster-1")
        assert status is not None and not status.get("connected")


class TestTokenSecrecy:
    def test_tokens_never_appear_in_logs(self, fleet: rf.Fleet) -> None:
        """No token, used, refused, expired or shared, appears in any log, even at debug level."""
        server = fleet.start_server(extra=["--log-level", "debug"])
        first = fleet.enroll("cluster-1")
        other = fleet.enroll("cluster-2", install=False)
        shared = fleet.enroll("cluster-3", shared_token=True, install=False)
        expired = asyncio.run(fleet.token("cluster-2", dt.timedelta(seconds=1)))
        expires = time.monotonic() + 1.0
        agent = fleet.start_agent("cluster-1", extra=["--log-level", "debug"])
        fleet.wait_connected("cluster-1")
        time.sleep(max(0.0, expires - time.monotonic()))

        async def refusals() -> None:
            request = rf.request_for(rf.new_key(), "cluster-2")
            for token, why in ((other.token + "x", "rejected"), (expired, "expired"),
                               (shared.token + "x", "rejected")):
                with refused(DENIED, why):
                    await rf.bootstrap(server.bootstrap, other.ca_cert, "cluster-2", token,
                                       request)

        asyncio.run(refusals())
        assert fleet.tokens == {other.token, shared.token, expired,
                                first.token}
        server.process.wait_for_log("bootstrap refused", timeout=5, count=3)
        agent.wait_for_log("DEBUG", timeout=5)
        for name, text in fleet.logs().items():
            for token in fleet.tokens:
                secret = token.rsplit(".", 1)[-1]
                assert secret not in text, f"a token is in {name}'s log"
                digest = hashlib.sha256(secret.encode()).hexdigest()
                assert digest not in text, f"a token's hash is in {name}'s log"
