"""A throwaway AWS Private CA, so provider tests talk real HTTP to a separate process.

``Server`` starts ``pca_server_main.py`` (moto, patched to follow the documented API,
behind a fault layer) on a free port of 127.0.0.1 and stops it at the end. Through it a
test injects faults (throttling, access denied, lost responses) and reads how many calls
reached the backend and how many certificates each IdempotencyToken produced.

Credentials are fake: ``use_fake_credentials`` puts them in the test's environment and
hides any real AWS configuration, so no test can reach a real account.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from meshtrust.providers import aws_pca

LAUNCHER = Path(__file__).with_name("pca_server_main.py")
REGION = "us-east-1"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
HIDDEN = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
          "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
          "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_ENDPOINT_URL",
          "AWS_ENDPOINT_URL_ACM_PCA")
# The control endpoints are on 127.0.0.1: never through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def use_fake_credentials(monkeypatch: pytest.MonkeyPatch, home: Path, *,
                         credentials: bool = True) -> None:
    """Fake AWS credentials (or none at all), with real AWS configuration out of reach."""
    for name in HIDDEN:
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_CREDENTIALS.items():
        if credentials:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookups
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@dataclasses.dataclass(frozen=True)
class Counters:
    """What the fake saw since the last reset.

    ``requests``: calls per action, faulted ones included; ``backend``: those that
    reached moto; ``issue_calls``: IssueCertificate calls that reached moto, per
    IdempotencyToken; ``issued``: certificates moto made, per IdempotencyToken.
    """

    requests: dict[str, int]
    backend: dict[str, int]
    issue_calls: dict[str, int]
    issued: dict[str, int]


class Server:
    """One fake AWS Private CA process on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.region = REGION
        self.home = Path(tempfile.mkdtemp(prefix="meshtrust-pca-"))
        self.log = self.home / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with self.log.open("wb") as sink:
            self._proc = subprocess.Popen(
                [sys.executable, str(LAUNCHER), "--port", str(self.port)],
                stdout=sink, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                self.counters()
                return
            except OSError:
                time.sleep(0.05)
        output = self.log.read_text()
        self.stop()
        raise RuntimeError(f"the fake AWS Private CA did not start:\n{output}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.home, ignore_errors=True)

    def client(self, region: str | None = None, **options: Any) -> aws_pca.AwsPca:
        """An ``AwsPca`` for this server, tuned to be quick: short backoff and waiter delay."""
        settings: dict[str, Any] = {"waiter_delay": 0.1, "backoff_base": 0.02,
                                    "backoff_cap": 0.2, "rate_per_second": 200.0}
        settings.update(options)
        from meshtrust.providers import aws_pca  # the AWS SDK only for tests that use it

        return aws_pca.AwsPca(region or self.region, endpoint_url=self.endpoint_url,
                              **settings)

    def boto3(self, region: str | None = None) -> Any:
        """A plain boto3 acm-pca client, for setting up states meshtrust never creates."""
        import boto3

        return boto3.session.Session().client("acm-pca", region_name=region or self.region,
                                              endpoint_url=self.endpoint_url)

    def inject(self, action: str, error: str = "ThrottlingException", *,
               message: str = "Rate exceeded", status: int = 400, count: int | None = None,
               lose_response: bool = False) -> None:
        """Fail the next ``count`` calls of ``action`` (every call if None) with ``error``.

        With ``lose_response`` the call reaches the backend, and then its answer is lost.
        """
        self._control("POST", "/__faults", {"action": action, "error": error,
                                            "message": message, "status": status,
                                            "count": count, "lose_response": lose_response})

    def clear_faults(self) -> None:
        self._control("DELETE", "/__faults")

    def reset(self) -> None:
        """Clear faults and counters (CAs and certificates stay)."""
        self._control("POST", "/__reset")

    def counters(self) -> Counters:
        return Counters(**self._control("GET", "/__counters"))

    def _control(self, method: str, path: str, payload: object = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.endpoint_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with _DIRECT.open(request, timeout=5) as response:
            return json.loads(response.read())
