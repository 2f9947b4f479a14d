"""The command line's allocator setting: freed tensors of a few MiB go back to the OS (each case runs in a
child process: the setting is process-wide)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")

# A freed mapped block raises glibc's default threshold past 2 MiB; then every other one of 100 touched 2 MiB
# tensors is freed (the kept ones pin the heap's top, as a training step's live tensors do).
CHILD = """
import sys, torch
from opd_agents.allocator import map_large_blocks
print(map_large_blocks() if sys.argv[1] == "set" else False)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
torch.ones(1 << 19)  # allocated and freed at once
blocks = [torch.ones(1 << 19) for _ in range(100)]
before = rss()
del blocks[::2]
print((before - rss()) / 2**20)
"""


def _returned_mib(mode: str, **env: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", float(out[1])


def test_freed_blocks_go_back_to_the_os() -> None:
    was_set, returned = _returned_mib("set")
    default_set, default_returned = _returned_mib("default")
    assert was_set and not default_set
    assert returned >= 90  # of the 100 MiB freed
    assert default_returned < returned - 50  # glibc's sliding threshold keeps them resident


def test_a_users_own_threshold_is_kept() -> None:
    was_set, _ = _returned_mib("set", MALLOC_MMAP_THRESHOLD_="65536")
    assert not was_set
