"""Temperature scaling (Guo et al., 2017): one number T that divides the logits before the softmax, fitted on
held-out images by minimising their negative log-likelihood; and the measures of calibration it is judged by.

NumPy only: the logits come in as arrays, and pipeline.train.models puts T into the model itself.
"""
from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
# The search range of T: wide enough for any trained classifier. The NLL is convex in 1/T, which is searched.
TEMPERATURE_RANGE = (0.02, 50.0)
_INVERSE_RANGE = (1 / TEMPERATURE_RANGE[1], 1 / TEMPERATURE_RANGE[0])


def softmax(logits, temperature=1.0):
    """Class probabilities of `logits` (N, C) divided by `temperature`, computed in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits, labels, temperature=1.0):
    """The mean negative log-likelihood of the true classes `labels` (N,) under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def fit_temperature(logits, labels):
    """The temperature T in TEMPERATURE_RANGE that minimises the NLL of `labels` under softmax(logits / T).

    The NLL is convex in 1/T, so a bounded scalar search finds its one minimum. A model no better than chance
    has its minimum at the largest T (uniform probabilities), a perfect separable one at the smallest.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0:
        raise ValueError("no images to fit a temperature on")
    result = minimize_scalar(lambda inverse: nll(logits * inverse, labels), bounds=_INVERSE_RANGE,
                             method="bounded", options={"xatol": 1e-7})
    return float(1.0 / result.x)


def at_range_edge(temperature):
    """Whether a fitted temperature is at the edge of TEMPERATURE_RANGE (within 1%), where the search stopped."""
    low, high = TEMPERATURE_RANGE
    return temperature <= low * 1.01 or temperature >= high * 0.99


def reliability_bins(confidence, correct, bins=ECE_BINS):
    """Equal-width confidence bins over (0, 1]: a list of {"low", "high", "count", "confidence", "accuracy"}
    (the last two the bin's means; None for an empty bin). A confidence equal to a bin's upper edge is in it."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin k holds edges[k] < c <= edges[k+1]; a confidence of exactly 0 (impossible for a softmax) joins the first
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for k in range(bins):
        inside = index == k
        count = int(inside.sum())
        rows.append({"low": float(edges[k]), "high": float(edges[k + 1]), "count": count,
                     "confidence": float(confidence[inside].mean()) if count else None,
                     "accuracy": float(correct[inside].mean()) if count else None})
    return rows


def expected_calibration_error(confidence, correct, bins=ECE_BINS):
    """ECE: the image-weighted mean, over equal-width confidence bins, of |accuracy - mean confidence|."""
    rows = reliability_bins(confidence, correct, bins)
    total = sum(r["count"] for r in rows)
    if not total:
        return math.nan
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / total)


def summary(logits, labels, temperature=1.0):
    """The calibration measures of softmax(logits / temperature) against `labels`: {"nll", "ece",
    "mean_confidence", "accuracy", "bins"} (bins: reliability_bins)."""
    probabilities = softmax(logits, temperature)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    return {"nll": nll(logits, labels, temperature), "ece": expected_calibration_error(confidence, correct),
            "mean_confidence": float(confidence.mean()), "accuracy": float(correct.mean()),
            "bins": reliability_bins(confidence, correct)}
