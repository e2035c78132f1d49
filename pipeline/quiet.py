"""Keeping the libraries' own chatter out of the pipeline's output unless `-v` asks for it.

TensorFlow 2.21 logs through absl from C++ before any Python setting can reach it (TF_CPP_MIN_LOG_LEVEL no
longer silences "oneDNN custom operations are on", "Could not find cuda drivers" or "failed call to cuInit"),
and TFLite prints "Created TensorFlow Lite XNNPACK delegate" from C. Those are written to file descriptor 2
directly, so they can only be held back by pointing that descriptor elsewhere while they happen. coremltools
and tf2onnx log through Python's logging, and coremltools draws tqdm bars for its passes (turned off by
TQDM_DISABLE, set in pipeline/__init__.py before tqdm is imported; our own bars ask for themselves). The
pipeline's own log lines go to stderr in one format, set up by `log_to_stderr` in every process that logs.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings

LIBRARY_LOGGERS = ("tensorflow", "absl", "coremltools", "tf2onnx", "onnx", "h5py", "matplotlib", "PIL")

_verbose = False


def log_to_stderr(level, prefix=""):
    """Send the pipeline's log lines of `level` and above to stderr as `HH:MM:SS L <prefix>message`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname).1s {prefix}%(message)s", "%H:%M:%S"))
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def configure(verbose):
    """Hide the libraries' log lines below ERROR unless `verbose`; the pipeline's own loggers are untouched."""
    global _verbose
    _verbose = verbose
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def verbose():
    """Whether `configure` was last asked to show the libraries' log lines."""
    return _verbose


@contextlib.contextmanager
def native_stderr():
    """Hold back what C/C++ code writes to stderr inside the block (shown again if the block fails, or with -v).

    Python's own sys.stderr is flushed first, so nothing of ours is lost; keep the block to a library call.
    """
    if _verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def converter_output():
    """Hold back all a converter says inside the block: what it prints (coremltools' quantization prints a line
    per layer), its Python warnings and what its native code writes to stderr. Shown if the block fails, or -v."""
    if _verbose:
        yield
        return
    printed = io.StringIO()
    with warnings.catch_warnings(), native_stderr():
        warnings.simplefilter("ignore")
        try:
            with contextlib.redirect_stdout(printed):
                yield
        except BaseException:
            sys.stderr.write(printed.getvalue())
            raise


def load_tensorflow():
    """Import TensorFlow and tf_keras and initialise the CPU device, with their start-up lines held back."""
    with native_stderr():
        import tensorflow as tf
        import tf_keras  # noqa: F401  (the Keras 2 API, imported for the lines its own native parts print)

        tf.constant(0.0) + 1.0  # the first op initialises the devices (the CUDA probe logs here)
