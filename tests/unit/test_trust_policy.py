"""RootTrustPolicy and VirtualMesh documents: both shapes read, every mistake named."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml

from meshtrust import errors
from meshtrust.authority import trust_policy
from meshtrust.pki import keys

SEED_POLICY = """
apiVersion: admin.gloo.solo.io/v2
kind: RootTrustPolicy
metadata:
  name: istio-ingressgateway
  namespace: gloo-mesh
spec:
  config:
    autoRestartPods: true
    mgmtServerCa:
      generated: {}
"""

SEED_VIRTUAL_MESH = """
apiVersion: networking.mesh.gloo.solo.io/v1
kind: VirtualMesh
metadata:
  name: virtual-mesh
  namespace: gloo-mesh
spec:
  mtlsConfig:
    autoRestartPods: true
    shared:
      rootCertificateAuthority:
        generated: {}
  federation:
    selectors:
    - {}
  meshes:
  - name: istiod-istio-system-cluster-1
    namespace: gloo-mesh
  - name: istiod-istio-system-cluster-2
    namespace: gloo-mesh
"""


def doc(text: str) -> dict[str, Any]:
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def policy_with(**config: Any) -> dict[str, Any]:
    document = doc(SEED_POLICY)
    document["spec"]["config"].update(config)
    return document


class TestParse:
    def test_seed_policy(self) -> None:
        """The reference's example policy reads with the reference's defaults."""
        policy = trust_policy.parse(doc(SEED_POLICY))
        assert policy.name == "istio-ingressgateway" and policy.auto_restart_pods
        assert policy.clusters is None and isinstance(policy.root, trust_policy.GeneratedRoot)
        assert policy.intermediate.key_type is keys.KeyType.RSA_4096
        assert policy.intermediate.grace_ratio == 0.1

    def test_seed_virtual_mesh(self) -> None:
        """The older VirtualMesh shape reads, with clusters from the istiod mesh names."""
        policy = trust_policy.parse(doc(SEED_VIRTUAL_MESH))
        assert policy.clusters == ("cluster-1", "cluster-2")
        assert policy.auto_restart_pods

    def test_options(self) -> None:
        """Intermediate options and cluster selectors are read."""
        document = policy_with(intermediateCertOptions={
            "ttl": "90s", "rsaKeySizeBytes": 2048, "secretRotationGracePeriodRatio": 0.5,
            "orgName": "Acme"})
        document["spec"]["applyToMeshes"] = [{"selector": {"cluster": "cluster-2"}},
                                             {"selector": {"clusters": ["cluster-3"]}}]
        policy = trust_policy.parse(document)
        assert policy.clusters == ("cluster-2", "cluster-3")
        assert policy.intermediate.lifetime == dt.timedelta(seconds=90)
        assert policy.intermediate.key_type is keys.KeyType.RSA_2048
        assert policy.intermediate.organization == "Acme"

    def test_round_trip(self) -> None:
        """to_document gives a RootTrustPolicy that parses to the same policy."""
        policy = trust_policy.parse(doc(SEED_VIRTUAL_MESH))
        assert trust_policy.parse(trust_policy.to_document(policy)) == policy

    @pytest.mark.parametrize("change, message", [
        ({"autoRestartPods": "yes"}, r"spec\.config\.autoRestartPods: must be true or false"),
        ({"mgmtServerCa": {"generated": {}, "secretRef": {"name": "x"}}},
         "exactly one of generated, secretRef, awsPca"),
        ({"mgmtServerCa": {"secretRef": {"name": "cacerts"}}}, "cannot be 'cacerts'"),
        ({"mgmtServerCa": {"generated": {"rsaKeySizeBytes": 1024}}}, "2048, 3072 or 4096"),
        ({"intermediateCertOptions": {"secretRotationGracePeriodRatio": 1.5}},
         "between 0 and 1"),
        ({"intermediateCertOptions": {"ttlDays": -3}}, "positive whole number"),
        ({"intermediateCertOptions": {"keyType": "ed25519"}}, "unknown key type"),
        ({"intermediateCertOptions": {"ttl": "soon"}}, "not a positive duration"),
        ({"bogus": 1}, r"spec\.config\.bogus: unknown field; allowed here"),
        ({"secretForm": "pkcs12"}, "one of cacerts, tls"),
        ({"mgmtServerCa": {"awsPca": {"certificateAuthorityArn": "arn:aws:s3:::bucket"}}},
         r"certificateAuthorityArn: 'arn:aws:s3:::bucket' is not an AWS Private CA ARN"),
        ({"mgmtServerCa": {"awsPca": {"arn": "x"}}}, r"awsPca\.arn: unknown field"),
        ({"mgmtServerCa": {"awsPca": {"certificateAuthorityArn":
          "arn:aws:acm-pca:us-east-1:123456789012:certificate-authority/abc\n"}}},
         "is not an AWS Private CA ARN"),
    ])
    def test_mistakes_are_named(self, change: dict[str, Any], message: str) -> None:
        """Each invalid field is refused with its path and what is allowed."""
        with pytest.raises(errors.ConfigError, match=message):
            trust_policy.parse(policy_with(**change))

    def test_aws_pca_signer(self) -> None:
        """awsPca names the CA that signs; it survives the round trip through storage."""
        arn = ("arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/"
               "11111111-2222-3333-4444-555555555555")
        policy = trust_policy.parse(policy_with(
            mgmtServerCa={"awsPca": {"certificateAuthorityArn": arn}}))
        assert policy.root == trust_policy.ExternalRoot(provider="aws-pca", arn=arn)
        assert isinstance(policy.root, trust_policy.ExternalRoot)
        assert policy.root.region == "eu-west-1"
        assert trust_policy.parse(trust_policy.to_document(policy)) == policy

    def test_bad_mesh_name(self) -> None:
        """A VirtualMesh mesh name that names no istiod is refused."""
        document = doc(SEED_VIRTUAL_MESH)
        document["spec"]["meshes"][0]["name"] = "linkerd-cluster-1"
        with pytest.raises(errors.ConfigError, match=r"spec\.meshes\[0\]\.name"):
            trust_policy.parse(document)

    def test_other_kinds_are_refused(self) -> None:
        """A document of another kind is not a trust policy."""
        with pytest.raises(errors.ConfigError, match="is not a trust policy"):
            trust_policy.parse({"apiVersion": "v1", "kind": "ConfigMap"})
