"""The C allocator setting the command line runs with (importing the library never changes it).

glibc's malloc serves a request below its mmap threshold from its heaps and, each time it frees a mapped
block, raises that threshold to the block's size (up to 32 MiB). After a few steps nearly every tensor of a
training step (activations of 1–30 MiB) lives in heap pages, and those stay resident when the tensors are
freed: pages are handed back only from the top of a heap. The evaluation that follows needs buffers of
other sizes (KV caches of 32 episodes), does not fit them into the holes, and takes new pages on top.
A fixed threshold maps every block from ``MMAP_THRESHOLD`` up on its own and unmaps it when it is freed.
On the quickstart this cut peak RSS by 0.8–1.0 GB at an unchanged wall time (docs/benchmarks.md, "Where the
quickstart's memory went"); a lower threshold saves a little more, but page faults then cost time.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 1 << 20  # bytes
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc's malloc.h)
USER_SETTING = "MALLOC_MMAP_THRESHOLD_"  # glibc's own variable: a user who sets it keeps their value


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process. Returns whether it was set: not on
    another C library, nor when the user set ``MALLOC_MMAP_THRESHOLD_`` themselves."""
    if USER_SETTING in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold))
