"""The process environment the pipeline reads and sets: its own variable names, Keras's cache folder, and the
TensorFlow and library settings that must be in place before those libraries are first imported.

A leaf: it imports nothing from the pipeline, so every layer may read it.
"""
from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_DIR_ENV = "MULTISNACKS_WEIGHTS_DIR"

# Read by TensorFlow, tqdm and coremltools when they are first imported; a value the user set is kept.
LIBRARY_DEFAULTS = {
    # tf-keras (the Keras 2 API), which ImageDataGenerator and coremltools' Keras converter need.
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # TensorFlow's pool (BFC) allocator for CPU tensors. The default allocator returns every large freed tensor to
    # the kernel and faults its pages in again for the next op, which is most of the time where page faults are
    # expensive (virtual machines); the pool keeps them (bench/RESULTS.md, "Allocator").
    "TF_CPU_ALLOCATOR_USE_BFC": "true",
    # coremltools draws a tqdm bar for every conversion pass (pipeline.quiet).
    "TQDM_DISABLE": "1",
}


def apply_library_defaults(environ=os.environ):
    """Set each of LIBRARY_DEFAULTS that `environ` does not already set; processes started later inherit them."""
    for name, value in LIBRARY_DEFAULTS.items():
        environ.setdefault(name, value)


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
