"""Store values check themselves; manifests from YAML fail with the field named."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from typing import Any

import pytest

from meshtrust import errors, testing
from meshtrust.store import backend, base, manifest, sqlite

UTC = dt.UTC


class TestSecret:
    def test_dotted_name(self) -> None:
        """A DNS-1123 subdomain with dots, such as root-trust.default, is a valid name."""
        secret = base.Secret(namespace="gloo-mesh", name="root-trust.default",
                             data={"root-cert.pem": b"x"})
        assert secret.kind == "Secret"

    @pytest.mark.parametrize("name", ["Upper", "under_score", "-dash", "dot.", "a" * 254, ""])
    def test_bad_name(self, name: str) -> None:
        """A name that is not a DNS-1123 subdomain raises InvalidField naming the field."""
        with pytest.raises(base.InvalidField, match="^name: .*DNS-1123 subdomain"):
            base.Secret(namespace="gloo-mesh", name=name)

    def test_namespace_is_a_label(self) -> None:
        """A namespace may not contain dots: it is a DNS-1123 label."""
        with pytest.raises(ValueError, match="namespace: 'a.b' is not a DNS-1123 label"):
            base.Secret(namespace="a.b", name="x")

    @pytest.mark.parametrize("key", ["..data", "..", ".", "with space", "slash/key", ""])
    def test_bad_key(self, key: str) -> None:
        """Data keys follow the Kubernetes rule, so they are always safe file names."""
        with pytest.raises(base.InvalidField, match="data: key"):
            base.Secret(namespace="ns", name="x", data={key: b""})

    def test_values_are_bytes(self) -> None:
        """Data values must be bytes, not text."""
        with pytest.raises(base.InvalidField, match="value of 'tls.crt' must be bytes"):
            base.Secret(namespace="ns", name="x", data={"tls.crt": "text"})  # type: ignore[dict-item]

    def test_naive_time(self) -> None:
        """Timestamps must be timezone-aware."""
        with pytest.raises(base.InvalidField, match="created: .*timezone-aware"):
            base.Secret(namespace="ns", name="x", created=dt.datetime(2025, 1, 1))

    def test_labels(self) -> None:
        """Label keys may carry a DNS prefix; values are at most 63 characters."""
        base.Secret(namespace="ns", name="x", labels={"app.kubernetes.io/name": "relay"})
        with pytest.raises(base.InvalidField, match="labels: value"):
            base.Secret(namespace="ns", name="x", labels={"a": "v" * 64})

    def test_copies_its_data(self) -> None:
        """A secret keeps its own copy of the mapping it was given."""
        data = {"k": b"v"}
        secret = base.Secret(namespace="ns", name="x", data=data)
        data["k"] = b"changed"
        assert secret.data == {"k": b"v"}


class TestResource:
    def test_secret_kind_is_reserved(self) -> None:
        """A resource cannot be of kind Secret."""
        with pytest.raises(base.InvalidField, match="kind: 'Secret' is reserved"):
            base.Resource(api_version="v1", kind="Secret", namespace="ns", name="x")

    def test_api_version(self) -> None:
        """apiVersion is group/version or a bare version."""
        base.Resource(api_version="coordination.k8s.io/v1", kind="Lease", namespace="n", name="x")
        with pytest.raises(base.InvalidField, match="api_version"):
            base.Resource(api_version="not a version", kind="Lease", namespace="n", name="x")

    def test_spec_must_be_json(self) -> None:
        """spec holds only JSON values, so every backend can store it."""
        with pytest.raises(base.InvalidField, match="spec: must hold only JSON values"):
            base.Resource(api_version="v1", kind="Thing", namespace="n", name="x",
                          spec={"when": dt.datetime.now(UTC)})


class TestManifest:
    def test_round_trip(self) -> None:
        """A stored object survives dump_json and load_json unchanged."""
        now = dt.datetime(2025, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
        secret = base.Secret(namespace="istio-system", name="cacerts", type="Opaque",
                             data={"ca-key.pem": b"\x00\xff"}, labels={"a": "b"},
                             annotations={"note": "any text"}, resource_version=9,
                             created=now, updated=now + dt.timedelta(seconds=1))
        assert manifest.load_json(manifest.dump_json(secret), source="t") == secret

    def test_kubernetes_shape(self) -> None:
        """dump gives the kubectl shape: base64 data and a string resourceVersion."""
        secret = base.Secret(namespace="ns", name="x", data={"token": b"abc"}, resource_version=4)
        document = manifest.dump(secret)
        assert document["apiVersion"] == "v1"
        assert document["metadata"]["resourceVersion"] == "4"
        assert document["data"] == {"token": "YWJj"}
        assert manifest.dump(secret, show_data=False)["data"] == {"token": 3}

    def test_string_data(self) -> None:
        """stringData values are stored as UTF-8 and override data."""
        [secret] = manifest.load_documents(
            "kind: Secret\napiVersion: v1\nmetadata: {name: t}\n"
            "data: {a: YQ==, b: YQ==}\nstringData: {b: bee}\n", source="f.yaml")
        assert isinstance(secret, base.Secret)
        assert (secret.namespace, dict(secret.data)) == ("default", {"a": b"a", "b": b"bee"})

    def test_resources_and_documents(self) -> None:
        """Any other kind loads as a resource; empty documents are skipped."""
        objs = manifest.load_documents(
            "---\napiVersion: admin.gloo.solo.io/v2\nkind: RootTrustPolicy\n"
            "metadata: {name: p, namespace: gloo-mesh}\nspec: {a: 1}\n---\n", source="f.yaml")
        assert [(o.kind, o.name) for o in objs] == [("RootTrustPolicy", "p")]

    @pytest.mark.parametrize(("text", "message"), [
        ("kind: Secret\nmetadata: {name: Bad_Name}\n", r"f.yaml document 1: metadata.name: "),
        ("kind: Secret\nmetadata: {name: ok, namespace: a.b}\n", r"metadata.namespace: "),
        ("kind: Secret\nmetadata: {name: ok}\ndata: {k: '***'}\n", r"data.k: not valid base64"),
        ("kind: Secret\nmetadata: {name: ok}\ndata: {'bad key': YQ==}\n", r": data: key"),
        ("kind: Secret\nmetadata: {name: ok, labels: [a]}\n", r"metadata.labels: must be a"),
        ("kind: Secret\n", r"metadata: is required"),
        ("kind: Thing\napiVersion: v1\nmetadata: {name: ok}\nspec: [1]\n", r"spec: must be"),
        ("kind: Thing\nmetadata: {name: ok}\n", r"apiVersion: "),
        ("metadata: {name: ok, resourceVersion: x}\n", r"metadata.resourceVersion: "),
        ("[1, 2]\n", r"a manifest must be a mapping"),
        ("a: [\n", r"not valid YAML"),
    ])
    def test_bad_input_names_the_field(self, text: str, message: str) -> None:
        """YAML that breaks a rule raises ConfigError naming the document and the field."""
        with pytest.raises(errors.ConfigError, match=message):
            manifest.load_documents(text, source="f.yaml")

    def test_a_stored_resource_reads_back_as_plain_data(self) -> None:
        """A resource record reads back equal, with its own plain dicts and lists."""
        resource = base.Resource(api_version="meshtrust.io/v1", kind="Thing", namespace="n",
                                 name="x", spec={"a": [1, 2.5, {"b": None}]},
                                 status={"state": "DONE", "pods": ["p"]}, resource_version=3)
        text = manifest.dump_json(resource)
        first = manifest.load_json(text, source="t")
        second = manifest.load_json(text, source="t")
        assert first == resource
        assert isinstance(first, base.Resource) and isinstance(second, base.Resource)
        first.spec["a"][2]["b"] = "changed"
        assert second.spec["a"][2]["b"] is None

    @pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
    def test_a_record_with_a_number_json_cannot_hold_is_refused(self, number: str) -> None:
        """Python's json reads NaN and overflows to infinity; a store record may not."""
        text = ('{"apiVersion":"v1","kind":"Thing","metadata":{"name":"x","namespace":"n"},'
                f'"spec":{{"n":{number}}}}}')
        with pytest.raises(errors.ConfigError, match=r"t: not valid JSON"):
            manifest.load_json(text, source="t")

    def test_a_record_nested_too_deep_is_refused(self) -> None:
        """A record nested deeper than the parser goes is refused as invalid, not a crash."""
        text = ('{"apiVersion":"v1","kind":"Thing","metadata":{"name":"x","namespace":"n"},'
                '"spec":{"n":' + "[" * 100_000 + "]" * 100_000 + "}}")
        with pytest.raises(errors.ConfigError, match=r"t: not valid JSON"):
            manifest.load_json(text, source="t")

    def test_a_resource_made_in_code_keeps_its_own_copy(self) -> None:
        """Values a caller passes are copied: changing them later changes nothing stored."""
        spec: dict[str, Any] = {"a": [1]}
        resource = base.Resource(api_version="v1", kind="Thing", namespace="n", name="x",
                                 spec=spec)
        spec["a"].append(2)
        assert resource.spec == {"a": [1]}


class TestFakeClock:
    def test_moves_only_when_told(self) -> None:
        """The fake clock stands still, advances by seconds or timedeltas, and can be set."""
        clock = testing.FakeClock()
        start = clock.now()
        assert clock.now() == start
        assert clock.advance(1.5) == start + dt.timedelta(seconds=1.5)
        clock.advance(dt.timedelta(minutes=1))
        assert clock.now() - start == dt.timedelta(seconds=61.5)
        clock.set(dt.datetime(2030, 1, 1, tzinfo=UTC))
        assert clock.now().year == 2030

    def test_refuses_going_back(self) -> None:
        """Advancing by a negative amount is a caller error."""
        with pytest.raises(ValueError, match="does not go backwards"):
            testing.FakeClock().advance(-1)


class TestLoadingMany:
    def test_a_long_list_lets_other_tasks_run_while_it_is_parsed(self) -> None:
        """Parsing a thousand records hands the event loop over between slices, and keeps
        their order."""
        texts = [manifest.dump_json(base.Resource(
            api_version="v1", kind="Thing", namespace="ns", name=f"thing-{i:04d}"))
            for i in range(1000)]

        async def scenario() -> tuple[list[str], int]:
            turns = 0
            done = False

            async def other() -> None:
                nonlocal turns
                while not done:
                    turns += 1
                    await asyncio.sleep(0)

            beside = asyncio.create_task(other())
            await asyncio.sleep(0)
            started = turns
            loaded = await backend.load_all(texts, source="test")
            done = True
            await beside
            return [obj.name for obj in loaded], turns - started

        names, turns = asyncio.run(scenario())
        assert names == [f"thing-{i:04d}" for i in range(1000)]
        assert turns >= 1000 // backend.LOAD_SLICE


class TestWriteTurns:
    def test_writers_of_one_file_take_the_lock_in_arrival_order(self, tmp_path: Any) -> None:
        """A writer that asks for the lock while another holds it and a third waits gets it
        third, whatever the first does next: one busy writer cannot keep another out."""
        turns = sqlite._turns_for(str(tmp_path / "a.db"))
        assert sqlite._turns_for(str(tmp_path / "." / "a.db")) is turns  # one per file
        order: list[str] = []
        holding = threading.Event()

        def busy() -> None:  # takes turn after turn, as a writer under a storm
            for _ in range(3):
                with turns.turn():
                    order.append("busy")
                    holding.set()
                    time.sleep(0.05)

        def lease() -> None:
            with turns.turn():
                order.append("lease")

        first = threading.Thread(target=busy)
        first.start()
        holding.wait()
        second = threading.Thread(target=lease)
        second.start()
        first.join()
        second.join()
        assert order == ["busy", "lease", "busy", "busy"]
