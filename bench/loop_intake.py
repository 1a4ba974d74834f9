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

With ``--burst N`` the client instead sends ``N`` calls at once, each with the
agent's deadline (``--deadline``), as a fleet does when it starts or renews
together, and prints how they ended and after how long: answered, refused by
gRPC itself before the server took them in (``CANCELLED`` within a second:
past its backlog of calls not yet taken in, ``grpc.server.max_pending_requests``
and ``..._hard_limit``, 1,000 and 3,000 calls per method by default), or
``DEADLINE_EXCEEDED`` while waiting to be taken in. ``--server-option`` sets
a gRPC server argument, such as those two, and ``--methods`` serves methods
registered as meshtrust's are (about 20 s a row):

    .venv/bin/python bench/loop_intake.py --tasks 10 50 --work-us 1000 --burst 6000
    .venv/bin/python bench/loop_intake.py --tasks 10 --work-us 1000 --burst 6000 --methods 1 \
        --server-option grpc.server.max_pending_requests=20000 \
        --server-option grpc.server.max_pending_requests_hard_limit=20000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Serving:
    """How the server process serves: gRPC servers on its one port, the methods, options."""

    servers: int = 1
    # 0: one method through a generic handler; N: N methods registered, as meshtrust's
    # generated code registers its own (gRPC then keeps calls waiting per method).
    methods: int = 0
    options: tuple[tuple[str, Any], ...] = ()

    def paths(self) -> list[str]:
        names = [METHOD] if not self.methods else [f"{METHOD}{i}" for i in range(self.methods)]
        return [f"/{SERVICE}/{name}" for name in names]


async def _serve(tasks: int, work_us: float, serving: Serving, ports: Any, stop: Any) -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handlers = {path.rsplit("/", 1)[1]: grpc.unary_unary_rpc_method_handler(echo)
                for path in serving.paths()}
    started: list[grpc.aio.Server] = []
    port = 0
    for _ in range(serving.servers):  # the second and later share the first's port
        server = transport.new_server(serving.options)
        if serving.methods:
            server.add_registered_method_handlers(SERVICE, handlers)
        else:
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(SERVICE, handlers),))
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


def _server_main(tasks: int, work_us: float, serving: Serving, ports: Any, stop: Any) -> None:
    asyncio.run(_serve(tasks, work_us, serving, ports, stop))


def _stubs(port: int, connections: int, paths: list[str]) -> tuple[list[Any], list[Any]]:
    """Channels, each its own connection, and a stub per channel and method, interleaved."""
    # Channels with different arguments do not share a connection.
    channels = [grpc.aio.insecure_channel(f"{HOST}:{port}", options=[("bench.connection", i)])
                for i in range(connections)]
    return channels, [channel.unary_unary(path) for path in paths for channel in channels]


async def _load(port: int, seconds: float, concurrency: int, connections: int,
                paths: list[str]) -> float:
    channels, calls = _stubs(port, connections, paths)
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


async def _burst(port: int, calls: int, deadline: float, connections: int, paths: list[str]
                 ) -> dict[str, dict[str, float]]:
    """Send ``calls`` calls at once; how many ended each way, and after how long."""
    channels, stubs = _stubs(port, connections, paths)
    ended: dict[str, list[float]] = collections.defaultdict(list)

    async def one(index: int) -> None:
        began = time.perf_counter()
        try:
            await stubs[index % len(stubs)](b"x", timeout=deadline)
            outcome = "OK"
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name
        ended[outcome].append(time.perf_counter() - began)

    await asyncio.gather(*(one(i) for i in range(calls)))
    for channel in channels:
        await channel.close()
    return {outcome: {"calls": len(times), "first_s": min(times),
                      "p50_s": sorted(times)[len(times) // 2], "last_s": max(times)}
            for outcome, times in sorted(ended.items())}


def measure(tasks: int, work_us: float, seconds: float, concurrency: int,
            serving: Serving = Serving(), connections: int = 1, burst: int = 0,
            deadline: float = 15.0) -> dict[str, Any]:
    """One server process with ``tasks`` busy tasks, loaded for ``seconds`` (or sent a
    ``burst`` of calls at once)."""
    ports: Any = multiprocessing.Queue()
    stop = multiprocessing.Event()
    process = multiprocessing.Process(target=_server_main,
                                      args=(tasks, work_us, serving, ports, stop))
    process.start()
    paths = serving.paths()
    try:
        port = ports.get(timeout=30)
        began = time.perf_counter()
        if burst:
            outcomes = asyncio.run(_burst(port, burst, deadline, connections, paths))
            rate = outcomes.get("OK", {}).get("calls", 0) / (time.perf_counter() - began)
        else:
            rate = asyncio.run(_load(port, seconds, concurrency, connections, paths))
        stop.set()
        turn = ports.get(timeout=30)
    finally:
        stop.set()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    result = {"tasks": tasks, "work_us": work_us, "turn_ms": turn * 1e3, "calls_per_s": rate,
              "calls_per_turn": rate * turn}
    if burst:
        result["outcomes"] = outcomes
    return result


def _option(text: str) -> tuple[str, Any]:
    """``name=value`` for a gRPC server argument; an integer value is passed as one."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected name=value, such as "
                                         "grpc.server.max_pending_requests=1000")
    try:
        return name, int(value)
    except ValueError:
        return name, value


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
    parser.add_argument("--methods", type=int, default=0,
                        help="serve this many registered methods, the calls spread over them "
                             "(0: one method through a generic handler)")
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="send N calls at once instead, and print how they ended")
    parser.add_argument("--deadline", type=float, default=15.0,
                        help="seconds each call of a burst may take (the agent's: 15)")
    parser.add_argument("--server-option", type=_option, action="append", default=[],
                        metavar="NAME=VALUE", help="a gRPC server argument (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if min(args.tasks) < 0 or args.work_us < 0 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--tasks and --work-us must be 0 or more, --seconds and --concurrency "
                     "positive")
    if args.burst < 0 or args.methods < 0 or args.deadline <= 0:
        parser.error("--burst and --methods must be 0 or more, --deadline positive")
    serving = Serving(args.servers, args.methods, tuple(args.server_option))
    results = [measure(n, args.work_us, args.seconds, args.concurrency, serving,
                       args.connections, args.burst, args.deadline) for n in args.tasks]
    if args.json:
        print(json.dumps({"grpcio": grpc.__version__, "results": results}, indent=2))
        return 0
    print(f"grpcio {grpc.__version__}; each busy task computes {args.work_us:.0f} µs per turn")
    if args.burst:
        print(f"{args.burst:,} calls at once, {args.deadline:g} s deadline; how they ended "
              "(calls, first / median / last, seconds)")
        for row in results:
            ended = "; ".join(f"{k} {v['calls']:,} ({v['first_s']:.1f} / {v['p50_s']:.1f} / "
                              f"{v['last_s']:.1f})" for k, v in row["outcomes"].items())
            print(f"{row['tasks']:>4} busy tasks, a turn of {row['turn_ms']:.1f} ms: {ended}")
        return 0
    print(f"{'busy tasks':>10} {'loop turn':>10} {'calls/s':>9} {'calls per turn':>15}")
    for row in results:
        print(f"{row['tasks']:>10} {row['turn_ms']:>8.2f} ms {row['calls_per_s']:>9,.0f} "
              f"{row['calls_per_turn']:>15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
