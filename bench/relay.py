"""Client-certificate issuances per second, end to end over gRPC mutual TLS.

What it measures, for each relay CA key type (RSA 2048 and ECDSA P-256):

* A real ``meshtrust server`` subprocess on 127.0.0.1 with a fresh SQLite
  management store; its ``--key-type`` decides the generated relay CA keys.
* ``--clusters`` clusters (default: one per in-flight call) are registered
  with ``enrollment.enroll``; each gets a client certificate issued offline
  by the relay signing CA from the store, and ``--csrs`` CSRs of its own
  (P-256 leaf keys, CN and DNS SAN the cluster name), all made before the
  clock starts: key generation is not measured.
* The load: ``--procs`` load-generator processes, each with grpc.aio mTLS
  channels (one per cluster, presenting that cluster's certificate), keep
  ``--concurrency`` ``Relay.Renew`` calls in flight in total for
  ``--seconds`` after a ``--warmup``. Every call is the whole server path:
  TLS peer check, registry reads, CSR parse and signature check, policy,
  signing, and the durable status record in SQLite (synchronous=FULL).
* Next to it: ``openssl speed -seconds S -multi 2`` sign/s for the same
  key type (both cores), and ``cfssl serve`` (Debian's golang-cfssl) over
  TLS with the SAME signing CA key and certificate and the same server
  certificate, signing the SAME CSRs via ``POST /api/v1/cfssl/sign`` under
  the same concurrency, from the same kind of Python load generator
  (asyncio, HTTP/1.1 keep-alive connections, one per cluster).

Run it from the repository root (the default run takes about 1.5 minutes on
a quiet machine):

    .venv/bin/python bench/relay.py
    .venv/bin/python bench/relay.py --seconds 10 --concurrency 64 --ca both
    .venv/bin/python bench/relay.py --ca rsa-2048 --json
    .venv/bin/python bench/relay.py --servers 2   # two server processes, one port
    .venv/bin/python bench/relay.py --profile     # also sample the server with py-spy
    .venv/bin/python bench/relay.py --ceiling     # also the bare gRPC ceiling (below)

``--ceiling`` adds what gRPC itself allows on this machine: a ``grpc.aio``
server with meshtrust's server options and the same mutual-TLS credentials,
whose ``Relay.Renew`` does no work at all (it parses the request and returns
a reply of the real size, built once), in one process and in two processes
sharing the port, loaded by the same load generator. No server that does
anything per call can issue faster than that.

The cfssl column needs ``cfssl`` on PATH (Debian: ``apt-get install -y
golang-cfssl``); without it the column is skipped with a note. ``--profile``
needs py-spy (``.venv/bin/pip install py-spy``). Before each measured run the
script waits up to ``--quiet-wait`` seconds for other processes to leave the
CPUs, and it reports how many cores they kept busy during each window.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

HOST = "127.0.0.1"
SERVER_NAME = "localhost"  # a SAN of the generated relay server certificate
RENEW_METHOD = "/meshtrust.relay.v1.Relay/Renew"

# key type -> (openssl speed algorithm, label its summary line starts with)
OPENSSL = {
    "rsa-2048": ("rsa2048", "rsa 2048 bits"),
    "ecdsa-p256": ("ecdsap256", "256 bits ecdsa (nistp256)"),
}
# From the issue: cfssl serve on the reference machine.
REFERENCE_CFSSL = {"rsa-2048": 1600.0, "ecdsa-p256": 8300.0}
# Goals: RSA 2048 at least half of openssl's 2-core sign rate; P-256 ahead of cfssl.
GOAL_OPENSSL_RATIO = {"rsa-2048": 0.5}
GOAL_CFSSL_RATIO = {"ecdsa-p256": 1.0}

CFSSL_CONFIG = {
    # Equivalent to meshtrust's relay-client profile: a leaf for TLS client
    # auth with digital signature and key encipherment, valid one year.
    "signing": {
        "default": {
            "usages": ["digital signature", "key encipherment", "client auth"],
            "expiry": "8760h",
        }
    }
}


# ----------------------------------------------------------------------------------------
# Results


@dataclass
class LoadResult:
    """One load run: completions inside the measured window."""

    target: str
    issued: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    error_kinds: dict[str, int] = field(default_factory=dict)
    client_cpu: float = 0.0  # CPU seconds of the load generators in the window
    server_cpu: float = 0.0  # CPU seconds of the server process in the window
    machine_cpu: float = 0.0  # busy CPU seconds of the whole machine in the window

    @property
    def rate(self) -> float:
        return self.issued / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {"target": self.target, "issued": self.issued, "errors": self.errors,
                "seconds": round(self.seconds, 3), "per_second": round(self.rate, 1),
                "p50_ms": round(self.percentile(0.50), 2),
                "p99_ms": round(self.percentile(0.99), 2),
                "error_kinds": self.error_kinds,
                "server_cores": round(self.server_cpu / self.seconds, 2) if self.seconds else 0,
                "client_cores": round(self.client_cpu / self.seconds, 2) if self.seconds else 0,
                "other_cores": round((self.machine_cpu - self.server_cpu - self.client_cpu)
                                     / self.seconds, 2) if self.seconds else 0}


@dataclass
class CaseResult:
    ca: str
    meshtrust: dict[str, Any] | None = None
    openssl_sign_per_s: float | None = None
    cfssl: dict[str, Any] | None = None
    ceiling: list[dict[str, Any]] = field(default_factory=list)  # 1 and 2 processes
    notes: list[str] = field(default_factory=list)
    profile: str | None = None


# ----------------------------------------------------------------------------------------
# Setup: server, clusters, certificates, CSRs


@dataclass
class Cluster:
    name: str
    cert_pem: bytes  # client certificate followed by the signing CA
    key_pem: bytes
    csrs: list[bytes]


@dataclass
class Fixture:
    relay: str
    trust: bytes
    clusters: list[Cluster]
    ca_cert: bytes  # the relay signing CA certificate (alone)
    ca_key: bytes
    server_cert: bytes  # the relay server chain and key, reused for cfssl's TLS
    server_key: bytes


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


def wait_quiet(limit: float, threshold: float = 0.15) -> float:
    """Wait up to ``limit`` seconds for other processes to leave the CPUs; return their load."""
    deadline = time.monotonic() + limit
    while True:
        before = _machine_busy()[0]
        time.sleep(1.0)
        load = _machine_busy()[0] - before
        if load < threshold or time.monotonic() >= deadline:
            return load


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of one of its threads, in seconds."""
    stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open while choosing)."""
    import socket

    held = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            held.append(sock)
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGINT each process (each leads its own group), then SIGKILL the groups still there."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(ready: Path, procs: list[subprocess.Popen[bytes]], log: Path,
               timeout: float) -> str | None:
    """Wait for the last of ``procs`` to write ``ready``: None once it has; if it exits or
    the time runs out, stop them all and return the end of their ``log``."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if procs[-1].poll() is not None or time.monotonic() > deadline:
            stop_processes(procs)
            return log.read_text(errors="replace")[-2000:]
        time.sleep(0.05)
    return None


class ServerProcess:
    """``meshtrust server`` processes in their own process groups, stopped with SIGINT.

    With ``count`` > 1 they share the store and the listen ports (gRPC binds with
    SO_REUSEPORT, so the kernel spreads connections over them); the first one starts
    alone, so it is the one that generates the relay PKI.
    """

    def __init__(self, workdir: Path, key_type: str, count: int = 1) -> None:
        self.workdir = workdir
        self.store = f"sqlite:///{workdir / 'mgmt.db'}"
        self.key_type = key_type
        self.count = count
        self.log = workdir / "server.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: dict[str, int] = {}

    def _spawn(self, index: int, listen: str, bootstrap: str) -> Path:
        ready = self.workdir / f"server-{index}.ready"
        command = [sys.executable, "-m", "meshtrust", "server", "--store", self.store,
                   "--listen", listen, "--bootstrap-listen", bootstrap,
                   "--ready-file", str(ready), "--key-type", self.key_type]
        with self.log.open("ab") as log:
            self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL,
                                               start_new_session=True))
        return ready

    def _wait(self, ready: Path) -> dict[str, int]:
        failure = wait_ready(ready, self.procs, self.log, 60.0)
        if failure is not None:
            raise SystemExit(f"the server did not start:\n{failure}")
        ports: dict[str, int] = json.loads(ready.read_text())
        return ports

    def start(self) -> dict[str, int]:
        if self.count == 1:
            self.ports = self._wait(self._spawn(0, f"{HOST}:0", f"{HOST}:0"))
            return self.ports
        listen, bootstrap = (f"{HOST}:{port}" for port in free_ports(2))
        for index in range(self.count):
            self.ports = self._wait(self._spawn(index, listen, bootstrap))
        return self.ports

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        stop_processes(self.procs)


async def _prepare(store_url: str, relay: str, bootstrap: str, clusters: int,
                   csrs_per_cluster: int) -> Fixture:
    from meshtrust import clock as clock_module
    from meshtrust import settings
    from meshtrust.authority import enrollment, relay_pki
    from meshtrust.pki import bundle, csr, issuer, keys, profiles
    from meshtrust.store import open_store

    names = settings.SecretNames()
    clock = clock_module.SystemClock()
    store = await open_store(store_url)
    try:
        ca = await relay_pki.load_signing_ca(store, names)
        trust = await relay_pki.trust_bundle(store, names)
        server = await relay_pki.server_credentials(store, names)
        now = clock.now()
        out: list[Cluster] = []
        for i in range(clusters):
            name = f"bench-{i:04d}"
            await enrollment.enroll(store, clock, name, server=relay, bootstrap_server=bootstrap)
            key = ec.generate_private_key(ec.SECP256R1())
            request = csr.Request(csr=csr.build_csr(key, common_name=name, names=[name]),
                                  public_key=key.public_key())
            cert = issuer.issue(request, ca, profiles.RELAY_CLIENT, now,
                                subject=issuer.Subject(cluster=name))
            leaf_csrs = []
            for _ in range(csrs_per_cluster):
                leaf = ec.generate_private_key(ec.SECP256R1())
                leaf_csrs.append(csr.dump_csr(csr.build_csr(leaf, common_name=name,
                                                            names=[name])))
            out.append(Cluster(name=name,
                               cert_pem=bundle.dump_certificates([cert, *ca.path[:-1]]),
                               key_pem=keys.dump_private_key(key), csrs=leaf_csrs))
        return Fixture(relay=relay, trust=trust, clusters=out,
                       ca_cert=bundle.dump_certificate(ca.certificate),
                       ca_key=keys.dump_private_key(ca.key),
                       server_cert=server.certificate_chain, server_key=server.private_key)
    finally:
        await store.close()


# ----------------------------------------------------------------------------------------
# The ceiling: gRPC with mutual TLS and no work per call


def ceiling_reply(fixture: Fixture) -> bytes:
    """A Renew reply of the real size: a client certificate chain and the CA bundle."""
    from meshtrust.rpc.transport import messages

    reply: bytes = messages.CertificateResponse(
        certificate_chain=fixture.clusters[0].cert_pem, ca_bundle=fixture.trust,
        serial="0" * 32, not_after_unix=int(time.time()) + 365 * 86400).SerializeToString()
    return reply


async def _serve_ceiling(config: dict[str, Any]) -> None:
    """Serve Relay.Renew with a canned reply until SIGINT or SIGTERM (a server process)."""
    from meshtrust.rpc import transport
    from meshtrust.rpc.transport import messages

    reply = messages.CertificateResponse.FromString(Path(config["reply"]).read_bytes())

    class Ceiling(transport.services.RelayServicer):
        async def Renew(self, request: Any, context: Any) -> Any:
            return reply

    identity = transport.Identity(chain=Path(config["chain"]).read_bytes(),
                                  key=Path(config["key"]).read_bytes(),
                                  trust=Path(config["trust"]).read_bytes())
    server = transport.new_server()
    transport.services.add_RelayServicer_to_server(  # type: ignore[no-untyped-call]
        Ceiling(), server)
    transport.add_listener(server, config["listen"], transport.Credentials(
        identity).server_credentials(require_client_auth=True))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    Path(config["ready"]).write_text("ready")
    await stop.wait()
    await server.stop(1)


class CeilingProcesses:
    """``count`` ceiling servers on one port (gRPC binds with SO_REUSEPORT)."""

    def __init__(self, workdir: Path, fixture: Fixture, count: int) -> None:
        self.dir = workdir / f"ceiling-{count}"
        self.dir.mkdir()
        files = {"chain": fixture.server_cert, "key": fixture.server_key,
                 "trust": fixture.trust, "reply": ceiling_reply(fixture)}
        for name, data in files.items():
            (self.dir / name).write_bytes(data)
        self.target = f"{HOST}:{free_ports(1)[0]}"
        self.log = self.dir / "server.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        for index in range(count):
            config = {name: str(self.dir / name) for name in files}
            config.update(listen=self.target, ready=str(self.dir / f"ready-{index}"))
            (self.dir / f"config-{index}.json").write_text(json.dumps(config))
            with self.log.open("ab") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--serve-ceiling",
                     str(self.dir / f"config-{index}.json")],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True))
            failure = wait_ready(Path(config["ready"]), self.procs, self.log, 30.0)
            if failure is not None:
                raise RuntimeError(f"the ceiling server did not start:\n{failure}")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        stop_processes(self.procs)


# ----------------------------------------------------------------------------------------
# Load generators (run in spawned worker processes)


@dataclass
class WorkerSpec:
    kind: str  # "grpc" or "http"
    target: str  # host:port
    trust: bytes
    clusters: list[Cluster]
    concurrency: int


async def _grpc_load(spec: WorkerSpec, ready: Any, go: Any) -> dict[str, Any]:
    import grpc
    import grpc.aio

    from meshtrust import rpc
    from meshtrust.rpc import transport
    from meshtrust.rpc.transport import messages

    channels = [transport.secure_channel(spec.target, trust=spec.trust, chain=c.cert_pem,
                                         key=c.key_pem, server_name=SERVER_NAME)
                for c in spec.clusters]
    # Raw bytes in and out: the requests are serialized beforehand and the replies are
    # parsed only for the first call of each worker, to keep the client's CPU small.
    calls = [ch.unary_unary(RENEW_METHOD) for ch in channels]
    requests = [[messages.RenewRequest(protocol_version=rpc.PROTOCOL_VERSION,
                                       csr=pem).SerializeToString() for pem in c.csrs]
                for c in spec.clusters]
    for i, call in enumerate(calls):  # connect (TLS handshakes) and check one reply each
        reply = messages.CertificateResponse.FromString(await call(requests[i][0], timeout=30))
        if not reply.certificate_chain.startswith(b"-----BEGIN CERTIFICATE-----"):
            raise RuntimeError("Renew returned no certificate")
    return await _drive(spec, ready, go, calls, requests, grpc.aio.AioRpcError,
                        lambda exc: exc.code().name, channels)


async def _http_load(spec: WorkerSpec, ready: Any, go: Any) -> dict[str, Any]:
    host, port = spec.target.rsplit(":", 1)
    context = ssl.create_default_context(cadata=spec.trust.decode())
    context.check_hostname = True
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in spec.clusters:
        conns.append(await asyncio.open_connection(host, int(port), ssl=context,
                                                   server_hostname=SERVER_NAME))
    requests = [[_http_request(spec.target, pem) for pem in c.csrs] for c in spec.clusters]

    def make_call(i: int) -> Any:
        reader, writer = conns[i]

        async def call(request: bytes, timeout: float | None = None) -> bytes:
            writer.write(request)
            status, body = await _http_response(reader)
            if status != 200 or b'"success":true' not in body:
                raise HTTPError(f"HTTP {status}")
            return body

        return call

    calls = [make_call(i) for i in range(len(conns))]
    for i, call in enumerate(calls):
        body = json.loads(await call(requests[i][0]))
        if not body["result"]["certificate"].startswith("-----BEGIN CERTIFICATE-----"):
            raise RuntimeError("cfssl returned no certificate")

    class Closer:
        async def close(self) -> None:
            for _, writer in conns:
                writer.close()

    return await _drive(spec, ready, go, calls, requests, HTTPError,
                        str, [Closer()])


class HTTPError(Exception):
    pass


def _http_request(target: str, csr_pem: bytes) -> bytes:
    body = json.dumps({"certificate_request": csr_pem.decode()}).encode()
    return (f"POST /api/v1/cfssl/sign HTTP/1.1\r\nHost: {target}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def _http_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    raise HTTPError("response without length")


async def _drive(spec: WorkerSpec, ready: Any, go: Any,
                 calls: list[Any], requests: list[list[bytes]],
                 error_type: type[BaseException],
                 describe: Any, closers: list[Any]) -> dict[str, Any]:
    """Keep ``spec.concurrency`` calls in flight, spread over the clusters' connections."""
    ready.put("ready")
    window_start, window_end = go.get()  # the same window for every worker process
    latencies: list[float] = []
    error_kinds: dict[str, int] = {}
    issued = 0
    cpu: list[float] = []
    clock = time.perf_counter
    mono = time.monotonic

    async def mark_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - mono()))
        cpu.append(time.process_time())
        await asyncio.sleep(max(0.0, window_end - mono()))
        cpu.append(time.process_time())

    async def worker(index: int) -> None:
        nonlocal issued
        slot = index % len(calls)
        call, mine = calls[slot], requests[slot]
        n = index
        while True:
            began = mono()
            if began >= window_end:
                return
            request = mine[n % len(mine)]
            n += 1
            t0 = clock()
            try:
                await call(request, timeout=30)
                ok, kind = True, ""
            except error_type as exc:
                ok, kind = False, describe(exc)
            elapsed = clock() - t0
            done = mono()
            if window_start <= began and done <= window_end:
                if ok:
                    issued += 1
                    latencies.append(elapsed * 1000)
                else:
                    error_kinds[kind] = error_kinds.get(kind, 0) + 1

    marker = asyncio.create_task(mark_cpu())
    await asyncio.gather(*(worker(i) for i in range(spec.concurrency)))
    await marker
    for closer in closers:
        await closer.close()
    return {"issued": issued, "errors": sum(error_kinds.values()), "error_kinds": error_kinds,
            "latencies_ms": latencies, "cpu": cpu[1] - cpu[0] if len(cpu) == 2 else 0.0}


def _worker_main(spec: WorkerSpec, ready: Any, go: Any, results: Any) -> None:
    try:
        load = _grpc_load if spec.kind == "grpc" else _http_load
        results.put(asyncio.run(load(spec, ready, go)))
    except BaseException as exc:  # report, so the parent does not wait forever
        ready.put(f"error: {type(exc).__name__}: {exc}")
        results.put({"fatal": f"{type(exc).__name__}: {exc}"})


def run_load(kind: str, label: str, target: str, fixture: Fixture, *, concurrency: int,
             procs: int, warmup: float, seconds: float, server_pids: list[int],
             on_window: Any = None, quiet_wait: float = 0.0) -> LoadResult:
    """Spread clusters and in-flight calls over ``procs`` worker processes; measure a window."""
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    if quiet_wait > 0:
        load = wait_quiet(quiet_wait)
        if load >= 0.15:
            _say(f"  note: other processes keep {load:.2f} cores busy; the numbers will be low")
    workers = []
    clusters = fixture.clusters
    for p in range(procs):
        mine = clusters[p::procs]
        share = concurrency // procs + (1 if p < concurrency % procs else 0)
        if not mine or not share:
            continue
        spec = WorkerSpec(kind=kind, target=target, trust=fixture.trust, clusters=mine,
                          concurrency=share)
        proc = ctx.Process(target=_worker_main, args=(spec, ready, go, results),
                           daemon=True)
        proc.start()
        workers.append(proc)
    for _ in workers:
        message = ready.get(timeout=120)
        if message != "ready":
            for proc in workers:
                proc.kill()
            raise SystemExit(f"{label}: a load generator failed: {message}")
    window_start = time.monotonic() + warmup
    window_end = window_start + seconds
    for _ in workers:
        go.put((window_start, window_end))
    time.sleep(max(0.0, window_start - time.monotonic()))
    if on_window is not None:
        on_window()
    server_cpu0, machine0 = sum(map(cpu_seconds, server_pids)), _machine_busy()[0]
    time.sleep(max(0.0, window_end - time.monotonic()))
    server_cpu1, machine1 = sum(map(cpu_seconds, server_pids)), _machine_busy()[0]
    result = LoadResult(target=label, seconds=seconds, server_cpu=server_cpu1 - server_cpu0,
                        machine_cpu=machine1 - machine0)
    for _ in workers:
        part = results.get(timeout=120)
        if "fatal" in part:
            raise SystemExit(f"{label}: a load generator failed: {part['fatal']}")
        result.issued += part["issued"]
        result.errors += part["errors"]
        result.latencies_ms += part["latencies_ms"]
        result.client_cpu += part["cpu"]
        for k, v in part["error_kinds"].items():
            result.error_kinds[k] = result.error_kinds.get(k, 0) + v
    for proc in workers:
        proc.join(timeout=30)
    return result


# ----------------------------------------------------------------------------------------
# openssl speed and cfssl serve


def openssl_speed(key_type: str, seconds: int) -> float | None:
    algorithm, label = OPENSSL[key_type]
    if shutil.which("openssl") is None:
        return None
    out = subprocess.run(["openssl", "speed", "-seconds", str(seconds), "-multi", "2",
                          algorithm], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.strip().startswith(label):
            # "<label> <sign s> <verify s> <sign/s> <verify/s>"
            numbers = re.findall(r"[\d.]+", line[line.index(label) + len(label):])
            return float(numbers[2])
    return None


def openssl_version() -> str:
    if shutil.which("openssl") is None:
        return "absent"
    return subprocess.run(["openssl", "version"], capture_output=True, text=True,
                          check=False).stdout.strip()


def cfssl_version() -> str | None:
    if shutil.which("cfssl") is None:
        return None
    out = subprocess.run(["cfssl", "version"], capture_output=True, text=True,
                         check=False).stdout
    return " ".join(line.strip() for line in out.splitlines() if line.strip())


class CfsslProcess:
    def __init__(self, workdir: Path, fixture: Fixture) -> None:
        d = workdir / "cfssl"
        d.mkdir()
        files = {"ca.pem": fixture.ca_cert, "ca-key.pem": fixture.ca_key,
                 "tls.pem": fixture.server_cert, "tls-key.pem": fixture.server_key,
                 "config.json": json.dumps(CFSSL_CONFIG).encode()}
        for name, data in files.items():
            (d / name).write_bytes(data)
        self.port = free_ports(1)[0]
        self.log = d / "cfssl.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["cfssl", "serve", "-address", HOST, "-port", str(self.port),
                 "-ca", str(d / "ca.pem"), "-ca-key", str(d / "ca-key.pem"),
                 "-config", str(d / "config.json"),
                 "-tls-cert", str(d / "tls.pem"), "-tls-key", str(d / "tls-key.pem")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.target = f"{HOST}:{self.port}"

    def wait_ready(self, trust: bytes, timeout: float = 30.0) -> None:
        import socket

        context = ssl.create_default_context(cadata=trust.decode())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"cfssl serve did not start:\n{tail}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as raw, \
                        context.wrap_socket(raw, server_hostname=SERVER_NAME):
                    return
            except OSError:
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------------------------------
# Profile summary


PROFILE_RATE = 100  # samples per second

# Where a sample of the server's GIL-holding thread goes: the first group whose marker
# is somewhere in the stack (py-spy's frames "function (file:line)").
PROFILE_GROUPS = [
    ("CSR parse + signature check (csr.load_csr)", ["load_csr ("]),
    ("peer certificate parse (authorize)", ["load_certificate (", "cluster_of ("]),
    ("signing (CertificateBuilder.sign)", ["CertificateBuilder.sign ("]),
    ("certificate build, PEM, reply (issuer, bundle)",
     ["issue (meshtrust/pki/issuer.py", "bundle.py", "_response (", "_issued (",
      "Issued.serial"]),
    ("logging", ["Logger."]),
    ("store watch feed (server follows registry/secrets)",
     ["Feed.", "_follow_registry", "_follow_server_secret", "_read_changes"]),
    ("store reads: JSON -> object, on the event loop", ["load_json ("]),
    ("store reads: executor hop, on the event loop",
     ["SqliteStore._query", "SqliteStore._get", "get_resource (", "get_secret ("]),
    ("store writes: on the event loop", ["SqliteStore._submit", "stored ("]),
    ("store writer thread (CAS, JSON, SQL, commit)", ["store-write"]),
    ("store reader thread (SQL)", ["store-read"]),
    ("registry + authority + servicer logic", ["Registry.", "RelayAuthority.",
                                               "RelayService.", "metrics.py"]),
    ("gRPC + asyncio C code (cygrpc callbacks, no Python frame)",
     ["Handle._run (asyncio/events.py:80) "]),  # a sample that ends in Handle._run
    ("asyncio event loop (Python)", ["asyncio/", "selectors.py"]),
]


def start_profiler(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the server's GIL holder for the measured window (if installed)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return None
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE), "--duration",
         str(max(1, round(seconds))), "--format", "raw", "--output", str(out), "--gil",
         "--threads", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, seconds: float, issued: int, top: int = 15) -> str:
    groups: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        probe = stack + " "
        label = next((name for name, needles in PROFILE_GROUPS
                      if any(needle in probe for needle in needles)), "other")
        groups[label] = groups.get(label, 0) + n
        leaf = stack.rsplit(";", 1)[-1]
        leaves[leaf] = leaves.get(leaf, 0) + n
    if not total or not issued:
        return "no profile samples\n"
    held = total / PROFILE_RATE
    out = io.StringIO()
    out.write(f"server GIL holder, sampled by py-spy at {PROFILE_RATE}/s over the window: "
              f"GIL held {100 * held / seconds:.0f}% of the time, "
              f"{1e6 * held / issued:.0f} us per issuance\n")
    for label, n in sorted(groups.items(), key=lambda kv: -kv[1]):
        out.write(f"  {100 * n / total:5.1f}%  {1e6 * n / PROFILE_RATE / issued:6.0f} us  "
                  f"{label}\n")
    out.write("  hottest frames (own time):\n")
    for leaf, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
        out.write(f"  {100 * n / total:5.1f}%  {leaf}\n")
    return out.getvalue()


# ----------------------------------------------------------------------------------------
# One case and the report


def run_case(key_type: str, args: argparse.Namespace) -> CaseResult:
    result = CaseResult(ca=key_type)
    clusters = args.clusters or args.concurrency
    with tempfile.TemporaryDirectory(prefix="meshtrust-bench-") as tmp:
        workdir = Path(tmp)
        server = ServerProcess(workdir, key_type, args.servers)
        profile = workdir / "server.pyspy" if args.profile else None
        spies: list[subprocess.Popen[bytes] | None] = []
        try:
            ports = server.start()
            relay = f"{HOST}:{ports['relay']}"
            _say(f"[{key_type}] server up ({relay}); enrolling {clusters} clusters, "
                 f"{clusters * args.csrs} CSRs")
            fixture = asyncio.run(_prepare(server.store, relay, f"{HOST}:{ports['bootstrap']}",
                                           clusters, args.csrs))
            _say(f"[{key_type}] meshtrust Relay.Renew: {args.concurrency} in flight, "
                 f"{args.servers} server process(es), {args.procs} load process(es), "
                 f"{args.seconds}s")
            load = run_load("grpc", "meshtrust", relay, fixture, concurrency=args.concurrency,
                            procs=args.procs, warmup=args.warmup, seconds=args.seconds,
                            server_pids=server.pids, quiet_wait=args.quiet_wait,
                            on_window=(lambda: spies.append(start_profiler(
                                server.pids[0], args.seconds, profile))) if profile else None)
            result.meshtrust = load.summary()
            for spy in spies:
                if spy is not None:
                    spy.wait(timeout=60)
        finally:
            server.stop()
        if profile is not None and result.meshtrust:
            if profile.exists():
                issued = result.meshtrust["issued"] // args.servers  # the first server's share
                result.profile = summarize_profile(profile, args.seconds, issued)
            else:
                result.notes.append("--profile: py-spy is not installed (.venv/bin/pip install "
                                    "py-spy), or it could not attach to the server")
        if args.no_cfssl:
            result.notes.append("cfssl skipped (--no-cfssl)")
        elif shutil.which("cfssl") is None:
            result.notes.append("cfssl not installed: column skipped (Debian: "
                                "apt-get install -y golang-cfssl)")
        else:
            cfssl = CfsslProcess(workdir, fixture)
            try:
                cfssl.wait_ready(fixture.trust)
                _say(f"[{key_type}] cfssl serve POST /api/v1/cfssl/sign: {args.concurrency} "
                     f"in flight, {args.procs} load process(es), {args.seconds}s")
                load = run_load("http", "cfssl", cfssl.target, fixture,
                                concurrency=args.concurrency, procs=args.procs,
                                warmup=args.warmup, seconds=args.seconds,
                                server_pids=[cfssl.pid], quiet_wait=args.quiet_wait)
                result.cfssl = load.summary()
            except RuntimeError as exc:
                result.notes.append(f"cfssl failed: {exc}")
            finally:
                cfssl.stop()
        if args.ceiling:
            for count in (1, 2):
                label = f"gRPC ceiling, {count} process{'es' if count > 1 else ''}"
                try:
                    ceiling = CeilingProcesses(workdir, fixture, count)
                except RuntimeError as exc:
                    result.notes.append(str(exc))
                    break
                try:
                    _say(f"[{key_type}] {label}: {args.concurrency} in flight, "
                         f"{args.procs} load process(es), {args.seconds}s")
                    load = run_load("grpc", label, ceiling.target, fixture,
                                    concurrency=args.concurrency, procs=args.procs,
                                    warmup=args.warmup, seconds=args.seconds,
                                    server_pids=ceiling.pids, quiet_wait=args.quiet_wait)
                    result.ceiling.append({**load.summary(), "processes": count})
                finally:
                    ceiling.stop()
    _say(f"[{key_type}] openssl speed -seconds {args.openssl_seconds} -multi 2 "
         f"{OPENSSL[key_type][0]}")
    if args.quiet_wait > 0:
        wait_quiet(args.quiet_wait)
    result.openssl_sign_per_s = openssl_speed(key_type, args.openssl_seconds)
    if result.openssl_sign_per_s is None:
        result.notes.append("openssl speed: no result (is openssl installed?)")
    return result


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def _num(value: float | None) -> str:
    return f"{value:,.0f}" if value else "-"


def report(results: list[CaseResult], args: argparse.Namespace) -> str:
    out = io.StringIO()
    out.write(f"\nRelay client-certificate issuance, end to end; {args.concurrency} calls in "
              f"flight, {args.seconds}s measured after {args.warmup}s warm-up, "
              f"{args.procs} load process(es), {os.cpu_count()} CPUs\n")
    out.write(f"{openssl_version()}; cfssl: {cfssl_version() or 'not installed'}\n\n")
    out.write("| CA key | meshtrust issued/s | openssl sign/s (2 cores) | ratio to openssl "
              "| cfssl issued/s | ratio to cfssl |\n")
    out.write("|---|---:|---:|---:|---:|---:|\n")
    for r in results:
        mesh = r.meshtrust["per_second"] if r.meshtrust else None
        cf = r.cfssl["per_second"] if r.cfssl else None
        out.write(f"| {r.ca} | {_num(mesh)} | {_num(r.openssl_sign_per_s)} | "
                  f"{_ratio(mesh, r.openssl_sign_per_s)} | {_num(cf)} | {_ratio(mesh, cf)} |\n")
    out.write("\n| CA key | server | issued | errors | p50 ms | p99 ms | server cores "
              "| load-generator cores | other processes' cores |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for r in results:
        for s in (r.meshtrust, r.cfssl, *r.ceiling):
            if s:
                errors = str(s["errors"]) + (f" {s['error_kinds']}" if s["errors"] else "")
                out.write(f"| {r.ca} | {s['target']} | {s['issued']} | {errors} | "
                          f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['server_cores']:.2f} | "
                          f"{s['client_cores']:.2f} | {s['other_cores']:.2f} |\n")
    out.write("\nGoals: RSA 2048 >= 0.50 of openssl's 2-core sign rate; P-256 ahead of cfssl "
              "(ratio > 1). Reference machine: cfssl ~1.6k/s (RSA 2048), ~8.3k/s (P-256).\n")
    for r in results:
        mesh = r.meshtrust["per_second"] if r.meshtrust else None
        if r.ca in GOAL_OPENSSL_RATIO and mesh and r.openssl_sign_per_s:
            ratio = mesh / r.openssl_sign_per_s
            verdict = "met" if ratio >= GOAL_OPENSSL_RATIO[r.ca] else "NOT met"
            out.write(f"  {r.ca}: {ratio:.2f} of openssl (goal "
                      f"{GOAL_OPENSSL_RATIO[r.ca]:.2f}): {verdict}\n")
        cf = r.cfssl["per_second"] if r.cfssl else None
        goal = GOAL_CFSSL_RATIO.get(r.ca)
        if goal and mesh and cf:
            verdict = "met" if mesh / cf > goal else "NOT met"
            out.write(f"  {r.ca}: {mesh / cf:.2f}x cfssl (goal > {goal:.2f}): {verdict}\n")
        for s in r.ceiling:
            out.write(f"  {r.ca}: {s['target']} (no work per call): {_num(s['per_second'])}/s, "
                      f"{_ratio(s['per_second'], r.openssl_sign_per_s)} of openssl, "
                      f"{_ratio(s['per_second'], cf)} of cfssl\n")
        for note in r.notes:
            out.write(f"  {r.ca}: {note}\n")
    out.write("\nProtocols differ: meshtrust is gRPC (HTTP/2, protobuf) over mutual TLS and "
              "records every issuance in SQLite (fsync per commit, group commit); cfssl is "
              "HTTP/1.1 JSON over server-only TLS with no database. Both sign the same CSRs "
              "with the same CA key; the load generators run on the same 2 cores as the "
              "servers.\n")
    for r in results:
        if r.profile:
            out.write(f"\n[{r.ca}] {r.profile}")
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight in total")
    parser.add_argument("--ca", choices=["rsa-2048", "ecdsa-p256", "both"], default="both")
    parser.add_argument("--procs", type=int, default=1, help="load-generator processes")
    parser.add_argument("--servers", type=int, default=1,
                        help="meshtrust server processes sharing the ports (SO_REUSEPORT) "
                             "and the store")
    parser.add_argument("--clusters", type=int, default=0,
                        help="clusters (connections); default one per call in flight")
    parser.add_argument("--csrs", type=int, default=8, help="pre-made CSRs per cluster")
    parser.add_argument("--openssl-seconds", type=int, default=0,
                        help="openssl speed -seconds (default: --seconds, at most 10)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="before each measured run, wait up to this many seconds for "
                             "other processes to leave the CPUs (0: do not wait)")
    parser.add_argument("--no-cfssl", action="store_true", help="skip the cfssl column")
    parser.add_argument("--profile", action="store_true",
                        help="sample the (first) server with py-spy during the window and "
                             "show where its GIL time goes (needs py-spy)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also measure a gRPC server that does no work per call, in one "
                             "and in two processes: the most any server can issue here")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--serve-ceiling", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ceiling:  # one ceiling server process (started by --ceiling)
        asyncio.run(_serve_ceiling(json.loads(Path(args.serve_ceiling).read_text())))
        return 0
    if min(args.concurrency, args.procs, args.servers) < 1 or args.seconds <= 0:
        parser.error("--concurrency, --seconds, --procs and --servers must be positive")
    args.openssl_seconds = args.openssl_seconds or max(1, min(10, int(args.seconds)))
    cases = ["rsa-2048", "ecdsa-p256"] if args.ca == "both" else [args.ca]
    results = [run_case(key_type, args) for key_type in cases]
    if args.json:
        print(json.dumps({"when": dt.datetime.now(dt.UTC).isoformat(),
                          "args": vars(args), "results": [asdict(r) for r in results]},
                         indent=2))
    else:
        print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
