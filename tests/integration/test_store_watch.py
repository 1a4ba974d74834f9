"""A watch sees writes made by another process sharing the store, live and in order."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import pytest

from meshtrust import store

WRITER = """
import asyncio, sys
from meshtrust import store
from meshtrust.store import base
async def main(url):
    opened = await store.open_store(url)
    for index in range(3):
        await opened.create(base.Secret(namespace="gloo-mesh", name=f"s{index}",
                                        data={"token": b"%d" % index}))
    await opened.close()
asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture(params=("sqlite", "dir", "postgresql"))
def url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return {"sqlite": f"sqlite://{tmp_path}/c.db", "dir": f"dir://{tmp_path}/tree"}[request.param]


async def _watch_other_process(url: str) -> list[str]:
    opened = await store.open_store(url, interval=0.02)
    try:
        names: list[str] = []

        async def follow() -> None:
            async for event in opened.watch("Secret", since=await opened.revision()):
                names.append(event.object.name)
                if len(names) == 3:
                    return

        watcher = asyncio.create_task(follow())
        await asyncio.sleep(0.05)
        writer = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, url)
        assert await writer.wait() == 0
        await asyncio.wait_for(watcher, 10)
        return names
    finally:
        await opened.close()


class TestWatchAcrossProcesses:
    def test_sees_other_writers(self, url: str) -> None:
        """Secrets created by a child process reach a watcher in this one, in order."""
        assert asyncio.run(_watch_other_process(url)) == ["s0", "s1", "s2"]
