"""What every loaded model is to the checks: a `Predictor`, raw RGB pixels in, probabilities in label order out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.errors import ExportError


@dataclass(frozen=True)
class Predictor:
    """A loaded exported model: raw RGB pixels (N, size, size, 3, 0-255) in, probabilities in `labels` order out.

    labels: the class labels as the file itself carries them (or as shipped beside it).
    """

    labels: list
    image_size: int
    predict: Callable


def in_label_order(probabilities, labels, wanted):
    """Probability columns reordered from `labels` (the file's order) to `wanted`; a missing label is an error."""
    missing = [label for label in wanted if label not in labels]
    if missing or len(labels) != len(wanted):
        raise ExportError(f"the model's labels {list(labels)} are not the classes {list(wanted)}")
    return np.asarray(probabilities)[:, [list(labels).index(label) for label in wanted]]
