"""Keeping freed memory in the process for the checkers' next batch, on Linux (glibc's malloc).

The Core ML checkers allocate and free arrays of several to tens of MB for every op of every batch. glibc maps
such arrays one by one and unmaps them when freed, and gives freed memory at the top of its heap back to the
kernel, so the next batch's arrays fault their pages in again. On 2 cores that took a quarter to nearly half of
the checks' time (EfficientNet-Lite0 at 256 px, 192 images, batches of 16: the .mlmodel checker at 26-29
images/s, 48-52 with this; the .mlpackage checker at 25-26, 34-35; system time 5.3-6.5 s, 2.7-2.8 s with this;
the same peak memory). Keeping freed memory means the heap stays at its largest size until the process ends,
so this is switched on where the checks run (the export stage and `verify`), the pipeline's last step, not for
training.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (glibc's malloc.h)
_LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit machines


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse: no trimming, the heap grown 1 GB at a time, and arrays
    up to 32 MB taken from the heap rather than mapped (and unmapped when freed) one by one.

    Returns whether the setting was applied: False off Linux or without glibc, where nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), mallopt(_M_TOP_PAD, 1 << 30),
                mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)])
