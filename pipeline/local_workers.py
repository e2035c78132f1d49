"""A training stage run by several worker processes of this machine (distribute.strategy: multi_worker with
distribute.local_workers: N), for one machine with many cores or sockets, and for testing what a cluster does.

The runner hands such a stage to `run_stage` instead of calling it. N processes of `python -m pipeline.train.worker`,
each told its place in a cluster over 127.0.0.1 by `TF_CONFIG`, run the stage's `run(ctx)` under one
MultiWorkerMirroredStrategy. Worker 0, the chief, writes what a one-process stage writes: its outputs into the
runner's temporary stage folder, the feature-store entries, the backups after each epoch. The others write into
folders of their own inside this run's temporary folder (removed when the stage ends, whatever ends it), read the
chief's feature-store entries instead of computing them, and start from a copy of the chief's backup, so that all
resume at the same epoch. When a worker dies, the others are stopped and the stage fails with one line; the next
run of the same command goes on from the last finished epoch.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pipeline
from pipeline import errors, fileio

log = logging.getLogger("pipeline.local_workers")

JOB = "job.pickle"
WORKER_MODULE = "pipeline.train.worker"


def count(cfg, stage):
    """How many local worker processes run `stage` (a Stage of the registry): `distribute.local_workers` for a
    training stage under `multi_worker`, else 0 (the stage runs in the runner's process)."""
    section = cfg.distribute
    return section.local_workers if "distribute" in stage.sections and section.strategy == "multi_worker" else 0


def result_file(job, index):
    """Where worker `index` of job folder `job` leaves its summary and weights digest when it ends well."""
    return Path(job) / f"result-{index}.json"


def error_file(job, index):
    """Where worker `index` leaves the message of the pipeline error it stopped on."""
    return Path(job) / f"error-{index}.json"


def traceback_file(job, index):
    """Where worker `index` leaves the traceback of an unexpected exception it stopped on."""
    return Path(job) / f"traceback-{index}.txt"


def private_root(job, index):
    """The folder of a worker other than the chief: its own outputs, backups and temporary files."""
    return Path(job) / f"worker-{index}"


def run_stage(stage, context, n, poll=0.2, grace=120):
    """Run `stage` with StageContext `context` in `n` local worker processes; return the chief's summary, with the
    digest of each worker's final weights (`worker_weights`), which must agree.

    TrainingError if a worker dies or the workers disagree; a worker's own pipeline error is raised as itself.
    `grace`: seconds the others get to end after the first one ended well.
    """
    job = Path(tempfile.mkdtemp(prefix=f"{stage.name}-workers-"))  # inside the run's temporary folder
    processes = []
    try:
        with open(job / JOB, "wb") as handle:
            pickle.dump({"stage": stage.name, "module": stage.module, "context": context,
                         "log_level": logging.getLogger("pipeline").getEffectiveLevel()}, handle)
        addresses = [f"127.0.0.1:{port}" for port in free_ports(n)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(pipeline.__file__).resolve().parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
        for index in range(n):
            cluster = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            processes.append(subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(job), str(index), str(os.getpid())],
                env={**env, "TF_CONFIG": json.dumps(cluster)}, start_new_session=True))
        log.info("%s: %d worker processes on this machine (%s), worker 0 the chief", stage.name, n,
                 ", ".join(addresses))
        failed = _wait(processes, poll, grace)
        if failed is not None:
            raise _failure(stage.name, job, failed, processes[failed], context.backup)
        results = [fileio.read_json(result_file(job, index)) for index in range(n)]
        digests = [result["weights"] for result in results]
        if len(set(digests)) > 1:
            raise errors.TrainingError(f"{stage.name}: the {n} workers ended with different weights "
                                       f"({', '.join(d[:12] for d in digests)}); nothing was saved. Report this, "
                                       "with the config; distribute.strategy: none trains in one process")
        return {**results[0]["summary"], "worker_weights": digests}
    finally:
        for process in processes:
            _kill(process)
        shutil.rmtree(job, ignore_errors=True)


def free_ports(n):
    """`n` TCP ports on 127.0.0.1 that were free a moment ago (held together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for held in sockets:
            held.bind(("127.0.0.1", 0))
        return [held.getsockname()[1] for held in sockets]
    finally:
        for held in sockets:
            held.close()


def _wait(processes, poll, grace):
    """The index of the worker whose failure stopped the run, or None once all have ended well. A worker killed by
    a signal comes first: the others' collective operations then fail too, as a consequence."""
    first_done = None
    while True:
        codes = [process.poll() for process in processes]
        failed = [index for index, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            return min(failed, key=lambda index: (codes[index] > 0, index))
        if all(code == 0 for code in codes):
            return None
        if first_done is None and 0 in codes:
            first_done = time.monotonic()
        if first_done is not None and time.monotonic() - first_done > grace:
            return codes.index(None)  # ended well by one, still running: hung at the end
        time.sleep(poll)


def _failure(stage, job, index, process, backup):
    """The error for worker `index`'s failure: its own pipeline error if it stopped on one, else one line."""
    code = process.returncode
    if error_file(job, index).is_file():
        found = fileio.read_json(error_file(job, index))
        kind = getattr(errors, found["type"], errors.PipelineError)
        return kind(found["message"])
    if code is not None and code > 0 and traceback_file(job, index).is_file():
        sys.stderr.write(traceback_file(job, index).read_text())
    if code is None:
        how = "did not end after the others had finished"
    elif code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
    else:
        how = f"failed with exit status {code} (its traceback is above)"
    kept = backup is not None and any(Path(backup).glob("epoch-*"))
    again = ("the epochs finished so far are backed up: run the same command again to go on from the last one"
             if kept else "no epoch had finished: run the same command again to start it over")
    return errors.TrainingError(f"{stage}: worker {index} (pid {process.pid}) {how}; the other workers were "
                                f"stopped and {stage} was not saved; {again}")


def _kill(process):
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
