"""Stopping cleanly: a store watch cancelled as it is woken still ends.

Found by the Istio suite: its teardown disconnects agents (each disconnect is
a store write that wakes the server's watches) just as it stops the server.
On Python 3.11 ``asyncio.wait_for`` returns normally when the awaited event is
set in the same loop iteration as the cancellation, so the watch went on and
the server hung on SIGTERM until killed. Which of the two comes first is left
to chance in a real process; here it is made to happen every time.
"""

from __future__ import annotations

import asyncio

from meshtrust.store import base, feed


class TestWatchCancellation:
    def test_a_watch_cancelled_as_a_write_wakes_it_ends(self) -> None:
        """notify() and cancel() in one loop iteration: the watch ends, cancelled, at once."""
        async def scenario() -> tuple[bool, bool]:
            async def read(after: int, kind: str, namespace: str | None,
                           limit: int) -> tuple[list[base.WatchEvent], int]:
                return [], after

            async def head() -> int:
                return 0

            watched = feed.Feed(read=read, head=head, interval=30)

            async def consume() -> None:
                async for _event in watched.watch("Pod", None, 0):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)  # parked, waiting for a write
            watched.notify()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2)
            ended = task in done
            if not ended:
                watched.close()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return ended, ended and task.cancelled()

        assert asyncio.run(scenario()) == (True, True)
