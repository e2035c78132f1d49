"""The "none of these" threshold: below it an app says it is not sure. Chosen on validation images by a stated
rule, and tabulated on the test images (and on photos of none of the classes, when given).

NumPy only. A score is higher for an image the model knows; the app compares the calibrated maximum class
probability, the `confidence` it reads from the model, with the threshold.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.confidence.calibration import softmax

TABLE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
SCORE = "the largest class probability after calibration (the model's confidence)"


def recommend(confidence, correct, keep):
    """The highest threshold that keeps at least the share `keep` of the correctly classified images (confidence at
    or above it): the confidence of the correct image at that quantile. None if no image is correct."""
    right = np.sort(np.asarray(confidence, dtype=np.float64)[np.asarray(correct, dtype=bool)])
    if not len(right):
        return None
    dropped = math.floor((1.0 - keep) * len(right) + 1e-9)
    return float(right[min(dropped, len(right) - 1)])


def rows(confidence, correct, thresholds, unknown_confidence=None):
    """One row per threshold: {"threshold", "kept" (share of the images at or above it), "kept_accuracy" (None if
    none kept), "right_kept" (share of the correct images kept), "unknown_rejected" (share of the unknown images
    below it; only when unknown_confidence is given)}."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    table = []
    for t in thresholds:
        kept = confidence >= t
        row = {"threshold": float(t), "kept": float(kept.mean()),
               "kept_accuracy": float(correct[kept].mean()) if kept.any() else None,
               "right_kept": float(kept[correct].mean()) if correct.any() else None}
        if unknown_confidence is not None:
            row["unknown_rejected"] = float((np.asarray(unknown_confidence) < t).mean())
        table.append(row)
    return table


def scores(logits, temperature):
    """The scores an image's logits give, each higher for an image the model knows: {"confidence": the largest
    calibrated probability, "max_logit": the largest logit, "energy": T * logsumexp(logits / T) (Liu et al., 2020,
    negated energy)}."""
    z = np.asarray(logits, dtype=np.float64)
    scaled = z / temperature
    top = scaled.max(axis=1)
    return {"confidence": softmax(z, temperature).max(axis=1), "max_logit": z.max(axis=1),
            "energy": temperature * (top + np.log(np.exp(scaled - top[:, None]).sum(axis=1)))}


def auroc(known, unknown):
    """The probability that a known image scores higher than an unknown one (ties count half): the area under the
    ROC curve of telling them apart by the score. NaN if either is empty."""
    known, unknown = np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)
    if not len(known) or not len(unknown):
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([known, unknown]))  # ties share their mean rank
    known_ranks = ranks[:len(known)].sum()
    return float((known_ranks - len(known) * (len(known) + 1) / 2) / (len(known) * len(unknown)))
