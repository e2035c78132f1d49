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
size, so one key is always one computation. Worker processes of one machine that train together (the feature
store's `group`, a SharedWork) compute each missing entry together, each a share of its batches, which the chief
joins into the entry.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import code_deps, fileio
from pipeline.catalog import ViewFiles
from pipeline.data.augmentation import split_batches
from pipeline.train import models
from pipeline.train.activations import ArrayFile, ArrayWriter, StackedArrays, write_view

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


@dataclass
class SharedWork:
    """Worker processes on one machine computing feature-store entries together: this one's `index` (0: the chief,
    which alone writes the store) of `count`, the `folder` they share for their parts, and `barrier`, which returns
    once every worker has called it."""

    index: int
    count: int
    folder: Path
    barrier: Callable[[], object]

    def share(self, n):
        """This worker's batches of `n`: a contiguous range, the shares in worker order."""
        return range(n * self.index // self.count, n * (self.index + 1) // self.count)


class BatchRange:
    """The batches `batch_numbers` (a range) of `batches` (of `batch_size` images), as activations.write_view reads."""

    def __init__(self, batches, batch_numbers, batch_size):
        self.batches, self.numbers = batches, batch_numbers
        start, stop = batch_numbers.start * batch_size, batch_numbers.stop * batch_size
        self.paths = batches.paths[start:stop] if len(batch_numbers) else []

    def __len__(self):
        return len(self.numbers)

    def __getitem__(self, i):
        return self.batches[self.numbers[i]]


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
                group = getattr(self.store, "group", None)

                def make(made, batches=batches, missing=missing, view=view):
                    targets = [None] * len(outputs)
                    for i, folder in zip(missing, made):
                        targets[i] = (ViewFiles(folder).outputs, outputs[i].dtype)
                    labels = write_view(model, view.name, batches, targets)
                    for folder in made:
                        np.save(ViewFiles(folder).labels, labels)

                made = (self.store.make_several([keys[i] for i in missing], make) if group is None else
                        self._together(group, model, outputs, [keys[i] for i in missing], missing, view, batches))
                for i, folder in zip(missing, made):
                    folders[i] = folder
            for output, folder in zip(outputs, folders):
                found[output].append(ViewFiles(folder))
        return [(StackedArrays([ArrayFile(files.outputs) for files in found[output]]),
                 np.concatenate([np.load(files.labels) for files in found[output]])) for output in outputs]

    def _together(self, group, model, outputs, keys, missing, view, batches):
        """Compute the entries `keys` (of outputs `missing`) of `view` with the other workers of `group`: each writes
        its share of the batches into the shared folder; the chief joins the shares into the entries."""
        parts = group.folder / keys[0]
        mine = parts / f"part-{group.index}"
        mine.mkdir(parents=True, exist_ok=True)
        targets = [None] * len(outputs)
        for i in missing:
            targets[i] = (mine / f"output-{i}.npy", outputs[i].dtype)
        share = BatchRange(batches, group.share(len(batches)), CACHE_BATCH)
        np.save(mine / "labels.npy", write_view(model, f"{view.name} (share {group.index + 1}/{group.count})",
                                                share, targets))
        group.barrier()  # every share written
        if group.index == 0:
            shares = [parts / f"part-{k}" for k in range(group.count)]

            def join(made):
                for i, folder in zip(missing, made):
                    files = ViewFiles(folder)
                    pieces = [ArrayFile(share / f"output-{i}.npy") for share in shares]
                    with ArrayWriter(files.outputs, pieces[0].dtype,
                                     (sum(len(p) for p in pieces), *pieces[0].shape[1:])) as joined:
                        for piece in pieces:
                            for start in range(0, len(piece), CACHE_BATCH):
                                joined.append(piece.block(start, min(start + CACHE_BATCH, len(piece))))
                            piece.close()
                    np.save(files.labels, np.concatenate([np.load(share / "labels.npy") for share in shares]))

            self.store.make_several(keys, join)
        group.barrier()  # the entries stored
        if group.index == 0:
            shutil.rmtree(parts, ignore_errors=True)
        return [self.store.folder(key) for key in keys]
