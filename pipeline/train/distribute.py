"""The tf.distribute strategy a training stage runs under, from the `distribute` config section."""
from __future__ import annotations

import functools
import logging
import os

from pipeline.errors import ConfigError

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


def any_worker(chosen, flag):
    """Whether `flag` holds in any worker process of `chosen`: a decision (stop training now) taken alike by all.
    Every worker must call it at the same point of training, as for any collective operation."""
    if not is_multi_worker(chosen):
        return bool(flag)
    import tensorflow as tf

    votes = chosen.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(chosen.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0


def same_in_every_worker(chosen, value):
    """Whether the number `value` is the same in every worker process of `chosen` (called by all at one point)."""
    if not is_multi_worker(chosen):
        return True
    import tensorflow as tf

    moments = chosen.run(lambda: tf.constant([1.0, value, value * value], tf.float64))
    n, total, squares = chosen.reduce(tf.distribute.ReduceOp.SUM, moments, axis=None).numpy()
    return n * squares == total * total  # Cauchy-Schwarz: equal only when every value is the same


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
