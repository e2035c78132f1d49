"""The tf.distribute strategy a training stage runs under, from the `distribute` config section."""
from __future__ import annotations

import functools
import logging
import os
import re

import numpy as np

from pipeline.errors import ConfigError, TrainingError

log = logging.getLogger("pipeline.train.distribute")


def strategy(section):
    """The tf.distribute.Strategy for `section` (a DistributeConfig): TensorFlow's default (one device), a
    MirroredStrategy over the GPUs (with `auto`, only when there are two or more) or, without GPUs, the CPU's logical
    devices, or (`multi_worker`) a MultiWorkerMirroredStrategy over the cluster in `TF_CONFIG`, which must be
    created before the process runs any other TensorFlow operation. Models to train are built inside its `scope()`."""
    if section.strategy == "multi_worker":
        return _multi_worker()
    import tensorflow as tf

    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if section.strategy == "none" or (section.strategy == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    return _mirrored(tuple(gpus or [device.name for device in tf.config.list_logical_devices("CPU")]))


@functools.lru_cache(maxsize=None)
def _mirrored(devices):
    # One per process for each set of devices: two MirroredStrategy objects number their collective operations
    # alike, and the second stage's all-reduce then meets the first's ("Shape mismatch in the collective instance").
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(devices))


@functools.lru_cache(maxsize=None)
def _multi_worker():
    if not os.environ.get("TF_CONFIG"):
        raise ConfigError("config key 'distribute.strategy' is multi_worker with 'distribute.local_workers' 0, so the "
                          "cluster comes from the TF_CONFIG environment variable, which is not set; set "
                          "distribute.local_workers to the number of worker processes to start on this machine, or "
                          "set TF_CONFIG on each machine as TensorFlow documents")
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy()


def is_multi_worker(chosen):
    """Whether `chosen` spans several processes, whose steps and decisions must stay in step."""
    import tensorflow as tf

    return isinstance(chosen, tf.distribute.MultiWorkerMirroredStrategy)


def workers(chosen):
    """The number of worker processes `chosen` trains in (1 unless it is a MultiWorkerMirroredStrategy)."""
    return chosen.extended._num_workers if is_multi_worker(chosen) else 1


def worker_index(chosen):
    """This process's place among the worker processes of `chosen` (0, the chief, unless it is multi-worker)."""
    return chosen.cluster_resolver.task_id if is_multi_worker(chosen) else 0


GATHERED_DTYPES = ("float16", "float32", "float64", "int32", "int64")
"""The dtypes TensorFlow's collective gather sends."""


def all_gather(chosen, array):
    """Every worker process's `array` (of one shape and dtype in all of them, one of GATHERED_DTYPES), stacked in
    worker order: an array of shape (workers, *array.shape). Every worker must call it at the same point."""
    import tensorflow as tf

    array = np.asarray(array)
    if array.dtype.name not in GATHERED_DTYPES:
        raise TypeError(f"collective gather sends {', '.join(GATHERED_DTYPES)}, not {array.dtype}")
    if not is_multi_worker(chosen):
        return array[np.newaxis]
    per_worker = chosen.num_replicas_in_sync // workers(chosen)
    return _gather_function(chosen)(tf.constant(array)).numpy()[::per_worker]  # a worker's replicas send alike


@functools.lru_cache(maxsize=None)
def _gather_function(chosen):
    import tensorflow as tf

    # A function: run eagerly, every call would set up its collective operation anew, a second or so each.
    @tf.function(reduce_retracing=True)
    def gather(value):
        return chosen.gather(chosen.run(lambda v: v[tf.newaxis], args=(value,)), axis=0)

    return gather


def any_worker(chosen, flag):
    """Whether `flag` holds in any worker process of `chosen`: a decision (stop training now) taken alike by all.
    Every worker must call it at the same point of training, as for any collective operation."""
    return bool(all_gather(chosen, np.int32(bool(flag))).any())


def fewest(chosen, count):
    """The smallest of the whole numbers `count` of every worker process of `chosen` (called by all at one point)."""
    return int(all_gather(chosen, np.int64(count)).min())


def lost_worker(stage, error, others=()):
    """A TrainingError of one line when `error`, raised by training stage `stage`, is TensorFlow's failure of a
    collective operation because another worker process is gone (killed, its machine down), naming it when
    TensorFlow does, or when `others` (the other workers' indices) has only one; else None."""
    import tensorflow as tf

    lost = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError)
    if not isinstance(error, lost):
        return None
    text = error.message or ""
    log.debug("TensorFlow's error: %s", text)
    task = re.search(r"remote target /job:worker/replica:\d+/task:(\d+)", text)
    task = task.group(1) if task else (others[0] if len(others) == 1 else None)
    reason = re.search(r'grpc_message:"([^"]*)"', text)
    return TrainingError(f"{stage}: {'another worker' if task is None else f'worker {task}'} of the cluster is gone "
                         f"({reason.group(1) if reason else type(error).__name__}); stop the command on every "
                         "machine, then run it again on each to go on from the last finished epoch")


class Cluster:
    """What the runner needs of the cluster (TF_CONFIG) whose every worker runs the same command, this process
    being one of them with strategy `chosen`."""

    def __init__(self, chosen):
        self.chosen = chosen

    def any_worker(self, flag):
        """Whether `flag` holds in any worker (see any_worker)."""
        return any_worker(self.chosen, flag)

    def failure(self, stage, error):
        """The one-line error for `error` raised by `stage` when a worker was lost, else None (see lost_worker)."""
        me = worker_index(self.chosen)
        return lost_worker(stage, error, [k for k in range(workers(self.chosen)) if k != me])


def describe(chosen, batch_size, learning_rate):
    """What a training stage records of its strategy: its name, the worker processes and replicas, the per-replica
    and global batch and the learning rate (used as configured, whatever the replicas)."""
    replicas = chosen.num_replicas_in_sync
    name = type(chosen).__name__
    name = {"_DefaultDistributionStrategy": "none",  # TensorFlow's one-device default
            "CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy"}.get(name, name)  # its class's own name
    info = {"strategy": name, "workers": workers(chosen), "replicas": replicas, "batch_size_per_replica": batch_size,
            "global_batch_size": batch_size * replicas, "learning_rate": learning_rate}
    if replicas > 1:
        log.info("training on %d replicas in %d worker process(es) (%s): global batch %d (%d per replica), learning "
                 "rate %g as configured", replicas, info["workers"], name, info["global_batch_size"], batch_size,
                 learning_rate)
    return info
