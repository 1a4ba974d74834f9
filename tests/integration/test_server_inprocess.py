"""A server run in-process: its metrics endpoint and its refusals at the protocol level."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import istiofleet as im
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshtrust import clock as clock_module
from meshtrust import errors, rpc
from meshtrust.agent import identity as agent_identity
from meshtrust.authority import enrollment, istio, registry
from meshtrust.pki import csr, issuer, keys
from meshtrust.rpc import transport
from meshtrust.rpc.transport import messages
from meshtrust.server import app, config, service
from meshtrust.store import base, open_store


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _config(tmp: Path, *, metrics: bool = False, **options: Any) -> config.ServerConfig:
    """A server on free ports of 127.0.0.1, with a SQLite store in ``tmp``."""
    return config.ServerConfig(store=f"sqlite:///{tmp / 'mgmt.db'}",
                               listen=f"127.0.0.1:{_port()}",
                               bootstrap_listen=f"127.0.0.1:{_port()}",
                               metrics=f"127.0.0.1:{_port()}" if metrics else None, **options)


@contextlib.asynccontextmanager
async def _serving(tmp: Path, *, metrics: bool = False, **options: Any
                   ) -> AsyncIterator[tuple[config.ServerConfig, base.Store]]:
    """A started in-process server (``_config``) and its store, stopped at the end."""
    cfg = _config(tmp, metrics=metrics, **options)
    store = await open_store(cfg.store)
    server = app.Server(cfg, store)
    await server.start()
    try:
        yield cfg, store
    finally:
        await server.stop(0)
        await store.close()


async def _scenario(tmp: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with _serving(tmp, metrics=True) as (cfg, store):
        metrics_address = cfg.metrics
        assert metrics_address is not None
        enrolled = await enrollment.enroll(store, clock_module.SystemClock(), "cluster-1",
                                           server=cfg.listen,
                                           bootstrap_server=cfg.bootstrap_listen)
        key = keys.generate_key(keys.KeyType.EC_P256)
        channel = transport.secure_channel(cfg.bootstrap_listen, trust=enrolled.ca_cert,
                                           server_name="localhost")
        try:
            stub = transport.bootstrap_stub(channel)
            for token in ("wrong-token", enrolled.token):
                request = messages.BootstrapRequest(
                    cluster="cluster-1", token=token,
                    csr=agent_identity.request_for(key, "cluster-1"))
                try:
                    await transport.call(stub.Bootstrap(request, timeout=10))
                except errors.AuthError:
                    pass
        finally:
            await channel.close()
        return await asyncio.to_thread(_scrape, metrics_address)


class TestServerMetrics:
    def test_bootstrap_and_expiry_are_exported(self, tmp_path: Path) -> None:
        """After one refused and one accepted bootstrap the counters and expiry gauges show it."""
        samples = asyncio.run(_scenario(tmp_path))
        assert samples[("meshtrust_bootstrap_attempts_total", (("outcome", "accepted"),))] == 1
        assert samples[("meshtrust_bootstrap_attempts_total", (("outcome", "refused"),))] == 1
        assert samples[("meshtrust_issuance_total",
                        (("outcome", "ok"), ("profile", "relay-client")))] == 1
        expiry = [v for (name, labels), v in samples.items()
                  if name == "meshtrust_certificate_expiration_timestamp_seconds"]
        kinds = {dict(labels)["kind"] for (name, labels) in samples
                 if name == "meshtrust_certificate_expiration_timestamp_seconds"}
        assert kinds == {"relay-root", "relay-signing", "relay-server", "relay-client"}
        assert all(v > 1.7e9 for v in expiry)


async def _refusals(tmp: Path) -> list[errors.MeshTrustError]:
    found: list[errors.MeshTrustError] = []
    async with _serving(tmp) as (cfg, store):
        enrolled = await enrollment.enroll(store, clock_module.SystemClock(), "cluster-1",
                                           server=cfg.listen,
                                           bootstrap_server=cfg.bootstrap_listen)
        key = keys.generate_key(keys.KeyType.EC_P256)
        channel = transport.secure_channel(cfg.bootstrap_listen, trust=enrolled.ca_cert,
                                           server_name="localhost")
        try:
            future = messages.BootstrapRequest(
                protocol_version=99, cluster="cluster-1", token=enrolled.token,
                csr=agent_identity.request_for(key, "cluster-1"))
            relay_call = messages.RenewRequest(csr=agent_identity.request_for(key, "cluster-1"))
            for call in (transport.bootstrap_stub(channel).Bootstrap(future, timeout=10),
                         transport.relay_stub(channel).Renew(relay_call, timeout=10)):
                try:
                    await transport.call(call)
                except errors.MeshTrustError as exc:
                    found.append(exc)
        finally:
            await channel.close()
    return found


class TestServerRefusals:
    def test_newer_protocol_and_missing_certificate(self, tmp_path: Path) -> None:
        """A newer protocol version and a relay call without a client certificate are refused."""
        newer, no_cert = asyncio.run(_refusals(tmp_path))
        assert isinstance(newer, errors.ConfigError)
        assert "relay protocol 99" in str(newer)
        assert isinstance(no_cert, errors.AuthError)
        assert "client certificate is required" in str(no_cert)


async def _stalled(tmp: Path) -> tuple[float, float]:
    """The lag gauge while the server's loop is idle, and after it was held for 1.6 s."""
    lag = ("meshtrust_server_event_loop_lag_seconds", ())
    async with _serving(tmp, metrics=True) as (cfg, store):
        metrics_address = cfg.metrics
        assert metrics_address is not None
        await asyncio.sleep(1.2)
        idle = (await asyncio.to_thread(_scrape, metrics_address))[lag]
        time.sleep(1.6)  # noqa: ASYNC251 - a handler that blocks the loop is the point
        await asyncio.sleep(0.7)
        held = (await asyncio.to_thread(_scrape, metrics_address))[lag]
    return idle, held


class TestOverload:
    def test_a_held_event_loop_shows_in_the_lag_gauge_and_the_log(
            self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """Idle, the loop runs its timers on time; held for 1.6 s, the gauge says about that
        and the server logs that it is overloaded."""
        caplog.set_level(logging.WARNING, logger="meshtrust.server.app")
        idle, held = asyncio.run(_stalled(tmp_path))
        assert idle < 0.5
        assert 1.0 < held < 2.5
        assert any("the server is overloaded: its event loop ran" in r.getMessage()
                   for r in caplog.records)


def _intermediate_csr(cluster: str) -> bytes:
    """The CSR an agent sends for its Istio intermediate (``agent.istio``)."""
    key = keys.generate_key(keys.KeyType.parse("ecdsa-p256"))
    return csr.dump_csr(csr.build_csr(
        key, common_name="Intermediate CA", organization="Istio", locality=cluster, ca=True,
        names=[issuer.ISTIOD_DNS, "spiffe://cluster.local/ns/istio-system/sa/istiod"]))


async def _handed_out(tmp: Path, count: int, room: int) -> list[list[str]]:
    """Which of ``count`` clusters' work streams had their intermediate, after one policy
    made work for all of them at once (``room`` of them expected) and after each of those
    in turn sent its CSR back: the clusters handed work, at the start and after each CSR
    signed."""
    clock = clock_module.SystemClock()
    async with _serving(tmp, insecure=True, max_issuances=1,
                        reconcile_interval=0.2) as (cfg, store):
        clusters = registry.Registry(store, clock)
        names = [f"cluster-{i}" for i in range(count)]
        for name in names:
            await clusters.register(name)
        channel = transport.insecure_channel(cfg.listen)
        relay = transport.relay_stub(channel)
        handed: dict[str, str] = {}  # cluster -> its work item
        beats = {name: 0 for name in names}
        connected, arrived = asyncio.Event(), asyncio.Event()

        def metadata(name: str) -> Any:
            return ((service.INSECURE_CLUSTER_HEADER, name),)

        async def hold(name: str) -> None:
            stream = relay.Work(messages.WorkSubscribe(replica="test"),
                                metadata=metadata(name))
            async for item in stream:
                if item.WhichOneof("kind") == "issue_intermediate":
                    handed.setdefault(name, item.id)
                    arrived.set()
                    continue
                beats[name] += 1
                if all(beats.values()):
                    connected.set()

        async def settled(expected: int) -> list[str]:
            """The clusters handed work once ``expected`` were, and no more came for half a
            second after."""
            async with asyncio.timeout(10):
                while len(handed) < expected:
                    arrived.clear()
                    await arrived.wait()
            await asyncio.sleep(0.5)
            return sorted(handed)

        streams = [asyncio.create_task(hold(name)) for name in names]
        try:
            async with asyncio.timeout(10):
                await connected.wait()  # every stream had its first heartbeat: no work yet
            await istio.IstioAuthority(store, clock, clusters).apply(im.policy())
            seen = [await settled(room)]
            for name in list(seen[0]):
                await relay.CompleteWork(messages.WorkResult(
                    id=handed[name], stage="csr", csr=_intermediate_csr(name)),
                    metadata=metadata(name), timeout=10)
                seen.append(await settled(len(seen[-1]) + 1))
            return seen
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            await channel.close()


class TestWorkHandOut:
    def test_work_goes_out_as_its_csrs_come_back(self, tmp_path: Path) -> None:
        """A policy that makes work for every cluster at once does not send every cluster
        its intermediate in the same instant, which would bring every CSR back together:
        with one issuance at a time, two clusters are handed their work
        (``service.HANDED_OUT_PER_SLOT``), and each CSR signed hands out the next
        cluster's."""
        room = service.HANDED_OUT_PER_SLOT
        seen = asyncio.run(_handed_out(tmp_path, 8, room))
        assert [len(names) for names in seen] == [room, room + 1, room + 2], seen
        assert all(set(a) < set(b) for a, b in zip(seen, seen[1:], strict=False)), seen


class TestOpenFiles:
    def test_the_server_raises_its_open_file_limit_to_the_hard_limit(self) -> None:
        """Started with a soft limit of 256 open files (systemd starts services at 1,024),
        the server raises it to the hard limit: one connection per agent needs more."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard <= 256:
            pytest.skip(f"the hard limit of open files here is {hard}")

        def lower() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

        code = ("import resource; from meshtrust.server import app; "
                "print(app.raise_open_file_limit(), "
                "resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
        out = subprocess.run([sys.executable, "-c", code], preexec_fn=lower, check=True,
                             capture_output=True, text=True, timeout=60).stdout
        reported, soft = (int(v) for v in out.split())
        assert reported == soft
        assert soft == hard if hard != resource.RLIM_INFINITY else soft > 256

    def test_connections_past_the_quota_leave_the_store_its_files(
            self, tmp_path: Path) -> None:
        """With 400 open files, 600 client connections do not starve the server: past its
        quota gRPC closes new connections (the callers retry), and a status report, a
        store write, still goes through on one of the connections it took."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard < 2000:
            pytest.skip(f"the hard limit of open files here is {hard}")
        assert app.connection_quota(400) == 200
        store, ready = f"sqlite://{tmp_path}/m.db", tmp_path / "ready.json"
        subprocess.run([sys.executable, "-m", "meshtrust", "cluster", "register", "c1",
                        "--store", store], check=True, capture_output=True, timeout=60)

        limited = ("import resource, runpy, sys; "
                   "resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400)); "
                   "sys.argv[0] = 'meshtrust'; runpy.run_module('meshtrust', "
                   "run_name='__main__')")
        log = (tmp_path / "server.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-c", limited, "server", "--insecure", "--store", store,
             "--listen", "127.0.0.1:0", "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            target = f"127.0.0.1:{json.loads(ready.read_text())['relay']}"
            outcomes = asyncio.run(_many_connections(target, 600))
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
        text = (tmp_path / "server.log").read_text()
        assert "at most 200 connections per port" in text
        assert 150 <= outcomes.count("ok") <= 200, outcomes.count("ok")
        assert set(outcomes) == {"ok", "UNAVAILABLE"}
        assert "unable to open" not in text and "Too many open files" not in text


async def _many_connections(target: str, count: int) -> list[str]:
    """Open ``count`` connections to ``target`` and send a status report on each, all
    held open together; the outcome of each report."""
    channels = [grpc.aio.insecure_channel(target, options=[("meshtrust.test", i)])
                for i in range(count)]
    header = [(service.INSECURE_CLUSTER_HEADER, "c1")]

    async def report(channel: grpc.aio.Channel) -> str:
        try:
            await transport.relay_stub(channel).ReportStatus(
                messages.StatusReport(protocol_version=rpc.PROTOCOL_VERSION), metadata=header,
                timeout=20)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "ok"

    try:
        return list(await asyncio.gather(*(report(c) for c in channels)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def _stopped_under(tmp: Path, count: int
                         ) -> tuple[list[errors.MeshTrustError], float, list[bool]]:
    """``count`` clusters' work streams open when the server stops (2 s grace): how each
    ended, how long the stop took, and whether each cluster's record says connected once
    it returned."""
    clock = clock_module.SystemClock()
    cfg = _config(tmp, insecure=True)
    store = await open_store(cfg.store)
    server = app.Server(cfg, store)
    await server.start()
    channel = transport.insecure_channel(cfg.listen)
    ended: list[errors.MeshTrustError] = []
    try:
        clusters = registry.Registry(store, clock)
        names = [f"cluster-{i}" for i in range(count)]
        for name in names:
            await clusters.register(name)
        opened = asyncio.Semaphore(0)

        async def hold(name: str) -> None:
            work = transport.relay_stub(channel).Work(
                messages.WorkSubscribe(replica="test"),
                metadata=((service.INSECURE_CLUSTER_HEADER, name),))
            first = True
            try:
                async for _ in transport.iterate(work):
                    if first:
                        first = False
                        opened.release()
            except errors.MeshTrustError as exc:
                ended.append(exc)

        streams = [asyncio.create_task(hold(name)) for name in names]
        async with asyncio.timeout(10):
            for _ in names:
                await opened.acquire()
        began = time.monotonic()
        await server.stop(2.0)
        took = time.monotonic() - began
        connected = [c.connected for c in await clusters.list()]
        async with asyncio.timeout(10):
            await asyncio.gather(*streams)
    finally:
        await channel.close()
        await store.close()
    return ended, took, connected


class TestStop:
    def test_open_work_streams_end_with_a_status_the_agents_act_on(
            self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """A stopping server ends its work streams itself, each with UNAVAILABLE and a
        message that says why, within the grace; each stream's record of the connection
        is gone by the time the stop returns, and nothing is logged as an error."""
        with caplog.at_level(logging.DEBUG):
            ended, took, connected = asyncio.run(_stopped_under(tmp_path, 20))
        assert connected == [False] * 20
        assert len(ended) == 20
        assert all(type(e) is errors.RPCError and "server is stopping" in str(e)
                   for e in ended), ended
        assert took < 2.0  # not held to the grace: no call was left for gRPC to cancel
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
