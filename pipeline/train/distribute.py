"""The tf.distribute strategy a training stage runs under, from the `distribute` config section."""
from __future__ import annotations

import functools
import logging

log = logging.getLogger("pipeline.train.distribute")


def strategy(section):
    """The tf.distribute.Strategy for `section` (a DistributeConfig): TensorFlow's default (one device), or a
    MirroredStrategy over the GPUs (with `auto`, only when there are two or more) or, without GPUs, the CPU's logical
    devices. Models to train are built and compiled inside its `scope()`."""
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


def describe(chosen, batch_size, learning_rate):
    """What a training stage records of its strategy: its name, the replicas, the per-replica and global batch and
    the learning rate (used as configured, whatever the replicas)."""
    replicas = chosen.num_replicas_in_sync
    name = type(chosen).__name__
    name = "none" if name == "_DefaultDistributionStrategy" else name  # TensorFlow's one-device default
    info = {"strategy": name, "replicas": replicas, "batch_size_per_replica": batch_size,
            "global_batch_size": batch_size * replicas, "learning_rate": learning_rate}
    if replicas > 1:
        log.info("training on %d replicas (%s): global batch %d (%d per replica), learning rate %g as configured",
                 replicas, info["strategy"], info["global_batch_size"], batch_size, learning_rate)
    return info
