"""CA keys encrypted at rest: sealed in the store, opened by the server at start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import istiofleet as im
import relayfleet as rf
from meshtrust import settings
from meshtrust.pki import keys

pytestmark = pytest.mark.slow

NS = settings.RELAY_NAMESPACE
CA_SECRETS = (settings.RELAY_ROOT_SECRET, settings.RELAY_SIGNING_SECRET,
              settings.SecretNames.root_trust(im.POLICY))


async def _ca_keys(url: str) -> dict[str, bytes]:
    async with rf.opened(url) as store:
        found = {}
        for name in CA_SECRETS:
            secret = await store.get_secret(NS, name)
            found[name] = secret.data.get("tls.key") or secret.data["key.pem"]
        return found


def _refused(fleet: rf.Fleet, name: str, *extra: str) -> str:
    """Start a server that must refuse to run; return what it said."""
    process = fleet.spawn(name, "server", "--store", fleet.mgmt_url, "--listen", "127.0.0.1:0",
                          "--bootstrap-listen", "127.0.0.1:0", *extra)
    assert process.popen.wait(timeout=20) != 0
    return process.log()


def test_sealed_keys_work_and_a_wrong_or_missing_passphrase_stops_the_server(
        fleet: rf.Fleet, tmp_path: Path) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    mesh = im.Mesh(fleet)
    try:
        fleet.start_server(extra=["--key-passphrase-file", str(passphrase),
                                  "--reconcile-interval", "1s"])
        mesh.apply(im.policy())
        mesh.add_cluster("cluster-1", pods=1)
        fleet.wait_connected("cluster-1")
        asyncio.run(mesh.wait_finished(["cluster-1"]))
    finally:
        mesh.close()
    sealed = asyncio.run(_ca_keys(fleet.mgmt_url))
    for name, pem in sealed.items():
        assert keys.is_encrypted(pem), name
        assert keys.KeyLock(b"correct horse battery staple").open(pem)
    first = fleet.server
    assert first is not None
    first.process.stop()
    log = _refused(fleet, "server-no-passphrase")
    assert "encrypted; give their passphrase with --key-passphrase-file" in log
    wrong = tmp_path / "wrong"
    wrong.write_text("incorrect horse\n")
    log = _refused(fleet, "server-wrong-passphrase", "--key-passphrase-file", str(wrong))
    assert "wrong passphrase" in log
    assert "correct horse" not in log
    # The right passphrase again: the agent carries on with what it has.
    fleet.start_server(relay_port=first.relay_port, bootstrap_port=first.bootstrap_port or 0,
                       extra=["--key-passphrase-file", str(passphrase)])
    fleet.wait_connected("cluster-1", timeout=30)


def test_plain_keys_are_sealed_in_place_when_a_passphrase_is_set(
        fleet: rf.Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = im.Mesh(fleet)
    try:
        server = fleet.start_server(extra=["--reconcile-interval", "1s"])
        mesh.apply(im.policy())
        mesh.add_cluster("cluster-1", pods=1)
        asyncio.run(mesh.wait_finished(["cluster-1"]))
        assert not any(keys.is_encrypted(k) for k in asyncio.run(_ca_keys(fleet.mgmt_url))
                       .values())
        server.process.stop()
        monkeypatch.setenv("MESHTRUST_KEY_PASSPHRASE", "from the environment")
        server = fleet.start_server(relay_port=server.relay_port,
                                    bootstrap_port=server.bootstrap_port or 0,
                                    extra=["--reconcile-interval", "1s"])
        assert len(server.process.lines("sealed the CA key in")) == len(CA_SECRETS)
        sealed = asyncio.run(_ca_keys(fleet.mgmt_url))
        assert all(keys.is_encrypted(k) for k in sealed.values())
        fleet.wait_connected("cluster-1", timeout=30)
    finally:
        mesh.close()
