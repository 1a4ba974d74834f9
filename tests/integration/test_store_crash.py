"""A writer killed with SIGKILL mid-stream leaves every secret whole: old or new, never torn."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from meshtrust import store
from meshtrust.store import base

WORKER = pathlib.Path(__file__).with_name("crash_worker.py")
NAMES = ("s0", "s1", "s2", "s3")
KEYS = {"ca.crt", "tls.crt", "tls.key"}


def sequence(secret: base.Secret) -> int:
    """The one sequence number all values of ``secret`` carry; fails on a torn secret."""
    assert set(secret.data) == KEYS, f"{secret.name} has keys {sorted(secret.data)}"
    numbers = set()
    for value in secret.data.values():
        tokens = set(value.split(b";")) - {b""}
        assert len(tokens) == 1, f"{secret.name} mixes values {sorted(tokens)[:3]}"
        name, seq = tokens.pop().split(b":")
        assert name.decode() == secret.name
        numbers.add(int(seq))
    assert len(numbers) == 1, f"{secret.name} is torn: keys carry {sorted(numbers)}"
    return numbers.pop()


@pytest.fixture(params=("sqlite", "dir"))
def url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    return {"sqlite": f"sqlite://{tmp_path}/crash.db?history=1000000",
            "dir": f"dir://{tmp_path}/tree?history=1000000"}[request.param]


async def _read_while_writing(url: str, seconds: float) -> int:
    """Read every secret over and over for ``seconds``; return how many reads were whole."""
    opened = await store.open_store(url)
    reads = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for secret in await opened.list_secrets(namespace="gloo-mesh"):
                sequence(secret)
                reads += 1
    finally:
        await opened.close()
    return reads


async def _check_after_crash(url: str, seen: dict[str, int]) -> None:
    opened = await store.open_store(url)
    try:
        head = await opened.revision()
        secrets = {s.name: s for s in await opened.list_secrets(namespace="gloo-mesh")}
        assert set(secrets) == set(NAMES)
        last: dict[str, base.WatchEvent] = {}
        async for event in opened.watch("Secret", since=0):
            last[event.object.name] = event
            if event.resource_version == head:
                break
        for name, secret in secrets.items():
            seq = sequence(secret)
            assert seq >= seen.get(name, 0), f"{name} went back from {seen[name]} to {seq}"
            seen[name] = seq
            assert secret.resource_version <= head
            assert last[name].object == secret, f"{name}: the change log disagrees with the store"
        after = await opened.update(dataclasses.replace(secrets["s0"], data=secrets["s1"].data,
                                                        labels={"checked": "yes"}))
        assert after.resource_version == head + 1
        await opened.update(dataclasses.replace(after, data=secrets["s0"].data, labels={}))
    finally:
        await opened.close()


class TestCrashSafety:
    def test_sigkill_mid_stream(self, url: str) -> None:
        """After SIGKILLs at random moments every secret is whole and the log agrees with it."""
        rng = random.Random(7)
        seen: dict[str, int] = {}
        for _ in range(3):
            with subprocess.Popen([sys.executable, str(WORKER), url], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) as worker:
                assert worker.stdout is not None and worker.stderr is not None
                ready = worker.stdout.readline().strip()
                if ready != b"ready":
                    worker.kill()
                    pytest.fail(f"the writer did not start: {worker.stderr.read().decode()}")
                reads = asyncio.run(_read_while_writing(url, rng.uniform(0.15, 0.4)))
                worker.send_signal(signal.SIGKILL)
                worker.wait(timeout=10)
            assert worker.returncode == -signal.SIGKILL
            assert reads > 0
            asyncio.run(_check_after_crash(url, seen))
        assert min(seen.values()) > 0, "the writer never got going"
