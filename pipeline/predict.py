"""The `predict` command: top labels of photos from one exported file, through that format's own input path."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import fileio
from pipeline.catalog import Catalog
from pipeline.data.images import BadImage, images_under, load_array
from pipeline.errors import PipelineError
from pipeline.export import coreml_runtime
from pipeline.export.formats import FORMATS
from pipeline.export.meta import model_meta
from pipeline.export.parity import KERAS, keras_predictor
from pipeline.train import models

# Formats something on Linux can run, so `predict` can use them.
RUNNABLE = (KERAS, *[name for name, fmt in FORMATS.items() if fmt.runtime])


def image_files(path):
    """The image at `path`, or every image under the folder `path` (sorted); an error names what is wrong."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    found = images_under(path)
    if not found:
        raise PipelineError(f"{path}: no image files in this folder (looked for .jpg, .jpeg, .png, ... "
                            "in it and its subfolders)")
    return found


def recommended_threshold(format_name, cfg, artifacts):
    """The "none of these" threshold the files of `format_name` were measured with: the export stage's (export.json),
    or for the Keras model the evaluate stage's (metrics.json); None if there is none or the file is unreadable."""
    catalog = Catalog(artifacts)
    try:
        if format_name == KERAS:
            return fileio.read_json(catalog.stage("evaluate").metrics).get("confidence", {}).get("threshold")
        return fileio.read_json(catalog.stage("export").checks).get("confidence", {}).get("confidence_threshold")
    except (OSError, ValueError, AttributeError):
        return None


def load_predictor(format_name, cfg, artifacts):
    """A Predictor for the exported file of `format_name` in the artifacts folder (or the Keras model).

    A file that cannot be read is the loader's DamagedFile, a PipelineError naming the file, the reason and the fix.
    """
    catalog = Catalog(artifacts)
    ingest, export = catalog.stage("ingest"), catalog.stage("export")
    if format_name == KERAS:
        model_path = catalog.stage("evaluate").model  # the fine-tuned model, calibrated: the one that ships
        _require(model_path, "evaluate")
        return keras_predictor(models.load(model_path), model_meta(cfg.model, ingest.read_classes()))
    fmt = FORMATS[format_name]
    path = export.model(cfg.export.name, format_name)
    _require(path, "export", f" with '{format_name}' in export.formats")
    _require(export.labels, "export")
    labels = export.read_labels()
    if fmt.native and coreml_runtime.available():  # Core ML itself, on a Mac
        return coreml_runtime.load(path, labels)
    return fmt.exporter().load(path, labels)


def _require(path, stage, extra=""):
    if not Path(path).exists():
        raise PipelineError(f"{path} does not exist: run `python -m pipeline {stage}` (or `make all`){extra} first")


def top_labels(predictor, paths, top_k):
    """[(path, [(label, probability), ...top_k])] for each image, best first."""
    results = []
    for path in paths:
        try:
            pixels = load_array(path, predictor.image_size)[None].astype(np.float32)
        except (BadImage, OSError, ValueError) as exc:
            raise PipelineError(f"{path}: not an image this tool can read ({exc}); give a JPEG/PNG photo "
                                "or a folder of them") from exc
        probabilities = predictor.predict(pixels)[0]
        best = np.argsort(-probabilities)[:top_k]
        results.append((path, [(predictor.labels[i], float(probabilities[i])) for i in best]))
    return results


def format_results(results, threshold=None):
    """One line per image: its path, then label (probability) pairs; below `threshold` (the best probability under
    it), "not sure" and the best guesses."""
    lines = []
    for path, labels in results:
        guesses = ", ".join(f"{label} {p:.3f}" for label, p in labels)
        unsure = threshold is not None and labels and labels[0][1] < threshold
        lines.append(f"{path}: not sure (below {threshold:.3f}; best guesses: {guesses})" if unsure
                     else f"{path}: {guesses}")
    return "\n".join(lines)
