"""Workloads of different clusters complete real mTLS only through a root they share."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

import pytest

from meshtrust import errors, federation
from meshtrust.pki import hierarchy, keys

NOW = dt.datetime.now(dt.UTC)


def _cacerts(clusters: tuple[str, ...]) -> dict[str, dict[str, bytes]]:
    built = hierarchy.build(hierarchy.Options(
        architecture=hierarchy.Architecture.SEPARATE, clusters=clusters,
        istio_key_type=keys.KeyType.EC_P256), NOW)
    return {s.cluster: s.data for s in built.secrets if s.name == "cacerts"}


@pytest.fixture(scope="module")
def meshes() -> dict[str, dict[str, bytes]]:
    return {**_cacerts(("east", "west")), **_cacerts(("other",))}


class TestHandshake:
    def test_shared_root_federates(self, meshes: dict[str, dict[str, bytes]]) -> None:
        """Two clusters under one root complete mTLS and see each other's SPIFFE IDs."""
        east = federation.workload("east", meshes["east"], NOW, service_account="sleep")
        west = federation.workload("west", meshes["west"], NOW, service_account="httpbin")
        seen = asyncio.run(federation.handshake(east, west))
        assert seen == "spiffe://cluster.local/ns/default/sa/httpbin"

    def test_other_root_is_refused(self, meshes: dict[str, dict[str, bytes]]) -> None:
        """A cluster under another policy's root is refused in either direction."""
        east = federation.workload("east", meshes["east"], NOW)
        other = federation.workload("other", meshes["other"], NOW)
        for client, server in ((east, other), (other, east)):
            with pytest.raises(errors.ChainError, match="certificate verify failed"):
                asyncio.run(federation.handshake(client, server))

    def test_server_refuses_a_client_it_does_not_trust(
            self, meshes: dict[str, dict[str, bytes]]) -> None:
        """A server trusting only its own root refuses a foreign client that trusts both."""
        east = federation.workload("east", meshes["east"], NOW)
        other = federation.workload("other", meshes["other"], NOW)
        both = dataclasses.replace(other, roots=other.roots + east.roots)
        with pytest.raises(errors.ChainError):
            asyncio.run(federation.handshake(both, east))

    def test_bundle_of_both_roots_bridges_a_rotation(
            self, meshes: dict[str, dict[str, bytes]]) -> None:
        """With both roots in root-cert.pem, old-root and new-root clusters federate."""
        east = federation.workload("east", meshes["east"], NOW)
        other = federation.workload("other", meshes["other"], NOW)
        bundle = east.roots + other.roots
        old = dataclasses.replace(east, roots=bundle)
        new = dataclasses.replace(other, roots=bundle)
        assert asyncio.run(federation.handshake(old, new)) == new.spiffe_id
        assert asyncio.run(federation.handshake(new, old)) == old.spiffe_id
