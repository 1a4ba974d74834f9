"""``meshtrust pki`` in-process: init writes the layout, inspect describes, verify judges."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest

import openssl_cli
from meshtrust.cli import main
from meshtrust.cli.output import Output
from meshtrust.pki import bundle


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main.main(list(argv), Output(stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "fleet"
    code, stdout, stderr = run("pki", "init", "--architecture", "separate", "--clusters",
                               "cluster-1,cluster-2", "--out", str(out),
                               "--istio-key-type", "ecdsa-p256", "--server-name", "relay.example")
    assert code == 0, stderr
    assert "inventory" in stdout
    return out


class TestPkiInit:
    def test_layout_matches_the_design(self, tree: Path) -> None:
        """Every secret lands at DIR/<cluster>/<namespace>/<name>/<key>."""
        for rel in ("mgmt/gloo-mesh/relay-root-tls-secret/ca.crt",
                    "mgmt/gloo-mesh/relay-root-tls-secret/tls.key",
                    "mgmt/gloo-mesh/relay-tls-signing-secret/tls.crt",
                    "mgmt/gloo-mesh/relay-server-tls-secret/tls.crt",
                    "mgmt/gloo-mesh/relay-identity-token-secret/token",
                    "mgmt/gloo-mesh/root-trust.default/root-cert.pem",
                    "mgmt/gloo-mesh/root-trust.default/key.pem",
                    "cluster-1/gloo-mesh/relay-client-tls-secret/tls.crt",
                    "cluster-1/gloo-mesh/relay-root-tls-secret/ca.crt",
                    "cluster-2/istio-system/cacerts/cert-chain.pem",
                    "cluster-2/istio-system/cacerts/ca-key.pem"):
            assert (tree / rel).is_file(), rel

    def test_private_keys_are_0600(self, tree: Path) -> None:
        """Private key files are readable by their owner only."""
        for rel in ("mgmt/gloo-mesh/relay-root-tls-secret/tls.key",
                    "cluster-1/istio-system/cacerts/ca-key.pem",
                    "cluster-1/gloo-mesh/relay-client-tls-secret/tls.key"):
            mode = stat.S_IMODE((tree / rel).resolve().stat().st_mode)
            assert mode & 0o077 == 0, (rel, oct(mode))

    def test_client_certificate_verifies_with_openssl(self, tree: Path, tmp_path: Path) -> None:
        """The written client certificate verifies against the written relay root."""
        client = tree / "cluster-1/gloo-mesh/relay-client-tls-secret"
        proc = openssl_cli.run("verify", "-CAfile", client / "ca.crt", "-untrusted",
                               client / "tls.crt", client / "tls.crt")
        assert proc.stdout.strip().endswith("OK")

    def test_server_names_are_added(self, tree: Path) -> None:
        """--server-name adds a SAN next to DNS:*.gloo-mesh."""
        cert = bundle.load_certificate(
            (tree / "mgmt/gloo-mesh/relay-server-tls-secret/tls.crt").read_bytes())
        sans = bundle.summary(cert, cert.not_valid_before_utc)["sans"]
        assert sans == ["DNS:*.gloo-mesh", "DNS:relay.example"]

    def test_refuses_a_non_empty_directory(self, tree: Path) -> None:
        """Re-running into a non-empty directory refuses and changes nothing."""
        before = (tree / "cluster-1/istio-system/cacerts/ca-cert.pem").read_bytes()
        code, _, err = run("pki", "init", "--architecture", "shared", "--clusters", "cluster-1",
                           "--out", str(tree))
        assert code == 1 and "--force" in err
        assert (tree / "cluster-1/istio-system/cacerts/ca-cert.pem").read_bytes() == before

    def test_force_replaces(self, tmp_path: Path) -> None:
        """With --force a second run replaces the secrets."""
        args = ("pki", "init", "--architecture", "shared", "--clusters", "c1", "--out",
                str(tmp_path), "--istio-key-type", "ecdsa-p256")
        assert run(*args)[0] == 0
        first = (tmp_path / "c1/istio-system/cacerts/ca-cert.pem").read_bytes()
        assert run(*args, "--force")[0] == 0
        assert (tmp_path / "c1/istio-system/cacerts/ca-cert.pem").read_bytes() != first

    def test_bad_cluster_name_is_explained(self, tmp_path: Path) -> None:
        """An invalid cluster name is refused with the rule, and nothing is written."""
        code, _, err = run("pki", "init", "--architecture", "split", "--clusters", "Cluster_1",
                           "--out", str(tmp_path / "x"))
        assert code == 1 and "lower-case letters" in err
        assert not (tmp_path / "x").exists()

    def test_unknown_architecture_is_a_usage_error(self, tmp_path: Path) -> None:
        """An unknown --architecture is refused by the argument parser."""
        with pytest.raises(SystemExit) as exit_info:
            run("pki", "init", "--architecture", "triple", "--clusters", "c1",
                "--out", str(tmp_path))
        assert exit_info.value.code == 2


class TestPkiInspect:
    def test_json_lists_each_certificate(self, tree: Path) -> None:
        """inspect -o json gives subject, SANs, key and a fingerprint per certificate."""
        code, stdout, _ = run("pki", "inspect", "-o", "json",
                              str(tree / "cluster-1/istio-system/cacerts/ca-cert.pem"))
        assert code == 0
        [item] = json.loads(stdout)
        assert item["subject"] == "L=cluster-1,CN=Intermediate CA,O=Istio"
        assert item["ca"] is True and item["path_length"] == 0
        assert "URI:spiffe://cluster.local/ns/istio-system/sa/istiod" in item["sans"]

    def test_fingerprint_matches_openssl(self, tree: Path) -> None:
        """The SHA-256 fingerprint equals the one openssl prints."""
        path = tree / "mgmt/gloo-mesh/relay-root-tls-secret/ca.crt"
        _, stdout, _ = run("pki", "inspect", "-o", "json", str(path))
        ours = json.loads(stdout)[0]["fingerprint_sha256"]
        theirs = openssl_cli.run("x509", "-noout", "-fingerprint", "-sha256", "-in", path).stdout
        assert theirs.strip().split("=", 1)[1] == ours

    def test_folder_is_read_without_duplicates(self, tree: Path) -> None:
        """A secret folder is read once per file, not again through its hidden versions."""
        _, stdout, _ = run("pki", "inspect", "-o", "json",
                           str(tree / "cluster-1/gloo-mesh/relay-root-tls-secret"))
        assert len(json.loads(stdout)) == 1

    def test_missing_path_is_explained(self, tmp_path: Path) -> None:
        """A path that does not exist is reported."""
        code, _, err = run("pki", "inspect", str(tmp_path / "nope.pem"))
        assert code == 1 and "does not exist" in err


class TestPkiVerify:
    def test_good_bundle_passes(self, tree: Path) -> None:
        """A generated cacerts passes the istio-intermediate profile with exit 0."""
        code, stdout, _ = run("pki", "verify", "--profile", "istio-intermediate",
                              str(tree / "cluster-1/istio-system/cacerts"))
        assert code == 0 and "OK" in stdout

    def test_client_bundle_passes_its_profile(self, tree: Path) -> None:
        """A generated relay client secret passes the relay-client profile for its cluster."""
        folder = tree / "cluster-2/gloo-mesh/relay-client-tls-secret"
        code, stdout, _ = run("pki", "verify", "--profile", "relay-client", "--cluster",
                              "cluster-2", str(folder))
        assert code == 0, stdout

    def test_wrong_profile_lists_every_problem(self, tree: Path) -> None:
        """Checking a leaf as an intermediate lists each problem and exits 1."""
        code, stdout, _ = run("pki", "verify", "--profile", "istio-intermediate",
                              str(tree / "cluster-1/gloo-mesh/relay-client-tls-secret"))
        assert code == 1
        assert "basicConstraints must be CA:true" in stdout
        assert "subjectAltName lacks DNS:istiod.istio-system.svc" in stdout

    def test_mismatched_key_is_found(self, tree: Path, tmp_path: Path) -> None:
        """A cacerts folder whose key belongs to another cluster fails."""
        bad = tmp_path / "cacerts"
        bad.mkdir()
        src = tree / "cluster-1/istio-system/cacerts"
        for name in ("ca-cert.pem", "root-cert.pem", "cert-chain.pem"):
            (bad / name).write_bytes((src / name).read_bytes())
        (bad / "ca-key.pem").write_bytes(
            (tree / "cluster-2/istio-system/cacerts/ca-key.pem").read_bytes())
        code, stdout, _ = run("pki", "verify", "--profile", "istio-intermediate", str(bad))
        assert code == 1 and "does not match" in stdout
