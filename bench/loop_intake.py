"""How many calls a ``grpc.aio`` server takes in while its event loop is busy.

A ``grpc.aio`` server asks gRPC's core for the next call of a method only after
it has taken in the last one, and each of those steps waits for a turn of the
event loop. So the rate at which calls are taken in is set by how long a turn
of the loop lasts, whatever the calls cost once they run: calls the server has
not taken in wait inside gRPC, where they can neither be answered nor refused,
until their deadline passes and they end ``CANCELLED``. This measures that
limit on its own: a server with meshtrust's server options and one method that
answers at once (no meshtrust code), whose loop also runs ``N`` other tasks that
each compute for ``--work-us`` microseconds per turn (as issuances, work streams
and store replies do in the management server), and a client in another
process keeping ``--concurrency`` calls in flight for ``--seconds``. For each
``N`` it prints the length of a turn of the server's loop (counted with a
callback that schedules itself), the calls answered per second, and calls per
turn. Run it from the repository root (about 20 s):

    .venv/bin/python bench/loop_intake.py
    .venv/bin/python bench/loop_intake.py --tasks 0 10 50 --work-us 200 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from typing import Any

import grpc
import grpc.aio

from meshtrust.rpc import transport

HOST = "127.0.0.1"
SERVICE, METHOD = "bench.Intake", "Echo"


def _compute(microseconds: float) -> None:
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


async def keep_busy(work_us: float) -> None:
    """Compute for ``work_us`` microseconds, then give the loop a turn; until cancelled."""
    while True:
        _compute(work_us)
        await asyncio.sleep(0)


async def _serve(tasks: int, work_us: float, servers: int, ports: Any, stop: Any) -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    started: list[grpc.aio.Server] = []
    port = 0
    for _ in range(servers):  # the second and later share the first's port (SO_REUSEPORT)
        server = transport.new_server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(echo)}),))
        port = transport.add_listener(server, f"{HOST}:{port}", None)
        await server.start()
        started.append(server)
    loop = asyncio.get_running_loop()
    turns = 0

    def turn() -> None:
        nonlocal turns
        turns += 1
        loop.call_soon(turn)

    loop.call_soon(turn)
    others = [asyncio.create_task(keep_busy(work_us)) for _ in range(tasks)]
    ports.put(port)
    began, first = time.perf_counter(), turns
    while not stop.is_set():
        await asyncio.sleep(0.05)
    ports.put((time.perf_counter() - began) / max(1, turns - first))
    for task in others:
        task.cancel()
    for server in started:
        await server.stop(None)


def _server_main(tasks: int, work_us: float, servers: int, ports: Any, stop: Any) -> None:
    asyncio.run(_serve(tasks, work_us, servers, ports, stop))


async def _load(port: int, seconds: float, concurrency: int, connections: int) -> float:
    # Channels with different arguments do not share a connection.
    channels = [grpc.aio.insecure_channel(f"{HOST}:{port}", options=[("bench.connection", i)])
                for i in range(connections)]
    calls = [channel.unary_unary(f"/{SERVICE}/{METHOD}") for channel in channels]
    answered = 0
    end = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        nonlocal answered
        call = calls[index % len(calls)]
        while time.perf_counter() < end:
            await call(b"x", timeout=30)
            answered += 1

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    for channel in channels:
        await channel.close()
    return answered / seconds


def measure(tasks: int, work_us: float, seconds: float, concurrency: int, servers: int = 1,
            connections: int = 1) -> dict[str, float]:
    """One server process with ``tasks`` busy tasks, loaded for ``seconds``."""
    ports: Any = multiprocessing.Queue()
    stop = multiprocessing.Event()
    process = multiprocessing.Process(target=_server_main,
                                      args=(tasks, work_us, servers, ports, stop))
    process.start()
    try:
        port = ports.get(timeout=30)
        rate = asyncio.run(_load(port, seconds, concurrency, connections))
        stop.set()
        turn = ports.get(timeout=30)
    finally:
        stop.set()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    return {"tasks": tasks, "work_us": work_us, "turn_ms": turn * 1e3, "calls_per_s": rate,
            "calls_per_turn": rate * turn}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[0, 10, 25, 50, 100],
                        help="other busy tasks on the server's loop, one run for each")
    parser.add_argument("--work-us", type=float, default=100.0,
                        help="microseconds each busy task computes per turn of the loop")
    parser.add_argument("--seconds", type=float, default=3.0, help="load per run")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="calls the client keeps in flight")
    parser.add_argument("--servers", type=int, default=1,
                        help="gRPC servers in the server process, all on one port")
    parser.add_argument("--connections", type=int, default=1,
                        help="client connections the calls are spread over")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if min(args.tasks) < 0 or args.work_us < 0 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--tasks and --work-us must be 0 or more, --seconds and --concurrency "
                     "positive")
    results = [measure(n, args.work_us, args.seconds, args.concurrency, args.servers,
                       args.connections) for n in args.tasks]
    if args.json:
        print(json.dumps({"grpcio": grpc.__version__, "results": results}, indent=2))
        return 0
    print(f"grpcio {grpc.__version__}; each busy task computes {args.work_us:.0f} µs per turn")
    print(f"{'busy tasks':>10} {'loop turn':>10} {'calls/s':>9} {'calls per turn':>15}")
    for row in results:
        print(f"{row['tasks']:>10} {row['turn_ms']:>8.2f} ms {row['calls_per_s']:>9,.0f} "
              f"{row['calls_per_turn']:>15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
