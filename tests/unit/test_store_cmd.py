"""``meshtrust store`` in-process: apply Kubernetes YAML, read it back, list, delete."""

from __future__ import annotations

import io
import json
import pathlib

import pytest
import yaml

from meshtrust.cli import main, store_cmd
from meshtrust.cli.output import Output

MANIFESTS = """\
apiVersion: v1
kind: Secret
metadata:
  name: cacerts
  namespace: istio-system
  labels: {app: istio}
type: Opaque
data:
  ca-cert.pem: Y2EtY2VydA==
stringData:
  root-cert.pem: root
---
apiVersion: admin.gloo.solo.io/v2
kind: RootTrustPolicy
metadata:
  name: root-trust-policy
  namespace: gloo-mesh
spec:
  config: {mgmtServerCa: {generated: {}}}
status:
  state: PENDING
"""


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main.main(list(argv), Output(stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def location(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store holding the manifests above, named by $MESHTRUST_STORE."""
    url = f"sqlite:{tmp_path}/cluster.db"
    monkeypatch.setenv(store_cmd.ENV_STORE, url)
    (tmp_path / "in.yaml").write_text(MANIFESTS)
    code, out, err = run("store", "apply", "-f", str(tmp_path / "in.yaml"))
    assert code == 0, err
    assert out.splitlines() == ["secret/istio-system/cacerts created",
                                "roottrustpolicy/gloo-mesh/root-trust-policy created"]
    return url


class TestStoreCommand:
    def test_apply_again_is_unchanged(self, location: str, tmp_path: pathlib.Path) -> None:
        """Applying the same file twice changes nothing the second time."""
        code, out, _ = run("store", "apply", "-f", str(tmp_path / "in.yaml"))
        assert code == 0
        assert out.split() == ["secret/istio-system/cacerts", "unchanged",
                               "roottrustpolicy/gloo-mesh/root-trust-policy", "unchanged"]

    def test_get_hides_values(self, location: str) -> None:
        """get shows key sizes, not values, unless --show-data is given."""
        code, out, _ = run("store", "get", "secret", "cacerts", "-n", "istio-system",
                           "-o", "json")
        assert code == 0
        document = json.loads(out)
        assert document["data"] == {"ca-cert.pem": 7, "root-cert.pem": 4}
        assert document["metadata"]["resourceVersion"] == "1"
        assert document["metadata"]["labels"] == {"app": "istio"}
        code, out, _ = run("store", "get", "secret", "cacerts", "-n", "istio-system",
                           "--show-data")
        assert yaml.safe_load(out)["data"]["ca-cert.pem"] == "Y2EtY2VydA=="
        code, out, _ = run("store", "get", "secret", "cacerts", "-n", "istio-system")
        assert "ca-cert.pem" in out and "7 bytes" in out and "Y2EtY2VydA" not in out

    def test_get_resource(self, location: str) -> None:
        """A resource prints as YAML with its spec and status."""
        code, out, _ = run("store", "get", "resource", "RootTrustPolicy", "root-trust-policy",
                           "-n", "gloo-mesh")
        document = yaml.safe_load(out)
        assert code == 0
        assert document["status"] == {"state": "PENDING"}
        assert document["metadata"]["generation"] == 1

    def test_list_with_selector(self, location: str) -> None:
        """list filters by label and prints a Kubernetes List with -o yaml."""
        code, out, _ = run("store", "list", "secrets", "-l", "app=istio", "-o", "yaml")
        assert code == 0
        assert [item["metadata"]["name"] for item in yaml.safe_load(out)["items"]] == ["cacerts"]
        code, out, _ = run("store", "list", "secrets", "-l", "app=other", "-o", "json")
        assert json.loads(out)["items"] == []
        code, out, _ = run("store", "list", "resources", "--kind", "RootTrustPolicy")
        assert code == 0 and "root-trust-policy" in out

    def test_delete(self, location: str) -> None:
        """A deleted secret is gone: get then fails with exit code 1 and a message."""
        code, out, _ = run("store", "delete", "secret", "cacerts", "-n", "istio-system")
        assert (code, out) == (0, "secret/istio-system/cacerts deleted\n")
        code, _, err = run("store", "get", "secret", "cacerts", "-n", "istio-system")
        assert (code, err) == (1, "error: secret istio-system/cacerts not found\n")

    def test_needs_a_store(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without --store or $MESHTRUST_STORE the command says how to name one."""
        monkeypatch.delenv(store_cmd.ENV_STORE, raising=False)
        code, _, err = run("store", "list", "secrets")
        assert code == 1
        assert "pass --store URL or set MESHTRUST_STORE" in err

    def test_bad_input_is_an_error_message(self, location: str, tmp_path: pathlib.Path) -> None:
        """Bad names, YAML and selectors give one error line, not a traceback."""
        assert run("store", "get", "secret", "Bad_Name")[2].startswith("error: invalid name:")
        (tmp_path / "bad.yaml").write_text("kind: Secret\nmetadata: {name: x}\ndata: {k: '*'}\n")
        code, _, err = run("store", "apply", "-f", str(tmp_path / "bad.yaml"))
        assert (code, err.strip()) == (1, f"error: {tmp_path}/bad.yaml document 1: data.k: "
                                          "not valid base64 (Only base64 data is allowed)")
        assert "not KEY=VALUE" in run("store", "list", "secrets", "-l", "nonsense")[2]
        assert "needs --kind" in run("store", "list", "resources")[2]
