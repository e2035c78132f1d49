"""Frozen layers' outputs for fixed views of the images, kept in the feature store one view per entry, so every
stage and every run that needs the same numbers computes them once.

train-head trains on the backbone's pooled features of each training image's original and mirrored views; cached
fine-tuning trains on the activations at its cut point of those same views (and of augmented ones). Both come
from the same frozen layers over the same images, so train-head computes the cut point's activations in the
same forward pass as its features, and fine-tuning computes only the views it adds; a fine-tuning setting
changed later reuses all of them. An entry's key holds everything its numbers depend on: the code that
computes them, ingest's and augment's outputs (the images, splits and preprocessing), the model settings that
shape the backbone, the digest of the weights of the layers that compute it, the view (with its seed when it is
random) and the dtype. Every entry is computed in batches of CACHE_BATCH images, whatever the training batch
size, so one key is always one computation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipeline import code_deps, fileio
from pipeline.catalog import ViewFiles
from pipeline.data.augmentation import split_batches
from pipeline.train import models
from pipeline.train.activations import ArrayFile, StackedArrays, write_view

log = logging.getLogger("pipeline.train.view_store")

CACHE_BATCH = 32
"""Images per forward pass when computing stored outputs (independent of any training batch size)."""


@dataclass(frozen=True)
class View:
    """One fixed view of every image of a split: its name and its ImageBatches options (flip, augment, seed)."""

    name: str
    split: str
    options: dict = field(default_factory=dict)


def training_views(flip_view, augmented_views, seed):
    """The fixed views of each training image: the original, its mirror if asked, then the augmented views,
    each drawing its own random transforms (seeded by `seed` and the view's number, with or without the mirror)."""
    views = [View("original training images", "train")]
    if flip_view:
        views.append(View("mirrored training images", "train", {"flip": True}))
    views += [View(f"augmented view {k + 1} of the training images", "train",
                   {"augment": True, "seed": seed * 1000 + 2 + k}) for k in range(augmented_views)]
    return views


def split_view(split):
    """The one plain view of every image of `split`."""
    return View(f"{split} images", split)


@dataclass(frozen=True)
class Output:
    """One output of a frozen model: what it is (`the backbone's features`), the digest of the weights of the
    layers that compute it, and the dtype it is kept in."""

    name: str
    weights: str
    dtype: str = "float32"


def backbone_section(cfg):
    """The model settings that shape the frozen backbone's outputs (all but the head's)."""
    return {k: v for k, v in cfg.key_section("model").items() if k not in models.HEAD_ONLY}


def activations_output(cut, lower):
    """The stored output that is the activations at cut point `cut`, computed by the frozen layers `lower`."""
    # float16 halves their size; the layers above upcast them on input.
    return Output(f"the activations at {cut}", models.weights_digest(lower), "float16")


class ViewStore:
    """The feature store seen as (output, view) entries for one dataset and backbone configuration."""

    def __init__(self, store, upstream, model_section):
        """store: the FeatureStore; upstream: ingest's and augment's output digests ({stage: {file: SHA-256}});
        model_section: the model settings that shape the backbone (not the head's)."""
        self.store = store
        self.base = {"code": code_deps.source_digest(code_deps.closure([__name__])),
                     "upstream": {name: upstream[name] for name in ("ingest", "augment")},
                     "model": model_section, "batch": CACHE_BATCH}

    def key(self, output, view):
        """The store key of `output` of `view`."""
        return "view-" + fileio.sha256_json({**self.base, "output": [output.name, output.weights, output.dtype],
                                             "view": [view.split, sorted(view.options.items())]})[:32]

    def outputs(self, model, outputs, views, ingest, augment, size):
        """For each of `model`'s `outputs`: (StackedArrays of its rows for every view, view-major; class index of
        each row). Views already stored are read; the others are computed, every output in one pass."""
        found = {output: [] for output in outputs}
        for view in views:
            keys = [self.key(output, view) for output in outputs]
            folders = [self.store.get(key) for key in keys]
            missing = [i for i, folder in enumerate(folders) if folder is None]
            for i, folder in enumerate(folders):
                if folder is not None:
                    log.info("reusing %s of the %s computed by an earlier run", outputs[i].name, view.name)
            if missing:
                batches = split_batches(ingest, augment, view.split, size, CACHE_BATCH, **view.options)

                def make(made, batches=batches, missing=missing, view=view):
                    targets = [None] * len(outputs)
                    for i, folder in zip(missing, made):
                        targets[i] = (ViewFiles(folder).outputs, outputs[i].dtype)
                    labels = write_view(model, view.name, batches, targets)
                    for folder in made:
                        np.save(ViewFiles(folder).labels, labels)

                for i, folder in zip(missing, self.store.make_several([keys[i] for i in missing], make)):
                    folders[i] = folder
            for output, folder in zip(outputs, folders):
                found[output].append(ViewFiles(folder))
        return [(StackedArrays([ArrayFile(files.outputs) for files in found[output]]),
                 np.concatenate([np.load(files.labels) for files in found[output]])) for output in outputs]
