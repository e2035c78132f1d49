"""The label map: each image's class as its index in the class list, the output order of every model."""
from __future__ import annotations

import numpy as np

from pipeline.errors import DataError


def class_indices(rows, classes):
    """Each row's class as its index in `classes` (the output order of every model); an unknown label is an error."""
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted({row["label"] for row in rows} - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not in the class list {list(classes)}: rerun ingest")
    return np.array([index[row["label"]] for row in rows], dtype=int)
