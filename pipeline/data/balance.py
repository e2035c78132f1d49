"""Class imbalance: loss weights inversely proportional to class counts, and oversampling of smaller classes."""
from __future__ import annotations

import numpy as np


def class_weights(labels, n_classes):
    """{class index: weight} with weight = n_samples / (n_classes * count), scikit-learn's "balanced".

    A class absent from `labels` gets weight 1 (nothing to weigh).
    """
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes)
    total = counts.sum()
    return {c: float(total / (n_classes * counts[c])) if counts[c] else 1.0 for c in range(n_classes)}


def oversample(indices, labels, rng):
    """`indices` with every class's entries repeated up to the largest class's count.

    labels: the class of each entry of `indices`. A class of n entries when the largest has m appears m // n
    times in full plus m % n of its entries drawn at random, so each epoch sees every class about equally.
    """
    indices, labels = np.asarray(indices), np.asarray(labels)
    if len(indices) == 0:
        return indices
    classes, counts = np.unique(labels, return_counts=True)
    largest = counts.max()
    parts = []
    for c, n in zip(classes, counts):
        own = indices[labels == c]
        parts += [own] * (largest // n) + [rng.choice(own, largest % n, replace=False)]
    return np.concatenate(parts)
