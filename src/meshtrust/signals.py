"""Acting on SIGINT and SIGTERM in an asyncio process, also while its event loop is busy.

asyncio's ``loop.add_signal_handler`` learns of a signal from a byte that
Python's signal handler writes to the loop's self-pipe. Every
``call_soon_threadsafe`` writes a byte to the same pipe, and a Unix socket
pair holds only about 280 one-byte writes. A server whose store threads hand
back thousands of results while its loop is busy (ten thousand agents
disconnecting at once) fills it; the signal's byte is then dropped, Python
prints "Exception ignored when trying to write to the signal wakeup fd", and
the signal is lost: the process does not stop until it is killed. So here
signals get a socket pair of their own, which nothing else writes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the byte written to the wakeup socket does the work."""


@contextlib.contextmanager
def handled(callback: Callable[[signal.Signals], object],
            signals: Iterable[signal.Signals] = STOP_SIGNALS) -> Iterator[None]:
    """Call ``callback(signal)`` on the running event loop for each of ``signals`` that
    arrives while the block runs; the earlier handlers come back after it.

    From the main thread, inside a running loop (as ``loop.add_signal_handler``).
    """
    loop = asyncio.get_running_loop()
    wanted = {int(sig): signal.Signals(sig) for sig in signals}
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)

    def arrived() -> None:
        try:
            data = reader.recv(4096)
        except BlockingIOError:  # woken with nothing to read
            return
        for number in data:
            if number in wanted:
                callback(wanted[number])

    previous_fd = signal.set_wakeup_fd(writer.fileno())
    previous = {sig: signal.signal(sig, _ignore) for sig in wanted.values()}
    loop.add_reader(reader.fileno(), arrived)
    try:
        yield
    finally:
        loop.remove_reader(reader.fileno())
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(previous_fd)
        reader.close()
        writer.close()
