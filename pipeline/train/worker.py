"""One worker process of a training stage that several run together (pipeline.local_workers starts them).

Usage, by the launcher only: `python -m pipeline.train.worker JOB_FOLDER INDEX PARENT_PID`, with `TF_CONFIG` naming
this worker's place in the cluster. The strategy is made first, before any other TensorFlow operation (collective
operations can be configured only then); then the stage's own `run(ctx)` runs as in one process. Worker 0, the
chief, has the runner's context; the others a private copy of it (pipeline.local_workers). Every worker leaves the
digest of its final weights, or the message of the pipeline error it stopped on, in the job folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import pickle
import shutil
import sys
import traceback
from pathlib import Path

from pipeline import fileio, local_workers, processes, quiet
from pipeline.cache.feature_store import ChiefsStore
from pipeline.errors import PipelineError
from pipeline.train import distribute
from pipeline.train.view_store import OneMachine


def private_context(context, root):
    """A non-chief worker's StageContext: outputs in `root`, the chief's feature-store entries read (never stored),
    and a copy of the chief's backup to resume from, written on by this worker alone."""
    out = type(context.out)(root / "out")
    out.root.mkdir(parents=True)
    backup = None
    if context.backup is not None:
        backup = root / "backup"
        if context.backup.is_dir():  # hard links: a backup's files are replaced, never rewritten in place
            shutil.copytree(context.backup, backup, copy_function=os.link)
    return dataclasses.replace(context, out=out, store=ChiefsStore(context.store), backup=backup)


def weights_digest(path):
    """SHA-256 of the weight arrays in the Keras HDF5 file `path`, in the order of their names."""
    import h5py
    import numpy as np

    digest = hashlib.sha256()
    with h5py.File(path, "r") as h5:
        arrays = []
        h5.visititems(lambda name, item: arrays.append(name) if isinstance(item, h5py.Dataset) else None)
        for name in sorted(arrays):
            digest.update(name.encode() + np.ascontiguousarray(h5[name][()]).tobytes())
    return digest.hexdigest()


def cores_per_worker(environ=os.environ):
    """This process's share of the cores it may run on, when TF_CONFIG's workers all run on this machine."""
    workers = len(json.loads(environ["TF_CONFIG"])["cluster"]["worker"])
    return max(1, len(os.sched_getaffinity(0)) // workers)


def _share_the_cores():
    # TensorFlow sizes its thread pool to every core; N such processes on one machine would oversubscribe it N times.
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(cores_per_worker())


def main(argv):
    """Run worker `argv[1]` of the job in folder `argv[0]`; exit 0 when its share is done, 3 on a pipeline error."""
    job, index, parent = Path(argv[0]), int(argv[1]), int(argv[2])
    processes.exit_with_parent(parent)
    spec = pickle.loads((job / local_workers.JOB).read_bytes())
    level = spec["log_level"]
    if index == 0:  # the chief speaks for all; the others say only what goes wrong
        quiet.log_to_stderr(level)
    else:
        quiet.log_to_stderr(max(level, logging.WARNING), f"[worker {index}] ")
    quiet.configure(level <= logging.DEBUG)
    context = spec["context"]
    try:
        with quiet.native_stderr():
            _share_the_cores()
            chosen = distribute.strategy(context.cfg.distribute)
        if index != 0:
            context = private_context(context, local_workers.private_root(job, index))
        # The workers compute the feature-store entries they need together, each a share.
        context.store.group = OneMachine(index, distribute.workers(chosen), job / "shards",
                                         lambda: distribute.any_worker(chosen, True))
        summary = importlib.import_module(spec["module"]).run(context)
        digest = weights_digest(context.out.model)
        distribute.any_worker(chosen, True)  # no worker ends while another may still need it
        fileio.write_json(local_workers.result_file(job, index), {"summary": summary, "weights": digest})
    except PipelineError as exc:
        fileio.write_json(local_workers.error_file(job, index), {"type": type(exc).__name__, "message": str(exc)})
        _exit(3)
    except Exception:  # the launcher shows it, unless another worker's death caused it (a broken collective)
        fileio.write_text(local_workers.traceback_file(job, index), traceback.format_exc())
        _exit(1)
    _exit(0)


def _exit(code):
    # Without waiting for TensorFlow's collective runtime to shut down, which can hang (tensorflow#35878).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
