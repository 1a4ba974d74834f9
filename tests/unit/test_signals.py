"""SIGINT and SIGTERM reach a busy event loop (meshtrust.signals), in real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

# A loop whose callback runs while a thread hands it 2,000 results (as the store's threads do
# while ten thousand agents disconnect) and the process gets SIGTERM meanwhile. With asyncio's
# loop.add_signal_handler the signal's byte finds the loop's self-pipe full and is dropped:
# this script then prints "signal lost" (checked by hand on Python 3.11).
BUSY = textwrap.dedent("""
    import asyncio, os, signal, threading, time
    from meshtrust import signals

    async def main():
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        got = []

        def busy():
            flood = threading.Thread(target=lambda: [
                loop.call_soon_threadsafe(lambda: None) for _ in range(2000)])
            flood.start()
            flood.join()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)

        with signals.handled(lambda sig: (got.append(sig), stopped.set())):
            loop.call_soon(busy)
            try:
                await asyncio.wait_for(stopped.wait(), 5)
            except TimeoutError:
                print("signal lost")
                return
        print("stopped by", got[0].name)

    asyncio.run(main())
""")

# An idle loop that another process signals; afterwards the earlier handlers are back.
IDLE = textwrap.dedent("""
    import asyncio, signal, sys
    from meshtrust import signals

    async def main():
        stopped = asyncio.Event()
        got = []
        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        with signals.handled(lambda sig: (got.append(sig), stopped.set())):
            print("ready", flush=True)
            await asyncio.wait_for(stopped.wait(), 10)
        after = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        print("stopped by", got[0].name, "handlers back:", before == after,
              "wakeup fd back:", signal.set_wakeup_fd(-1) == -1)

    asyncio.run(main())
""")


def test_a_signal_is_not_lost_while_the_loop_is_busy() -> None:
    proc = subprocess.run([sys.executable, "-c", BUSY], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stopped by SIGTERM", proc.stdout + proc.stderr
    assert "wakeup fd" not in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_from_another_process_wakes_an_idle_loop(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", IDLE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == f"stopped by {sig.name} handlers back: True wakeup fd back: True", \
        out + err
