"""Disaster recovery: a wiped management store, restored from a backup, keeps its fleet."""

from __future__ import annotations

import asyncio
import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import relayfleet as rf
from meshtrust.authority import registry

pytestmark = pytest.mark.slow

DAMAGED = "wrong passphrase or damaged backup file"


def meshtrust(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real command line, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "meshtrust", *argv], capture_output=True,
                          text=True, timeout=60, check=False)


def client_secret(fleet: rf.Fleet, cluster: str) -> tuple[int, str]:
    """The resource version and certificate serial of the cluster's relay-client-tls-secret."""
    held = fleet.client_identity(cluster)
    assert held is not None, f"{cluster} holds no client certificate"
    return held.resource_version, f"{held.certificate.serial_number:x}"


def store_contents(url: str) -> list[Any]:
    async def go() -> list[Any]:
        async with rf.opened(url) as store:
            return [*await store.list_secrets(),
                    *await store.list_resources(registry.CLUSTER_KIND)]
    return asyncio.run(go())


def wipe(fleet: rf.Fleet) -> None:
    """Delete the management store: the SQLite file and its journal."""
    database = fleet.root / "mgmt.db"
    for path in (database, database.with_name("mgmt.db-wal"), database.with_name("mgmt.db-shm")):
        path.unlink(missing_ok=True)
    assert not database.exists()


class TestBackupRestore:
    def test_agents_carry_on_with_their_certificates_after_a_restore(
            self, fleet: rf.Fleet, tmp_path: Path) -> None:
        """Back up, wipe the store, restore: every agent reconnects with the certificate it
        held, no cluster re-registers or re-bootstraps, and a wrong passphrase wrote nothing."""
        server = fleet.start_server()
        clusters = ("cluster-1", "cluster-2")
        agents = {}
        for name in clusters:
            fleet.enroll(name)
            agents[name] = fleet.start_agent(name)
        held = {}
        for name in clusters:
            status = fleet.wait_connected(name)
            held[name] = client_secret(fleet, name)
            assert status["clientCertificate"]["serial"] == held[name][1]

        passphrase = tmp_path / "passphrase"
        passphrase.write_text("a long passphrase for the CA backup\n")
        saved = tmp_path / "mgmt.backup"
        made = meshtrust("backup", "-o", str(saved), "--store", fleet.mgmt_url,
                         "--passphrase-file", str(passphrase))
        assert made.returncode == 0, made.stderr
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        assert b"BEGIN" not in saved.read_bytes()  # no PEM in the clear

        server.process.stop()
        for agent in agents.values():
            agent.wait_for_log("relay connection to .* ended", timeout=5)
        wipe(fleet)

        wrong = tmp_path / "wrong"
        wrong.write_text("not the passphrase\n")
        refused = meshtrust("restore", str(saved), "--store", fleet.mgmt_url,
                            "--passphrase-file", str(wrong))
        assert refused.returncode == 1
        assert refused.stderr == f"error: {saved}: {DAMAGED}\n"
        assert not (fleet.root / "mgmt.db").exists()  # not even opened
        assert store_contents(fleet.mgmt_url) == []   # an empty store, for the real restore

        restored = meshtrust("restore", str(saved), "--store", fleet.mgmt_url,
                             "--passphrase-file", str(passphrase))
        assert restored.returncode == 0, restored.stderr
        assert "created secret gloo-mesh/relay-tls-signing-secret" in restored.stdout

        restarted_at = dt.datetime.now(dt.UTC)
        again = fleet.start_server(relay_port=server.relay_port,
                                   bootstrap_port=server.bootstrap_port or 0)
        for name in clusters:
            again.process.wait_for_log(f"agent of cluster {name} connected", timeout=15)
            status = rf.poll(lambda n=name: (s := fleet.cluster_status(n)) and s.get(
                "connected") and dt.datetime.fromisoformat(s["lastSeen"]) > restarted_at and s,
                timeout=5, what=f"{name} to be seen after the restore")
            assert status["clientCertificate"]["serial"] == held[name][1]
            assert client_secret(fleet, name) == held[name]
            agents[name].wait_for_log(r"connected to \S+ over mTLS", timeout=5, count=2)
            assert len(agents[name].lines("bootstrapping")) == 1
            assert agents[name].alive
        assert not again.process.lines("generated|bootstrapped|refused")
