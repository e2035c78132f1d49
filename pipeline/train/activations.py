"""Outputs of a frozen model for fixed views of the images, cached in an `.npy` file and read back in batches.

Cached training (the head on pooled features, the upper blocks on a cut point's activations) computes these
once and trains on them for many epochs. They are written batch by batch and read back row by row with
plain file writes and reads, never mapped (a mapped file's pages count as the process's memory once touched),
so memory holds one batch at a time however large the dataset grows.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import numpy as np

from pipeline.data.augmentation import one_hot, split_batches
from pipeline.data.batch_source import BatchSource
from pipeline.progress import Progress

log = logging.getLogger("pipeline.train.activations")
_OPENING = threading.Lock()


def view_specs(flip_view, augmented_views):
    """The fixed views of each training image that cached training uses: (name, ImageBatches options)."""
    views = [("original", {})]
    if flip_view:
        views.append(("mirrored", {"flip": True}))
    views += [(f"augmented view {k + 1}", {"augment": True}) for k in range(augmented_views)]
    return views


class ArrayFile:
    """A 2+-dimensional `.npy` file whose rows are read on demand (never mapped or loaded whole)."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = None

    def __len__(self):
        return self.shape[0]

    @property
    def nbytes(self):
        """The size of the array's data in bytes."""
        return self.shape[0] * self.row_bytes

    def first(self, n):
        """The same file seen as its first `n` rows only."""
        if not 0 <= n <= self.shape[0]:
            raise ValueError(f"{self.path} has {self.shape[0]} rows, not {n}")
        part = ArrayFile.__new__(ArrayFile)
        part.__dict__.update(self.__dict__, shape=(n, *self.shape[1:]), _fd=None)
        return part

    def _open(self):
        with _OPENING:  # tf.data may read batches from several threads at once
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def block(self, start, stop):
        """Rows `start` .. `stop - 1` as one array, read in one go."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"{self.path}: rows {start}..{stop} of {self.shape[0]}")
        size = (stop - start) * self.row_bytes
        data = os.pread(self._open(), size, self.offset + start * self.row_bytes)
        if len(data) != size:
            raise ValueError(f"{self.path} is shorter than its header says ({self.shape[0]} rows): remove it")
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:]).copy()

    def rows(self, indices):
        """The rows at `indices`, in that order, as one array."""
        self._open()
        out = np.empty((len(indices), *self.shape[1:]), self.dtype)
        flat = out.reshape(len(indices), -1).view(np.uint8)
        for k, i in enumerate(indices):
            flat[k] = np.frombuffer(os.pread(self._fd, self.row_bytes, self.offset + int(i) * self.row_bytes),
                                    np.uint8)
        return out

    def close(self):
        """Close the file handle (reads reopen it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self):
        """Close the file and delete it (a stage's cache, once trained on)."""
        self.close()
        os.unlink(self.path)


class ArrayWriter:
    """A 2+-dimensional `.npy` file of a known shape written in blocks of rows, in order, with plain file writes.

    Use as a context manager: leaving it with fewer rows written than the shape says is an error. A file left
    short by a crash has a header promising rows that are not there (ArrayFile.block reports it); the feature
    store publishes an entry's files only once they are closed whole.
    """

    def __init__(self, path, dtype, shape):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(int(n) for n in shape)
        self.written = 0
        self._file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self._file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                          "fortran_order": False, "shape": self.shape})

    def append(self, rows):
        """Write `rows` (converted to the file's dtype) after the rows written so far."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.written + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows of shape {rows.shape} do not fit after {self.written} of "
                             f"{self.shape}")
        self._file.write(rows.data)
        self.written += len(rows)

    def close(self):
        """Close the file; an error if fewer rows were written than its shape says."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.written != self.shape[0]:
            raise ValueError(f"{self.path}: {self.written} of {self.shape[0]} rows written")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if error is None:
            self.close()
        elif self._file is not None:
            self._file.close()
            self._file = None


class StackedArrays:
    """ArrayFiles of one row shape and dtype seen as one array: the first's rows, then the second's, and so on."""

    def __init__(self, files):
        if not files or len({(f.shape[1:], f.dtype) for f in files}) != 1:
            raise ValueError("stacked arrays need one or more files of one row shape and dtype: "
                             + ", ".join(f"{f.path} {f.shape} {f.dtype}" for f in files))
        self.files = list(files)
        self.starts = np.cumsum([0] + [len(f) for f in self.files])
        self.shape, self.dtype = (int(self.starts[-1]), *self.files[0].shape[1:]), self.files[0].dtype
        self.path = self.files[0].path

    def __len__(self):
        return self.shape[0]

    @property
    def nbytes(self):
        """The size of the arrays' data in bytes."""
        return sum(f.nbytes for f in self.files)

    def rows(self, indices):
        """The rows at `indices` (over all the files), in that order, as one array."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row {indices.max() if indices.max() >= len(self) else indices.min()} of {len(self)}")
        out = np.empty((len(indices), *self.shape[1:]), self.dtype)
        which = np.searchsorted(self.starts, indices, side="right") - 1
        for k, f in enumerate(self.files):
            picked = np.flatnonzero(which == k)
            if picked.size:
                out[picked] = f.rows(indices[picked] - self.starts[k])
        return out

    def close(self):
        """Close every file's handle."""
        for f in self.files:
            f.close()


def _forward(model, name, batches):
    """Yield ([each of `model`'s outputs as an array], class indices) batch by batch, with progress and a log line."""
    t0 = time.monotonic()
    progress = Progress(f"computing {name}", len(batches.paths), unit="images")
    for i in range(len(batches)):
        images, onehot = batches[i]
        outputs = model(images, training=False)
        outputs = [o.numpy() for o in outputs] if isinstance(outputs, (list, tuple)) else [outputs.numpy()]
        yield outputs, onehot.argmax(axis=1)
        progress.advance(len(images))
    progress.close()
    seconds = time.monotonic() - t0
    log.info("computed %s (%d images) in %.0fs, %.1f images/s", name, len(batches.paths), seconds,
             len(batches.paths) / max(seconds, 1e-9))


def _output_shapes(model):
    shapes = model.output_shape
    return shapes if isinstance(shapes, list) else [shapes]


def write_outputs(model, batch_sources, path, dtype):
    """Run `model` over every batch of every source and write the outputs, in order, to the `.npy` at `path`.

    `batch_sources` is a list of (name, ImageBatches). Returns an ArrayFile and the class index of each row.
    """
    total = sum(len(batches.paths) for _, batches in batch_sources)
    labels = []
    with ArrayWriter(path, dtype, (total, *_output_shapes(model)[0][1:])) as array:
        for name, batches in batch_sources:
            for (out, *_), classes in _forward(model, name, batches):
                array.append(out)
                labels.append(classes)
    return ArrayFile(path), np.concatenate(labels)


def write_view(model, name, batches, targets):
    """Run `model` over `batches` once and write each of its outputs to its target.

    targets: one per model output, (path of the `.npy` to write, dtype), or None for an output not kept.
    Returns the class index of each row.
    """
    labels = []
    with contextlib.ExitStack() as stack:
        arrays = [None if target is None else
                  stack.enter_context(ArrayWriter(target[0], target[1], (len(batches.paths), *shape[1:])))
                  for target, shape in zip(targets, _output_shapes(model))]
        for outputs, classes in _forward(model, name, batches):
            for array, out in zip(arrays, outputs):
                if array is not None:
                    array.append(out)
            labels.append(classes)
    return np.concatenate(labels) if labels else np.zeros(0, np.int64)


def cache_views(model, ingest_files, augment_files, size, batch_size, views, seed, path, dtype="float32"):
    """`model`'s outputs for every view of every training image, in a file; returns (ArrayFile, class indices).

    Each augmented view draws its own random transforms (seeded by `seed` and its position).
    """
    sources = [(name, split_batches(ingest_files, augment_files, "train", size, batch_size, seed=seed * 1000 + k,
                                    **options)) for k, (name, options) in enumerate(views)]
    return write_outputs(model, sources, path, dtype)


def cache_split(model, ingest_files, augment_files, split, size, batch_size, path, dtype="float32"):
    """`model`'s outputs for every image of one split, in a file; returns (ArrayFile, class indices)."""
    batches = split_batches(ingest_files, augment_files, split, size, batch_size)
    return write_outputs(model, [(f"{split} images", batches)], path, dtype)


class CachedBatches(BatchSource):
    """Batches of (cached rows as float32, one-hot labels) from an ArrayFile, in an order drawn afresh each epoch if
    asked: a batch source (pipeline.data.batch_source).

    The rows of a views cache are view-major (all originals, then all mirrors, ...). With `views_per_epoch`, each
    epoch takes that many distinct views of every image, drawn afresh per image and epoch. With `oversample`, the
    smaller classes' rows are repeated in every epoch up to the largest class's count.
    """

    def __init__(self, array, labels, n_classes, batch_size, shuffle=False, seed=0, n_views=1,
                 views_per_epoch=None, oversample=False):
        if len(array) % n_views:
            raise ValueError(f"{array.path}: {len(array)} rows do not divide into {n_views} views")
        self.array, self.row_shape = array, tuple(array.shape[1:])
        self.n_views, self.views_per_epoch = n_views, views_per_epoch or n_views
        super().__init__(labels, n_classes, batch_size, shuffle, seed, oversample)

    def _rows(self, rng):
        """All rows, or `views_per_epoch` distinct views of each image drawn with `rng`."""
        if self.views_per_epoch == self.n_views:
            return np.arange(len(self.array))
        n_images = len(self.array) // self.n_views
        picks = np.argsort(rng.random((n_images, self.n_views)), axis=1)[:, :self.views_per_epoch]
        return (picks * n_images + np.arange(n_images)[:, None]).ravel()

    def batch(self, epoch, i, positions=None):
        """Batch `i` of epoch `epoch`: (rows as float32, one-hot labels); with `positions`, only those rows."""
        # Reading in file order is faster; the batch's composition, not its order, is what shuffling sets.
        picked = np.sort(self.picked(epoch, i))
        if positions is not None:
            picked = picked[np.asarray(positions, dtype=int)]
        return self.array.rows(picked).astype(np.float32), one_hot(self.labels[picked], self.n_classes)
