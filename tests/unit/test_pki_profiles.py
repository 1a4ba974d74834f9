"""Every profile, in every architecture, checked with the real openssl CLI."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

import openssl_cli
from meshtrust.pki import bundle, csr, hierarchy, issuer, keys, profiles

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)

LEAF_KU = "Digital Signature, Key Encipherment"
CA_KU = "Certificate Sign, CRL Sign"
CA_KU_DS = "Digital Signature, Certificate Sign, CRL Sign"

# name -> {extension: (critical, value or None for "any value")}
EXPECTED: dict[str, dict[str, tuple[bool, str | None]]] = {
    "relay-root": {"X509v3 Basic Constraints": (True, "CA:TRUE"),
                   "X509v3 Key Usage": (True, CA_KU)},
    "relay-signing": {"X509v3 Basic Constraints": (True, "CA:TRUE, pathlen:0"),
                      "X509v3 Key Usage": (True, CA_KU)},
    "shared-signing": {"X509v3 Basic Constraints": (True, "CA:TRUE, pathlen:1"),
                       "X509v3 Key Usage": (True, CA_KU_DS)},
    "relay-server": {"X509v3 Basic Constraints": (False, "CA:FALSE"),
                     "X509v3 Key Usage": (False, LEAF_KU),
                     "X509v3 Extended Key Usage": (
                         False, "TLS Web Server Authentication, TLS Web Client Authentication"),
                     "X509v3 Subject Alternative Name": (False, "DNS:*.gloo-mesh")},
    "relay-client": {"X509v3 Basic Constraints": (False, "CA:FALSE"),
                     "X509v3 Key Usage": (False, LEAF_KU),
                     "X509v3 Extended Key Usage": (False, "TLS Web Client Authentication"),
                     "X509v3 Subject Alternative Name": (False, "DNS:cluster-1")},
    "istio-root": {"X509v3 Basic Constraints": (True, "CA:TRUE"),
                   "X509v3 Key Usage": (True, CA_KU_DS)},
    "istio-intermediate": {
        "X509v3 Basic Constraints": (True, "CA:TRUE, pathlen:0"),
        "X509v3 Key Usage": (True, CA_KU_DS),
        "X509v3 Subject Alternative Name": (
            False, ("DNS:istiod.istio-system.svc, "
                   "URI:spiffe://cluster.local/ns/istio-system/sa/istiod"))},
    "spiffe-workload": {
        "X509v3 Basic Constraints": (True, "CA:FALSE"),
        "X509v3 Key Usage": (True, LEAF_KU),
        "X509v3 Extended Key Usage": (
            False, "TLS Web Server Authentication, TLS Web Client Authentication"),
        "X509v3 Subject Alternative Name": (
            True, "URI:spiffe://cluster.local/ns/default/sa/sleep")},
}
ALWAYS = {"X509v3 Subject Key Identifier", "X509v3 Authority Key Identifier"}


def _by_name(h: hierarchy.Hierarchy) -> dict[tuple[str, str], hierarchy.SecretFiles]:
    return {(s.cluster, s.name): s for s in h.secrets}


@pytest.fixture(scope="module", params=[a.value for a in hierarchy.Architecture])
def built(request: pytest.FixtureRequest) -> hierarchy.Hierarchy:
    options = hierarchy.Options(architecture=hierarchy.Architecture(request.param),
                                clusters=("cluster-1", "cluster-2"),
                                istio_key_type=keys.KeyType.EC_P256)
    return hierarchy.build(options, NOW)


def _certs_of(h: hierarchy.Hierarchy) -> list[tuple[str, x509.Certificate,
                                                     tuple[x509.Certificate, ...],
                                                     x509.Certificate]]:
    """(profile, certificate, intermediates, root) of everything in a hierarchy."""
    s = _by_name(h)
    relay_root = h.relay_root.certificate
    relay_chain = h.relay_signing.path[:-1]
    found = [("relay-root", relay_root, (), relay_root),
             (h.relay_signing.certificate.extensions.get_extension_for_class(
                 x509.BasicConstraints).value.path_length == 1 and "shared-signing"
              or "relay-signing", h.relay_signing.certificate, (), relay_root)]
    server = bundle.load_certificates(s[("mgmt", "relay-server-tls-secret")].data["tls.crt"])
    found.append(("relay-server", server[0], tuple(server[1:]), relay_root))
    client = bundle.load_certificates(s[("cluster-1", "relay-client-tls-secret")].data["tls.crt"])
    found.append(("relay-client", client[0], tuple(client[1:]), relay_root))
    assert tuple(client[1:]) == relay_chain
    chain = bundle.load_certificates(s[("cluster-1", "cacerts")].data["cert-chain.pem"])
    found.append(("istio-intermediate", chain[0], tuple(chain[1:-1]), h.istio_root))
    if h.istio_root != relay_root:
        found.append(("istio-root", h.istio_root, (), h.istio_root))
    # A workload certificate, issued by the cluster's Istio CA, proves federation works.
    ca_key = keys.load_private_key(s[("cluster-1", "cacerts")].data["ca-key.pem"])
    cluster_ca = issuer.CA(certificate=chain[0], key=ca_key, chain=tuple(chain[1:]))
    wl_key = keys.generate_key(keys.KeyType.EC_P256)
    wl = issuer.issue(csr.load_csr(csr.dump_csr(csr.build_csr(wl_key))), cluster_ca,
                      profiles.SPIFFE_WORKLOAD, NOW,
                      subject=issuer.Subject(namespace="default", service_account="sleep"))
    found.append(("spiffe-workload", wl, tuple(chain[:-1]), h.istio_root))
    return found


class TestProfilesWithOpenSSL:
    def test_every_certificate_verifies_with_openssl(self, built: hierarchy.Hierarchy,
                                                     tmp_path: Path) -> None:
        """openssl verify accepts every certificate of the hierarchy up to its root."""
        for _, cert, intermediates, root in _certs_of(built):
            # At the time they were issued for: the shortest lifetime (a workload's) is a
            # day, and the real clock moves on.
            out = openssl_cli.verify(tmp_path, cert, root, intermediates, check=False,
                                     at=NOW + dt.timedelta(minutes=1))
            assert out.returncode == 0, out.stderr

    def test_extensions_are_exactly_the_profile(self, built: hierarchy.Hierarchy,
                                                tmp_path: Path) -> None:
        """openssl x509 -text shows exactly the profile's extensions, with criticality."""
        for profile, cert, _, _ in _certs_of(built):
            found = openssl_cli.extensions(openssl_cli.text(tmp_path, cert))
            expected = EXPECTED[profile]
            assert set(found) == set(expected) | ALWAYS, profile
            for name, (critical, value) in expected.items():
                assert found[name][0] == critical, (profile, name)
                assert found[name][1] == value, (profile, name, found[name][1])

    def test_istio_chain_reaches_the_istio_root(self, built: hierarchy.Hierarchy) -> None:
        """cert-chain.pem is the intermediate followed by every CA up to the root."""
        s = _by_name(built)["cluster-2", "cacerts"].data
        chain = bundle.load_certificates(s["cert-chain.pem"])
        assert chain[-1] == bundle.load_certificate(s["root-cert.pem"])
        assert chain[0] == bundle.load_certificate(s["ca-cert.pem"])
        assert bundle.order_chain(chain[0], chain[1:]) == chain


class TestArchitectures:
    def test_separate_roots_share_no_trust(self) -> None:
        """In the separate architecture the Istio and relay roots differ and do not cross-verify."""
        h = hierarchy.build(hierarchy.Options(architecture=hierarchy.Architecture.SEPARATE,
                                              clusters=("c1",),
                                              istio_key_type=keys.KeyType.EC_P256), NOW)
        assert h.istio_root != h.relay_root.certificate
        assert not bundle.issued_by(h.istio_root, h.relay_root.certificate)

    def test_shared_uses_one_intermediate_for_both(self) -> None:
        """In the shared architecture one intermediate signs relay leaves and Istio CAs."""
        h = hierarchy.build(hierarchy.Options(architecture=hierarchy.Architecture.SHARED,
                                              clusters=("c1",),
                                              istio_key_type=keys.KeyType.EC_P256), NOW)
        assert h.istio_signing is h.relay_signing
        assert h.istio_root == h.relay_root.certificate

    def test_split_signs_istio_under_the_root(self) -> None:
        """In the split architecture the cluster CAs hang directly under the shared root."""
        h = hierarchy.build(hierarchy.Options(architecture=hierarchy.Architecture.SPLIT,
                                              clusters=("c1",),
                                              istio_key_type=keys.KeyType.EC_P256), NOW)
        cacerts = _by_name(h)["c1", "cacerts"].data
        chain = bundle.load_certificates(cacerts["cert-chain.pem"])
        assert len(chain) == 2 and chain[1] == h.relay_root.certificate

    def test_istio_intermediate_defaults_to_rsa_4096(self) -> None:
        """Without an override the cluster CA key is RSA 4096, as in the reference."""
        h = hierarchy.build(hierarchy.Options(architecture=hierarchy.Architecture.SPLIT,
                                              clusters=("c1",)), NOW)
        cacerts = _by_name(h)["c1", "cacerts"].data
        assert keys.describe_key(keys.load_private_key(cacerts["ca-key.pem"])) == "RSA 4096"

    @pytest.mark.parametrize("clusters, message", [
        ((), "at least one cluster"),
        (("Bad_Name",), "invalid"),
        (("mgmt",), "management cluster"),
        (("a", "a"), "unique"),
    ])
    def test_bad_cluster_lists_are_refused(self, clusters: tuple[str, ...], message: str) -> None:
        """Empty, invalid, reserved and duplicate cluster names are refused with a reason."""
        from meshtrust import errors
        with pytest.raises(errors.ConfigError, match=message):
            hierarchy.Options(architecture=hierarchy.Architecture.SHARED, clusters=clusters)
