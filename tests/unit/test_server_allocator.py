"""The server has glibc map large allocations on pages of their own."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from meshtrust import errors
from meshtrust.server import app, config

# In a fresh interpreter: 4,000 blocks the size of a BIO buffer of gRPC's TLS, each written
# whole; every other one is freed (the connections that came and went, between ones that
# stay), and 2,000 more are made that see one small write each (the connections held).
# Prints the RSS all this added (KiB).
_CHURN = """
import ctypes, sys
from meshtrust.server import app
threshold = int(sys.argv[1])
assert app.map_large_allocations(threshold) is bool(threshold)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE, COUNT = 17_416, 2_000

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def blocks(count, written):
    made = [libc.malloc(SIZE) for _ in range(count)]
    for block in made:
        ctypes.memset(block, 1, written)
    return made

base = rss()
first = blocks(2 * COUNT, SIZE)
for block in first[::2]:
    libc.free(block)
held = blocks(COUNT, 512)
print(rss() - base)
"""


def _added_kib(threshold: int) -> int:
    done = subprocess.run([sys.executable, "-c", _CHURN, str(threshold)], check=True,
                          capture_output=True, text=True, timeout=60)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_held_blocks_take_memory_only_where_written() -> None:
    """From glibc's heap, the held blocks reuse the freed ones, resident whole; mapped on
    their own, the freed blocks went back to the system and each held one takes only the
    page written. (A block mapped on its own is rounded up to whole pages: the ones that
    stay, written whole, take 20 KiB each instead of 17.)"""
    heap = _added_kib(0)
    mapped = _added_kib(config.DEFAULT_MMAP_THRESHOLD)
    assert heap > 60_000, (heap, mapped)  # 4,000 blocks of 17 KiB resident
    assert (heap - mapped) / 2_000 > 8, (heap, mapped)  # KiB saved per held block


def test_zero_leaves_the_allocator_alone() -> None:
    assert app.map_large_allocations(0) is False


class TestSetting:
    def test_default_and_values(self) -> None:
        made = config.from_mapping({"store": "sqlite:///x.db"})
        assert made.mmap_threshold == config.DEFAULT_MMAP_THRESHOLD == 8192
        assert config.from_mapping({"store": "sqlite:///x.db",
                                    "mmap-threshold": "0"}).mmap_threshold == 0
        assert config.from_mapping({"store": "sqlite:///x.db",
                                    "mmap_threshold": 65536}).mmap_threshold == 65536

    @pytest.mark.parametrize("value", [100, 4095, 64 * 1024 * 1024, -1])
    def test_out_of_range(self, value: int) -> None:
        with pytest.raises(errors.ConfigError, match="mmap-threshold must be 0 .* or from 4096"):
            config.from_mapping({"store": "sqlite:///x.db", "mmap-threshold": value})

    def test_not_a_number(self) -> None:
        with pytest.raises(errors.ConfigError, match="mmap-threshold: give a whole number"):
            config.from_mapping({"store": "sqlite:///x.db", "mmap-threshold": "8 KiB"})
