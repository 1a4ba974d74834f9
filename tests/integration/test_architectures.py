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
import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import istiofleet as im
import openssl_cli
import pcaserver
import relayfleet as rf
from meshtrust import clock, federation, settings
from meshtrust.authority import ca_config, registry
from meshtrust.pki import bundle, csr, hierarchy, issuer, keys, profiles
from meshtrust.store import base

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


@pytest.fixture
def aws(pca_server: pcaserver.Server, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> pcaserver.Server:
    """The fake AWS Private CA, reached by the CLI and by the server process alike."""
    pcaserver.use_fake_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL_ACM_PCA", pca_server.endpoint_url)
    pca_server.clear_faults()
    return pca_server


@pytest.mark.parametrize("placement", ["hybrid", "external"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_aws_private_ca(mesh: im.Mesh, tmp_path: Path, aws: pcaserver.Server,
                        architecture: str, placement: str) -> None:
    """Roots (hybrid) or every CA (external) at AWS Private CA; the rest as with local keys."""
    out = _init(mesh, "--architecture", architecture, "--placement", placement,
                "--provider", "aws-pca", "--region", aws.region, "-o", "json")
    document = json.loads(out)
    keys_at = _key_locations(document["hierarchy"])
    assert any(k.startswith("arn:aws:acm-pca:") for k in keys_at)
    cas_in_store = [k for k in keys_at if k.startswith("management store")
                    and "server" not in k]
    if placement == "external":
        assert cas_in_store == [], keys_at
        assert document["relaySigner"]["provider"] == "aws-pca"
    else:
        assert cas_in_store, keys_at  # meshtrust keeps the intermediates it issues with
    before = aws.counters()
    if placement == "external":
        aws.inject("IssueCertificate", count=3)  # AWS throttles the first bootstraps
    _converge(mesh, tmp_path, architecture)
    after = aws.counters()
    signed_at_aws = (after.backend.get("IssueCertificate", 0)
                     - before.backend.get("IssueCertificate", 0))
    made = {token: n - before.issued.get(token, 0) for token, n in after.issued.items()}
    assert all(n <= 1 for n in made.values()), made  # never two for one request
    if placement == "external":
        # Both bootstraps and both Istio intermediates went through AWS, once each.
        assert signed_at_aws == 2 * len(CLUSTERS)
    elif architecture == "split":
        assert signed_at_aws == len(CLUSTERS)  # the relay intermediate is at AWS
    else:
        assert signed_at_aws == 0


def test_aws_misconfiguration_is_one_clear_error(mesh: im.Mesh, aws: pcaserver.Server) -> None:
    """A root in another region, a root in the wrong state, missing permissions."""
    client = aws.client()
    arn = client.create_root("meshtrust-test-root", lifetime=dt.timedelta(days=30),
                             idempotency=f"misconfigured-{id(client)}")
    base_args = ["init", "--store", mesh.fleet.mgmt_url, "--architecture", "shared",
                 "--placement", "hybrid"]
    code, _, err = im.cli(*base_args, "--region", "eu-west-1", "--root-arn", arn)
    assert code == 1 and f"pass --region {aws.region}" in err, err
    aws.boto3().update_certificate_authority(CertificateAuthorityArn=arn, Status="DISABLED")
    code, _, err = im.cli(*base_args, "--region", aws.region, "--root-arn", arn)
    assert code == 1 and "DISABLED" in err, err
    aws.inject("CreateCertificateAuthority", "AccessDeniedException",
               message="not authorized to perform acm-pca:CreateCertificateAuthority")
    try:
        code, _, err = im.cli(*base_args, "--region", aws.region)
    finally:
        aws.clear_faults()
    assert code == 1 and "acm-pca:CreateCertificateAuthority" in err, err
    assert err.count("error:") == 1

    async def untouched() -> None:
        async with rf.opened(mesh.fleet.mgmt_url) as mgmt:
            assert await mgmt.list_secrets() == []

    asyncio.run(untouched())


def _key_locations(nodes: list[dict[str, Any]]) -> list[str]:
    found = []
    for node in nodes:
        found.append(node["key"])
        found += _key_locations(node["signs"])
    return found


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


def test_external_bring_your_own(mesh: im.Mesh, tmp_path: Path) -> None:
    """Placement external with no provider: meshtrust issues nothing, watches, reloads, warns.

    Every certificate comes from the user's own CA (an offline hierarchy here).
    Agents connect with the client certificates they were given; a replaced
    server or client certificate is picked up with no restart; one that is due
    for renewal is reported by `meshtrust status` and in the agent's log.
    """
    fleet = mesh.fleet
    now = dt.datetime.now(dt.UTC)
    built = hierarchy.build(hierarchy.Options(
        architecture=hierarchy.Architecture.SEPARATE, clusters=CLUSTERS,
        server_names=("localhost", "127.0.0.1"), istio_key_type=keys.KeyType.EC_P256), now)
    wanted = {settings.RELAY_ROOT_SECRET, settings.RELAY_SERVER_SECRET,
              settings.RELAY_CLIENT_SECRET, settings.ISTIO_CA_SECRET}

    async def bring() -> None:
        for item in built.secrets:
            if item.name not in wanted:
                continue
            async with rf.opened(fleet.store_url(item.cluster)) as store:
                await store.create(base.Secret(namespace=item.namespace, name=item.name,
                                               type=item.type, data=item.data))
        async with rf.opened(fleet.mgmt_url) as mgmt:
            for cluster in CLUSTERS:
                await registry.Registry(mgmt, clock.SystemClock()).register(cluster)

    asyncio.run(bring())
    out = _init(mesh, "--architecture", "separate", "--placement", "external",
                "--provider", "none")
    assert "outside meshtrust" in out
    server = fleet.start_server(extra=["--reconcile-interval", "1s"])
    server.process.wait_for_log("issues no relay certificates", timeout=10)
    agents = {cluster: fleet.start_agent(cluster) for cluster in CLUSTERS}
    for cluster in CLUSTERS:
        fleet.wait_connected(cluster, timeout=30)

    def reissue_client(cluster: str, lifetime: dt.timedelta, age: dt.timedelta) -> str:
        """Put a client certificate from the user's CA, issued ``age`` ago, in the store."""
        key = keys.generate_key(keys.KeyType.EC_P256)
        request = csr.Request(csr=csr.build_csr(key, common_name=cluster, names=[cluster]),
                              public_key=key.public_key())
        cert = issuer.issue(request, built.relay_signing, profiles.RELAY_CLIENT,
                            dt.datetime.now(dt.UTC) - age, lifetime,
                            issuer.Subject(cluster=cluster))

        async def put() -> None:
            async with rf.opened(fleet.store_url(cluster)) as store:
                current = await store.get_secret(NS, settings.RELAY_CLIENT_SECRET)
                await store.update(dataclasses.replace(
                    current, data=hierarchy.tls_data(cert, key, built.relay_signing)))

        asyncio.run(put())
        return f"{cert.serial_number:x}"

    # A new client certificate, past its renewal time: used at once, and reported.
    serial = reissue_client(CLUSTERS[0], dt.timedelta(minutes=10), dt.timedelta(minutes=8))
    agents[CLUSTERS[0]].wait_for_log(f"client certificate {serial} .* renew it yourself",
                                     timeout=20)

    def reported() -> dict[str, Any] | None:
        code, text, _ = im.cli("status", "--store", fleet.mgmt_url, "-o", "json")
        items = json.loads(text)["items"]
        mine = [i for i in items if i["cluster"] == CLUSTERS[0] and i["kind"] == "relay-client"]
        if not mine or mine[0]["serial"] != serial:
            return None
        return {"code": code, "items": items, "client": mine[0]}

    seen = rf.poll(reported, timeout=20, what="the new client certificate in the inventory")
    assert seen["client"]["managedBy"] == "bring-your-own"
    assert seen["client"]["state"] == "renewal-due"
    assert seen["code"] == 3  # something needs attention
    intermediates = [i for i in seen["items"] if i["kind"] == "istio-intermediate"]
    assert {i["cluster"] for i in intermediates} == set(CLUSTERS)
    assert {i["managedBy"] for i in intermediates} == {"bring-your-own"}
    # A new server certificate from the user's CA is served without a restart.
    key = keys.generate_key(keys.KeyType.EC_P256)
    cert = issuer.issue(csr.Request(csr=csr.build_csr(key), public_key=key.public_key()),
                        built.relay_signing, profiles.RELAY_SERVER, dt.datetime.now(dt.UTC),
                        dt.timedelta(days=30), issuer.Subject(names=("localhost", "127.0.0.1")))

    async def replace_server() -> None:
        async with rf.opened(fleet.mgmt_url) as mgmt:
            current = await mgmt.get_secret(NS, settings.RELAY_SERVER_SECRET)
            await mgmt.update(dataclasses.replace(
                current, data=hierarchy.tls_data(cert, key, built.relay_signing)))

    asyncio.run(replace_server())
    server.process.wait_for_log("server certificate reloaded", timeout=10)
    served = openssl_cli.run("s_client", "-connect", server.relay, "-servername", "localhost",
                             input=b"", check=False).stdout
    printed = openssl_cli.run("x509", "-noout", "-serial", input=served.encode()).stdout
    assert int(printed.strip().split("=", 1)[1], 16) == cert.serial_number
    # Nothing was issued by meshtrust.
    assert not server.process.lines("bootstrapped cluster|signed the Istio")
