"""Throughput and watch latency of every store backend, with durable settings.

What it measures, per backend (memory for reference, sqlite, dir, postgresql):

* writes/s, concurrent: ``--writers`` tasks in one process each update their own
  secret in a loop (get once, then update with the returned version) for
  ``--seconds``. A secret is shaped like a relay secret: ``ca.crt`` (1 KiB),
  ``tls.crt`` (2 KiB) and ``tls.key`` (1.7 KiB). Each write is acknowledged only
  once durable: SQLite commits with ``synchronous=FULL`` (group commit batches
  the concurrent writers), the dir store fsyncs the log, the files and the
  directories, and PostgreSQL runs with ``fsync=on`` and ``synchronous_commit=on``.
* writes/s, one writer: the same with a single task, i.e. one fsync per write.
* reads/s: ``--writers`` tasks calling ``get_secret`` on the secrets written.
* watch latency, same process: one watcher (``since=`` the current revision)
  while one writer updates a secret every 5 ms; the time from just before
  ``update`` is called to the watcher receiving the event, p50 and p99.
* watch latency, other process: the same with the watcher in a child process
  sharing the store (the memory store has no such case). SQLite and the dir
  store are polled every 50 ms (the default), PostgreSQL is woken by NOTIFY.

And, once, the cost of reading one stored record back into an object
(``manifest.load_json``, which every backend's reads and watches go through) for
a resource shaped like a cluster's Istio intermediate record (about 3.8 KB),
next to ``json.loads`` of the same text alone.

PostgreSQL is a throwaway server started from the Debian packages the tests use
(``tests/pgserver.py``), with durable settings; its data lives under /tmp.

Run it from the repository root:

    .venv/bin/python bench/store.py              # table, about a minute
    .venv/bin/python bench/store.py --json       # machine-readable results
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any

from meshtrust import store, testing
from meshtrust.store import base, manifest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import pgserver  # noqa: E402  (the tests' throwaway PostgreSQL server)

DATA = {"ca.crt": os.urandom(1024), "tls.crt": os.urandom(2048), "tls.key": os.urandom(1700)}
WATCH_WRITES = 200


@dataclasses.dataclass
class Result:
    backend: str
    writes_concurrent: float = 0.0
    writes_single: float = 0.0
    reads: float = 0.0
    watch_p50_ms: float = 0.0
    watch_p99_ms: float = 0.0
    remote_p50_ms: float | None = None
    remote_p99_ms: float | None = None


async def _open(url: str | None) -> base.Store:
    return testing.MemoryStore() if url is None else await store.open_store(url)


async def _writes(opened: base.Store, writers: int, seconds: float, prefix: str) -> float:
    secrets = [await opened.create(base.Secret(namespace="bench", name=f"{prefix}-{i}",
                                               data=DATA)) for i in range(writers)]
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop(current: base.Secret) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            current = await opened.update(current)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(secret) for secret in secrets))
    return done / (time.perf_counter() - start)


async def _reads(opened: base.Store, readers: int, seconds: float) -> float:
    names = [secret.name for secret in await opened.list_secrets(namespace="bench")]
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop(offset: int) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < deadline:
            await opened.get_secret("bench", names[index % len(names)])
            index += 1
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(readers)))
    return done / (time.perf_counter() - start)


async def _watch_latency(opened: base.Store) -> list[float]:
    current = await opened.create(base.Secret(namespace="watch", name="ticker", data=DATA))
    started: list[float] = []  # one write at a time, so the n-th event is the n-th write
    latencies: list[float] = []

    async def watcher(since: int) -> None:
        async for _event in opened.watch("Secret", namespace="watch", since=since):
            latencies.append(time.perf_counter() - started[len(latencies)])
            if len(latencies) == WATCH_WRITES:
                return

    task = asyncio.create_task(watcher(current.resource_version))
    for _ in range(WATCH_WRITES):
        await asyncio.sleep(0.005)
        started.append(time.perf_counter())
        current = await opened.update(current)
    await asyncio.wait_for(task, 30)
    return latencies


_CHILD = """
import asyncio, sys, time
from meshtrust import store
async def main(url, since, count):
    opened = await store.open_store(url)
    print("ready", flush=True)
    seen = 0
    async for event in opened.watch("Secret", namespace="remote", since=since):
        print(event.resource_version, time.time(), flush=True)
        seen += 1
        if seen == count:
            break
    await opened.close()
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def _remote_latency(opened: base.Store, url: str) -> list[float]:
    current = await opened.create(base.Secret(namespace="remote", name="ticker", data=DATA))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, url, str(current.resource_version), str(WATCH_WRITES),
        stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    assert (await child.stdout.readline()).strip() == b"ready"
    started: list[float] = []
    for _ in range(WATCH_WRITES):
        await asyncio.sleep(0.005)
        started.append(time.time())
        current = await opened.update(current)
    out, _ = await asyncio.wait_for(child.communicate(), 60)
    received = [float(line.split()[1]) for line in out.decode().splitlines()]
    return [when - begun for when, begun in zip(received, started, strict=True)]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


async def measure(name: str, url: str | None, args: argparse.Namespace) -> Result:
    opened = await _open(url)
    try:
        result = Result(backend=name)
        result.writes_concurrent = await _writes(opened, args.writers, args.seconds, "many")
        result.writes_single = await _writes(opened, 1, args.seconds, "one")
        result.reads = await _reads(opened, args.writers, args.seconds)
        latencies = await _watch_latency(opened)
        result.watch_p50_ms = _percentile(latencies, 0.5)
        result.watch_p99_ms = _percentile(latencies, 0.99)
        if url is not None:
            remote = await _remote_latency(opened, url)
            result.remote_p50_ms = _percentile(remote, 0.5)
            result.remote_p99_ms = _percentile(remote, 0.99)
        return result
    finally:
        await opened.close()


def parse_cost(seconds: float) -> dict[str, float]:
    """Microseconds to read one IssuedCertificate-shaped record back, and to json.loads it."""
    now = dt.datetime.now(dt.UTC)
    chain = ("-----BEGIN CERTIFICATE-----\n" + "A" * 1400 + "\n-----END CERTIFICATE-----\n") * 2
    record = manifest.dump_json(base.Resource(
        api_version="meshtrust.io/v1", kind="IssuedCertificate", namespace="gloo-mesh",
        name="mesh.c-01234", labels={"cluster": "c-01234", "policy": "mesh"},
        spec={"policy": "mesh", "cluster": "c-01234", "keyType": "ecdsa-p256", "ttl": "721h",
              "trustDomain": "cluster.local", "organization": "Istio", "generation": 2,
              "rootFingerprint": "ab" * 32, "autoRestartPods": False},
        status={"state": "FINISHED", "chain": chain, "serial": "12ab" * 8,
                "notAfter": "2027-01-01T00:00:00Z", "keySha256": "cd" * 32, "pods": ["a", "b"]},
        resource_version=12345, generation=2, created=now, updated=now))

    def per_call(read: Any) -> float:
        count, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            for _ in range(100):
                read(record)
            count += 100
        return (time.perf_counter() - began) / count * 1e6

    return {"record_bytes": len(record),
            "load_json_us": per_call(lambda text: manifest.load_json(text, source="bench")),
            "json_loads_us": per_call(json.loads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput test")
    parser.add_argument("--writers", type=int, default=64, help="concurrent tasks")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    results: list[Result] = []
    server = pgserver.Server(durable=True)
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="meshtrust-bench-") as folder:
            backends: list[tuple[str, str | None]] = [
                ("memory", None), ("sqlite", f"sqlite:{folder}/cluster.db"),
                ("dir", f"dir:{folder}/tree"),
                ("postgresql", server.create_database("bench"))]
            for name, url in backends:
                results.append(asyncio.run(measure(name, url, args)))
                if not args.json:
                    print(f"measured {name}", file=sys.stderr)
    finally:
        server.stop()
    parse = parse_cost(args.seconds)
    if args.json:
        print(json.dumps({"backends": [dataclasses.asdict(r) for r in results],
                          "record_parse": parse}, indent=2))
        return
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {args.writers} "
          f"concurrent writers/readers, {args.seconds:g} s per measurement")
    header = ("backend", f"writes/s ({args.writers})", "writes/s (1)", "reads/s",
              "watch p50/p99 ms", "other process p50/p99 ms")
    rows = [header] + [(
        r.backend, f"{r.writes_concurrent:,.0f}", f"{r.writes_single:,.0f}", f"{r.reads:,.0f}",
        f"{r.watch_p50_ms:.1f} / {r.watch_p99_ms:.1f}",
        "-" if r.remote_p50_ms is None else f"{r.remote_p50_ms:.1f} / {r.remote_p99_ms:.1f}")
        for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"reading a {parse['record_bytes']:,}-byte record back: manifest.load_json "
          f"{parse['load_json_us']:.1f} µs, json.loads alone {parse['json_loads_us']:.1f} µs "
          f"({parse['load_json_us'] / parse['json_loads_us']:.1f}x)")


if __name__ == "__main__":
    main()
