"""Run by test_store_crash in its own process: rewrite a few secrets until killed.

Every value of a secret carries the same sequence number, so a reader can tell a
whole secret from a torn one. The secrets are rewritten concurrently, so the
SQLite writer batches them. Prints "ready" once writing has begun.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys

from meshtrust import errors, store
from meshtrust.store import base

NAMES = ("s0", "s1", "s2", "s3")
SIZES = {"ca.crt": 50, "tls.crt": 3000, "tls.key": 700}


def payload(name: str, seq: int) -> dict[str, bytes]:
    return {key: f"{name}:{seq};".encode() * size for key, size in SIZES.items()}


async def rewrite(opened: base.Store, name: str) -> None:
    try:
        current = await opened.get_secret("gloo-mesh", name)
    except errors.NotFound:
        current = await opened.create(base.Secret(namespace="gloo-mesh", name=name,
                                                  data=payload(name, 0)))
    seq = int(current.data["ca.crt"].split(b":")[1].split(b";")[0])
    while True:
        seq += 1
        current = await opened.update(dataclasses.replace(current, data=payload(name, seq)))


async def main(url: str) -> None:
    opened = await store.open_store(url)
    tasks = [asyncio.create_task(rewrite(opened, name)) for name in NAMES]
    await asyncio.sleep(0.02)
    print("ready", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
