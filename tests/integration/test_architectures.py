"""Every architecture × placement: `meshtrust init`, then a real server and agents.

For each combination the test runs `meshtrust init` on an empty management
store, starts `meshtrust server` and two agents as processes, waits until both
clusters hold a relay client certificate and an Istio intermediate, checks
every chain with `openssl verify`, and runs the cross-cluster workload
handshake. The AWS Private CA placements run against moto's standalone server.
With separate roots, a relay certificate must not validate as an Istio peer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

import istiofleet as im
import openssl_cli
import relayfleet as rf
from meshtrust import federation, settings
from meshtrust.authority import ca_config
from meshtrust.pki import bundle, hierarchy, issuer, keys, profiles

pytestmark = pytest.mark.slow

CLUSTERS = ("cluster-1", "cluster-2")
NS = settings.RELAY_NAMESPACE
ARCHITECTURES = ("shared", "split", "separate")


@pytest.fixture
def mesh(fleet: rf.Fleet) -> Iterator[im.Mesh]:
    made = im.Mesh(fleet)
    try:
        yield made
    finally:
        made.close()


def _certs(pem: bytes) -> list[x509.Certificate]:
    return bundle.load_certificates(pem, "test")


def _verify(tmp: Path, chain_pem: bytes, roots_pem: bytes, *, purpose: str | None = None,
            check: bool = True) -> bool:
    chain = _certs(chain_pem)
    roots = _certs(roots_pem)
    intermediates = tuple(c for c in chain[1:] if not bundle.is_self_signed(c))
    done = openssl_cli.verify(tmp, chain[0], roots[0], intermediates, purpose=purpose,
                              check=check)
    return done.returncode == 0


def _converge(mesh: im.Mesh, tmp: Path, architecture: str) -> None:
    """Start the server and agents; check every chain with openssl; federate."""
    fleet = mesh.fleet
    mesh.start_server()
    for cluster in CLUSTERS:
        mesh.add_cluster(cluster, pods=1)
    for cluster in CLUSTERS:
        fleet.wait_connected(cluster, timeout=30)

    async def check() -> None:
        await mesh.wait_finished(CLUSTERS, timeout=60)
        async with rf.opened(fleet.mgmt_url) as mgmt:
            server = await mgmt.get_secret(NS, settings.RELAY_SERVER_SECRET)
            relay_root = (await mgmt.get_secret(NS, settings.RELAY_ROOT_SECRET)).data["ca.crt"]
        assert _verify(tmp, server.data["tls.crt"], relay_root, purpose="sslserver")
        cacerts = {}
        for cluster in CLUSTERS:
            client = await fleet.aclient_identity(cluster)
            assert client is not None
            assert _verify(tmp, client.chain, relay_root, purpose="sslclient")
            secret = await mesh.secret(cluster)
            assert secret is not None
            cacerts[cluster] = secret.data
            assert _verify(tmp, secret.data["cert-chain.pem"], secret.data["root-cert.pem"])
        now = dt.datetime.now(dt.UTC)
        a = federation.workload(CLUSTERS[0], cacerts[CLUSTERS[0]], now)
        b = federation.workload(CLUSTERS[1], cacerts[CLUSTERS[1]], now,
                                service_account="httpbin")
        assert await federation.handshake(a, b) == b.spiffe_id
        # The relay and the mesh share a root unless the architecture separates them.
        client = await fleet.aclient_identity(CLUSTERS[0])
        assert client is not None
        istio_root = cacerts[CLUSTERS[0]]["root-cert.pem"]
        shares_root = _verify(tmp, client.chain, istio_root, check=False)
        assert shares_root == (architecture != "separate")

    asyncio.run(check())


def _init(mesh: im.Mesh, *args: str) -> str:
    code, out, err = im.cli("init", "--store", mesh.fleet.mgmt_url, "--policy", im.POLICY,
                            *args)
    assert code == 0, err
    return out


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_internal(mesh: im.Mesh, tmp_path: Path, architecture: str) -> None:
    """Every CA key in the management store."""
    out = _init(mesh, "--architecture", architecture)
    assert "management store" in out
    _converge(mesh, tmp_path, architecture)


def _brought_ca(folder: Path, root: issuer.CA, profile: profiles.Profile) -> Path:
    """An intermediate under the user's own offline root, as files."""
    ca = issuer.new_intermediate(keys.KeyType.EC_P256, root, profile, dt.datetime.now(dt.UTC))
    folder.mkdir()
    for name, data in hierarchy.tls_data(ca.certificate, ca.key, root).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_hybrid_with_brought_intermediates(mesh: im.Mesh, tmp_path: Path,
                                           architecture: str) -> None:
    """Hybrid with the user's offline root: meshtrust holds only the intermediates."""
    now = dt.datetime.now(dt.UTC)
    root = issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT, now)
    shared = architecture == "shared"
    relay = _brought_ca(tmp_path / "relay-ca", root,
                        profiles.SHARED_SIGNING if shared else profiles.RELAY_SIGNING)
    args = ["--architecture", architecture, "--placement", "hybrid", "--provider", "secret",
            "--relay-ca", str(relay)]
    if not shared:
        istio_root = (root if architecture == "split"
                      else issuer.new_root(keys.KeyType.EC_P256, profiles.ISTIO_ROOT, now))
        args += ["--istio-ca", str(_brought_ca(tmp_path / "istio-ca", istio_root,
                                               profiles.SHARED_SIGNING))]
    out = _init(mesh, *args)
    assert "outside meshtrust (brought)" in out

    async def root_key_absent() -> None:
        async with rf.opened(mesh.fleet.mgmt_url) as mgmt:
            stored = await mgmt.get_secret(NS, settings.RELAY_ROOT_SECRET)
        assert set(stored.data) == {"ca.crt"}  # the root's key never reached the store

    asyncio.run(root_key_absent())
    _converge(mesh, tmp_path, architecture)


def test_brought_ca_is_checked(mesh: im.Mesh, tmp_path: Path) -> None:
    """A brought CA that is no CA, or under the wrong roots, is refused before writing."""
    now = dt.datetime.now(dt.UTC)
    root = issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT, now)
    relay = _brought_ca(tmp_path / "relay-ca", root, profiles.RELAY_SIGNING)
    code, _, err = im.cli("init", "--store", mesh.fleet.mgmt_url, "--architecture", "shared",
                          "--placement", "hybrid", "--provider", "secret", "--relay-ca",
                          str(relay))
    assert code == 1
    assert "--relay-ca is not a usable shared-signing CA" in err
    assert "must allow 1 CA level below it" in err
    istio = _brought_ca(tmp_path / "istio-ca", root, profiles.SHARED_SIGNING)
    code, _, err = im.cli("init", "--store", mesh.fleet.mgmt_url, "--architecture", "separate",
                          "--placement", "hybrid", "--provider", "secret", "--relay-ca",
                          str(relay), "--istio-ca", str(istio))
    assert code == 1 and "different roots" in err

    async def empty() -> None:
        async with rf.opened(mesh.fleet.mgmt_url) as mgmt:
            assert await mgmt.list_secrets() == []
            assert await ca_config.load(mgmt) is None

    asyncio.run(empty())


def test_init_refuses_a_store_set_up(mesh: im.Mesh) -> None:
    """A second init names what exists and changes nothing without --force."""
    _init(mesh, "--architecture", "shared")
    code, _, err = im.cli("init", "--store", mesh.fleet.mgmt_url, "--architecture", "split")
    assert code == 1
    assert "relay-root-tls-secret" in err and "--force" in err
    out = _init(mesh, "--architecture", "split", "--force", "-o", "json")
    assert '"architecture": "split"' in out
