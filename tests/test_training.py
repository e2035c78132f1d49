"""training.fit: the best epoch is kept, the history has the learning rate, and the time budget stops training."""
import csv

import numpy as np

from pipeline import models, training
from pipeline.catalog import TrainFiles
from pipeline.config import FinetuneConfig, ModelConfig, TrainHeadConfig


def data(n=64, dim=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, dim)).astype(np.float32) + 3 * np.eye(classes, dim, dtype=np.float32)[y]
    return x, np.eye(classes, dtype=np.float32)[y]


def test_fit_writes_history_with_learning_rate_and_keeps_the_best(tmp_path):
    files = TrainFiles(tmp_path)
    head = models.build_head(ModelConfig(), 3, 8)
    section = FinetuneConfig(epochs=4, batch_size=16, learning_rate=0.01, patience=4)
    summary = training.fit(head, data(), data(seed=1), section, files, section.learning_rate, reduce_lr=True)
    rows = list(csv.DictReader(open(files.history)))
    assert len(rows) == summary["epochs_run"] == 4
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(rows[0])
    assert abs(float(rows[0]["lr"]) - 0.01) < 1e-9
    assert summary["val_accuracy"] == max(float(r["val_accuracy"]) for r in rows)
    assert files.curves.is_file() and files.summary.is_file() and not files.checkpoint.exists()


def test_time_budget_stops_after_the_epoch_that_crosses_it(tmp_path):
    head = models.build_head(ModelConfig(), 3, 8)
    section = TrainHeadConfig(epochs=50, batch_size=16, learning_rate=0.01, patience=50, max_minutes=1e-6)
    summary = training.fit(head, data(), data(seed=1), section, TrainFiles(tmp_path), section.learning_rate)
    assert summary["stopped_by_time_budget"] and summary["epochs_run"] == 1
