"""The export stage's conversions, run beside its checks: every file converted in order in a worker process,
while this process computes the Keras reference and checks each file as soon as it is written.

Converting is mostly one core's work (coremltools' Python passes, tf2onnx, the TFLite converter), and so is much
of checking a file; on two cores the two overlap. The worker is a spawned process (the start method macOS uses
anyway), which loads the model from the same file this process loaded, so what it converts is what the checks
measure against. With `in_worker` off every file is converted here instead, each when it is first waited for.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from pipeline import processes, quiet
from pipeline.errors import ExportError, PipelineError
from pipeline.export.formats import FORMATS

log = logging.getLogger("pipeline.export")

_worker = {}  # in the worker process: the loaded model, and the calibration images once loaded


class Conversions:
    """The files `files` ({format: path}) of `model` (saved at `model_path`, which the worker loads; unused
    without one) being written, in order.

    calibration: a picklable function of no arguments giving the calibration pixels, called (once) only if a
        format needs them (FORMATS[name].calibrated); None when none does.
    in_worker: convert in a worker process (started here) rather than in this one.
    Use as a context manager: leaving it waits for the worker's current conversion and drops the rest.
    """

    def __init__(self, model, model_path, meta, files, calibration=None, in_worker=True):
        self.model, self.meta, self.files, self.calibration = model, meta, dict(files), calibration
        self.seconds, self.calibration_seconds = {}, 0.0
        self._loaded = {}  # calibration pixels, when converting here
        self._pool = self._futures = None
        if in_worker and self.files:
            self._pool = worker_pool(_start_worker, (str(model_path), quiet.verbose()))
            self._futures = {name: self._pool.submit(_convert, name, meta, path, self._calibration_for(name))
                             for name, path in self.files.items()}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(now=exc_type is not None)

    def close(self, now=False):
        """Stop the worker: conversions not started are dropped; the one under way is waited for, or with `now`
        (an error or an interrupt is unwinding) the worker is killed at once."""
        if self._pool is None:
            return
        if now:
            for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def wait(self, name):
        """Block until format `name`'s file is written (a conversion's ExportError is raised here); log it."""
        if name in self.seconds:
            return
        if self._futures is None:
            result = _converted(name, self.model, self.meta, self.files[name], self._calibration_for(name),
                                self._loaded)
        else:
            try:
                result = self._futures[name].result()
            except BrokenProcessPool as exc:
                raise ExportError(f"the conversion worker process stopped while converting {FORMATS[name].title} "
                                  f"('{name}'): {exc}; set export.convert_in_worker: false to convert in the "
                                  "stage's own process") from exc
        self.seconds[name] = result["seconds"]
        self.calibration_seconds += result["calibration_seconds"]
        log.info("export %s: %s (%.2f MB) in %.1fs", FORMATS[name].title, self.files[name].name,
                 result["megabytes"], result["seconds"])

    def wait_all(self):
        """Block until every file is written."""
        for name in self.files:
            self.wait(name)

    def summary(self):
        """{"calibration_images": seconds spent loading them, "convert": {format: seconds}} of the files written."""
        return {"calibration_images": round(self.calibration_seconds, 2),
                "convert": {name: self.seconds[name] for name in self.files if name in self.seconds}}

    def _calibration_for(self, name):
        return self.calibration if FORMATS[name].calibrated else None


def worker_pool(initializer=None, initargs=()):
    """A pool of one spawned worker process, which runs `initializer(*initargs)` first and ends as soon as this
    process is gone. Spawned, not forked: the child starts a fresh interpreter, whose first import of the package
    sets the library environment before TensorFlow loads."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_child,
                               initargs=(os.getpid(), initializer, initargs))


def _start_child(parent_pid, initializer, initargs):
    processes.exit_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def export_file(name, model, meta, path, calibration=None):
    """Write the file of format `name`, timed, a failure reported with the format's name; return its seconds.

    calibration: raw RGB training images for a format that needs them (FORMATS[name].calibrated), else unused.
    """
    fmt = FORMATS[name]
    t0 = time.monotonic()
    extra = {}
    if fmt.calibrated:
        if calibration is None:
            raise ExportError(f"{fmt.title} ('{name}' in export.formats) needs calibration images; the export "
                              "stage passes export.calibration_images training images")
        extra["calibration"] = calibration
    try:
        with quiet.converter_output():
            fmt.exporter().export(model, meta, path, fmt.precision, **extra)
    except PipelineError:
        raise
    except Exception as exc:  # a converter's own error, whatever its type
        raise ExportError(f"export of {fmt.title} ('{name}' in export.formats) to {path.name} failed: "
                          f"{type(exc).__name__}: {exc}; leave '{name}' out of export.formats to export the "
                          "others") from exc
    return round(time.monotonic() - t0, 2)


def _start_worker(model_path, verbose):
    from pipeline.train import models  # importing pipeline sets TF_USE_LEGACY_KERAS before TensorFlow loads

    quiet.configure(verbose)
    quiet.load_tensorflow()  # with its start-up lines held back, as in the stage's own process
    _worker["model"] = models.load(model_path)


def _convert(name, meta, path, calibration):
    return _converted(name, _worker["model"], meta, path, calibration, _worker)


def _converted(name, model, meta, path, calibration, loaded):
    """Convert one file: {"seconds", "calibration_seconds" (loading them, if this call did), "megabytes"}.

    loaded: where calibration pixels are kept once loaded (the worker's state), so they are read once.
    """
    from pipeline.export.parity import megabytes

    t0 = time.monotonic()
    pixels = None
    if calibration is not None:
        if "calibration" not in loaded:
            loaded["calibration"] = calibration()
        pixels = loaded["calibration"]
    loading = time.monotonic() - t0
    seconds = export_file(name, model, meta, path, pixels)
    return {"seconds": seconds, "calibration_seconds": loading, "megabytes": megabytes(path)}
