"""Admission control over the real relay: a burst of issuances against a server signing two."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
import grpc.aio

import relayfleet as rf
from meshtrust import errors
from meshtrust.agent import backoff
from meshtrust.pki import keys
from meshtrust.rpc import transport

CLUSTERS = 12
RENEWALS_EACH = 8


class Burst:
    """Calls made until they succeed, honouring RESOURCE_EXHAUSTED as an agent does."""

    def __init__(self) -> None:
        self.rng = random.Random(3)
        self.busy = 0
        self.hints: list[float] = []
        self.failures: list[str] = []

    async def until_done(self, call: Any) -> Any:
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                error = transport.translate(exc)
                if not isinstance(error, errors.RateLimited):
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
                    raise
                metadata = dict(exc.trailing_metadata() or ())
                assert int(metadata[transport.RETRY_AFTER_MS]) > 0
                self.busy += 1
                self.hints.append(error.retry_after)
                await asyncio.sleep(backoff.delay(error, 1.0, self.rng))


class TestAdmission:
    def test_a_burst_past_the_limit_is_deferred_then_all_issued(self, fleet: rf.Fleet) -> None:
        """Bootstraps and renewals past the limit get RESOURCE_EXHAUSTED and a time; all succeed."""
        # Two at once and no waiting: every call past the second is told when to come back.
        server = fleet.start_server(extra=["--max-issuances", "2", "--max-issuance-wait", "0",
                                           "--max-bootstrap-wait", "0"])
        names = [f"cluster-{i}" for i in range(CLUSTERS)]

        async def scenario() -> tuple[Burst, Burst, float]:
            trust = await fleet.relay_root()
            tokens = [await fleet.token(name) for name in names]
            made = [rf.new_key() for _ in names]
            booting = Burst()

            async def bootstrap(i: int) -> rf.Credentials:
                response = await booting.until_done(lambda: rf.bootstrap(
                    server.bootstrap, trust, names[i], tokens[i],
                    rf.request_for(made[i], names[i])))
                return rf.Credentials(chain=bytes(response.certificate_chain),
                                      key=keys.dump_private_key(made[i]),
                                      trust=bytes(response.ca_bundle))

            began = time.monotonic()
            credentials = await asyncio.gather(*(bootstrap(i) for i in range(CLUSTERS)))
            channels = [rf.relay_channel(server.relay, c) for c in credentials]
            requests = [[rf.request_for(rf.new_key(), name) for _ in range(RENEWALS_EACH)]
                        for name in names]
            renewing = Burst()
            try:
                replies = await asyncio.gather(*(
                    renewing.until_done(lambda c=channel, r=request: rf.renew(c, r))
                    for channel, mine in zip(channels, requests, strict=True)
                    for request in mine))
            finally:
                for channel in channels:
                    await channel.close()
            assert all(bytes(r.certificate_chain).startswith(b"-----BEGIN CERTIFICATE")
                       for r in replies)
            assert len({r.serial for r in replies}) == CLUSTERS * RENEWALS_EACH
            return booting, renewing, time.monotonic() - began

        for name in names:
            fleet.register(name)
        booting, renewing, took = asyncio.run(scenario())

        assert not booting.failures and not renewing.failures
        assert booting.busy > 0, "12 bootstraps at once against 2 slots: some must wait"
        assert renewing.busy > 0, "96 renewals at once against 2 slots: some must wait"
        # Each refused call was given its own time, not one shared constant.
        assert len(set(renewing.hints)) > 1 and max(renewing.hints) < 30
        assert took < 12, f"the burst took {took:.1f} s"
        assert server.process.alive
        assert not server.process.lines("ERROR|Traceback")

    def test_bootstraps_past_the_limit_wait_their_turn(self, fleet: rf.Fleet) -> None:
        """A bootstrap waits up to --max-bootstrap-wait (10 s) for its slot, where other
        callers are refused at once: 12 bootstraps against 2 slots are all served, none told
        to come back."""
        server = fleet.start_server(extra=["--max-issuances", "2", "--max-issuance-wait", "0"])
        names = [f"cluster-{i}" for i in range(CLUSTERS)]
        for name in names:
            fleet.register(name)

        async def scenario() -> Burst:
            trust = await fleet.relay_root()
            tokens = [await fleet.token(name) for name in names]
            booting = Burst()
            replies = await asyncio.gather(*(booting.until_done(
                lambda i=i: rf.bootstrap(server.bootstrap, trust, names[i], tokens[i],
                                         rf.request_for(rf.new_key(), names[i])))
                for i in range(CLUSTERS)))
            assert len({r.serial for r in replies}) == CLUSTERS
            return booting

        booting = asyncio.run(scenario())

        assert not booting.failures
        assert booting.busy == 0, f"{booting.busy} bootstraps were told to come back"
        assert not server.process.lines("ERROR|Traceback")
