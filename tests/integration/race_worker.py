"""Run by test_store_race in its own process: add one to a shared counter N times.

Each attempt reads the counter and writes it back plus one with compare-and-swap;
a Conflict means the other process won that round, so it reads again and retries.
Prints how many updates it made and how many conflicts it met, as JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys

from meshtrust import errors, store


async def main(url: str, count: int, start_file: str) -> None:
    opened = await store.open_store(url)
    while not os.path.exists(start_file):
        await asyncio.sleep(0.001)
    updates = conflicts = 0
    while updates < count:
        counter = await opened.get_resource("Counter", "default", "shared")
        bumped = dict(counter.spec, value=counter.spec["value"] + 1)
        try:
            await opened.update(dataclasses.replace(counter, spec=bumped))
            updates += 1
        except errors.Conflict:
            conflicts += 1
    await opened.close()
    print(json.dumps({"updates": updates, "conflicts": conflicts}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
