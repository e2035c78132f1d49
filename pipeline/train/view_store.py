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
size, so one key is always one computation. Worker processes that train together (the feature store's `group`, a
SharedWork) compute each missing entry together, each a share of its batches: on one machine the chief joins the
shares into the entry; across machines every worker receives the others' shares and stores the whole entry.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import code_deps, fileio
from pipeline.catalog import ViewFiles
from pipeline.data.augmentation import split_batches
from pipeline.train import distribute, models
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


class SharedWork:
    """Worker processes computing feature-store entries together: this one's `index` (0: the chief) of `count`, each
    computing a contiguous share of an entry's batches into `folder`/<entry>/part-<index>. How the shares meet is
    the subclass's: OneMachine (a folder all workers read) or AcrossMachines (sent through collective operations).
    Every worker calls the same methods at the same points, as for any collective operation."""

    def __init__(self, index, count, folder):
        self.index, self.count, self.folder = index, count, Path(folder) if folder is not None else None

    def share(self, n):
        """Worker `index`'s batches of `n`: a contiguous range, the shares in worker order."""
        return self.share_of(self.index, n)

    def share_of(self, index, n):
        """Worker `index`'s batches of `n`."""
        return range(n * index // self.count, n * (index + 1) // self.count)

    def agree(self, missing, n):
        """The outputs (indices of `n`) to compute, from those this worker's store lacks (`missing`)."""
        return missing

    def collect(self, parts, names, sizes):
        """Once this worker's share is in `parts`/part-<index> (files `names` of `sizes[k]` rows for worker k, and
        labels.npy): every worker's part folder in order, where this worker can read them, or None when this
        worker stores nothing."""
        raise NotImplementedError

    def finish(self, parts):
        """After the entries are stored: remove the shares."""
        raise NotImplementedError


class OneMachine(SharedWork):
    """Worker processes of one machine: the shares are written into the one `folder` they all read, `barrier`
    returns once every worker has called it, and the chief alone joins and stores the entries (the others read
    the chief's store)."""

    def __init__(self, index, count, folder, barrier: Callable[[], object]):
        super().__init__(index, count, folder)
        self.barrier = barrier

    def collect(self, parts, names, sizes):
        self.barrier()  # every share written
        return [parts / f"part-{k}" for k in range(self.count)] if self.index == 0 else None

    def finish(self, parts):
        self.barrier()  # the entries stored
        if self.index == 0:
            shutil.rmtree(parts, ignore_errors=True)


class AcrossMachines(SharedWork):
    """Worker processes with no folder in common (a TF_CONFIG cluster, each machine its own artifacts folder):
    each keeps its share in its own `folder`, `gather(array)` returns every worker's `array` (of one shape and
    dtype in all) stacked in worker order, and every worker receives the others' shares through it, block by
    block, and stores the whole entries in its own store."""

    def __init__(self, index, count, folder, gather: Callable[[np.ndarray], np.ndarray]):
        super().__init__(index, count, folder)
        self.gather = gather

    def agree(self, missing, n):
        """The outputs missing in any worker's store: all compute them, so that every worker can store them."""
        flags = np.zeros(n, np.int32)
        flags[list(missing)] = 1
        anywhere = self.gather(flags).any(axis=0)
        return [i for i in range(n) if anywhere[i]]

    def collect(self, parts, names, sizes):
        folders = [parts / f"part-{k}" for k in range(self.count)]
        mine = folders[self.index]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        if max(sizes) == 0:  # a split without images: every worker knows it, so none sends
            return [mine]
        t0 = time.monotonic()
        labels = np.load(mine / "labels.npy")
        gathered = self.gather(np.pad(labels, (0, max(sizes) - len(labels))))
        for k, folder in enumerate(folders):
            if k != self.index:
                np.save(folder / "labels.npy", gathered[k][:sizes[k]])
        received = sum(self._send(ArrayFile(mine / name), [folder / name for folder in folders], sizes)
                       for name in names)
        log.info("received the other %d workers' shares (%.0f MB) in %.1fs", self.count - 1, received / 1e6,
                 time.monotonic() - t0)
        return folders

    def _send(self, own, paths, sizes):
        """Every worker's rows of one output, CACHE_BATCH rows of each share at a time, into `paths` (own's
        excepted, already written). Returns the bytes received."""
        blank = np.zeros((CACHE_BATCH, *own.shape[1:]), own.dtype)
        with contextlib.ExitStack() as stack:
            writers = {k: stack.enter_context(ArrayWriter(path, own.dtype, (sizes[k], *own.shape[1:])))
                       for k, path in enumerate(paths) if k != self.index}
            for start in range(0, max(sizes), CACHE_BATCH):
                block = blank.copy()
                if start < len(own):
                    rows = own.block(start, min(start + CACHE_BATCH, len(own)))
                    block[:len(rows)] = rows
                gathered = self.gather(block)
                for k, writer in writers.items():
                    writer.append(gathered[k][:max(0, min(CACHE_BATCH, sizes[k] - start))])
        own.close()
        return sum(sizes[k] for k in writers) * own.row_bytes

    def finish(self, parts):
        shutil.rmtree(parts, ignore_errors=True)


def across_machines(chosen, store):
    """This process's AcrossMachines in the cluster of the MultiWorkerMirroredStrategy `chosen`, its shares kept in
    `store`'s scratch, or None with a single worker."""
    count = distribute.workers(chosen)
    if count < 2:
        return None
    return AcrossMachines(distribute.worker_index(chosen), count, store.shares,
                          lambda array: distribute.all_gather(chosen, array))


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
            group = getattr(self.store, "group", None)
            if group is not None:
                missing = group.agree(missing, len(outputs))
            for i, folder in enumerate(folders):
                if i not in missing:
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

                made = (self.store.make_several([keys[i] for i in missing], make) if group is None else
                        self._together(group, model, outputs, [keys[i] for i in missing], missing, view, batches))
                for i, folder in zip(missing, made):
                    folders[i] = folder
            for output, folder in zip(outputs, folders):
                found[output].append(ViewFiles(folder))
        return [(StackedArrays([ArrayFile(files.outputs) for files in found[output]]),
                 np.concatenate([np.load(files.labels) for files in found[output]])) for output in outputs]

    def _together(self, group, model, outputs, keys, missing, view, batches):
        """Compute the entries `keys` (of outputs `missing`) of `view` with the other workers of `group`: each computes
        its share of the batches; the shares are joined into the entries by the worker(s) that store them."""
        parts = group.folder / keys[0]
        mine = parts / f"part-{group.index}"
        mine.mkdir(parents=True, exist_ok=True)
        names = [f"output-{i}.npy" for i in missing]
        targets = [None] * len(outputs)
        for i, name in zip(missing, names):
            targets[i] = (mine / name, outputs[i].dtype)
        share = BatchRange(batches, group.share(len(batches)), CACHE_BATCH)
        np.save(mine / "labels.npy", write_view(model, f"{view.name} (share {group.index + 1}/{group.count})",
                                                share, targets))
        sizes = [len(BatchRange(batches, group.share_of(k, len(batches)), CACHE_BATCH).paths)
                 for k in range(group.count)]
        shares = group.collect(parts, names, sizes)
        if shares is not None:

            def join(made):
                for name, folder in zip(names, made):
                    files = ViewFiles(folder)
                    pieces = [ArrayFile(share / name) for share in shares]
                    with ArrayWriter(files.outputs, pieces[0].dtype,
                                     (sum(len(p) for p in pieces), *pieces[0].shape[1:])) as joined:
                        for piece in pieces:
                            for start in range(0, len(piece), CACHE_BATCH):
                                joined.append(piece.block(start, min(start + CACHE_BATCH, len(piece))))
                            piece.close()
                    np.save(files.labels, np.concatenate([np.load(share / "labels.npy") for share in shares]))

            self.store.make_several(keys, join)
        group.finish(parts)
        return [self.store.folder(key) for key in keys]
