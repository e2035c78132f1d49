"""training.fit: the best epoch is kept, the history has the learning rate, schedules and label smoothing take
effect, and the time budget stops training."""
import csv
import math

import numpy as np
import pytest

from pipeline.catalog import TrainFiles
from pipeline.config import FinetuneConfig, ModelConfig, TrainHeadConfig
from pipeline.train import models, training


def data(n=64, dim=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, dim)).astype(np.float32) + 3 * np.eye(classes, dim, dtype=np.float32)[y]
    return x, np.eye(classes, dtype=np.float32)[y]


def test_fit_writes_history_with_learning_rate_and_keeps_the_best(tmp_path):
    files = TrainFiles(tmp_path)
    head = models.build_head(ModelConfig(), 3, 8)
    section = FinetuneConfig(epochs=4, batch_size=16, learning_rate=0.01, patience=4)
    summary = training.fit(head, data(), data(seed=1), section, files)
    rows = list(csv.DictReader(open(files.history)))
    assert len(rows) == summary["epochs_run"] == 4
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(rows[0])
    assert abs(float(rows[0]["lr"]) - 0.01) < 1e-9
    assert summary["val_accuracy"] == max(float(r["val_accuracy"]) for r in rows)
    assert files.curves.is_file() and files.summary.is_file() and not files.checkpoint.exists()


def test_a_second_fit_that_learns_the_same_writes_the_same_files(tmp_path):
    """Timings stay out of the files, so the stages below a rerun that learnt the same stay fresh."""
    section = FinetuneConfig(epochs=2, batch_size=16, learning_rate=0.01, seed=3)
    written = []
    for run in ("first", "second"):
        files = TrainFiles(tmp_path / run)
        files.root.mkdir()
        training.seed_everything(3)
        summary = training.fit(models.build_head(ModelConfig(), 3, 8), data(), data(seed=1), section, files)
        assert summary["fit_seconds"] > 0
        written.append({name: (files.root / name).read_bytes() for name in (files.summary.name, files.history.name)})
    assert written[0] == written[1]


def test_time_budget_stops_before_an_epoch_that_would_end_after_it(monkeypatch):
    from types import SimpleNamespace

    import tensorflow as tf

    clock = iter([0.0, 0.0, 100.0, 100.0, 210.0])  # start; epoch 1 from 0 to 100 s; epoch 2 from 100 to 210 s
    monkeypatch.setattr(training.time, "monotonic", lambda: next(clock))
    budget = training._callbacks()[1](250 / 60)
    budget.set_model(SimpleNamespace(stop_training=False, distribute_strategy=tf.distribute.get_strategy()))
    budget.on_epoch_begin(0)
    budget.on_epoch_end(0)
    assert not budget.model.stop_training  # 100 s run, another 100 s ends at 200 s: inside the 250 s
    budget.on_epoch_begin(1)
    budget.on_epoch_end(1)
    assert budget.model.stop_training and budget.stopped_at == 2  # a third would end near 320 s


def test_a_tiny_time_budget_still_runs_one_epoch(tmp_path):
    head = models.build_head(ModelConfig(), 3, 8)
    section = TrainHeadConfig(epochs=50, batch_size=16, learning_rate=0.01, patience=50, max_minutes=1e-6)
    summary = training.fit(head, data(), data(seed=1), section, TrainFiles(tmp_path))
    assert summary["stopped_by_time_budget"] and summary["epochs_run"] == 1


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    section = FinetuneConfig(epochs=6, learning_rate=1e-3, min_lr=1e-5, schedule="cosine", warmup_epochs=1)
    rates = [training.learning_rate_at(e, section) for e in range(6)]
    assert rates[0] == 1e-3 / 2  # warm-up epoch 1 of 1: half the peak
    assert rates[1] == 1e-3  # the peak right after warm-up
    assert math.isclose(rates[-1], 1e-5)  # min_lr at the last epoch
    mid = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 2 / 4))  # epoch 3: 2 of 4 decay steps
    assert math.isclose(rates[3], mid)
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))


def test_cosine_schedule_is_what_fit_uses(tmp_path):
    files = TrainFiles(tmp_path)
    section = FinetuneConfig(epochs=3, batch_size=16, learning_rate=0.01, min_lr=0.001, schedule="cosine",
                             patience=5)
    training.fit(models.build_head(ModelConfig(), 3, 8), data(), data(seed=1), section, files)
    rows = list(csv.DictReader(open(files.history)))
    for e, row in enumerate(rows):
        assert math.isclose(float(row["lr"]), training.learning_rate_at(e, section), rel_tol=1e-5)


def test_label_smoothing_reaches_the_loss(tmp_path):
    """With all weights zero every class gets probability 1/3, so the loss is ln 3 with or without smoothing;
    after one epoch on separable data the smoothed loss stays higher (its targets are never 0 or 1)."""
    losses = {}
    for smoothing in (0.0, 0.5):
        head = models.build_head(ModelConfig(l2=0.0, dropout=0.0), 3, 8)
        section = TrainHeadConfig(epochs=3, batch_size=16, learning_rate=0.05, label_smoothing=smoothing,
                                  patience=5)
        training.fit(head, data(), data(seed=1), section, TrainFiles(tmp_path / str(smoothing)))
        rows = list(csv.DictReader(open(TrainFiles(tmp_path / str(smoothing)).history)))
        losses[smoothing] = float(rows[-1]["loss"])
    # cross-entropy against targets (1 - 0.5 + 0.5/3, 0.5/3, 0.5/3) is at least its entropy, 0.87 nats
    p = [1 - 0.5 + 0.5 / 3, 0.5 / 3, 0.5 / 3]
    assert losses[0.5] >= -sum(q * math.log(q) for q in p) - 1e-3
    assert losses[0.0] < losses[0.5]


def test_ema_puts_the_average_into_the_model_each_epoch(tmp_path):
    """The average starts at the initial weights and moves by (1 - momentum) per step: with a momentum of
    1 - 1e-9 it stays at the initial weights, so after an epoch the model holds them again; without it the
    weights move."""
    moved = {}
    for momentum in (None, 1 - 1e-9):
        head = models.build_head(ModelConfig(dropout=0.0), 3, 8)
        initial = head.get_layer("logits").get_weights()[0].copy()
        section = TrainHeadConfig(epochs=1, batch_size=16, learning_rate=0.05, ema_momentum=momentum)
        training.fit(head, data(), data(seed=1), section, TrainFiles(tmp_path / str(momentum)))
        moved[momentum] = np.abs(head.get_layer("logits").get_weights()[0] - initial).max()
    assert moved[None] > 1e-2
    assert moved[1 - 1e-9] < 1e-6


@pytest.mark.parametrize("name, keras_class, momentum", [("adam", "Adam", None), ("sgd", "SGD", 0.5),
                                                          ("rmsprop", "RMSprop", 0.5)])
def test_the_configured_optimizer_trains(tmp_path, name, keras_class, momentum):
    head = models.build_head(ModelConfig(), 3, 8)
    section = TrainHeadConfig(epochs=1, batch_size=16, optimizer=name, momentum=0.5)
    training.fit(head, data(), data(seed=1), section, TrainFiles(tmp_path))
    assert type(head.optimizer).__name__ == keras_class
    if momentum is not None:
        assert float(head.optimizer.momentum) == momentum


def test_balanced_class_weight_reaches_keras(tmp_path, monkeypatch):
    head = models.build_head(ModelConfig(), 3, 8)
    x, y = data()
    y = np.eye(3, dtype=np.float32)[[0] * 40 + [1] * 16 + [2] * 8]
    seen = {}
    real_fit = type(head).fit

    def fit(self, *args, **kwargs):
        seen.update(kwargs)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(type(head), "fit", fit)
    training.fit(head, (x, y), data(seed=1), TrainHeadConfig(epochs=1, batch_size=16, class_weight="balanced"),
                 TrainFiles(tmp_path))
    assert seen["class_weight"] == pytest.approx({0: 64 / (3 * 40), 1: 64 / (3 * 16), 2: 64 / (3 * 8)})



def test_balanced_class_weight_of_a_batch_source_is_in_its_batches_weights(tmp_path, monkeypatch):
    from pipeline.train.activations import ArrayFile, CachedBatches

    x, _ = data()
    labels = np.array([0] * 40 + [1] * 16 + [2] * 8)
    np.save(tmp_path / "x.npy", x)
    source = CachedBatches(ArrayFile(tmp_path / "x.npy"), labels, 3, 16, shuffle=True, seed=2)
    validation = CachedBatches(ArrayFile(tmp_path / "x.npy"), labels, 3, 16)
    head = models.build_head(ModelConfig(), 3, 8)
    seen = {}
    real_fit = type(head).fit

    def fit(self, x, *args, **kwargs):
        seen.update(kwargs, first=next(iter(x)))
        return real_fit(self, x, *args, **kwargs)

    monkeypatch.setattr(type(head), "fit", fit)
    training.fit(head, source, validation, TrainHeadConfig(epochs=1, batch_size=16, class_weight="balanced"),
                 TrainFiles(tmp_path / "out"))
    assert seen.get("class_weight") is None  # not Keras's: it cannot map a distributed dataset
    _, y, weights = (np.asarray(t) for t in seen["first"])
    balanced = np.array([64 / (3 * 40), 64 / (3 * 16), 64 / (3 * 8)])  # scikit-learn's n / (classes * count)
    np.testing.assert_allclose(weights, balanced[y.argmax(axis=1)], rtol=1e-6)

def test_own_rows_accuracy_counts_each_row_of_positive_weight_once():
    y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    predicted = np.eye(3, dtype=np.float32)[[0, 2, 2, 1]]  # rows 0 and 2 right
    metric = training.own_rows_accuracy()
    metric.update_state(y, predicted, sample_weight=np.array([1.5, 1.5, 1.5, 0.0], np.float32))
    assert metric.name == "accuracy" and float(metric.result()) == pytest.approx(2 / 3)  # row 3 is a filler
