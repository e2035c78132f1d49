"""Keras ImageDataGenerator settings and the batches that feed the network from ingest's index."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from pipeline.backbones import BACKBONES, scale_bias
from pipeline.data.batch_source import BatchSource
from pipeline.data.images import load_array
from pipeline.data.labels import class_indices

PREPROCESS_KEYS = ("input_scale", "input_bias")


def generator_settings(aug_cfg, backbone_name):
    """The ImageDataGenerator keyword arguments for training images, with the backbone's preprocessing."""
    settings = dataclasses.asdict(aug_cfg)
    settings.pop("preview_images")
    backbone = BACKBONES[backbone_name]
    settings.update(input_scale=backbone.input_scale, input_bias=backbone.input_bias)
    return settings


def make_generator(settings, augment=True):
    """An ImageDataGenerator from saved settings; without `augment`, only the preprocessing (val and test)."""
    from tf_keras.preprocessing.image import ImageDataGenerator

    preprocess = functools.partial(scale_bias, scale=settings["input_scale"], bias=settings["input_bias"])
    if not augment:
        return ImageDataGenerator(preprocessing_function=preprocess)
    kwargs = {k: v for k, v in settings.items() if k not in PREPROCESS_KEYS}
    return ImageDataGenerator(preprocessing_function=preprocess, **kwargs)


def one_hot(indices, n_classes):
    """One-hot float32 rows for integer class indices."""
    return np.eye(n_classes, dtype=np.float32)[np.asarray(indices, dtype=int)]


class ImageBatches(BatchSource):
    """Batches of (preprocessed images, one-hot labels) read from index rows through an ImageDataGenerator: a batch
    source for pipeline.train.inputs, and fixed views read batch by batch (`batches[i]`, epoch 0).

    Images are decoded with pipeline.data.images (upright RGB, bilinear resize), then, as in Keras's own
    iterators, `random_transform` (when augmenting) and `standardize` (which applies the backbone's scale and bias).
    `flip` mirrors every image (a fixed view for test-time augmentation and cached features); `oversample`
    repeats the smaller classes' images in every epoch up to the largest class's count. Each epoch's order and
    each batch's random transforms are functions of the seed, the epoch and the batch alone, so a resumed run or
    another worker draws what an unbroken one-process run would.
    """

    def __init__(self, rows, classes, size, generator, batch_size, augment=False, shuffle=False,
                 flip=False, seed=0, oversample=False):
        self.paths = [row["path"] for row in rows]
        self.size, self.generator, self.augment, self.flip = size, generator, augment, flip
        self.row_shape = (size, size, 3)
        super().__init__(class_indices(rows, classes), len(classes), batch_size, shuffle, seed, oversample)

    @property
    def thread_safe(self):
        """Whether batches may be read from several threads: not when augmenting, as Keras's `random_transform`
        seeds and draws from NumPy's global generator."""
        return not self.augment

    def images(self, i, epoch=0, positions=None):
        """Batch i of epoch `epoch` as float32 pixels 0-255 after augmentation, before preprocessing; with
        `positions`, only the images at those positions of the batch (transformed as in the whole batch)."""
        picked = self.picked(epoch, i)
        positions = np.arange(len(picked)) if positions is None else np.asarray(positions, dtype=int)
        batch = np.stack([load_array(self.paths[j], self.size) for j in picked[positions]]).astype(np.float32)
        if self.flip:
            batch = batch[:, :, ::-1, :]
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, i])
            seeds = [int(rng.integers(1 << 31)) for _ in picked]  # one per image of the whole batch, in order
            batch = np.stack([self.generator.random_transform(x, seed=seeds[k]) for x, k in zip(batch, positions)])
        return batch, self.labels[picked[positions]]

    def batch(self, epoch, i, positions=None):
        """Batch `i` of epoch `epoch`: (preprocessed images, one-hot labels); with `positions`, only those rows."""
        batch, labels = self.images(i, epoch, positions)
        batch = np.stack([self.generator.standardize(x) for x in batch])
        return batch, one_hot(labels, self.n_classes)


def split_batches(ingest_files, augment_files, split, size, batch_size, augment=False, shuffle=False,
                  flip=False, seed=0, oversample=False):
    """Batches of one split of ingest's index, through the generator saved by the augment stage."""
    from pipeline.fileio import read_json

    generator = make_generator(read_json(augment_files.settings), augment)
    return ImageBatches(ingest_files.read_index(split), ingest_files.read_classes(), size, generator,
                        batch_size, augment=augment, shuffle=shuffle, flip=flip, seed=seed, oversample=oversample)
