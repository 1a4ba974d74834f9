"""Fuzzing trust policies: RootTrustPolicy and VirtualMesh documents and the YAML they come in.

Valid documents with fields dropped, added, renamed or given values of the
wrong type or range; random structures; and damaged YAML text read as
``meshtrust apply -f`` reads it. Each document is applied to a management
store. The properties: a refusal is a domain error with a message; an
accepted policy reads back from the store as the same policy; and the
reconcile loop handles it (to an Istio root and per-cluster work) without
raising anything but a domain error.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given

import fuzzkit
import fuzzworld
from meshtrust import errors
from meshtrust.authority import audit, istio, registry, signers, trust_policy
from meshtrust.cli import trust_cmd
from meshtrust.pki import keys
from meshtrust.testing import FakeClock, MemoryStore

NS = "gloo-mesh"
ARN = "arn:aws:acm-pca:us-east-1:123456789012:certificate-authority/11111111-2222-3333-4444-5555"
SEEDS: tuple[dict[str, Any], ...] = (
    {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
     "metadata": {"name": "mesh", "namespace": NS},
     "spec": {"applyToMeshes": [{"selector": {"cluster": "c1"}},
                                {"selector": {"clusters": ["c2", "c3"]}}],
              "config": {"mgmtServerCa": {"generated": {"ttlDays": 3650, "keyType": "ecdsa-p256",
                                                        "orgName": "Istio"}},
                         "intermediateCertOptions": {"ttl": "12h", "rsaKeySizeBytes": 2048,
                                                     "secretRotationGracePeriodRatio": 0.1,
                                                     "orgName": "Istio"},
                         "autoRestartPods": True, "trustDomain": "cluster.local",
                         "secretForm": "tls"}}},
    {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
     "metadata": {"name": "brought"},
     "spec": {"config": {"mgmtServerCa": {"secretRef": {"name": "my-root", "namespace": NS}},
                         "intermediateCertOptions": {"ttlDays": 30, "keyType": "ecdsa-p384"}}}},
    {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
     "metadata": {"name": "aws", "namespace": NS},
     "spec": {"config": {"mgmtServerCa": {"awsPca": {"certificateAuthorityArn": ARN}}}}},
    {"apiVersion": "networking.mesh.gloo.solo.io/v1", "kind": "VirtualMesh",
     "metadata": {"name": "virtual-mesh", "namespace": NS},
     "spec": {"mtlsConfig": {"autoRestartPods": True, "shared": {"rootCertificateAuthority": {
         "generated": {"rsaKeySizeBytes": 4096, "ttl": "90s"}}}},
         "meshes": [{"name": "istiod-istio-system-c1", "namespace": NS},
                    {"name": "istiod-istio-system-c2"}], "federation": {}}},
    {"apiVersion": "networking.mesh.gloo.solo.io/v1", "kind": "VirtualMesh",
     "metadata": {"name": "vm-secret"},
     "spec": {"mtlsConfig": {"shared": {"rootCertificateAuthority": {
         "secret": {"name": "vm-root", "namespace": "istio-system"}}}}}},
)
KEYS: tuple[Any, ...] = (
    "apiVersion", "kind", "metadata", "name", "namespace", "spec", "applyToMeshes", "selector",
    "cluster", "clusters", "config", "mgmtServerCa", "generated", "secretRef", "awsPca",
    "certificateAuthorityArn", "intermediateCertOptions", "ttlDays", "ttl", "keyType",
    "rsaKeySizeBytes", "orgName", "secretRotationGracePeriodRatio", "autoRestartPods",
    "trustDomain", "secretForm", "mtlsConfig", "shared", "rootCertificateAuthority", "secret",
    "meshes", "federation", "x", "", 1, None, True, 0.5, dt.date(2026, 1, 1))
VALUES: tuple[Any, ...] = (
    None, True, False, 0, 1, -1, 2**31, 2**63, 10**30, 0.5, -0.0, 1e308, float("nan"),
    float("inf"), "", " ", "x", "0.5s", "0.0000001s", "1e400s", "nan", "inf", "-1h", "1000y",
    "1001y", "2s", "86400", "rsa-4096", "rsa-1024", "ecdsa-p256", "ed25519", "RSA4096",
    "Mesh", "mesh", "a" * 64, "a" * 250, "a." * 100 + "a", "c1", "C1", "c1.x", "*", "cacerts",
    "tls", "istiod-istio-system-", "istiod-istio-system-c1", "istiod-istio-system-*",
    ARN + "\n", ARN.replace("123456789012", "١٢٣٤٥٦٧٨٩٠١٢"), "gloo-mesh", "Gloo_Mesh",
    "admin.gloo.solo.io/v2", "RootTrustPolicy", "VirtualMesh", "networking.mesh.gloo.solo.io/v1",
    "CLUSTER.LOCAL", "cluster.local/x", [], {}, [None], [{}], [{"selector": {}}],
    [{"selector": {"clusters": "c1"}}], [{"selector": {"clusters": 5}}], {"name": "x"},
    {1: 2, "a": 3}, {"a": {"b": {"c": []}}}, dt.datetime(2026, 1, 1), dt.date(2026, 1, 1),
    b"bytes", {"c1", "c2"})
YAML_SEEDS = tuple(yaml.safe_dump_all([doc]).encode() for doc in SEEDS)

# Documents that start from (almost) nothing: a bare head grown by a longer program.
SKELETONS: tuple[dict[str, Any], ...] = tuple(
    {"apiVersion": d["apiVersion"], "kind": d["kind"], "metadata": {"name": "m"}, "spec": {}}
    for d in SEEDS[::3])


def document(pick: fuzzkit.Picker) -> Any:
    """A valid document edited, one grown from a bare head, or damaged YAML text."""
    kind = pick.integer(0, 4)
    if kind < 3:
        return fuzzkit.mutate_document(pick.choice(SEEDS), pick.program(), SEEDS, keys=KEYS,
                                       values=VALUES)
    if kind == 3:
        return fuzzkit.mutate_document(pick.choice(SKELETONS), pick.program(8), SEEDS,
                                       keys=KEYS, values=VALUES)
    return pick.mutated(YAML_SEEDS, 3, structured=False)


@dataclasses.dataclass
class Policies:
    """A management store with clusters c1 and c2, copied for each example."""

    runner: fuzzkit.Loop
    template: MemoryStore
    stdin: Callable[[io.TextIOWrapper], None]
    cache: signers.Signers

    async def check(self, document: Any) -> str:
        clock = FakeClock(fuzzworld.START)
        store = fuzzworld.copy_store(self.template, clock)
        log = audit.AuditLog(store, clock, actor=audit.SERVER)
        authority = istio.IstioAuthority(store, clock, registry.Registry(store, clock, audit=log),
                                         signer_cache=self.cache, audit=log)
        if isinstance(document, bytes):  # YAML text, read as `meshtrust apply -f -` reads it
            self.stdin(io.TextIOWrapper(io.BytesIO(document), encoding="utf-8"))
            try:
                found: list[Any] = trust_cmd._documents(Path("-"))
            except errors.MeshTrustError as exc:
                fuzzkit.refusal(exc)
                return "refused: YAML"
        elif isinstance(document, dict):
            found = [document]
        else:
            return "not a mapping"  # what `apply -f` refuses before any policy is read
        outcome = "accepted"
        for one in found:
            try:
                await authority.apply(one)
            except errors.MeshTrustError as exc:
                fuzzkit.refusal(exc)
                outcome = f"refused: {type(exc).__name__}"
                continue
            policy = trust_policy.parse(one)
            stored = [p for _, p in await authority.policies() if p.name == policy.name]
            assert stored == [policy], "the stored policy reads back as another"
            try:
                await authority.reconcile()
            except errors.MeshTrustError as exc:
                fuzzkit.refusal(exc)
                outcome = f"reconcile refused: {type(exc).__name__}"
        return outcome


def unreachable_external_ca(provider: str, arn: str) -> Any:
    """An external CA that cannot be reached: no request leaves the test."""
    raise errors.ProviderError(f"{provider} {arn} cannot be reached from the fuzz tests")


@pytest.fixture
def policies(runner: fuzzkit.Loop, monkeypatch: pytest.MonkeyPatch) -> Policies:
    # Roots are made with one cached key: key generation is not what is fuzzed here.
    cached = fuzzkit.key("ec-p256")
    monkeypatch.setattr(keys, "generate_key", lambda key_type: cached)

    async def made() -> MemoryStore:
        clock = FakeClock(fuzzworld.START)
        store = MemoryStore(clock=clock)
        reg = registry.Registry(store, clock)
        for name in fuzzworld.CLUSTERS:
            await reg.register(name)
        return store

    return Policies(runner=runner, template=runner.run(made()),
                    stdin=lambda stream: monkeypatch.setattr(sys, "stdin", stream),
                    cache=signers.Signers(open_external=unreachable_external_ca))


class TestTrustPolicies:
    def test_documents_and_yaml(self, policies: Policies) -> None:
        """A policy document is refused with the reason, or stored and reconciled as it reads."""
        tally = fuzzkit.Tally()

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            found = document(fuzzkit.Picker(data))
            with fuzzkit.watchdog():
                tally.add(policies.runner.run(policies.check(found)))

        example()
        print(f"trust policies: {tally}")
        assert tally["accepted"] > tally.total // 20
        assert tally["refused: ConfigError"] > tally.total // 4
