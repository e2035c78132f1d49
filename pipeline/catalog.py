"""Every artifact path, and the readers and writers of the files other stages read, in one place.

Each stage writes into its own folder under the artifacts root. A stage's file names are defined here as
attributes of a small class bound to that folder, so the runner can bind the same names to a temporary
folder while the stage runs and swap it into place when the stage succeeds.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline import fileio
from pipeline.export.formats import FORMATS

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

    def write_classes(self, classes):
        """Write the class labels, one per line, in output order."""
        fileio.write_lines(self.classes, classes)

    def read_classes(self):
        """The class labels written by ingest, in output order."""
        return [line for line in self.classes.read_text(encoding="utf-8").splitlines() if line]

    def write_index(self, columns, rows):
        """Write the image index: one row per image (path, label, split, ...), as CSV."""
        fileio.write_csv(self.index, columns, rows)

    def read_index(self, split=None):
        """The image index written by ingest: a list of rows (dicts with path, label, split), optionally of one split."""
        with open(self.index, newline="", encoding="utf-8") as f:
            return [row for row in csv.DictReader(f) if split is None or row["split"] == split]


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


class EvaluateFiles(StageFiles):
    """evaluate: the model that ships (the fine-tuned one, its logits divided by the fitted temperature), metrics,
    the per-image predictions, plots and a Markdown report."""

    model = property(lambda self: self.root / "model.h5")
    metrics = property(lambda self: self.root / "metrics.json")
    reliability = property(lambda self: self.root / "reliability.png")
    predictions = property(lambda self: self.root / "predictions.csv")
    confusion = property(lambda self: self.root / "confusion.png")
    worst = property(lambda self: self.root / "worst.png")
    report = property(lambda self: self.root / "report.md")
    report_html = property(lambda self: self.root / "report.html")  # the same, self-contained (images embedded)


class ExportFiles(StageFiles):
    """export: one file per format (named by the export config), the labels, the checks and the parity table."""

    labels = property(lambda self: self.root / "labels.txt")
    checks = property(lambda self: self.root / "export.json")
    parity = property(lambda self: self.root / "parity.md")

    def model(self, name, format_name):
        """The exported file of format `format_name` (a key of pipeline.export.formats.FORMATS) for model `name`."""
        return self.root / f"{name}{FORMATS[format_name].suffix}"

    def write_labels(self, labels):
        """Write labels.txt, shipped beside the exported files (one label per line, in output order)."""
        fileio.write_lines(self.labels, labels)

    def read_labels(self):
        """The labels shipped beside the exported files."""
        return self.labels.read_text(encoding="utf-8").splitlines()


class SweepFiles:
    """A sweep's folder: one artifacts folder per combination, the results table, the curves and the best config."""

    def __init__(self, root):
        self.root = Path(root)

    table = property(lambda self: self.root / "sweep.csv")
    curves = property(lambda self: self.root / "sweep.png")
    best_config = property(lambda self: self.root / "best.yaml")

    def run(self, number, slug):
        """The artifacts folder of combination `number` (from 1), named also by `slug`, its values in short."""
        return self.root / "runs" / f"{number:02d}-{slug}"


class ViewFiles:
    """A feature store entry of one frozen output for one view of a split (pipeline.train.view_store)."""

    def __init__(self, root):
        self.root = Path(root)

    outputs = property(lambda self: self.root / "outputs.npy")
    """The (rows, ...) array: one row per image of the split, in its index's order."""
    labels = property(lambda self: self.root / "labels.npy")
    """The class index of each row."""


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

    @property
    def feature_store(self):
        """Where computed features are kept between runs, one folder per key (pipeline.cache.feature_store)."""
        return self.root / "feature-store"

    @property
    def sweep(self):
        """The files of a sweep run on this artifacts folder."""
        return SweepFiles(self.root / "sweep")

    def scratch(self, name):
        """The root for a stage's temporary folders while it runs."""
        return self.root / f".{name}.tmp"

    @property
    def temp(self):
        """The system temporary folder of a run's processes (converters write there), so nothing lands outside."""
        return self.root / ".tmp"

    def backup(self, name, key):
        """Where stage `name` keeps what it needs to go on after a kill (a training stage: the state after its last
        finished epoch), for its cache key's digest `key`; removed when the stage completes."""
        return self.backups_root / f"{name}-{key}"

    def backups(self, name):
        """The backup folders stage `name` has, for any key."""
        return sorted(self.backups_root.glob(f"{name}-*")) if self.backups_root.is_dir() else []

    backups_root = property(lambda self: self.root / ".resume")
    """The folder of the stages' backup folders."""

    def leftovers(self, stage_names):
        """The temporary folders a killed run may have left: the stages' scratch roots, the run's temporary folder
        and half-unpacked archives; remove them only while holding the folder's lock."""
        unpacking = sorted(self.sources.glob("*.tmp")) if self.sources.is_dir() else []
        return [*(self.scratch(name) for name in stage_names), self.temp, *unpacking]
