"""What the fuzzers found, kept as plain tests: each input once crashed meshtrust.

Each was an exception other than a domain error (or a policy the store could
not read back). They are checked here with the exact kind of input, so they
stay fixed whatever the fuzzers' strategies become.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

import fuzzkit
import fuzzworld
from servicercontext import Context, Metadatum
from meshtrust import errors, metrics
from meshtrust.authority import backup, registry, relay_pki, signers, trust_policy
from meshtrust.cli import trust_cmd
from meshtrust.pki import bundle, csr, envelope, issuer, keys, profiles
from meshtrust.rpc.transport import messages
from meshtrust.server import service
from meshtrust.store import base
from meshtrust.testing import FakeClock, MemoryStore

NOW = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
P256_CURVE = bytes.fromhex("06082a8648ce3d030107")  # the OID 1.2.840.10045.3.1.7, as DER
EC_KEY_TYPE = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey 1.2.840.10045.2.1


def _der_csr(**names: Any) -> bytes:
    request = csr.build_csr(fuzzkit.key("ec-p256"), **names)
    return request.public_bytes(serialization.Encoding.DER)


def _signed_again(info: bytes) -> bytes:
    return fuzzkit.sign_raw(fuzzkit.key("ec-p256"), info)


def _edited_info(edit: Any) -> bytes:
    """A c1 CSR whose signed part was changed by ``edit(tree)``, then signed again."""
    tree = fuzzkit.parse_der(fuzzkit.request_info(_der_csr(common_name="c1", names=["c1"])))
    assert tree is not None
    edit(tree)
    return _signed_again(tree.dump())


def _subject_attribute(tree: fuzzkit.Node) -> fuzzkit.Node:
    """The value node of the first attribute of a CertificationRequestInfo's subject."""
    assert tree.children
    subject = tree.children[1]
    assert subject.children and subject.children[0].children
    return subject.children[0].children[0].children[1]  # type: ignore[index]


class TestLoadCSR:
    def test_version_other_than_one(self) -> None:
        """A CSR whose version is not v1 is refused as invalid, not raised as InvalidVersion."""
        def version_two(tree: fuzzkit.Node) -> None:
            assert tree.children
            tree.children[0].content = b"\x01"
        with pytest.raises(errors.InvalidCSR, match="not a valid CSR version"):
            csr.load_csr(_edited_info(version_two))

    def test_unknown_curve(self) -> None:
        """A key on a curve cryptography does not know is a key policy refusal."""
        data = _der_csr(common_name="c1").replace(P256_CURVE, P256_CURVE[:2] + b"\x1a"
                                                  + P256_CURVE[3:])
        with pytest.raises(errors.KeyPolicyError, match="cannot be read"):
            csr.load_csr(data)

    @pytest.mark.parametrize(("tag", "value"), [(0x0C, b"\xff\xfe"), (0x03, b"\x00c1")])
    def test_unreadable_common_name(self, tag: int, value: bytes) -> None:
        """A subject that cannot be read (bad UTF-8; a bit string) is refused at the gate,
        not where the issuer reads the common name."""
        def damage(tree: fuzzkit.Node) -> None:
            node = _subject_attribute(tree)
            node.tag, node.content = tag, value
        with pytest.raises(errors.InvalidCSR, match="malformed subject"):
            csr.load_csr(_edited_info(damage))

    @pytest.mark.parametrize("name", ["", "c" * 65])
    def test_common_name_out_of_bounds(self, name: str) -> None:
        """A common name of no or of 65 characters is refused, not only warned about."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name,
                                                    _validate=False)])
            request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
                fuzzkit.key("ec-p256"), fuzzkit.sign_hash(fuzzkit.key("ec-p256")))
        with pytest.raises(errors.InvalidCSR, match="length must be"):
            csr.load_csr(request.public_bytes(serialization.Encoding.PEM))

    def test_extension_twice(self) -> None:
        """A signed CSR that asks for the same extension twice is refused as malformed."""
        def twice(tree: fuzzkit.Node) -> None:
            attributes = tree.children[-1]  # type: ignore[index]
            extensions = attributes.children[0].children[1].children[0]  # type: ignore[index]
            extensions.children.append(extensions.children[0].copy())  # type: ignore[union-attr]
        with pytest.raises(errors.InvalidCSR, match="malformed subject or extension"):
            csr.load_csr(_edited_info(twice))


class TestLoadCertificates:
    def _certificate(self) -> bytes:
        ca = issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT, NOW)
        return ca.certificate.public_bytes(serialization.Encoding.DER)

    def test_version_out_of_range(self) -> None:
        """A certificate of version 7 is unreadable (ChainError), not an InvalidVersion."""
        der = self._certificate()
        at = der.index(b"\xa0\x03\x02\x01\x02")
        damaged = der[:at + 4] + b"\x06" + der[at + 5:]
        with pytest.raises(errors.ChainError, match="no readable certificate"):
            bundle.load_certificates(fuzzkit.pem("CERTIFICATE", damaged))

    def test_unknown_key_algorithm(self) -> None:
        """A certificate whose key cryptography cannot read is refused when loaded, not where
        its key is compared."""
        damaged = self._certificate().replace(EC_KEY_TYPE, EC_KEY_TYPE[:4] + b"\x4c"
                                              + EC_KEY_TYPE[5:])
        with pytest.raises(errors.ChainError, match="no readable certificate"):
            bundle.load_certificates(damaged)


class TestLoadPrivateKey:
    def test_unknown_key_algorithm(self) -> None:
        """A PKCS#8 key of an algorithm cryptography does not know is a key policy refusal."""
        der = fuzzkit.key("ec-p256").private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        damaged = der.replace(EC_KEY_TYPE, EC_KEY_TYPE[:4] + b"\x4c" + EC_KEY_TYPE[5:])
        with pytest.raises(errors.KeyPolicyError, match="cannot read the private key"):
            keys.load_private_key(fuzzkit.pem("PRIVATE KEY", damaged))


class TestBackupFiles:
    def test_header_nested_deep(self) -> None:
        """A sealed file whose header nests a thousand arrays does not open: CannotOpen."""
        with pytest.raises(envelope.CannotOpen, match="header is unreadable"):
            envelope.load_header(envelope.MAGIC + b"[" * 1000 + b"\n")

    def test_contents_nested_deep(self) -> None:
        """Contents nested too deep to read are refused as not JSON."""
        with pytest.raises(errors.ConfigError, match="not JSON"):
            backup.load_contents(b"[" * 5000 + b"]" * 5000)

    def test_odd_statuses_restore_and_list(self) -> None:
        """A record whose policy is not a name, or a cluster whose client certificate is not a
        mapping, restores and lists instead of raising."""
        async def scenario() -> list[str]:
            clock = FakeClock(NOW)
            store = MemoryStore(clock=clock)
            await relay_pki.ensure(store, clock)
            contents = await backup.collect(store, clock)
            odd = (base.Resource(api_version="meshtrust.io/v1", kind="IssuedCertificate",
                                 namespace="gloo-mesh", name="mesh.c1",
                                 spec={"policy": {"not": "a name"}, "policyGeneration": 1}),
                   base.Resource(api_version="admin.gloo.solo.io/v2", kind="KubernetesCluster",
                                 namespace="gloo-mesh", name="c1",
                                 status={"clientCertificate": "x"}))
            contents = dataclasses.replace(contents, resources=odd)
            written = await backup.restore(MemoryStore(clock=clock), contents)
            assert [row[3] for row in backup.inventory(contents, NOW)][-1] == \
                "not bootstrapped yet"
            assert backup.unbootstrapped(contents) == ["c1"]
            clusters = registry.Registry(store, clock)
            await store.create(odd[1])
            listed = await clusters.list()  # the registry reads it as not bootstrapped
            assert [(c.name, c.client_serial) for c in listed] == [("c1", None)]
            return written
        assert len(asyncio.run(scenario())) == 6


def _policy(**config: Any) -> dict[str, Any]:
    return {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
            "metadata": {"name": "mesh"}, "spec": {"config": config}}


class TestTrustPolicy:
    @pytest.mark.parametrize(("document", "message"), [
        ({**_policy(), "spec": {1: 2, "config": {}}}, r"spec\.1: unknown field"),
        ({**_policy(), "spec": {"applyToMeshes": [{"selector": {"clusters": 5}}]}},
         r"selector\.clusters: must be a list"),
        (_policy(intermediateCertOptions={"ttlDays": 10**10}), "at most 365000"),
        (_policy(mgmtServerCa={"secretRef": {"name": "root", "namespace": "Istio"}}),
         r"secretRef\.namespace: 'Istio' is not a DNS-1123 label"),
        (_policy(mgmtServerCa={"secretRef": {"name": "Root"}}),
         r"secretRef\.name: 'Root' is not a DNS-1123 subdomain"),
        ({**_policy(), "metadata": {"name": "Mesh"}}, r"metadata\.name: 'Mesh' is not"),
        ({**_policy(), "metadata": {"name": "m" * 64}}, "at most 63 characters"),
        ({**_policy(), "metadata": {"name": "mesh", "namespace": "Gloo"}},
         r"metadata\.namespace: 'Gloo' is not a DNS-1123 label"),
    ])
    def test_refused_with_the_field(self, document: dict[str, Any], message: str) -> None:
        """What the store or the reconcile loop could not take is refused at parse, naming
        the field."""
        with pytest.raises(errors.ConfigError, match=message):
            trust_policy.parse(document)

    def test_sub_second_lifetime_reads_back(self) -> None:
        """A ttl of half a second is stored as 0.5s, not as 0s, which no longer parses."""
        policy = trust_policy.parse(_policy(intermediateCertOptions={"ttl": "0.5s"},
                                            mgmtServerCa={"generated": {"ttl": "1.25s"}}))
        assert trust_policy.parse(trust_policy.to_document(policy)) == policy


class TestPolicyYAML:
    @pytest.mark.parametrize("text", [b"\xff\xfe", b"a: 2026-13-45\n", b"a: !!int 0x\n",
                                      b"[" * 2000])
    def test_unreadable_file(self, tmp_path: Path, text: bytes) -> None:
        """`meshtrust apply -f` refuses a file that is not UTF-8 or holds a value YAML cannot
        build, with ConfigError, not a traceback."""
        path = tmp_path / "policy.yaml"
        path.write_bytes(text)
        with pytest.raises(errors.ConfigError, match="is not valid YAML"):
            trust_cmd._documents(path)


class TestReportStatus:
    def test_times_past_year_9999(self, made: fuzzworld.Template) -> None:
        """A report of times no date can hold is recorded with those times unknown."""
        async def scenario() -> dict[str, Any]:
            world = await fuzzworld.World.fresh(made, signers.Signers())
            relay = service.RelayService(world.relay, world.clock, metrics.Metrics(),
                                         insecure=True)
            report = messages.StatusReport(protocol_version=1, certificates=[
                messages.HeldCertificate(kind="relay-client", not_after_unix=2**63 - 1,
                                         renew_at_unix=-2**63)])
            await relay.ReportStatus(report, Context(metadata=[
                Metadatum(service.INSECURE_CLUSTER_HEADER, "c1")]))
            resource = await world.store.get_resource("KubernetesCluster", "gloo-mesh", "c1")
            return dict(resource.status["certificates"][0])
        held = asyncio.run(scenario())
        assert (held["notAfter"], held["renewAt"]) == ("", "")
