"""A real TLS handshake between openssl s_server and s_client with meshtrust certificates."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrust.pki import hierarchy, keys

HTTP_GET = "GET / HTTP/1.0\r\n\r\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write(h: hierarchy.Hierarchy, into: Path) -> dict[str, Path]:
    paths = {}
    for s in h.secrets:
        if s.name in ("relay-server-tls-secret", "relay-client-tls-secret") and (
                s.cluster in ("mgmt", "cluster-1")):
            for key, value in s.data.items():
                path = into / f"{s.name}-{key}"
                path.write_bytes(value)
                paths[f"{s.name}/{key}"] = path
    return paths


@pytest.fixture(scope="module")
def fleets(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, Path]]:
    now = dt.datetime.now(dt.UTC)
    made = []
    for name in ("ours", "foreign"):
        options = hierarchy.Options(architecture=hierarchy.Architecture.SPLIT,
                                    clusters=("cluster-1",), key_type=keys.KeyType.RSA_2048,
                                    istio_key_type=keys.KeyType.EC_P256)
        made.append(_write(hierarchy.build(options, now), tmp_path_factory.mktemp(name)))
    return made[0], made[1]


@pytest.fixture()
def server(fleets: tuple[dict[str, Path], dict[str, Path]],
           tmp_path: Path) -> Iterator[tuple[int, Path]]:
    ours, _ = fleets
    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-www",
             "-cert", ours["relay-server-tls-secret/tls.crt"],
             "-cert_chain", ours["relay-server-tls-secret/tls.crt"],
             "-key", ours["relay-server-tls-secret/tls.key"],
             "-CAfile", ours["relay-server-tls-secret/ca.crt"],
             "-Verify", "3", "-verify_return_error"],
            stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port, log
    finally:
        proc.kill()
        proc.wait()


def _client(port: int, cert: Path, key: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-cert", str(cert),
         "-cert_chain", str(cert), "-key", str(key), "-CAfile", str(ca),
         "-verify_return_error", "-ign_eof"],
        input=HTTP_GET, capture_output=True, text=True, timeout=20, check=False)


class TestRelayHandshake:
    def test_client_certificate_is_accepted(self, fleets: tuple[dict[str, Path], dict[str, Path]],
                                            server: tuple[int, Path]) -> None:
        """s_server requiring client certs accepts our relay client and s_client verifies it."""
        ours, _ = fleets
        port, _ = server
        result = _client(port, ours["relay-client-tls-secret/tls.crt"],
                         ours["relay-client-tls-secret/tls.key"],
                         ours["relay-client-tls-secret/ca.crt"])
        assert "Verify return code: 0 (ok)" in result.stdout
        assert "HTTP/1.0 200 ok" in result.stdout

    def test_client_from_another_root_is_refused(
            self, fleets: tuple[dict[str, Path], dict[str, Path]],
            server: tuple[int, Path]) -> None:
        """A client certificate from a different root gets no response and the server logs why."""
        ours, foreign = fleets
        port, log = server
        result = _client(port, foreign["relay-client-tls-secret/tls.crt"],
                         foreign["relay-client-tls-secret/tls.key"],
                         ours["relay-client-tls-secret/ca.crt"])
        assert "HTTP/1.0 200 ok" not in result.stdout
        time.sleep(0.2)
        assert "certificate verify failed" in log.read_text()
