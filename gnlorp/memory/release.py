"""Let a CPU run hand freed tensor memory back to the operating system.

glibc serves large allocations with mmap and returns them on free, but after the first large free it raises
its mmap threshold (up to 32 MiB) to that size, so from then on every tensor below 32 MiB - most of a small
LLaMA's weights, gradients and activations - comes from the heap, which never shrinks. Freed gradients and
activations then stay in the process's RSS, and a llama-130m run's RSS climbs step after step to 1.5× what it
actually holds (docs/BENCHMARKS.md, "Peak memory"). Pinning the threshold keeps every tensor of 128 KiB or
more on mmap, so RSS follows what is alive: the memory a CPU user has to have, and what the estimator predicts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h); setting it also turns off the dynamic raise
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value: small objects stay on the heap, tensors do not


def return_freed_memory() -> bool:
    """Pin glibc's mmap threshold for this process; False where there is no glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
