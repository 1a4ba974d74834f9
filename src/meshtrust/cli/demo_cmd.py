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

from meshtrust import demo, signals
from meshtrust.cli.output import Output


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "demo", help="run a local fleet: a server and one agent per cluster",
        description="Start a management server and one agent per cluster as separate "
                    "processes on 127.0.0.1, with SQLite stores in a work directory. The "
                    "clusters are registered, bootstrap with single-use tokens, connect over "
                    "mTLS and rotate their client certificates (lifetimes of seconds) while a "
                    "live table shows each one. Ctrl-C stops everything. With --duration it "
                    "stops by itself and exits 0 only if every cluster bootstrapped, connected, "
                    "rotated its client certificate, got its Istio intermediate (applied by a "
                    "RootTrustPolicy; pods restarted in order) and completed mTLS with the "
                    "other clusters' workloads.")
    parser.add_argument("--clusters", type=int, default=3, help="number of workload clusters "
                                                                "(default %(default)s)")
    parser.add_argument("--workdir", type=Path,
                        help="where stores and logs go (default: a new temporary directory)")
    parser.add_argument("--duration", type=float,
                        help="stop after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--client-lifetime", type=int, default=20,
                        help="client certificate lifetime in seconds (default %(default)s)")
    parser.add_argument("--rotate-root", action="store_true",
                        help="once every cluster has its Istio CA, rotate the root while "
                             "workloads of different clusters keep completing mTLS")
    parser.set_defaults(handler=_run)


def _table(fleet: demo.Fleet, elapsed: float) -> Table:
    now = dt.datetime.now(dt.UTC)
    views, alive = fleet.views, fleet.alive()
    title = f"meshtrust fleet — {elapsed:.0f}s"
    if fleet.plan.rotate_root:
        title += f" — root rotation: {fleet.rotation_step}"
    table = Table(title=title, header_style="bold")
    for column in ("cluster", "agent", "relay", "client serial", "renews in", "rotations",
                   "istio CA", "pods", "cross-cluster mTLS"):
        table.add_column(column)
    for name, view in views.items():
        renews = f"{max((view.renew_at - now).total_seconds(), 0):.0f}s" if view.renew_at else "-"
        table.add_row(
            name, "running" if alive.get(name) else "[red]stopped[/]",
            "[green]mTLS[/]" if view.connected else "[yellow]connecting[/]",
            (view.serial or "-")[:8], renews, str(view.rotations),
            f"{view.istio_state} {(view.istio_serial or '')[:8]}".strip(),
            str(view.pods_bounced),
            f"[red]{view.last_handshake}[/]" if view.handshake_failures
            else view.last_handshake)
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
            live.update(_table(fleet, elapsed))
        elif elapsed - last_line >= 5:
            last_line = elapsed
            rotation = f" root:{fleet.rotation_step}" if fleet.plan.rotate_root else ""
            out.line(f"[{elapsed:4.0f}s]{rotation} " + "  ".join(
                f"{v.name}: {'mTLS' if v.connected else 'connecting'} "
                f"rotations={v.rotations} istio={v.istio_state} pods={v.pods_bounced} "
                f"handshakes={v.handshakes - v.handshake_failures}/{v.handshakes}"
                for v in views.values()))
        if not fleet.alive().get("server", False):
            out.error("the server process stopped; see server.log in the work directory")
            break
        if duration is not None and elapsed >= duration:
            break
        await asyncio.sleep(0.5)
    return fleet.ok


def _run(args: argparse.Namespace, out: Output) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="meshtrust-demo-"))
    plan = demo.Plan(clusters=args.clusters, workdir=workdir,
                     client_lifetime=args.client_lifetime, rotate_root=args.rotate_root)
    out.line(f"meshtrust demo: {plan.clusters} clusters, stores and logs in {workdir}"
             + ("" if args.duration else "; Ctrl-C stops"))
    interrupted = False

    async def go() -> bool:
        nonlocal interrupted
        fleet = demo.Fleet(plan)
        task = asyncio.current_task()
        assert task is not None
        with signals.handled(lambda _: task.cancel(),
                             (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
            try:
                await fleet.start()
                if fleet.dashboard:
                    out.line(f"expiry dashboard: {fleet.dashboard} (Prometheus metrics: "
                             f"{fleet.dashboard.removesuffix('/ui')}/metrics)")
                if not out.console.is_terminal:
                    return await _watch(fleet, out, args.duration, None)
                with Live(_table(fleet, 0), console=out.console,
                          refresh_per_second=4) as live:
                    return await _watch(fleet, out, args.duration, live)
            except asyncio.CancelledError:
                interrupted = True
                return fleet.ok
            finally:
                await fleet.stop()
                title = "summary" + (f" — root rotation: {fleet.rotation_step}"
                                     if plan.rotate_root else "")
                out.table(["cluster", "bootstrapped", "mTLS", "client rotations", "chain verified",
                           "istio CAs", "mTLS handshakes ok"],
                          [[v.name, _yes(v.bootstrapped), _yes(v.ever_connected), str(v.rotations),
                            _yes(v.verified), str(len(v.istio_serials)),
                            f"{v.handshakes - v.handshake_failures}/{v.handshakes}"]
                           for v in fleet.views.values()], title=title)

    ok = asyncio.run(go())
    out.line(f"inspect a cluster: meshtrust store list secrets --store "
             f"{plan.store(plan.names[0])}")
    if ok:
        out.line("every cluster bootstrapped, connected over mTLS, rotated its client "
                 "certificate, got its Istio CA, and federated with the others"
                 + (", through a root rotation" if plan.rotate_root else ""))
        return 0
    if interrupted and args.duration is None:
        out.line("stopped")
        return 0
    out.line("not every step succeeded for every cluster (see the summary); the logs are in "
             f"{workdir}")
    return 1


def _yes(value: bool) -> str:
    return "yes" if value else "no"
