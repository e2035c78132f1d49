"""Bench helper: how fast training's input reads cached activations for fine-tuning.

Usage: PYTHONPATH=. python bench/input_rate.py ARTIFACTS [--batch 256] [--batches 100] [--replicas R]
Reads the largest activations entries of ARTIFACTS's feature store (the training views' cached activations) as
CachedBatches does for fine-tuning, shuffled, in batches of --batch rows (the global batch: 8 replicas of 32 by
default), twice (the first pass warms the page cache), and prints rows/s and MB/s of the second pass as JSON:
`direct`, batch after batch in one thread; `dataset`, through training's tf.data input (pipeline.train.inputs:
each batch cut into --replicas parts, read ahead in parallel), as one input pipeline feeding every replica.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.catalog import ViewFiles
from pipeline.train.activations import ArrayFile, CachedBatches, StackedArrays


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=8)
    args = parser.parse_args()
    entries = [ViewFiles(p) for p in (args.artifacts / "feature-store").glob("view-*")]
    shapes = {e.root: np.load(e.outputs, mmap_mode="r").shape for e in entries}
    activations = [e for e in entries if len(shapes[e.root]) == 4]
    biggest = max(shapes[e.root][0] for e in activations)
    views = [e for e in activations if shapes[e.root][0] == biggest]  # the training views (val is smaller)
    array = StackedArrays([ArrayFile(e.outputs) for e in views])
    labels = np.concatenate([np.load(e.labels) for e in views])
    source = CachedBatches(array, labels, int(labels.max()) + 1, args.batch, shuffle=True, seed=0, n_views=len(views))
    count = min(args.batches, len(source))
    row_mb = np.prod(shapes[views[0].root][1:]) * np.load(views[0].outputs, mmap_mode="r").dtype.itemsize / 1e6
    result = {"views": len(views), "row_shape": list(shapes[views[0].root][1:]), "batch": args.batch}
    for way in ("direct", "dataset"):
        for epoch in (0, 1):
            t0 = time.monotonic()
            rows = _read(way, source, epoch, count, args.replicas)
            seconds = time.monotonic() - t0
        result[way] = {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
                       "mb_per_s_read": round(rows * row_mb / seconds)}
    print(json.dumps(result))


def _read(way, source, epoch, count, replicas):
    """Rows read from the first `count` batches of `epoch`, one way or the other."""
    if way == "direct":
        return sum(len(source.batch(epoch, i)[0]) for i in range(count))
    from pipeline.train import inputs

    parts = inputs.dataset(source, epoch, epoch + 1, replicas=replicas).take(count * replicas)
    return sum(int(element[0].shape[0]) for element in parts)  # (inputs, labels[, weights])


if __name__ == "__main__":
    main()
