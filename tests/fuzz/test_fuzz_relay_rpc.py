"""Fuzzing the relay's servicers with every message an agent (or anyone) can send.

Each example is wire bytes: a message with random field values, the same
damaged byte by byte, or random bytes. What the protobuf decoder takes is
handed to the servicer as gRPC would, with a context that presents a client
certificate (of a registered, another or a deregistered cluster), none, or
the insecure mode's header. The properties: the servicer answers or aborts
the call with a status code and a message, and never raises anything else;
a certificate it returns is exactly what its profile allows, for the caller's
own cluster and key; and nothing is issued to a caller that was not entitled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError
from hypothesis import given

import fuzzkit
import fuzzworld
from servicercontext import Aborted, Context, Metadatum
from meshtrust import metrics
from meshtrust.authority import signers
from meshtrust.pki import bundle, csr
from meshtrust.rpc.transport import messages
from meshtrust.server import authn, service

PEERS = ("c1", "c2", fuzzworld.GONE, None, "insecure")


@dataclasses.dataclass
class Call:
    """One example: the world, the servicers and the caller."""

    world: fuzzworld.World
    relay: service.RelayService
    bootstrap: service.BootstrapService
    context: Context
    cluster: str | None  # whom the context authenticates, if anyone


@dataclasses.dataclass
class Harness:
    """Runs one example: a fresh copy of the server's state, the servicers, the call."""

    made: fuzzworld.Template
    runner: fuzzkit.Loop
    cache: signers.Signers = dataclasses.field(default_factory=signers.Signers)
    meters: metrics.Metrics = dataclasses.field(default_factory=metrics.Metrics)

    async def call(self, peer: str | None, header: str = "") -> Call:
        world = await fuzzworld.World.fresh(self.made, self.cache)
        insecure = peer == "insecure"
        if insecure:
            context = Context(metadata=[Metadatum(service.INSECURE_CLUSTER_HEADER, header)])
        else:
            context = Context(certificate=self.made.peers[peer] if peer else None)
        relay = service.RelayService(world.relay, world.clock, self.meters, insecure=insecure,
                                     heartbeat=0.01, istio_ca=world.istio)
        boot = service.BootstrapService(world.relay, authn.FailureLimiter(), self.meters)
        cluster = header if insecure else peer
        return Call(world=world, relay=relay, bootstrap=boot, context=context, cluster=cluster)

    def run(self, data: bytes, kind: type[Any], tally: fuzzkit.Tally, peer: str | None,
            header: str, body: Callable[[Call, Any], Any]) -> None:
        """Decode ``data`` as gRPC would and, if it decodes, run ``body`` on it."""
        try:
            request = kind.FromString(data)
        except DecodeError:
            tally.add("undecodable")  # gRPC refuses it; no servicer sees it
            return

        async def go() -> str:
            call = await self.call(peer, header)
            try:
                await body(call, request)
            except Aborted as exc:
                assert exc.code is not grpc.StatusCode.OK
                assert exc.details.strip(), f"{exc.code} without a message"
                return f"aborted: {exc.code.name}"
            finally:
                await call.world.close()
            return "answered"

        with fuzzkit.watchdog():
            tally.add(self.runner.run(go()))


@pytest.fixture(scope="module")
def harness(runner: fuzzkit.Loop, made: fuzzworld.Template) -> Harness:
    return Harness(made=made, runner=runner)


VERSIONS = (1, 0, 1, 0, 1, 0, 2, 2**32 - 1)  # mostly ones this server speaks
CLUSTER_NAMES = ("c1", "c2", fuzzworld.GONE, "c3", "C1", "", "c1.", "c1\x00")
HEADERS = ("c1", "c2", fuzzworld.GONE, "")
STAGES = ("csr", "", "finished", "failed")


def pick_text(pick: fuzzkit.Picker, choices: Sequence[str], max_size: int = 40) -> str:
    """Mostly one of ``choices`` (the first most of all), sometimes any text."""
    kind = pick.integer(0, 7)
    return choices[0] if kind < 3 else pick.text(max_size) if kind == 7 else pick.choice(choices)


def pick_bytes(pick: fuzzkit.Picker, valid: Sequence[bytes], ders: Sequence[bytes]) -> bytes:
    """Mostly a valid value, else one damaged, else random bytes."""
    kind = pick.integer(0, 3)
    if kind < 2:
        return bytes(pick.choice(valid))
    return pick.mutated(ders, 2) if kind == 2 else pick.bytes(64)


def wire(pick: fuzzkit.Picker, fields: Callable[[fuzzkit.Picker], Any]) -> bytes:
    """A message's bytes: from random field values (also two merged, as protobuf merges a
    field sent twice), those damaged byte by byte, or random bytes."""
    kind = pick.integer(0, 7)
    if kind < 5:
        return bytes(fields(pick).SerializeToString())
    if kind == 5:
        return bytes(fields(pick).SerializeToString() + fields(pick).SerializeToString())
    if kind == 6:
        return fuzzkit.mutate(fields(pick).SerializeToString(), pick.program(3),
                              structured=False)
    return pick.bytes(120)


def held_certificate(pick: fuzzkit.Picker) -> Any:
    text = pick.text(24)
    return messages.HeldCertificate(
        kind=text, namespace=text, secret=pick.text(8), serial=text, subject=text,
        issuer=text, not_before_unix=pick.int64(), not_after_unix=pick.int64(),
        renew_at_unix=pick.int64(), fingerprint_sha256=text, managed=pick.flag())


def status_report(pick: fuzzkit.Picker) -> Any:
    """A status report as ReportStatus and a work stream's subscription carry it."""
    return messages.StatusReport(
        protocol_version=pick.choice(VERSIONS), agent_version=pick.text(24),
        replica=pick.text(24), leader=pick.flag(),
        certificates=[held_certificate(pick) for _ in range(pick.integer(0, 3))])


def ders(pems: Sequence[bytes]) -> tuple[bytes, ...]:
    return tuple(csr.load_csr(p).csr.public_bytes(serialization.Encoding.DER) for p in pems)


def first_certificate(chain: bytes) -> Any:
    return bundle.load_certificates(chain, "certificate chain")[0]


class TestBootstrap:
    def test_bootstrap_messages(self, harness: Harness) -> None:
        """Bootstrap answers a certificate only to a real token, else aborts with a reason."""
        made = harness.made
        tokens = (made.token, made.shared_token, "", made.token + "x")
        csrs = (*made.client_csrs, fuzzworld.client_csr("c2"), made.intermediate_csrs[0])
        damaged = ders(csrs)
        tally = fuzzkit.Tally()

        def fields(pick: fuzzkit.Picker) -> Any:
            return messages.BootstrapRequest(
                protocol_version=pick.choice(VERSIONS), cluster=pick_text(pick, CLUSTER_NAMES),
                token=pick_text(pick, tokens, 80), csr=pick_bytes(pick, csrs, damaged))

        async def body(call: Call, request: Any) -> None:
            reply = await call.bootstrap.Bootstrap(request, call.context)
            assert request.protocol_version <= 1
            assert (request.cluster, request.token) == ("c1", made.token) or (
                request.cluster in fuzzworld.CLUSTERS
                and request.token.strip() == made.shared_token.strip())
            fuzzkit.check_relay_client(
                first_certificate(reply.certificate_chain), cluster=request.cluster,
                ca=made.signing, public_key=csr.load_csr(request.csr).public_key,
                now=fuzzworld.START, lifetime=fuzzworld.CLIENT_LIFETIME)

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            harness.run(wire(pick, fields), messages.BootstrapRequest, tally, None, "", body)

        example()
        print(f"Bootstrap: {tally}")
        assert tally["answered"] > 0 and tally["aborted: PERMISSION_DENIED"] > 0
        assert tally["undecodable"] < tally.total // 3


class TestRelay:
    def test_renew_messages(self, harness: Harness) -> None:
        """Renew issues only the caller's own relay client certificate, for the CSR's key."""
        made = harness.made
        csrs = (*made.client_csrs, fuzzworld.client_csr("c2"), made.intermediate_csrs[0])
        damaged = ders(csrs)
        tally = fuzzkit.Tally()

        def fields(pick: fuzzkit.Picker) -> Any:
            return messages.RenewRequest(protocol_version=pick.choice(VERSIONS),
                                         csr=pick_bytes(pick, csrs, damaged))

        async def body(call: Call, request: Any) -> None:
            reply = await call.relay.Renew(request, call.context)
            assert call.cluster in fuzzworld.CLUSTERS
            fuzzkit.check_relay_client(
                first_certificate(reply.certificate_chain), cluster=call.cluster,
                ca=made.signing, public_key=csr.load_csr(request.csr).public_key,
                now=fuzzworld.START, lifetime=fuzzworld.CLIENT_LIFETIME)

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            peer, header = pick.choice(PEERS), pick_text(pick, HEADERS)
            harness.run(wire(pick, fields), messages.RenewRequest, tally, peer, header, body)

        example()
        print(f"Renew: {tally}")
        assert tally["answered"] > 0 and tally["aborted: INVALID_ARGUMENT"] > 0

    def test_report_status_messages(self, harness: Harness) -> None:
        """ReportStatus records what a registered caller holds, and refuses anyone else."""
        tally = fuzzkit.Tally()
        fields = status_report

        async def body(call: Call, request: Any) -> None:
            await call.relay.ReportStatus(request, call.context)
            assert call.cluster in fuzzworld.CLUSTERS
            assert (await call.world.registry.get(call.cluster)).last_seen is not None

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            peer, header = pick.choice(PEERS), pick_text(pick, HEADERS)
            harness.run(wire(pick, fields), messages.StatusReport, tally, peer, header, body)

        example()
        print(f"ReportStatus: {tally}")
        assert tally["answered"] > tally.total // 10

    def test_work_subscribe_messages(self, harness: Harness) -> None:
        """A work stream sends a registered caller its own work and heartbeats, no one else's."""
        made = harness.made
        tally = fuzzkit.Tally()

        def fields(pick: fuzzkit.Picker) -> Any:
            return messages.WorkSubscribe(protocol_version=pick.choice(VERSIONS),
                                          replica=pick.text(24), leader=pick.flag(),
                                          status=status_report(pick) if pick.flag() else None)

        async def body(call: Call, request: Any) -> None:
            stream = call.relay.Work(request, call.context)
            try:
                items = [await anext(stream) for _ in range(2)]
                record = (await call.world.registry.get(call.cluster)).record
            finally:
                await stream.aclose()
            assert call.cluster in fuzzworld.CLUSTERS
            # First a heartbeat that says whether the subscription's status was recorded.
            assert items[0].WhichOneof("kind") == "heartbeat"
            assert items[0].heartbeat.status_recorded is request.HasField("status")
            work = [i for i in items if i.WhichOneof("kind") == "issue_intermediate"]
            assert [i.id for i in work] == [made.work[call.cluster]]
            assert record is not None and record.status["connected"]
            if request.HasField("status"):
                held = record.status["certificates"]
                assert [c["serial"] for c in held] == [
                    c.serial for c in request.status.certificates]
                assert record.status["agent"]["replica"] == request.status.replica

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            peer, header = pick.choice(PEERS), pick_text(pick, HEADERS)
            harness.run(wire(pick, fields), messages.WorkSubscribe, tally, peer, header, body)

        example()
        print(f"Work: {tally}")
        assert tally["answered"] > tally.total // 10

    def test_complete_work_messages(self, harness: Harness) -> None:
        """CompleteWork signs only the caller's own work item, with exactly the Istio profile."""
        made = harness.made
        ids = (made.work["c1"], made.work["c2"], "mesh.c1/1/2", "mesh.c1", "", "/",
               "mesh.c1/1/1/x", "Mesh.c1/1/1", "x" * 300, "mesh.c1/1/1\x00")
        csrs = (*made.intermediate_csrs, made.client_csrs[0],
                fuzzworld.intermediate_csr("c1", "rsa-2048"))
        damaged = ders(csrs)
        tally = fuzzkit.Tally()

        def fields(pick: fuzzkit.Picker) -> Any:
            return messages.WorkResult(
                id=pick_text(pick, ids), csr=pick_bytes(pick, csrs, damaged),
                error=pick.text(40), stage=pick_text(pick, STAGES, 12),
                pods_bounced=[pick.text(24) for _ in range(pick.integer(0, 3))],
                restart_needed=pick.flag())

        async def body(call: Call, request: Any) -> None:
            reply = await call.relay.CompleteWork(request, call.context)
            assert call.cluster in fuzzworld.CLUSTERS
            assert request.id == made.work[call.cluster], "work of another was accepted"
            if request.stage in ("", "csr"):
                fuzzkit.check_istio_intermediate(
                    first_certificate(reply.certificate_chain), cluster=call.cluster,
                    ca=made.istio_ca, public_key=csr.load_csr(request.csr).public_key,
                    now=fuzzworld.START, lifetime=fuzzworld.INTERMEDIATE_LIFETIME)

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            peer, header = pick.choice(PEERS), pick_text(pick, HEADERS)
            harness.run(wire(pick, fields), messages.WorkResult, tally, peer, header, body)

        example()
        print(f"CompleteWork: {tally}")
        assert tally["answered"] > 0 and tally["aborted: PERMISSION_DENIED"] > 0
