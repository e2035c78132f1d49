"""Training input as tf.data: a batch source's batches, epoch after epoch, read ahead of the training step.

A batch source (pipeline.data.batch_source: ImageBatches, CachedBatches) has `len()`
batches per epoch, `batch(epoch, i, positions)` -> (inputs, one-hot labels) as float32 arrays, `row_shape`,
`n_classes` and `thread_safe`. Its batches are a function of the epoch and the batch number alone, so the dataset
can start at any epoch (a resumed run), and each worker of a tf.distribute strategy can read only its replicas'
rows of every batch (`keras.utils.Sequence` and Python generators cannot be distributed).
"""
from __future__ import annotations

import numpy as np

READ_AHEAD = 2
"""Batches (or replicas' parts of batches) read ahead of the one training, in parallel when the source allows."""


def dataset(source, first_epoch=0, epochs=1, replicas=1, batch_means=True, pipeline=(0, 1), class_weights=None):
    """The batches of epochs `first_epoch` .. `epochs - 1` of `source`, in order, as one tf.data.Dataset whose
    cardinality is their count; the next batches are read while the current one trains.

    With `replicas` > 1, each element is one replica's part of a batch, with sample weights: (inputs, labels,
    weights). A short last batch could leave a replica none, which oneDNN's kernels cannot take (an empty batch
    there fails as a wrong channel count), so each batch is first filled up to a multiple of `replicas` with copies
    of its first rows weighted 0 (`own_rows_accuracy` in pipeline.train.training counts only the others), then cut
    into `replicas` equal parts in order. Of those, input pipeline `pipeline` = (index, count) of a tf.distribute
    input context yields the parts of its own replicas (index * R .. index * R + R - 1, R = replicas / count), and
    reads only their rows. Keras divides a replica's weighted loss by its row count, fillers included, and by the
    replicas; `batch_means` weights the batch's own rows (filled size / own size), so that the sum over the
    replicas is its own rows' mean, as in one process (training); else 1, so that an epoch's weighted losses add
    up to its own rows' sum (validation: see `filled_fraction`). `class_weights` ({class index: weight}) make
    weights whatever the replicas, multiplying them as Keras's `class_weight` would.
    """
    import tensorflow as tf

    steps = len(source)
    index, count = pipeline
    if replicas % count:
        raise ValueError(f"{replicas} replicas do not divide among {count} input pipelines")
    local = replicas // count
    first_part = index * local

    weighted = replicas > 1 or class_weights is not None
    if class_weights is not None:
        class_weights = np.array([class_weights[c] for c in range(source.n_classes)], np.float32)

    def read(epoch, i, part):
        if not weighted:
            inputs, labels = source.batch(int(epoch), int(i))
            return np.asarray(inputs, np.float32), np.asarray(labels, np.float32)
        n = len(source.picked(int(epoch), int(i)))
        filled = n + (-n % replicas)
        size = filled // replicas
        positions = np.arange(int(part) * size, (int(part) + 1) * size)
        own = positions < n
        inputs, labels = source.batch(int(epoch), int(i), np.where(own, positions, (positions - n) % n))
        weights = np.where(own, filled / n if batch_means else 1.0, 0.0).astype(np.float32)
        if class_weights is not None:
            weights *= class_weights[np.asarray(labels).argmax(axis=1)]
        return np.asarray(inputs, np.float32), np.asarray(labels, np.float32), weights

    def typed(epoch, i, part):
        kinds = (tf.float32,) * (3 if weighted else 2)
        inputs, labels, *weights = tf.numpy_function(read, [epoch, i, part], kinds, stateful=False)
        shaped = (tf.ensure_shape(inputs, (None, *source.row_shape)), tf.ensure_shape(labels, (None, source.n_classes)))
        return shaped + tuple(tf.ensure_shape(w, (None,)) for w in weights)

    parts = tf.data.Dataset.range(first_part, first_part + local)
    elements = tf.data.Dataset.range(first_epoch, epochs).flat_map(
        lambda epoch: tf.data.Dataset.range(steps).flat_map(lambda i: parts.map(lambda part: (epoch, i, part))))
    elements = (elements.map(typed, num_parallel_calls=READ_AHEAD, deterministic=True) if source.thread_safe else
                elements.map(typed))
    elements = elements.apply(tf.data.experimental.assert_cardinality((epochs - first_epoch) * steps * local))
    options = tf.data.Options()
    # Each pipeline reads its own parts already: tf.distribute must not shard it again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return elements.with_options(options).prefetch(1)


def distributed(strategy, source, first_epoch=0, epochs=1, batch_means=True, class_weights=None):
    """`dataset` for training under `strategy`: with one replica the dataset itself; with several, a distributed
    dataset whose input pipeline in each worker process reads only the parts of every batch its replicas train on.
    Keras takes it as it is and needs the steps to run (it has no cardinality)."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return dataset(source, first_epoch, epochs, class_weights=class_weights)

    def per_worker(context):
        return dataset(source, first_epoch, epochs, replicas, batch_means,
                       (context.input_pipeline_id, context.num_input_pipelines), class_weights)

    return strategy.distribute_datasets_from_function(per_worker)


def filled_fraction(source, replicas):
    """Own rows / all rows of one epoch of `source` once its batches are filled up for `replicas`: Keras's epoch
    loss on batches weighted as `dataset(..., batch_means=False)` makes them, divided by this, is the own rows'
    mean. The same every epoch, as every epoch's batches have the same sizes."""
    sizes = [len(source.picked(0, i)) for i in range(len(source))]
    return sum(sizes) / sum(n + (-n % replicas) for n in sizes)
