"""Fleet scale: N simulated clusters against one real management server.

What it runs:

* A real ``meshtrust server`` process on 127.0.0.1 with a fresh SQLite
  management store in a temporary directory, its default settings but for
  what the flags below say. ``--store postgres`` puts the store in a throwaway
  PostgreSQL server instead (Debian's packages, ``fsync=on``, as the tests start
  it), the HA deployment's store: with ``--servers N`` the replicas share it.
* Before the clock starts, through the authority API, in bulk: the relay PKI,
  N registered clusters with one single-use bootstrap token each, and a
  ``RootTrustPolicy`` that selects every cluster (generated P-256 root, P-256
  intermediates, no pod restarts).
* ``--workers`` processes of simulated agents (``bench/fleetsim.py``): each
  agent is a real gRPC client over real mutual TLS with the real messages. It
  bootstraps with its token, holds a ``Relay.Work`` stream, answers its Istio
  work item with a CSR for a key it made and reports it finished, and sends a
  status report when what it holds changes and every ``--report-interval``
  seconds otherwise (the agent's default, 300).

It reports how long until every cluster is bootstrapped, holds a relay
stream and has an Istio intermediate; the server's RSS and CPU over time;
where the machine's cores went in each phase (the server's, its event loop
thread's among them, the simulators', other processes' and the idle ones);
p50/p99 latencies; errors (any failed call other than RESOURCE_EXHAUSTED,
which the agents wait out as told) and dropped streams.

``--storm``: then every client certificate and every intermediate falls due
at once: each agent renews after a random delay of at most ``--storm-spread``
seconds (the agent's spread of an overdue renewal, ``--renew-spread``; the agents'
jitter spreads renewals that are not overdue over a share of the grace window),
and the policy is applied again with a new intermediate lifetime, which sends
every cluster a new work item. Reports the time to drain, errors and p99.

``--root-rotation``: then the policy's root is rotated (as ``meshtrust rotate
root`` does) while every worker runs mTLS handshakes between workloads of two
of its clusters, issued from their current ``cacerts``, back to back. Reports
the time to ``DONE`` and the failed handshakes.

``--ceiling``: the same agents against ``bench/fleetceiling.py`` instead of the
server: the relay protocol with the same gRPC options, mutual TLS and signing code,
and nothing else (no store, tokens, admission control or schedule). With
``--no-policy``, what it reaches is the most a server on Python's gRPC reaches on this
machine; with intermediates, thousands of clusters overflow its gRPC backlog, as it
has no admission control.

``--bootstrap-spread S``: each agent's first bootstrap waits a random part of S
seconds, as the agent's ``--bootstrap-spread`` (the default, 0, starts them all in the
same second); the time to converge still counts from the start.

``--no-policy``: no trust policy, so no Istio work: the clusters only bootstrap and
hold their relay streams, which is what the converge target counts.

Run from the repository root (``.venv/bin/pip install -e '.[bench]'`` for
psutil and matplotlib; without psutil /proc is read, without matplotlib
``--plot`` is refused):

    .venv/bin/python bench/fleet.py --clusters 1000
    .venv/bin/python bench/fleet.py --clusters 10000 --storm --plot fleet.png
    .venv/bin/python bench/fleet.py --clusters 100 --root-rotation
    .venv/bin/python bench/fleet.py --clusters 10000 --storm --ceiling --timeout 900
    .venv/bin/python bench/fleet.py --clusters 10000 --storm --store postgres --servers 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import queue as queue_module
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fleetsim
import relay

from meshtrust.agent import config as agent_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import pgserver  # noqa: E402  (the tests' throwaway PostgreSQL server)

HOST = "127.0.0.1"
POLICY = "fleet"
NAMESPACE = "gloo-mesh"
SHOW_EVERY = 0.25  # seconds between two updates of the progress display
ERROR_BUCKET = 30.0  # seconds per bucket of the errors' timeline in the JSON results
# Where a record of the server's log starts: its own (a date) or gRPC's C core's (I1207 ...).
_RECORD = re.compile(r"\d{4}-\d\d-\d\d |[IWEF]\d{4} ")


def policy_document(ttl: str) -> dict[str, Any]:
    return {"apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
            "metadata": {"name": POLICY, "namespace": NAMESPACE},
            "spec": {"config": {
                "mgmtServerCa": {"generated": {"keyType": "ecdsa-p256"}},
                "intermediateCertOptions": {"keyType": "ecdsa-p256", "ttl": ttl},
                "autoRestartPods": False}}}


# ----------------------------------------------------------------------------------------
# The management store, through the authority API


async def prepare(store_url: str, count: int, key_type: str, *, policy: bool = True,
                  parallel: int = 512) -> tuple[list[fleetsim.ClusterSpec], bytes]:
    """The relay PKI, ``count`` clusters with a token each, and (with ``policy``) the
    trust policy."""
    from meshtrust import clock as clock_module
    from meshtrust.authority import istio, registry, relay_pki
    from meshtrust.pki import keys
    from meshtrust.store import open_store

    clock = clock_module.SystemClock()
    store = await open_store(store_url)
    try:
        await relay_pki.ensure(store, clock, relay_pki.Options(
            key_type=keys.KeyType.parse(key_type)))
        clusters = registry.Registry(store, clock)
        gate = asyncio.Semaphore(parallel)

        async def enroll(name: str) -> fleetsim.ClusterSpec:
            async with gate:
                await clusters.register(name)
                return fleetsim.ClusterSpec(name=name, token=await clusters.create_token(name))

        width = max(5, len(str(count - 1)))
        made = await asyncio.gather(*(enroll(f"c-{i:0{width}d}") for i in range(count)))
        if policy:
            await istio.IstioAuthority(store, clock, clusters).apply(policy_document("720h"))
        return list(made), await relay_pki.trust_bundle(store)
    finally:
        await store.close()


async def apply_policy(store_url: str, ttl: str) -> None:
    from meshtrust import clock as clock_module
    from meshtrust.authority import istio, registry
    from meshtrust.store import open_store

    clock = clock_module.SystemClock()
    store = await open_store(store_url)
    try:
        await istio.IstioAuthority(store, clock, registry.Registry(store, clock)).apply(
            policy_document(ttl))
    finally:
        await store.close()


async def start_rotation(store_url: str) -> None:
    from meshtrust import clock as clock_module
    from meshtrust.authority import istio, registry, root_rotation
    from meshtrust.store import open_store

    clock = clock_module.SystemClock()
    store = await open_store(store_url)
    try:
        authority = istio.IstioAuthority(store, clock, registry.Registry(store, clock))
        await root_rotation.RootRotations(store, clock, authority).start(POLICY)
    finally:
        await store.close()


async def rotation_step(store_url: str) -> str:
    from meshtrust.authority import root_rotation
    from meshtrust.store import open_store

    store = await open_store(store_url)
    try:
        found = await store.get_resource(root_rotation.ROTATION_KIND, NAMESPACE, POLICY)
        return str(found.status.get("step", ""))
    finally:
        await store.close()


# ----------------------------------------------------------------------------------------
# The server process and what it uses


class ServerProcess:
    """``meshtrust server`` processes in their own process groups, stopped with SIGINT.

    With ``--servers N`` > 1 they are replicas on the one store sharing the listen
    ports (gRPC binds with SO_REUSEPORT, so the kernel spreads the agents' connections
    over them); the first starts alone, so it is the one that generates the relay PKI.
    """

    def __init__(self, workdir: Path, args: argparse.Namespace, store: str) -> None:
        self.workdir = workdir
        self.store = store
        self.log = workdir / "server.log"
        self.args = args
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> dict[str, int]:
        listen = bootstrap = f"{HOST}:0"
        if self.args.servers > 1:
            listen, bootstrap = (f"{HOST}:{port}" for port in relay.free_ports(2))
        ports: dict[str, int] = {}
        for index in range(self.args.servers):
            ports = self._start_one(index, listen, bootstrap)
        return ports

    def _start_one(self, index: int, listen: str, bootstrap: str) -> dict[str, int]:
        ready = self.workdir / f"server-{index}.ready"
        common = ["--store", self.store, "--listen", listen, "--bootstrap-listen", bootstrap,
                  "--ready-file", str(ready)]
        if self.args.ceiling:
            command = [sys.executable, str(Path(__file__).with_name("fleetceiling.py")),
                       *common, *(["--no-work"] if self.args.no_policy else [])]
        else:
            command = [sys.executable, "-m", "meshtrust", "server", *common,
                       "--key-type", self.args.key_type,
                       "--log-level", self.args.server_log_level, *self.args.server_arg]
            if self.args.max_issuances:
                command += ["--max-issuances", str(self.args.max_issuances)]
        with self.log.open("ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise SystemExit(f"the server did not start:\n{tail}")
            time.sleep(0.05)
        ports: dict[str, int] = json.loads(ready.read_text())
        return ports

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def signal(self, signum: int) -> None:
        for proc in self.procs:
            proc.send_signal(signum)

    def exited(self) -> bool:
        return any(proc.poll() is not None for proc in self.procs)

    def stop(self) -> None:
        running = [proc for proc in self.procs if proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGINT)
        for proc in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _proc_stat(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of a process, from psutil or /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            times = p.cpu_times()
            return p.memory_info().rss, times.user + times.system
        except psutil.Error:
            return 0, 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[21]) * os.sysconf("SC_PAGE_SIZE"), (int(fields[11]) + int(fields[12])) / tick


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Sample:
    t: float
    rss: int
    cpu: float  # server CPU seconds so far
    workers_cpu: float
    machine_cpu: float  # busy CPU seconds of the whole machine so far
    loop_cpu: float  # CPU seconds of the servers' event loop threads so far


class Sampler(threading.Thread):
    """The server's RSS and CPU (and the workers' CPU) every ``interval`` seconds."""

    def __init__(self, server_pids: list[int], worker_pids: list[int],
                 interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server_pids = server_pids
        self.worker_pids = worker_pids
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            stats = [_proc_stat(pid) for pid in self.server_pids]
            rss, cpu = sum(r for r, _ in stats), sum(c for _, c in stats)
            workers = sum(_proc_stat(pid)[1] for pid in self.worker_pids)
            # A server's event loop runs on its main thread, whose id is the process's.
            loops = sum(relay.cpu_seconds(pid, thread=pid) for pid in self.server_pids)
            self.samples.append(Sample(time.monotonic(), rss, cpu, workers, _machine_busy(),
                                       loops))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()

    def peak_rss_mib(self, start: float, end: float) -> float | None:
        """The highest server RSS sampled from ``start`` to ``end``; None if none was."""
        inside = [s.rss for s in self.samples if start <= s.t <= end]
        return max(inside) / 2**20 if inside else None

    def window(self, start: float, end: float) -> dict[str, float]:
        inside = [s for s in self.samples if start <= s.t <= end]
        if len(inside) < 2:
            return {"peak_rss_mib": 0.0, "server_cores": 0.0, "worker_cores": 0.0,
                    "other_cores": 0.0}
        span = inside[-1].t - inside[0].t
        server = (inside[-1].cpu - inside[0].cpu) / span
        workers = (inside[-1].workers_cpu - inside[0].workers_cpu) / span
        machine = (inside[-1].machine_cpu - inside[0].machine_cpu) / span
        return {"peak_rss_mib": max(s.rss for s in inside) / 2**20,
                "end_rss_mib": inside[-1].rss / 2**20,
                "server_cpu_s": server * span, "worker_cpu_s": workers * span,
                "server_cores": server, "worker_cores": workers,
                "loop_cores": (inside[-1].loop_cpu - inside[0].loop_cpu) / span,
                "other_cores": max(0.0, machine - server - workers),
                "idle_cores": max(0.0, (os.cpu_count() or 1) - machine)}

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None


# ----------------------------------------------------------------------------------------
# Events from the workers


class Tally:
    """Every event the workers sent: ``(kind, time, value)``.

    Counts from the start of each phase (``mark``) are kept as events come: the
    progress display asks for them several times a second, and counting them
    again over every event of a 10,000-cluster run took the driver a third of a
    core, which the server then did not have.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self._since: dict[float, collections.Counter[str]] = {0.0: self.counts}

    def mark(self, start: float) -> None:
        """Keep counts of the events from ``start`` on, as they come."""
        self._since[start] = collections.Counter(k for k, t, _ in self.events if t >= start)

    def add(self, batch: list[tuple[str, float, float]]) -> None:
        self.events.extend(batch)
        for kind, when, _ in batch:
            for start, counter in self._since.items():
                if when >= start:
                    counter[kind] += 1

    def since(self, kind: str, start: float,
              end: float = float("inf")) -> list[tuple[float, float]]:
        return [(t, v) for k, t, v in self.events if k == kind and start <= t <= end]

    def count(self, kind: str, start: float = 0.0) -> int:
        counter = self._since.get(start)
        if counter is not None:
            return counter[kind]
        return sum(1 for k, t, _ in self.events if k == kind and t >= start)

    def nth_time(self, kind: str, n: int, start: float) -> float | None:
        """When the ``n``-th ``kind`` event after ``start`` came, if it did."""
        times = sorted(t for t, _ in self.since(kind, start))
        return times[n - 1] if len(times) >= n else None

    def prefixed(self, prefix: str, start: float, end: float = float("inf")
                 ) -> collections.Counter[str]:
        counter = self._since.get(start)
        if counter is not None and end == float("inf"):
            return collections.Counter({k: n for k, n in counter.items()
                                        if k.startswith(prefix)})
        return collections.Counter(k for k, t, _ in self.events
                                   if k.startswith(prefix) and start <= t <= end)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(tally: Tally, kind: str, start: float, end: float = float("inf")) -> dict[str, Any]:
    values = [v for _, v in tally.since(kind, start, end)]
    p50, p99 = percentile(values, 0.50), percentile(values, 0.99)
    return {"n": len(values), "p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
            "max_ms": round(max(values) * 1000, 1) if values else None}


def _by_bucket(timed: Iterable[tuple[float, float]], start: float) -> list[list[float]]:
    """The values of ``(time, value)`` pairs, in one list per ``ERROR_BUCKET`` seconds after
    ``start``, up to the last pair's."""
    buckets: list[list[float]] = []
    for t, v in timed:
        index = int((t - start) // ERROR_BUCKET)
        buckets.extend([] for _ in range(index + 1 - len(buckets)))
        buckets[index].append(v)
    return buckets


def latency_per_bucket(tally: Tally, kind: str, start: float,
                       end: float = float("inf")) -> list[dict[str, Any]]:
    """``latency`` of the ``kind`` events that ended in each ``ERROR_BUCKET`` seconds after
    ``start``, with how many took over 2 s: whether a tail is spread or comes at once."""
    figures = []
    for values in _by_bucket(tally.since(kind, start, end), start):
        p50, p99 = percentile(values, 0.50), percentile(values, 0.99)
        figures.append({"n": len(values), "p50_ms": round(p50 * 1000) if p50 is not None else None,
                        "p99_ms": round(p99 * 1000) if p99 is not None else None,
                        "over_2s": sum(1 for v in values if v > 2.0)})
    return figures


def collections_figures(tally: Tally, start: float, end: float = float("inf")) -> dict[str, Any]:
    """The simulators' own garbage collections from ``start``: each one stopped a
    worker's event loop, and so is part of what its agents measured meanwhile."""
    took = [v for _, v in tally.since("simgc", start, end)]
    return {"n": len(took), "seconds": round(sum(took), 2),
            "longest_ms": round(max(took) * 1000, 1) if took else None}


def error_figures(tally: Tally, start: float, end: float = float("inf")) -> dict[str, Any]:
    """The errors after ``start``: how many of each kind, how long the failed calls had
    run (gRPC's backlog refuses a call within a second; one the server did not take in
    ends at its deadline), and how many came in each ``ERROR_BUCKET`` seconds."""
    errors = [(k, t) for k, t, _ in tally.events if k.startswith("error:") and start <= t <= end]
    counts = collections.Counter(k for k, _ in errors)
    buckets = [len(b) for b in _by_bucket(((t, 0.0) for _, t in errors), start)]
    return {"errors": dict(counts),
            "failed_call_ran": {k: latency(tally, k, start, end) for k in counts},
            f"errors_per_{ERROR_BUCKET:.0f}s": buckets}


# ----------------------------------------------------------------------------------------
# The run


class Fleet:
    def __init__(self, args: argparse.Namespace, workdir: Path, store: str) -> None:
        self.args = args
        self.workdir = workdir
        self.server = ServerProcess(workdir, args, store)
        self.context = mp.get_context("spawn")
        self.events: Any = self.context.Queue()
        self.commands: list[Any] = []
        self.workers: list[Any] = []
        self.tally = Tally()
        self.sampler: Sampler | None = None
        self.marks: dict[str, float] = {}
        self.result: dict[str, Any] = {}
        self._stopped = 0

    # -- plumbing ----------------------------------------------------------------------------

    def pump(self, timeout: float = 0.1) -> None:
        """Take what the workers sent within ``timeout`` seconds."""
        try:
            message = self.events.get(timeout=timeout)
        except queue_module.Empty:
            return
        while True:
            if message[0] == "batch":
                self.tally.add(message[2])
            elif message[0] == "stopped":
                self._stopped += 1
            try:
                message = self.events.get_nowait()
            except queue_module.Empty:
                return

    def broadcast(self, *command: Any) -> None:
        for commands in self.commands:
            commands.put(command)

    def wait(self, done: Any, timeout: float, progress: Any, update: Any) -> bool:
        deadline = time.monotonic() + timeout
        shown = 0.0
        while time.monotonic() < deadline:
            self.pump()
            if time.monotonic() - shown >= SHOW_EVERY:
                shown = time.monotonic()
                update()
                progress.refresh()
            if done():
                return True
            if self.server.exited():
                raise SystemExit("the server exited; see " + str(self.server.log))
        return False

    def server_text(self) -> str:
        assert self.sampler is not None
        latest, first = self.sampler.latest(), self.sampler.samples[:1]
        if latest is None or not first:
            return ""
        recent = [s for s in self.sampler.samples if s.t >= latest.t - 2.0]
        cores = ((recent[-1].cpu - recent[0].cpu) / (recent[-1].t - recent[0].t)
                 if len(recent) > 1 and recent[-1].t > recent[0].t else 0.0)
        return f"server {latest.rss / 2**20:,.0f} MiB, {100 * cores:.0f}% CPU"

    # -- phases ------------------------------------------------------------------------------

    def setup(self) -> None:
        args = self.args
        _say(f"preparing the management store: relay PKI, {args.clusters:,} clusters with a "
             f"token each{'' if args.no_policy else ', the trust policy'}")
        began = time.monotonic()
        clusters, trust = asyncio.run(prepare(self.server.store, args.clusters, args.key_type,
                                              policy=not args.no_policy))
        self.result["prepare_s"] = round(time.monotonic() - began, 2)
        _say(f"  done in {self.result['prepare_s']} s; starting the server")
        ports = self.server.start()
        relay, bootstrap = f"{HOST}:{ports['relay']}", f"{HOST}:{ports['bootstrap']}"
        shares = [clusters[i::args.workers] for i in range(args.workers)]
        for index, share in enumerate(shares):
            commands = self.context.Queue()
            spec = fleetsim.WorkerSpec(
                index=index, clusters=share, relay=relay, bootstrap=bootstrap, trust=trust,
                report_interval=args.report_interval,
                separate_unary_channel=args.channels == 2, renew_keys=args.storm,
                handshakes=args.root_rotation, seed=args.seed + index,
                bootstrap_spread=args.bootstrap_spread)
            worker = self.context.Process(target=fleetsim.main, args=(spec, self.events, commands),
                                          daemon=True)
            worker.start()
            self.commands.append(commands)
            self.workers.append(worker)
        ready = 0
        deadline = time.monotonic() + 600
        while ready < len(self.workers):
            try:
                message = self.events.get(timeout=1.0)
            except queue_module.Empty:
                if time.monotonic() > deadline or any(not w.is_alive() for w in self.workers):
                    raise SystemExit("a worker did not start") from None
                continue
            if message[0] == "ready":
                ready += 1
        self.sampler = Sampler(self.server.pids, [w.pid for w in self.workers])
        self.sampler.start()

    def converge(self, progress: Any) -> bool:
        n = self.args.clusters
        bars = {kind: progress.add_task(label, total=n) for kind, label in (
            ("bootstrapped", "bootstrapped"), ("connected", "relay stream open"),
            ("intermediate", "Istio intermediate"))
            if kind != "intermediate" or not self.args.no_policy}
        status = progress.add_task("", total=None)
        go = time.monotonic() + 0.5
        self.marks["go"] = go
        self.tally.mark(go)
        self.broadcast("go", go)
        spies = self._profile(go)

        def update() -> None:
            for kind, bar in bars.items():
                progress.update(bar, completed=self.tally.count(kind))
            progress.update(status, description=f"{self.server_text()}; errors "
                                                f"{sum(self.tally.prefixed('error:', 0).values())}")

        done = self.wait(lambda: all(self.tally.count(k) >= n for k in bars),
                         self.args.timeout, progress, update)
        ended = time.monotonic()
        self.marks["converged" if done else "converge phase timed out"] = ended
        self._finish_profile(spies, "converge")
        times = {k: self.tally.nth_time(k, n, go) for k in bars}
        held = times.get("connected")
        self.result["converge"] = {
            "done": done,
            **{f"all_{k}_s": round(t - go, 2) if t else None for k, t in times.items()},
            **self._converge_figures(go, ended),
            # The target's moment: every cluster bootstrapped and holding its stream (the
            # intermediates may still be on their way).
            "held_peak_rss_mib": (self.sampler.peak_rss_mib(go, held)
                                  if held and self.sampler else None),
        }
        return done

    def _converge_figures(self, go: float, end: float) -> dict[str, Any]:
        """Counts, latencies, refusals, errors and resources of the converge phase so far."""
        return {
            **{f"{k}_count": self.tally.count(k)
               for k in ("bootstrapped", "connected", "intermediate")},
            "bootstrap_latency": latency(self.tally, "bootstrapped", go),
            "bootstrap_call": latency(self.tally, "call:bootstrap", go),
            "intermediate_latency": latency(self.tally, "intermediate", go),
            "busy": dict(self.tally.prefixed("busy:", go)),
            **error_figures(self.tally, go, end),
            "drops": self.tally.count("drop", go),
            "simulator_lag": latency(self.tally, "simlag", go, end),
            "simulator_gc": collections_figures(self.tally, go, end),
            **(self.sampler.window(go, end) if self.sampler else {}),
        }

    def partial(self) -> None:
        """What the converge phase reached when the run was interrupted."""
        if "converge" in self.result or "go" not in self.marks:
            return
        go, now = self.marks["go"], time.monotonic()
        self.result["converge"] = {"done": False, "seconds": round(now - go, 1),
                                   **self._converge_figures(go, now)}

    def hold(self, progress: Any) -> None:
        """Steady state: every stream held, reports and heartbeats flowing."""
        began = time.monotonic()
        task = progress.add_task(f"steady state for {self.args.hold:.0f} s",
                                 total=self.args.hold)
        spies = self._profile(began)

        def update() -> None:
            progress.update(task, completed=time.monotonic() - began)

        self.wait(lambda: time.monotonic() - began >= self.args.hold, self.args.hold + 1,
                  progress, update)
        self._finish_profile(spies, "steady")
        assert self.sampler is not None
        self.result["steady"] = {
            "seconds": self.args.hold, **self.sampler.window(began, time.monotonic()),
            "errors": dict(self.tally.prefixed("error:", began)),
            "drops": self.tally.count("drop", began)}

    def storm(self, progress: Any) -> None:
        n = self.args.clusters
        began = time.monotonic()
        self.marks["storm"] = began
        self.tally.mark(began)
        renewed = progress.add_task("storm: client certificates renewed", total=n)
        intermediates = 0 if self.args.no_policy else n
        reissued = progress.add_task("storm: intermediates re-issued", total=intermediates)
        status = progress.add_task("", total=None)
        self.broadcast("storm", self.args.storm_spread)
        if self.args.ceiling and not self.args.no_policy:
            self.server.signal(signal.SIGUSR1)  # its way of sending every cluster new work
        elif not self.args.no_policy:
            asyncio.run(apply_policy(self.server.store, "721h"))  # a new lifetime: all re-issue
        spies = self._profile(began)

        def update() -> None:
            progress.update(renewed, completed=self.tally.count("renewed", began))
            progress.update(reissued, completed=self.tally.count("intermediate", began))
            busy = sum(self.tally.prefixed("busy:", began).values())
            failed = sum(self.tally.prefixed("error:", began).values())
            progress.update(status, description=f"{self.server_text()}; told to wait {busy}, "
                                                f"errors {failed}")

        done = self.wait(lambda: (self.tally.count("renewed", began) >= n
                                  and self.tally.count("intermediate", began) >= intermediates),
                         self.args.timeout, progress, update)
        end = time.monotonic()
        self._finish_profile(spies, "storm")
        last_renewal = self.tally.nth_time("renewed", n, began)
        last_intermediate = self.tally.nth_time("intermediate", n, began)
        assert self.sampler is not None
        self.result["storm"] = {
            "done": done, "spread_s": self.args.storm_spread,
            "renewals_drained_s": round(last_renewal - began, 2) if last_renewal else None,
            "intermediates_drained_s": (round(last_intermediate - began, 2)
                                        if last_intermediate else None),
            "renewed": self.tally.count("renewed", began),
            "renew_end_to_end": latency(self.tally, "renewed", began),
            "renew_call": latency(self.tally, "call:renew", began),
            f"renew_call_per_{ERROR_BUCKET:.0f}s": latency_per_bucket(self.tally, "call:renew",
                                                                     began, end),
            "intermediate_latency": latency(self.tally, "intermediate", began),
            "busy": dict(self.tally.prefixed("busy:", began)),
            **error_figures(self.tally, began, end),
            "drops": self.tally.count("drop", began),
            "rebootstraps": self.tally.count("call:bootstrap", began),
            "simulator_lag": latency(self.tally, "simlag", began, end),
            "simulator_gc": collections_figures(self.tally, began, end),
            **self.sampler.window(began, end),
        }

    def rotate(self, progress: Any) -> None:
        began = time.monotonic()
        self.marks["rotation"] = began
        self.tally.mark(began)
        task = progress.add_task("root rotation", total=None)
        asyncio.run(start_rotation(self.server.store))
        steps: list[tuple[str, float]] = []
        last_poll = 0.0

        def update() -> None:
            nonlocal last_poll
            now = time.monotonic()
            if now - last_poll >= 0.5:
                last_poll = now
                step = asyncio.run(rotation_step(self.server.store))
                if not steps or steps[-1][0] != step:
                    steps.append((step, now - began))
            ok = self.tally.count("handshake_ok", began)
            failed = self.tally.count("handshake_fail", began)
            progress.update(task, description=f"root rotation: {steps[-1][0] if steps else ''}"
                                              f"; handshakes {ok} ok, {failed} failed; "
                                              f"{self.server_text()}")

        done = self.wait(lambda: bool(steps) and steps[-1][0] == "DONE", self.args.timeout,
                         progress, update)
        end = time.monotonic()
        # Keep the handshakes going a little after DONE: the old root is gone by now.
        settle = time.monotonic()
        self.wait(lambda: time.monotonic() - settle > 3, 5, progress, update)
        self.result["rotation"] = {
            "done": done, "seconds": round(end - began, 2) if done else None,
            "steps": [{"step": s, "at_s": round(t, 2)} for s, t in steps],
            "intermediates_reissued": self.tally.count("intermediate", began),
            "handshakes_ok": self.tally.count("handshake_ok", began),
            "handshakes_failed": self.tally.count("handshake_fail", began),
            "handshakes_failed_before": self.tally.count("handshake_fail") -
            self.tally.count("handshake_fail", began),
            "errors": dict(self.tally.prefixed("error:", began)),
        }

    def stop(self) -> None:
        began = time.monotonic()
        self.marks.setdefault("end", began)
        self.broadcast("stop")
        deadline = time.monotonic() + 60
        while self._stopped < len(self.workers) and time.monotonic() < deadline:
            self.pump(0.2)
        for worker in self.workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
        _say(f"workers stopped in {time.monotonic() - began:.1f} s")
        if self.sampler is not None:
            self.sampler.stop()
        self.server.stop()
        _say(f"server stopped in {time.monotonic() - began:.1f} s")

    # -- profile -----------------------------------------------------------------------------

    def _profile(self, start: float) -> Any:
        if not self.args.profile:
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            self.result.setdefault("notes", []).append("--profile: py-spy is not installed")
            return None
        out = self.workdir / f"server-{len(self.marks)}.pyspy"
        proc = subprocess.Popen(
            [spy, "record", "--pid", str(self.server.pids[0]), "--rate", "50", "--duration",
             str(int(self.args.profile)), "--format", "raw", "--output", str(out), "--gil",
             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc, out, start

    def _finish_profile(self, spies: Any, phase: str) -> None:
        if spies is None:
            return
        proc, out, _ = spies
        try:
            proc.wait(timeout=self.args.profile + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if out.exists():
            self.result.setdefault("profiles", {})[phase] = summarize_profile(out)


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Where the server's GIL time went: own time of the hottest frames, and by module."""
    leaves: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaves[frames[-1]] += n
        seen: set[str] = set()
        for frame in frames:
            where = frame.rsplit("(", 1)[-1]
            module = where.split(":")[0].replace(")", "")
            if "meshtrust/" in module:
                module = "meshtrust/" + module.split("meshtrust/", 1)[1]
            if module not in seen:
                seen.add(module)
                modules[module] += n
            function = frame.strip()
            if function not in seen and "meshtrust/" in function:
                seen.add(function)
                functions[function] += n
    if not total:
        return {"samples": 0}
    return {"samples": total,
            "own_time": [(round(100 * n / total, 1), leaf) for leaf, n in leaves.most_common(top)],
            "inclusive_meshtrust": [(round(100 * n / total, 1), f)
                                    for f, n in functions.most_common(top)],
            "inclusive_modules": [(round(100 * n / total, 1), m)
                                  for m, n in modules.most_common(top)]}


# ----------------------------------------------------------------------------------------
# Report


def machine() -> str:
    import grpc

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} CPUs ({model}), {memory:.0f} GiB, Linux "
            f"{platform.release()}, Python {platform.python_version()}, grpcio "
            f"{grpc.__version__}")


def _ms(block: dict[str, Any], key: str = "p99_ms") -> str:
    value = block.get(key)
    return "-" if value is None else f"{value:,.0f} ms"


def _lag_row(phase: dict[str, Any]) -> tuple[str, str, str]:
    """How late the simulators' own event loops ran: part of every latency they measure."""
    lag = phase.get("simulator_lag") or {}
    collected = phase.get("simulator_gc") or {}
    return ("simulator event loop late p99 / max (in the latencies above)",
            f"{_ms(lag)} / {_ms(lag, 'max_ms')}",
            f"its GC: {collected.get('seconds', 0)} s, longest {_ms(collected, 'longest_ms')}")


def _ran(phase: dict[str, Any]) -> str:
    """How long the failed calls of the most frequent error kinds ran before they failed."""
    kinds = sorted(phase["errors"].items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{k.split(':', 1)[1]} {_ms(phase['failed_call_ran'][k], 'p50_ms')} / "
                     f"{_ms(phase['failed_call_ran'][k], 'max_ms')}" for k, _ in kinds)


def _sum(counter: dict[str, int]) -> str:
    total = sum(counter.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in
                                    sorted(counter.items(), key=lambda kv: -kv[1])[:4]) + ")"


def _with_traceback(log: list[str], index: int) -> str:
    """The server log's line ``index`` with the lines that go on from it (a traceback):
    those up to the next record, which starts with a date or is gRPC's own."""
    end = index + 1
    while end < len(log) and end - index < 60 and not _RECORD.match(log[end]):
        end += 1
    return "\n".join(log[index:end])


def table(result: dict[str, Any], args: argparse.Namespace) -> Any:
    from rich.table import Table

    replicas = f"{args.servers} replicas of " if args.servers > 1 else ""
    served = ("the ceiling (bench/fleetceiling.py), not meshtrust server" if args.ceiling
              else f"{replicas}meshtrust server on {args.store}")
    spread = (f" starting over {args.bootstrap_spread:g} s" if args.bootstrap_spread
              else "")
    out = Table(title=f"meshtrust fleet: {args.clusters:,} simulated clusters{spread}, "
                      f"{args.workers} worker processes, against {served}")
    out.add_column("phase")
    out.add_column("measure")
    out.add_column("value", justify="right")
    out.add_column("target", justify="right")
    out.add_row("setup", "registry + tokens + policy, in bulk", f"{result['prepare_s']} s", "")
    c = result.get("converge")
    if c:
        streams = c.get("all_connected_s")
        rss = c.get("peak_rss_mib", 0.0)
        if not c["done"]:
            out.add_row("converge", "NOT converged: reached",
                        f"{c['bootstrapped_count']:,} bootstrapped, {c['connected_count']:,} "
                        f"streams, {c['intermediate_count']:,} intermediates", "")
        out.add_row("converge", "all bootstrapped", _s(c.get("all_bootstrapped_s")), "")
        out.add_row("", "all holding a relay stream", _s(streams),
                    _verdict(streams is not None and streams <= 60, "<= 60 s"))
        out.add_row("", "all with an Istio intermediate",
                    "no policy" if args.no_policy else _s(c.get("all_intermediate_s")), "")
        held = c.get("held_peak_rss_mib")
        if held is not None and not args.no_policy:
            out.add_row("", "server peak RSS until all held a stream", f"{held:,.0f} MiB",
                        _verdict(0 < held <= 1024, "<= 1024 MiB"))
        out.add_row("", "server peak RSS" if args.no_policy else
                    "server peak RSS, intermediates included", f"{rss:,.0f} MiB",
                    _verdict(0 < rss <= 1024, "<= 1024 MiB"))
        out.add_row("", *_cores_row(c))
        out.add_row("", "CPU per cluster: server / simulators",
                    f"{1000 * c.get('server_cpu_s', 0) / args.clusters:.1f} ms / "
                    f"{1000 * c.get('worker_cpu_s', 0) / args.clusters:.1f} ms", "")
        out.add_row("", "bootstrap p50 / p99 (end to end)",
                    f"{_ms(c['bootstrap_latency'], 'p50_ms')} / {_ms(c['bootstrap_latency'])}", "")
        out.add_row("", "bootstrap call p50 / p99",
                    f"{_ms(c['bootstrap_call'], 'p50_ms')} / {_ms(c['bootstrap_call'])}", "")
        out.add_row("", "intermediate p50 / p99 (work item to finished)",
                    f"{_ms(c['intermediate_latency'], 'p50_ms')} / "
                    f"{_ms(c['intermediate_latency'])}", "")
        out.add_row("", "told to wait (RESOURCE_EXHAUSTED)", _sum(c["busy"]), "")
        out.add_row("", *_lag_row(c))
        out.add_row("", "errors", _sum(c["errors"]), "")
        out.add_row("", "streams dropped", str(c["drops"]), "")
    s = result.get("steady")
    if s:
        peak = s.get("peak_rss_mib", 0.0)
        out.add_row("steady", f"server peak / end RSS, CPU over {s['seconds']:.0f} s",
                    f"{peak:,.0f} / {s.get('end_rss_mib', 0):,.0f} MiB, "
                    f"{s.get('server_cores', 0):.2f}", _verdict(0 < peak <= 1024, "<= 1024 MiB"))
        out.add_row("", "errors / streams dropped", f"{_sum(s['errors'])} / {s['drops']}", "")
    st = result.get("storm")
    if st:
        out.add_row("storm", "renewals drained", _s(st.get("renewals_drained_s")), "")
        out.add_row("", "intermediates drained", "no policy" if args.no_policy
                    else _s(st.get("intermediates_drained_s")), "")
        errors = sum(st["errors"].values())
        out.add_row("", "errors", _sum(st["errors"]), _verdict(errors == 0, "0"))
        if errors:
            out.add_row("", "how long the failed calls ran, p50 / max", _ran(st), "")
        call = st["renew_call"].get("p99_ms")
        out.add_row("", "Renew call p50 / p99",
                    f"{_ms(st['renew_call'], 'p50_ms')} / {_ms(st['renew_call'])}",
                    _verdict(call is not None and call <= 2000, "p99 <= 2 s"))
        out.add_row("", "renewal p50 / p99, end to end (waits included)",
                    f"{_ms(st['renew_end_to_end'], 'p50_ms')} / "
                    f"{_ms(st['renew_end_to_end'])}", "")
        out.add_row("", "told to wait (RESOURCE_EXHAUSTED)", _sum(st["busy"]), "")
        out.add_row("", *_lag_row(st))
        out.add_row("", "streams dropped / re-bootstraps",
                    f"{st['drops']} / {st['rebootstraps']}", "")
        out.add_row("", "server peak RSS", f"{st.get('peak_rss_mib', 0):,.0f} MiB", "")
        out.add_row("", *_cores_row(st))
    r = result.get("rotation")
    if r:
        seconds = r.get("seconds")
        out.add_row("root rotation", "start to DONE", _s(seconds),
                    _verdict(seconds is not None and seconds <= 60, "<= 60 s"))
        out.add_row("", "steps", ", ".join(f"{x['step']} {x['at_s']} s" for x in r["steps"]), "")
        out.add_row("", "cross-cluster handshakes ok / failed",
                    f"{r['handshakes_ok']} / {r['handshakes_failed']}",
                    _verdict(r["handshakes_failed"] == 0 and r["handshakes_ok"] > 0, "0 failed"))
        out.add_row("", "errors", _sum(r["errors"]), "")
    return out


def _cores_row(phase: dict[str, Any]) -> tuple[str, str, str]:
    """The machine's cores over a phase: the server's (its event loop thread's within
    them), the simulators', other processes' and the idle ones."""
    return ("cores: server (its event loop) / simulators / other processes / idle",
            f"{phase.get('server_cores', 0):.2f} ({phase.get('loop_cores', 0):.2f}) / "
            f"{phase.get('worker_cores', 0):.2f} / {phase.get('other_cores', 0):.2f} / "
            f"{phase.get('idle_cores', 0):.2f}", "")


def _s(value: float | None) -> str:
    return "not reached" if value is None else f"{value:,.1f} s"


def _verdict(ok: bool, target: str) -> str:
    return f"{target} [green]met[/]" if ok else f"{target} [red]NOT met[/]"


def plot(fleet: Fleet, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    go = fleet.marks["go"]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7))
    end = fleet.marks.get("end", float("inf"))
    for kind, label, color in (
            ("bootstrapped", "bootstrapped", "tab:blue"),
            ("connected", "relay stream open", "tab:orange"),
            ("intermediate", "Istio intermediates finished (every round)", "tab:green"),
            ("renewed", "storm: client certificates renewed", "tab:purple")):
        times = sorted(t - go for t, _ in fleet.tally.since(kind, go, end))
        if times:
            top.plot(times, range(1, len(times) + 1), label=label, color=color)
    top.set_ylabel("clusters")
    top.legend(loc="lower right")
    top.set_title(f"{fleet.args.clusters:,} simulated clusters against one meshtrust server")
    assert fleet.sampler is not None
    samples = [s for s in fleet.sampler.samples if go <= s.t <= end]
    if samples:
        xs = [s.t - go for s in samples]
        bottom.plot(xs, [s.rss / 2**20 for s in samples], color="tab:red", label="server RSS")
        bottom.set_ylabel("server RSS (MiB)")
        cpu = bottom.twinx()
        pairs = list(zip(samples, samples[1:], strict=False))
        cpu.plot([b.t - go for _, b in pairs],
                 [100 * (b.cpu - a.cpu) / (b.t - a.t) for a, b in pairs],
                 color="tab:blue", alpha=0.5, label="server CPU")
        cpu.set_ylabel("server CPU (%)")
    for name, when in fleet.marks.items():
        if name not in ("go", "end"):
            for axis in (top, bottom):
                axis.axvline(when - go, color="grey", linestyle=":")
            top.annotate(name, (when - go, 0), rotation=90, fontsize=8)
    bottom.set_xlabel("seconds since the agents started")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(needed, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard < needed:
            _say(f"warning: open files are limited to {hard}; {needed} may be needed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="simulator processes")
    parser.add_argument("--storm", action="store_true",
                        help="then renew every client certificate and re-issue every "
                             "intermediate at once")
    parser.add_argument("--storm-spread", type=float,
                        default=agent_config.DEFAULT_RENEW_SPREAD,
                        help="each agent renews after a random delay of at most this many "
                             "seconds (default: the agent's --renew-spread for an overdue "
                             "renewal, %(default)s; 1 is the agent without it)")
    parser.add_argument("--bootstrap-spread", type=float,
                        default=agent_config.DEFAULT_BOOTSTRAP_SPREAD, metavar="SECONDS",
                        help="each agent's first bootstrap waits a random part of this, as "
                             "the agent's --bootstrap-spread (default %(default)s: all at "
                             "once); the time to converge counts from the start")
    parser.add_argument("--root-rotation", action="store_true",
                        help="then rotate the policy's root while workloads of the clusters "
                             "handshake across clusters")
    parser.add_argument("--hold", type=float, default=10.0,
                        help="seconds of steady state to measure after convergence (60 or "
                             "more take in the leader's sweep of stopped replicas, once a minute)")
    parser.add_argument("--report-interval", type=float,
                        default=agent_config.DEFAULT_STATUS_INTERVAL,
                        help="seconds between an agent's status reports when nothing changed "
                             "(default: the agent's, %(default)s)")
    parser.add_argument("--channels", type=int, choices=[1, 2], default=1,
                        help="connections per agent: 1 as the agent (the work stream and the "
                             "calls share it) or 2 (one for each, as the agent had before)")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite",
                        help="the management store: the embedded SQLite file (default) or "
                             "a throwaway PostgreSQL server started for the run")
    parser.add_argument("--servers", type=int, default=1,
                        help="server processes: replicas on the one store and the same ports "
                             "(RSS and CPU are their sums; --profile samples the first)")
    parser.add_argument("--ceiling", action="store_true",
                        help="run the agents against bench/fleetceiling.py instead of "
                             "meshtrust server: the same protocol, TLS and signing, nothing "
                             "else (no store, admission control or schedule), to measure what "
                             "this machine allows at best")
    parser.add_argument("--no-policy", action="store_true",
                        help="apply no trust policy: the clusters bootstrap and hold their "
                             "relay streams, and get no Istio intermediate")
    parser.add_argument("--max-issuances", type=int, default=0,
                        help="the server's --max-issuances (default: the server's default)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="another argument for meshtrust server (repeatable)")
    parser.add_argument("--server-log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--key-type", default="ecdsa-p256", help="relay CA key type")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per phase")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="sample the server with py-spy for SECONDS from the start of "
                             "each phase")
    parser.add_argument("--plot", type=Path, help="write the convergence over time to a PNG")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for other processes to leave the CPUs")
    args = parser.parse_args()
    if args.clusters < 2 or args.workers < 1 or args.servers < 1:
        parser.error("--clusters must be at least 2, --workers and --servers at least 1")
    if args.ceiling and (args.max_issuances or args.server_arg):
        parser.error("--max-issuances and --server-arg are settings of meshtrust server, "
                     "which --ceiling does not run")
    if args.ceiling and args.store != "sqlite":
        parser.error("--ceiling runs no store: not with --store")
    if args.root_rotation and (args.ceiling or args.no_policy):
        parser.error("--root-rotation needs the trust policy of meshtrust server: not with "
                     "--ceiling or --no-policy")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: .venv/bin/pip install -e '.[bench]'")
    # The server's connections: an agent's, and its next one while it moves to a renewed
    # certificate (the server inherits the limit, and raises its own soft limit to it).
    _raise_file_limit(args.clusters * 2 * (args.channels + 1) + 4096)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    console = Console(stderr=True)
    if args.quiet_wait > 0:
        deadline = time.monotonic() + args.quiet_wait
        while time.monotonic() < deadline:
            before = _machine_busy()
            time.sleep(1.0)
            if _machine_busy() - before < 0.2:
                break
    workdir = Path(tempfile.mkdtemp(prefix="meshtrust-fleet-"))
    database: pgserver.Server | None = None
    if args.store == "postgres":
        database = pgserver.Server(durable=True)
        database.start()
        store = database.create_database("fleet")
    else:
        store = f"sqlite:///{workdir / 'mgmt.db'}"
    fleet = Fleet(args, workdir, store)
    result = fleet.result
    result.update({"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                   "machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}})
    try:
        fleet.setup()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False,
                      auto_refresh=False) as progress:
            try:
                if fleet.converge(progress):
                    fleet.hold(progress)
                    if args.storm:
                        fleet.storm(progress)
                    if args.root_rotation:
                        fleet.rotate(progress)
            except KeyboardInterrupt:
                result["interrupted"] = True
                fleet.partial()
    finally:
        fleet.stop()
        log = fleet.server.log.read_text(errors="replace").splitlines()
        failures = [index for index, line in enumerate(log) if " ERROR " in line]
        # The server's last words: how long its garbage collector stopped it, in all.
        collected = [line.split("garbage collection took ", 1)[1] for line in log
                     if "garbage collection took " in line]
        result["server_log"] = {"lines": len(log),
                                "warnings": sum(" WARNING " in line for line in log),
                                "errors": len(failures),
                                "first_errors": [_with_traceback(log, i) for i in failures[:5]],
                                "garbage_collection": collected[-1] if collected else None}
        if database is not None:
            database.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            _say(f"work directory kept: {workdir}")
    console.print(table(result, args))
    console.print(f"machine: {result['machine']}")
    if result["server_log"]["garbage_collection"]:
        console.print("server garbage collection, whole run: "
                      f"{result['server_log']['garbage_collection']}")
    for line in result["server_log"]["first_errors"]:
        console.print(f"server log: {line}", markup=False, highlight=False)
    for phase, profile in result.get("profiles", {}).items():
        console.print(f"\n[bold]{phase}[/]: server GIL holder, py-spy, {profile['samples']} "
                      "samples; inclusive time in meshtrust functions:")
        for share, frame in profile.get("inclusive_meshtrust", [])[:15]:
            console.print(f"  {share:5.1f}%  {frame}")
        console.print("  own time, hottest frames:")
        for share, frame in profile.get("own_time", [])[:12]:
            console.print(f"  {share:5.1f}%  {frame}")
    if args.plot:
        plot(fleet, args.plot)
        _say(f"plot written to {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("converge", {}).get("done") else 1


if __name__ == "__main__":
    sys.exit(main())
