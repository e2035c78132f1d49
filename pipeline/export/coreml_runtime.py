"""Core ML itself: running an exported `.mlmodel` or `.mlpackage` through coremltools' `MLModel.predict`.

Core ML exists only on macOS; there the parity table and `verify` get a row per Core ML file computed by the
real framework (with its batch-1 latency) beside the NumPy checker's, and `predict` uses it. Elsewhere these
rows are absent and the table says why.
"""
from __future__ import annotations

import sys

import numpy as np

from pipeline.checkers.kernels import DamagedFile
from pipeline.checkers.predictor import Predictor

TITLE = "Core ML framework (coremltools MLModel.predict, CPU and Neural Engine)"
ABSENT = "Core ML itself (MLModel.predict) runs only on macOS, so its rows are absent on this machine"


def available():
    """Whether Core ML can run models here (macOS)."""
    return sys.platform == "darwin"


def load(path, labels, input_name="image", output_name="labelProbability"):
    """A Predictor that runs the file through Core ML, one image per call, probabilities in `labels` order; a file
    Core ML cannot read is a DamagedFile."""
    import coremltools as ct
    from google.protobuf.message import DecodeError
    from PIL import Image

    try:
        model = ct.models.MLModel(str(path))
    except (DecodeError, OSError, RuntimeError) as error:  # RuntimeError: Core ML could not read or compile it
        raise DamagedFile.reading(path, "Core ML model", error) from error
    image = model.get_spec().description.input[0].type.imageType

    def predict(pixels):
        rows = []
        for image in np.asarray(pixels):
            picture = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")
            scores = model.predict({input_name: picture})[output_name]
            missing = [label for label in labels if label not in scores]
            if missing:
                from pipeline.errors import ExportError

                raise ExportError(f"{path}: Core ML's output has no probability for {missing}")
            rows.append([float(scores[label]) for label in labels])
        return np.array(rows, dtype=np.float64)

    return Predictor(labels=list(labels), image_size=int(image.width), predict=predict)
