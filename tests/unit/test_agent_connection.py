"""When the agent closes a relay connection its new certificate replaced."""

from __future__ import annotations

import asyncio

from meshtrust.agent import connection


class Channel:
    """Stands in for a grpc.aio channel: records when it was closed."""

    def __init__(self) -> None:
        self.closed_at: float | None = None

    async def close(self) -> None:
        self.closed_at = asyncio.get_running_loop().time()


def test_an_unused_channel_closes_at_once() -> None:
    async def scenario() -> Channel:
        retirement = connection.Retirement(grace=30)
        channel = Channel()
        with retirement.using(channel):
            pass
        retirement.retire(channel)
        await asyncio.sleep(0)
        assert retirement.retired == 0
        return channel

    assert asyncio.run(scenario()).closed_at is not None


def test_a_channel_in_use_closes_when_its_last_user_is_done() -> None:
    async def scenario() -> tuple[Channel, Channel, list[str]]:
        retirement = connection.Retirement(grace=30)
        old, other = Channel(), Channel()
        seen: list[str] = []
        with retirement.using(old), retirement.using(other):
            with retirement.using(old):  # a call, next to the stream
                retirement.retire(old)
                await asyncio.sleep(0.01)
                seen.append(f"call done, closed: {old.closed_at is not None}")
            await asyncio.sleep(0.01)
            seen.append(f"stream still on it, closed: {old.closed_at is not None}")
        await asyncio.sleep(0.01)
        seen.append(f"all done, closed: {old.closed_at is not None}")
        return old, other, seen

    old, other, seen = asyncio.run(scenario())
    assert seen == ["call done, closed: False", "stream still on it, closed: False",
                    "all done, closed: True"]
    assert other.closed_at is None  # never retired


def test_a_channel_still_used_after_the_grace_is_closed_anyway() -> None:
    async def scenario() -> tuple[float, Channel, int]:
        retirement = connection.Retirement(grace=0.1)
        channel = Channel()
        began = asyncio.get_running_loop().time()
        with retirement.using(channel):
            retirement.retire(channel)
            await asyncio.sleep(0.3)
        await asyncio.sleep(0)
        return began, channel, retirement.retired

    began, channel, left = asyncio.run(scenario())
    assert channel.closed_at is not None and 0.09 <= channel.closed_at - began < 0.25
    assert left == 0


def test_stopping_closes_what_is_still_in_use() -> None:
    async def scenario() -> Channel:
        retirement = connection.Retirement(grace=30)
        channel = Channel()
        with retirement.using(channel):
            retirement.retire(channel)
            await retirement.close()
        return channel

    assert asyncio.run(scenario()).closed_at is not None
