"""Every artifact path, in one place.

Each stage writes into its own folder under the artifacts root. A stage's file names are defined here as
attributes of a small class bound to that folder, so the runner can bind the same names to a temporary
folder while the stage runs and swap it into place when the stage succeeds.
"""
from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.json"
RESOLVED_CONFIG = "config.yaml"


class StageFiles:
    """The files of one stage, bound to a folder."""

    def __init__(self, root):
        self.root = Path(root)

    @property
    def manifest(self):
        return self.root / MANIFEST

    @property
    def resolved_config(self):
        return self.root / RESOLVED_CONFIG


class IngestFiles(StageFiles):
    """ingest: the class list (the one source of labels), the image index, counts and the check report."""

    classes = property(lambda self: self.root / "classes.txt")
    index = property(lambda self: self.root / "index.csv")
    counts = property(lambda self: self.root / "counts.csv")
    report = property(lambda self: self.root / "ingest_report.json")


class AugmentFiles(StageFiles):
    """augment: the resolved ImageDataGenerator settings and a preview grid."""

    settings = property(lambda self: self.root / "augment.json")
    preview = property(lambda self: self.root / "preview.png")


class TrainFiles(StageFiles):
    """train-head and finetune: the trained Keras model, its history and curves."""

    model = property(lambda self: self.root / "model.h5")
    checkpoint = property(lambda self: self.root / "checkpoint.h5")
    history = property(lambda self: self.root / "history.csv")
    curves = property(lambda self: self.root / "curves.png")
    summary = property(lambda self: self.root / "training.json")

    def cache(self, name):
        """A file of cached activations while the stage trains on them (removed when it finishes)."""
        return self.root / f"cache-{name}.npy"


class EvaluateFiles(StageFiles):
    """evaluate: metrics, the per-image predictions, plots and a Markdown report."""

    metrics = property(lambda self: self.root / "metrics.json")
    predictions = property(lambda self: self.root / "predictions.csv")
    confusion = property(lambda self: self.root / "confusion.png")
    worst = property(lambda self: self.root / "worst.png")
    report = property(lambda self: self.root / "report.md")


class ExportFiles(StageFiles):
    """export: one file per format (named by the export config), the labels, the checks and the parity table."""

    labels = property(lambda self: self.root / "labels.txt")
    checks = property(lambda self: self.root / "export.json")
    parity = property(lambda self: self.root / "parity.md")

    def model(self, name, suffix):
        """The exported model file of one format."""
        return self.root / f"{name}{suffix}"


STAGE_FILES = {
    "ingest": IngestFiles,
    "augment": AugmentFiles,
    "train-head": TrainFiles,
    "finetune": TrainFiles,
    "evaluate": EvaluateFiles,
    "export": ExportFiles,
}


class Catalog:
    """The artifacts root and the folders beneath it."""

    def __init__(self, root="artifacts"):
        self.root = Path(root)

    def stage(self, name, root=None):
        """The files of stage `name`, in its own folder or in `root` if given."""
        return STAGE_FILES[name](root or self.root / name)

    @property
    def sources(self):
        """Where dataset archives are unpacked, one folder per archive content hash."""
        return self.root / "sources"

    def scratch(self, name):
        """The root for a stage's temporary folders while it runs."""
        return self.root / f".{name}.tmp"


def keras_home():
    """Keras's own cache folder (datasets/ and models/ beneath it): $KERAS_HOME, else ~/.keras."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
