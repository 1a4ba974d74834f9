"""``meshtrust demo``: a whole fleet on this machine, with rotation you can watch."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import tempfile
import time
from pathlib import Path

from rich.live import Live
from rich.table import Table

from meshtrust import demo
from meshtrust.cli.output import Output


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "demo", help="run a local fleet: a server and one agent per cluster",
        description="Start a management server and one agent per cluster as separate "
                    "processes on 127.0.0.1, with SQLite stores in a work directory. The "
                    "clusters are registered, bootstrap with single-use tokens, connect over "
                    "mTLS and rotate their client certificates (lifetimes of seconds) while a "
                    "live table shows each one. Ctrl-C stops everything. With --duration it "
                    "stops by itself and exits 0 only if every cluster bootstrapped, connected "
                    "and rotated its certificate at least once.")
    parser.add_argument("--clusters", type=int, default=3, help="number of workload clusters "
                                                                "(default %(default)s)")
    parser.add_argument("--workdir", type=Path,
                        help="where stores and logs go (default: a new temporary directory)")
    parser.add_argument("--duration", type=float,
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--client-lifetime", type=int, default=20,
                        help="client certificate lifetime in seconds (default %(default)s)")
    parser.set_defaults(handler=_run)


def _table(views: dict[str, demo.ClusterView], alive: dict[str, bool], elapsed: float) -> Table:
    now = dt.datetime.now(dt.UTC)
    table = Table(title=f"meshtrust fleet — {elapsed:.0f}s", header_style="bold")
    for column in ("cluster", "agent", "relay", "client serial", "expires in", "renews in",
                   "rotations", "verified"):
        table.add_column(column)
    for name, view in views.items():
        expires = f"{(view.not_after - now).total_seconds():.0f}s" if view.not_after else "-"
        renews = f"{max((view.renew_at - now).total_seconds(), 0):.0f}s" if view.renew_at else "-"
        table.add_row(
            name, "running" if alive.get(name) else "[red]stopped[/]",
            "[green]mTLS[/]" if view.connected else "[yellow]connecting[/]",
            (view.serial or "-")[:16], expires, renews, str(view.rotations),
            "[green]yes[/]" if view.verified else "-")
    return table


async def _watch(fleet: demo.Fleet, out: Output, duration: float | None,
                 live: Live | None) -> bool:
    """Refresh the views every half second until ``duration`` or the server stops."""
    started = time.monotonic()
    last_line = -5.0
    while True:
        views = await fleet.observe()
        elapsed = time.monotonic() - started
        if live is not None:
            live.update(_table(views, fleet.alive(), elapsed))
        elif elapsed - last_line >= 5:
            last_line = elapsed
            out.line(f"[{elapsed:4.0f}s] " + "  ".join(
                f"{v.name}: {'mTLS' if v.connected else 'connecting'} serial="
                f"{(v.serial or '-')[:8]} rotations={v.rotations}" for v in views.values()))
        if not fleet.alive().get("server", False):
            out.error("the server process stopped; see server.log in the work directory")
            break
        if duration is not None and elapsed >= duration:
            break
        await asyncio.sleep(0.5)
    return all(v.ok for v in fleet.views.values())


def _run(args: argparse.Namespace, out: Output) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="meshtrust-demo-"))
    plan = demo.Plan(clusters=args.clusters, workdir=workdir,
                     client_lifetime=args.client_lifetime)
    out.line(f"meshtrust demo: {plan.clusters} clusters, stores and logs in {workdir}"
             + ("" if args.duration else "; Ctrl-C stops"))
    interrupted = False

    async def go() -> bool:
        nonlocal interrupted
        fleet = demo.Fleet(plan)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await fleet.start()
            if not out.console.is_terminal:
                return await _watch(fleet, out, args.duration, None)
            with Live(_table(fleet.views, {}, 0), console=out.console,
                      refresh_per_second=4) as live:
                return await _watch(fleet, out, args.duration, live)
        except asyncio.CancelledError:
            interrupted = True
            return all(v.ok for v in fleet.views.values())
        finally:
            await fleet.stop()
            out.table(["cluster", "bootstrapped", "mTLS", "rotations", "chain verified"],
                      [[v.name, _yes(v.bootstrapped), _yes(v.ever_connected), str(v.rotations),
                        _yes(v.verified)] for v in fleet.views.values()], title="summary")

    ok = asyncio.run(go())
    out.line(f"inspect a cluster: meshtrust store list secrets --store "
             f"{plan.store(plan.names[0])}")
    if ok:
        out.line("every cluster bootstrapped, connected over mTLS and rotated its certificate")
        return 0
    if interrupted and args.duration is None:
        out.line("stopped")
        return 0
    out.line("not every cluster bootstrapped, connected and rotated; see the logs in "
             f"{workdir}")
    return 1


def _yes(value: bool) -> str:
    return "yes" if value else "no"
