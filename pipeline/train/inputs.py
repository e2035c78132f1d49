"""Training input as tf.data: a batch source's batches, epoch after epoch, read ahead of the training step.

A batch source (pipeline.data.batch_source: ImageBatches, CachedBatches) has `len()`
batches per epoch, `batch(epoch, i)` -> (inputs, one-hot labels) as float32 arrays, `row_shape` and `n_classes`.
Its batches are a function of the epoch and the batch number alone, so the dataset can start at any epoch (a
resumed run) and tf.distribute can split each batch among replicas (`keras.utils.Sequence` and Python generators
cannot be distributed).
"""
from __future__ import annotations

import numpy as np


def dataset(source, first_epoch=0, epochs=1, replicas=1, batch_means=True):
    """The batches of epochs `first_epoch` .. `epochs - 1` of `source`, in order, as one tf.data.Dataset whose
    cardinality is their count; the next batch is read while the current one trains.

    With `replicas` > 1, tf.distribute splits each batch among them, and a short last batch could leave a replica
    none, which oneDNN's kernels cannot take (an empty batch there fails as a wrong channel count). Each batch then
    comes with sample weights (inputs, labels, weights), filled up to a multiple of `replicas` with copies of its
    first rows weighted 0 (`own_rows_accuracy` in pipeline.train.training counts only the others). Keras divides a
    batch's weighted loss by its row count, fillers included; `batch_means` weights the batch's own rows
    (filled size / own size), so that its loss and gradient are its own rows' mean, as in one process (training);
    else 1, so that an epoch's weighted losses add up to its own rows' sum (validation: see `filled_fraction`).
    """
    import tensorflow as tf

    steps = len(source)

    def read(epoch, i):
        inputs, labels = source.batch(int(epoch), int(i))
        inputs, labels = np.asarray(inputs, np.float32), np.asarray(labels, np.float32)
        if replicas == 1:
            return inputs, labels
        fill = np.arange(-len(inputs) % replicas) % len(inputs)
        own = (len(inputs) + len(fill)) / len(inputs) if batch_means else 1.0
        weights = np.concatenate([np.full(len(inputs), own, np.float32), np.zeros(len(fill), np.float32)])
        return np.concatenate([inputs, inputs[fill]]), np.concatenate([labels, labels[fill]]), weights

    def typed(epoch, i):
        kinds = (tf.float32,) * (2 if replicas == 1 else 3)
        inputs, labels, *weights = tf.numpy_function(read, [epoch, i], kinds, stateful=False)
        shaped = (tf.ensure_shape(inputs, (None, *source.row_shape)), tf.ensure_shape(labels, (None, source.n_classes)))
        return shaped + tuple(tf.ensure_shape(w, (None,)) for w in weights)

    batches = tf.data.Dataset.range(first_epoch, epochs).flat_map(
        lambda epoch: tf.data.Dataset.range(steps).map(lambda i: (epoch, i)))
    batches = batches.map(typed).apply(tf.data.experimental.assert_cardinality((epochs - first_epoch) * steps))
    options = tf.data.Options()
    # Each batch is read whole where the dataset runs; tf.distribute splits it among the replicas.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.with_options(options).prefetch(1)


def filled_fraction(source, replicas):
    """Own rows / all rows of one epoch of `source` once its batches are filled up for `replicas`: Keras's epoch
    loss on batches weighted as `dataset(..., batch_means=False)` makes them, divided by this, is the own rows'
    mean. The same every epoch, as every epoch's batches have the same sizes."""
    sizes = [len(source.picked(0, i)) for i in range(len(source))]
    return sum(sizes) / sum(n + (-n % replicas) for n in sizes)
