"""The process environment the pipeline reads and sets: its own variable names, Keras's cache folder, and the
TensorFlow and library settings that must be in place before those libraries are first imported.

A leaf: it imports nothing from the pipeline, so every layer may read it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

WEIGHTS_DIR_ENV = "MULTISNACKS_WEIGHTS_DIR"
KEEP_FREED_ENV = "MULTISNACKS_KEEP_FREED_MEMORY"  # "0": leave glibc's malloc as it is (for measuring)

# Read by TensorFlow, tqdm and coremltools when they are first imported; a value the user set is kept.
LIBRARY_DEFAULTS = {
    # tf-keras (the Keras 2 API), which ImageDataGenerator and coremltools' Keras converter need.
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # TensorFlow's pool (BFC) allocator for CPU tensors. The default allocator returns every large freed tensor to
    # the kernel and faults its pages in again for the next op, which is most of the time where page faults are
    # expensive (virtual machines); the pool keeps them (bench/RESULTS.md, "Allocator"). Where TensorFlow enables
    # oneDNN (recent Intel CPUs), oneDNN's own allocator pools whatever this says.
    "TF_CPU_ALLOCATOR_USE_BFC": "true",
    # coremltools draws a tqdm bar for every conversion pass (pipeline.quiet).
    "TQDM_DISABLE": "1",
}


def apply_library_defaults(environ=os.environ):
    """Set each of LIBRARY_DEFAULTS that `environ` does not already set; processes started later inherit them."""
    for name, value in LIBRARY_DEFAULTS.items():
        environ.setdefault(name, value)


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (glibc's malloc.h)
_LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit machines


def keep_freed_memory(environ=os.environ):
    """Ask glibc's malloc to keep freed memory for reuse: no trimming, the heap grown 1 GB at a time, and arrays
    up to 32 MB taken from the heap rather than mapped (and unmapped when freed) one by one.

    NumPy arrays, Keras's input batches and the math libraries' scratch buffers come from malloc, not from
    TensorFlow's pool; mapped one by one, each is faulted in page by page again (bench/RESULTS.md, "Allocator").
    Returns whether the setting was applied: False off Linux, without glibc, or with $MULTISNACKS_KEEP_FREED_MEMORY
    set to 0.
    """
    if not sys.platform.startswith("linux") or environ.get(KEEP_FREED_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), mallopt(_M_TOP_PAD, 1 << 30),
                mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)])


def keras_home():
    """Keras's own cache folder (datasets/ and models/ beneath it): $KERAS_HOME, else ~/.keras."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def keras_cache_dir():
    """The folder where Keras caches downloaded model weights."""
    return keras_home() / "models"


def pool_allocator_in_force():
    """Whether this process's TensorFlow allocates CPU tensors from its pool (only that allocator keeps the
    statistics `get_memory_info` reads). Imports TensorFlow."""
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return False
    return True
