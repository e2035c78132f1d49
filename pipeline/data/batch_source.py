"""What every batch source shares: each epoch's order of rows, drawn from the seed and the epoch alone.

A batch source (pipeline.data.augmentation.ImageBatches, pipeline.train.activations.CachedBatches) has `len()`
batches per epoch and `batch(epoch, i)`; pipeline.train.inputs reads them as tf.data. Because an epoch's order
depends on nothing read before it, a resumed run, or another worker, draws what an unbroken one-process run would.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.data import balance


class BatchSource:
    """The order of rows each epoch reads, in batches of `batch_size`.

    labels: each row's class index. `shuffle` reorders every epoch; `oversample` repeats the smaller classes' rows in
    every epoch up to the largest class's count. A subclass that reads only some rows each epoch overrides `_rows`.
    `batch(epoch, i)` reads the rows `picked(epoch, i)` (`batch(epoch, i, positions)` only those at `positions` of
    the batch, which are the same rows whatever else is read); `batches[i]` is batch i of epoch 0 (a fixed view's
    batches). `thread_safe`: whether batches may be read from several threads at once.
    """

    thread_safe = True

    def __init__(self, labels, n_classes, batch_size, shuffle=False, seed=0, oversample=False):
        self.labels, self.n_classes = np.asarray(labels), n_classes
        self.batch_size, self.shuffle, self.seed, self.oversample = batch_size, shuffle, seed, oversample
        self._order = (None, None)
        self._steps = math.ceil(len(self.order(0)) / batch_size)  # every epoch reads as many rows

    def _rows(self, rng):
        """The rows one epoch reads, before oversampling and shuffling: all of them."""
        return np.arange(len(self.labels))

    def order(self, epoch):
        """The rows epoch `epoch` (from 0) reads, in its order."""
        cached, order = self._order  # one read: tf.data may ask from several threads at once
        if cached != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = self._rows(rng)
            if self.oversample:
                order = balance.oversample(order, self.labels[order], rng)
            if self.shuffle:
                rng.shuffle(order)
            self._order = (epoch, order)
        return order

    def picked(self, epoch, i):
        """The rows of batch `i` of epoch `epoch`."""
        return self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def __len__(self):
        return self._steps

    def __getitem__(self, i):
        return self.batch(0, i)
