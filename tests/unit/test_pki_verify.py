"""Chain verification and bring-your-own bundle checks."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from cryptography import x509

from meshtrust import errors
from meshtrust.pki import bundle, csr, hierarchy, issuer, keys, profiles, verify

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def built() -> hierarchy.Hierarchy:
    return hierarchy.build(hierarchy.Options(architecture=hierarchy.Architecture.SEPARATE,
                                             clusters=("cluster-1",),
                                             istio_key_type=keys.KeyType.EC_P256), NOW)


def _secret(h: hierarchy.Hierarchy, cluster: str, name: str) -> dict[str, bytes]:
    return next(s.data for s in h.secrets if s.cluster == cluster and s.name == name)


class TestVerifyChain:
    def test_client_chain_verifies(self, built: hierarchy.Hierarchy) -> None:
        """A relay client certificate verifies as a TLS client up to the relay root."""
        found = bundle.load_bundle(_secret(built, "cluster-1", "relay-client-tls-secret"))
        path = verify.verify_chain(found.certificate, found.intermediates, found.roots, NOW,
                                   client_auth=True)
        assert path[-1] == built.relay_root.certificate

    def test_server_cert_is_not_a_client_without_client_eku(
            self, built: hierarchy.Hierarchy) -> None:
        """A certificate lacking EKU clientAuth fails client verification."""
        root = built.relay_root
        key = keys.generate_key(keys.KeyType.EC_P256)
        # Istio workload certs carry both EKUs, so build one with serverAuth only by profile.
        server_only = dataclasses.replace(profiles.RELAY_SERVER,
                                          extended_key_usage=(profiles.SERVER_AUTH,))
        cert = issuer.issue(csr.Request(csr=csr.build_csr(key), public_key=key.public_key()),
                            built.relay_signing, server_only, NOW)
        with pytest.raises(errors.ChainError, match="does not verify"):
            verify.verify_chain(cert, [built.relay_signing.certificate], [root.certificate], NOW,
                                client_auth=True)

    def test_foreign_root_fails(self, built: hierarchy.Hierarchy) -> None:
        """A cluster CA does not verify against the relay root in the separate architecture."""
        found = bundle.load_bundle(_secret(built, "cluster-1", "cacerts"))
        with pytest.raises(errors.ChainError, match="does not verify"):
            verify.verify_chain(found.certificate, (), [built.relay_root.certificate], NOW)

    def test_pathlen_zero_stops_a_sub_ca(self, built: hierarchy.Hierarchy) -> None:
        """A CA signed under a pathlen:0 cluster CA does not verify."""
        files = _secret(built, "cluster-1", "cacerts")
        found = bundle.load_bundle(files)
        assert found.key is not None
        cluster_ca = issuer.CA(certificate=found.certificate, key=found.key,
                               chain=(built.istio_root,))
        sub_key = keys.generate_key(keys.KeyType.EC_P256)
        # Build a rogue sub-CA by hand: issue() would need a CA profile, which is the point.
        rogue = issuer.issue(csr.Request(csr=csr.build_csr(sub_key, ca=True),
                                         public_key=sub_key.public_key()),
                             cluster_ca, profiles.ISTIO_INTERMEDIATE, NOW,
                             subject=issuer.Subject(cluster="rogue"))
        leaf_key = keys.generate_key(keys.KeyType.EC_P256)
        rogue_ca = issuer.CA(certificate=rogue, key=sub_key, chain=cluster_ca.path)
        leaf = issuer.issue(csr.Request(csr=csr.build_csr(leaf_key),
                                        public_key=leaf_key.public_key()),
                            rogue_ca, profiles.SPIFFE_WORKLOAD, NOW,
                            subject=issuer.Subject(namespace="a", service_account="b"))
        with pytest.raises(errors.ChainError):
            verify.verify_chain(leaf, [rogue, found.certificate], [built.istio_root], NOW)

    def test_expired_chain_fails(self, built: hierarchy.Hierarchy) -> None:
        """A chain checked after its leaf expired does not verify."""
        found = bundle.load_bundle(_secret(built, "cluster-1", "relay-client-tls-secret"))
        later = found.certificate.not_valid_after_utc + dt.timedelta(days=1)
        with pytest.raises(errors.ChainError):
            verify.verify_chain(found.certificate, found.intermediates, found.roots, later)


class TestCheckBundle:
    def test_good_bundle_has_no_problems(self, built: hierarchy.Hierarchy) -> None:
        """The cacerts of a generated hierarchy pass the istio-intermediate profile."""
        found = bundle.load_bundle(_secret(built, "cluster-1", "cacerts"))
        assert verify.check_bundle(profiles.ISTIO_INTERMEDIATE, found, NOW) == []

    def test_wrong_key_is_reported(self, built: hierarchy.Hierarchy) -> None:
        """A key that is not the certificate's is reported."""
        files = dict(_secret(built, "cluster-1", "cacerts"))
        files["ca-key.pem"] = keys.dump_private_key(keys.generate_key(keys.KeyType.EC_P256))
        problems = verify.check_bundle(profiles.ISTIO_INTERMEDIATE, bundle.load_bundle(files), NOW)
        assert "the private key does not match the certificate" in problems

    def test_leaf_is_not_an_intermediate(self, built: hierarchy.Hierarchy) -> None:
        """A leaf certificate checked as an Istio intermediate lists CA, usage and SAN problems."""
        files = _secret(built, "cluster-1", "relay-client-tls-secret")
        problems = verify.check_bundle(profiles.ISTIO_INTERMEDIATE, bundle.load_bundle(files), NOW)
        text = "\n".join(problems)
        assert "basicConstraints must be CA:true" in text
        assert "keyUsage lacks keyCertSign" in text
        assert "subjectAltName lacks DNS:istiod.istio-system.svc" in text

    def test_unlimited_pathlen_is_reported(self, built: hierarchy.Hierarchy) -> None:
        """An intermediate without pathlen:0 is reported."""
        root = issuer.CA(certificate=built.istio_root,
                         key=keys.load_private_key(_secret(built, "mgmt",
                                                           "root-trust.default")["key.pem"]))
        key = keys.generate_key(keys.KeyType.EC_P256)
        loose = issuer.issue(csr.Request(csr=csr.build_csr(key, ca=True),
                                         public_key=key.public_key()),
                             root, profiles.ISTIO_INTERMEDIATE.with_path_length(None), NOW,
                             subject=issuer.Subject(cluster="cluster-1"))
        found = bundle.Bundle(certificate=loose, key=key, intermediates=(),
                              roots=(built.istio_root,), form="cacerts")
        problems = verify.check_bundle(profiles.ISTIO_INTERMEDIATE, found, NOW)
        assert problems == ["pathlen must be at most 0, found unlimited"]

    def test_missing_root_is_reported(self, built: hierarchy.Hierarchy) -> None:
        """A bundle with no root certificate says the root is missing."""
        files = {k: v for k, v in _secret(built, "cluster-1", "cacerts").items()
                 if k != "root-cert.pem"}
        files["cert-chain.pem"] = files["ca-cert.pem"]
        problems = verify.check_bundle(profiles.ISTIO_INTERMEDIATE, bundle.load_bundle(files), NOW)
        assert "the root certificate is missing" in problems

    def test_client_names_other_cluster(self, built: hierarchy.Hierarchy) -> None:
        """A relay client certificate checked for another cluster reports the missing SAN."""
        files = _secret(built, "cluster-1", "relay-client-tls-secret")
        problems = verify.check_bundle(profiles.RELAY_CLIENT, bundle.load_bundle(files), NOW,
                                       cluster="cluster-9")
        assert problems == ["subjectAltName lacks DNS:cluster-9"]

    def test_unknown_layout_is_refused(self) -> None:
        """A folder with neither cacerts nor tls files is refused with the expected names."""
        with pytest.raises(errors.ChainError, match="ca-cert.pem"):
            bundle.load_bundle({"foo.pem": b"x"})


class TestFingerprint:
    def test_matches_openssl_format(self, built: hierarchy.Hierarchy) -> None:
        """Fingerprints are 32 upper-case hex pairs joined by colons."""
        fp = bundle.fingerprint(built.relay_root.certificate)
        assert len(fp.split(":")) == 32 and fp == fp.upper()
        assert isinstance(built.relay_root.certificate, x509.Certificate)
