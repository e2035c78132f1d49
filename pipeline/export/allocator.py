"""Keeping freed memory in the process for the checkers' next batch, on Linux (glibc's malloc).

The Core ML checkers allocate and free arrays of several to tens of MB for every op of every batch. glibc maps
such arrays one by one and unmaps them when freed, and gives freed memory at the top of its heap back to the
kernel, so the next batch's arrays fault their pages in again (bench/RESULTS.md, "Allocator"). Keeping freed
memory means the heap stays at its largest size until the process ends, so this is switched on where the checks
run (the export stage and `verify`), the pipeline's last step, not for training. TensorFlow's own tensors come
from its pool allocator in every process (pipeline.environment).
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
