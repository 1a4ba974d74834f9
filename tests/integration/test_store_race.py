"""Two OS processes race compare-and-swap updates of one object on a shared store."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys

import pytest

from meshtrust import store
from meshtrust.store import base

WORKER = pathlib.Path(__file__).with_name("race_worker.py")
PER_PROCESS = 500


@pytest.fixture(params=("sqlite", "dir", "postgresql"))
def url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return {"sqlite": f"sqlite://{tmp_path}/race.db",
            "dir": f"dir://{tmp_path}/tree?history=5000"}[request.param]


async def _create_counter(url: str) -> int:
    opened = await store.open_store(url)
    try:
        made = await opened.create(base.Resource(
            api_version="test.meshtrust.io/v1", kind="Counter", namespace="default",
            name="shared", spec={"value": 0}))
        return made.resource_version
    finally:
        await opened.close()


async def _history(url: str, since: int, count: int) -> tuple[int, list[int]]:
    opened = await store.open_store(url)
    try:
        final = await opened.get_resource("Counter", "default", "shared")
        values: list[int] = []
        async for event in opened.watch("Counter", since=since):
            assert isinstance(event.object, base.Resource)
            values.append(event.object.spec["value"])
            if len(values) == count:
                break
        return final.spec["value"], values
    finally:
        await opened.close()


class TestCompareAndSwapRace:
    def test_every_update_applied_once(self, url: str, tmp_path: pathlib.Path) -> None:
        """Each update is applied exactly once or refused: the counter ends at the number made."""
        created = asyncio.run(_create_counter(url))
        start = tmp_path / "start"
        workers = [subprocess.Popen(
            [sys.executable, str(WORKER), url, str(PER_PROCESS), str(start)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1")) for _ in range(2)]
        start.touch()
        reports = []
        for worker in workers:
            out, err = worker.communicate(timeout=60)
            assert worker.returncode == 0, err
            reports.append(json.loads(out))
        made = sum(report["updates"] for report in reports)
        assert made == 2 * PER_PROCESS
        assert sum(report["conflicts"] for report in reports) > 0, "the processes never raced"
        final, values = asyncio.run(asyncio.wait_for(_history(url, created, made), 30))
        assert final == made
        assert values == list(range(1, made + 1))
