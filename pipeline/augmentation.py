"""Keras ImageDataGenerator settings and the batches that feed the network from ingest's index."""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from pipeline.backbones import BACKBONES
from pipeline.images import load_array

PREPROCESS_KEY = "preprocessing_function"

log = logging.getLogger("pipeline.augmentation")


def generator_settings(aug_cfg, backbone_name):
    """The ImageDataGenerator keyword arguments for training images, with preprocess_input named."""
    settings = dataclasses.asdict(aug_cfg)
    settings.pop("preview_images")
    settings[PREPROCESS_KEY] = BACKBONES[backbone_name].preprocess_module + ".preprocess_input"
    return settings


def make_generator(settings, augment=True):
    """An ImageDataGenerator from saved settings; without `augment`, only preprocess_input (val and test)."""
    import importlib

    from tf_keras.preprocessing.image import ImageDataGenerator

    module, _, func = settings[PREPROCESS_KEY].rpartition(".")
    preprocess = getattr(importlib.import_module(module), func)
    if not augment:
        return ImageDataGenerator(preprocessing_function=preprocess)
    kwargs = {k: v for k, v in settings.items() if k != PREPROCESS_KEY}
    return ImageDataGenerator(preprocessing_function=preprocess, **kwargs)


def one_hot(indices, n_classes):
    """One-hot float32 rows for integer class indices."""
    return np.eye(n_classes, dtype=np.float32)[np.asarray(indices, dtype=int)]


def _sequence_base():
    import tf_keras as keras

    return keras.utils.Sequence


class ImageBatches(_sequence_base()):
    """Batches of (preprocessed images, one-hot labels) read from index rows through an ImageDataGenerator.

    Images are decoded with pipeline.images (upright RGB, bilinear resize), then, as in Keras's own
    iterators, `random_transform` (when augmenting) and `standardize` (which applies preprocess_input).
    `flip` mirrors every image (a fixed view for test-time augmentation and cached features).
    """

    def __init__(self, rows, classes, size, generator, batch_size, augment=False, shuffle=False,
                 flip=False, seed=0):
        super().__init__()
        self.paths = [row["path"] for row in rows]
        index = {label: i for i, label in enumerate(classes)}
        self.labels = np.array([index[row["label"]] for row in rows], dtype=int)
        self.n_classes = len(classes)
        self.size, self.generator, self.batch_size = size, generator, batch_size
        self.augment, self.shuffle, self.flip = augment, shuffle, flip
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(self.paths))
        if shuffle:
            self.rng.shuffle(self.order)

    def __len__(self):
        return math.ceil(len(self.paths) / self.batch_size)

    def images(self, i):
        """Batch i as float32 pixels 0-255 after augmentation, before preprocessing."""
        picked = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        batch = np.stack([load_array(self.paths[j], self.size) for j in picked]).astype(np.float32)
        if self.flip:
            batch = batch[:, :, ::-1, :]
        if self.augment:
            batch = np.stack([self.generator.random_transform(x, seed=int(self.rng.integers(1 << 31)))
                              for x in batch])
        return batch, self.labels[picked]

    def __getitem__(self, i):
        batch, labels = self.images(i)
        batch = np.stack([self.generator.standardize(x) for x in batch])
        return batch, one_hot(labels, self.n_classes)

    def on_epoch_end(self):
        if self.shuffle:
            self.rng.shuffle(self.order)


def split_batches(ingest_files, augment_files, split, size, batch_size, augment=False, shuffle=False,
                  flip=False, seed=0):
    """Batches of one split of ingest's index, through the generator saved by the augment stage."""
    from pipeline.fileio import read_json
    from pipeline.stages.ingest import read_classes, read_index

    generator = make_generator(read_json(augment_files.settings), augment)
    return ImageBatches(read_index(ingest_files, split), read_classes(ingest_files), size, generator,
                        batch_size, augment=augment, shuffle=shuffle, flip=flip, seed=seed)


def view_specs(flip_view, augmented_views):
    """The fixed views of each training image that cached training uses: (name, ImageBatches options)."""
    views = [("original", {})]
    if flip_view:
        views.append(("mirrored", {"flip": True}))
    views += [(f"augmented view {k + 1}", {"augment": True}) for k in range(augmented_views)]
    return views


def predict_views(model, ingest_files, augment_files, size, batch_size, views, seed, dtype="float32"):
    """`model`'s outputs for every view of every training image, concatenated, with their class indices.

    Each augmented view draws its own random transforms (seeded by `seed` and its position).
    """
    from pipeline.training import (
        keras_verbose,  # training imports plotting; keep it off this module's import
    )

    outputs, labels = [], []
    for k, (name, options) in enumerate(views):
        batches = split_batches(ingest_files, augment_files, "train", size, batch_size, seed=seed * 1000 + k,
                                **options)
        t0 = time.monotonic()
        outputs.append(model.predict(batches, verbose=keras_verbose(predict=True)).astype(dtype))
        seconds = time.monotonic() - t0
        log.info("computed %s of %d training images in %.0fs (%.1f images/s)", name, len(outputs[-1]), seconds,
                 len(outputs[-1]) / max(seconds, 1e-9))
        labels.append(batches.labels)
    return np.concatenate(outputs), np.concatenate(labels)
