"""How long a SQLite read takes for a busy event loop: on a thread, and on the loop itself.

SQLite lets go of the GIL at every step of a statement, so a thread that runs
SQL for the event loop takes the GIL back several times per query. A thread
waiting for the GIL asks the holder to let go only after waiting
``sys.getswitchinterval()`` seconds (5 ms by default) with no switch in
between. A busy event loop lets go of the GIL for an instant at every turn,
when it polls for I/O, and each of those counts as a switch: the wait starts
again, and the thread can wait far longer than 5 ms. This measures it on its
own: an event loop that also runs ``--tasks`` other tasks that each compute for
``--work-us`` microseconds per turn (as calls, work streams and replies do in
the management server), and one task that reads a stored record of 2 KB again
and again for ``--seconds``, in one of two ways:

* ``thread``: the query on a reader thread (a one-thread executor), as the
  SQLite store reads;
* ``loop``: the same query run on the event loop itself, after one turn of it
  (as a call's task gets its turn).

The records are written by a real ``SqliteStore``; the reads are plain
``sqlite3`` queries on a connection of their own, so that both ways do the
same work.

For each way, switch interval and load it prints the rounds per second and
the p50/p99 latency of one. Run it from the repository root (about 40 s):

    .venv/bin/python bench/thread_wait.py
    .venv/bin/python bench/thread_wait.py --switch 0.005 0.0005 --tasks 0 5 20 --json
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fleet import percentile
from loop_intake import keep_busy

from meshtrust.store import base, sqlite

KIND, NAMESPACE = "Thing", "bench"
RECORDS = 50
WAYS = ("thread", "loop")


async def _measure(path: Path, way: str, tasks: int, work_us: float,
                   seconds: float) -> dict[str, Any]:
    store = await sqlite.SqliteStore.open(str(path))
    reader = sqlite3.connect(str(path), check_same_thread=False)
    thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-read")
    loop = asyncio.get_running_loop()
    try:
        for index in range(RECORDS):
            await store.create(base.Resource(
                api_version="v1", kind=KIND, namespace=NAMESPACE, name=f"r-{index}",
                spec={"index": index, "text": "x" * 2000}))

        async def one(index: int) -> None:
            name = f"r-{index % RECORDS}"
            def read() -> list[Any]:
                return reader.execute(
                    "SELECT body FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
                    (KIND, NAMESPACE, name)).fetchall()

            if way == "thread":
                await loop.run_in_executor(thread, read)
            else:
                await asyncio.sleep(0)  # a turn of the loop, as a call's task would wait
                read()

        others = [asyncio.create_task(keep_busy(work_us)) for _ in range(tasks)]
        took: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() < started + seconds:
            began = time.perf_counter()
            await one(len(took))
            took.append(time.perf_counter() - began)
        elapsed = time.perf_counter() - started
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
    finally:
        thread.shutdown(wait=True)
        reader.close()
        await store.close()
    return {"rounds_per_s": len(took) / elapsed,
            "p50_ms": (percentile(took, 0.5) or 0.0) * 1e3,
            "p99_ms": (percentile(took, 0.99) or 0.0) * 1e3, "rounds": len(took)}


def measure(way: str, switch: float, tasks: int, work_us: float,
            seconds: float) -> dict[str, Any]:
    """One store, one loop with ``tasks`` busy tasks, at switch interval ``switch``."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(switch)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(_measure(Path(tmp) / "store.db", way, tasks, work_us,
                                          seconds))
    finally:
        sys.setswitchinterval(before)
    return {"way": way, "switch_ms": switch * 1e3, "tasks": tasks, "work_us": work_us,
            **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--switch", type=float, nargs="+", default=[sys.getswitchinterval()],
                        help="GIL switch intervals in seconds, one run for each (default: "
                             "Python's)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[0, 5, 20],
                        help="other busy tasks on the loop, one run for each")
    parser.add_argument("--work-us", type=float, default=200.0,
                        help="microseconds each busy task computes per turn of the loop")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if min(args.switch) <= 0 or min(args.tasks) < 0 or args.work_us < 0 or args.seconds <= 0:
        parser.error("--switch and --seconds must be positive, --tasks and --work-us 0 or "
                     "more")
    results = [measure(w, s, n, args.work_us, args.seconds)
               for w in args.ways for s in args.switch for n in args.tasks]
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "results": results}, indent=2))
        return 0
    print(f"Python {sys.version.split()[0]}; each busy task computes {args.work_us:.0f} µs "
          "per turn")
    print(f"{'way':>6} {'switch':>8} {'busy tasks':>10} {'rounds/s':>9} {'p50':>11} {'p99':>11}")
    for row in results:
        print(f"{row['way']:>6} {row['switch_ms']:>5.1f} ms {row['tasks']:>10} "
              f"{row['rounds_per_s']:>9,.0f} {row['p50_ms']:>8.2f} ms {row['p99_ms']:>8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
