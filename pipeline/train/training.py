"""Fitting a model with the pipeline's callbacks, and writing its history, curves and best weights."""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import fileio
from pipeline.data import balance
from pipeline.progress import Progress
from pipeline.train import distribute, inputs, resume
from pipeline.train.resume import EpochBackup

log = logging.getLogger("pipeline.train.training")


def seed_everything(seed):
    """Seed Python's, NumPy's and TensorFlow's random generators (weight initialisation, dropout, shuffling)."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)


def check_batch_size(section_name, batch_size, n_train):
    """A batch larger than the training set is a config error naming the key."""
    from pipeline.errors import ConfigError

    if batch_size > n_train:
        raise ConfigError(f"config key '{section_name}.batch_size' has value {batch_size}, larger than the "
                          f"training set ({n_train} images); set it to at most {n_train}")


def _callbacks():
    import tf_keras as keras

    class TimeBudget(keras.callbacks.Callback):
        """Stop training before an epoch that would end after `minutes` (judged by the longest epoch so far)."""

        def __init__(self, minutes):
            super().__init__()
            self.seconds = None if minutes is None else minutes * 60
            self.start = self.epoch_start = time.monotonic()
            self.longest = 0.0
            self.stopped_at = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.monotonic()

        def state(self):
            """What a resumed run needs to count on from here: the training time so far, the longest epoch and
            the epoch the budget stopped training after (None if it did not)."""
            return {"elapsed": time.monotonic() - self.start, "longest": self.longest, "stopped_at": self.stopped_at}

        def resume(self, state):
            """Count on from a backed-up `state()`."""
            self.start = time.monotonic() - state["elapsed"]
            self.longest, self.stopped_at = state["longest"], state["stopped_at"]

        def on_epoch_end(self, epoch, logs=None):
            now = time.monotonic()
            self.longest = max(self.longest, now - self.epoch_start)
            # Every worker process stops after the same epoch, or the others would wait for it forever.
            if self.seconds is not None and distribute.any_worker(self.model.distribute_strategy,
                                                                  now - self.start + self.longest > self.seconds):
                log.warning("time budget of %.1f min: another epoch (up to %.1f min) would end after it; stopping "
                            "after epoch %d and keeping the best epoch", self.seconds / 60, self.longest / 60,
                            epoch + 1)
                self.stopped_at = epoch + 1
                self.model.stop_training = True

    class BestWeights(keras.callbacks.Callback):
        """Write the weights of the best epoch so far by validation accuracy to `path`. Unlike Keras's
        ModelCheckpoint, which keeps a non-chief worker's file only while writing it, every worker keeps its own."""

        RESUMED = ("checkpoint", ("best",))  # what a resumed run restores (pipeline.train.resume)

        def __init__(self, path):
            super().__init__()
            self.path, self.best = str(path), -np.inf

        def on_epoch_end(self, epoch, logs=None):
            current = (logs or {}).get("val_accuracy")
            if current is not None and current > self.best:
                self.best = float(current)
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self.model.save_weights(self.path, overwrite=True)

    class ValidationLoss(keras.callbacks.Callback):
        """Make the validation loss of batches filled up for several replicas (pipeline.train.inputs) the mean
        over the validation rows themselves: Keras's figure is their loss summed over all rows, filler rows
        included, plus the weights' regularization loss, so the first part is divided by their share of all rows."""

        def __init__(self, own_fraction):
            super().__init__()
            self.own_fraction = own_fraction

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None and "val_loss" in logs:
                penalty = sum(float(keras.backend.get_value(loss)) for loss in self.model.losses)
                logs["val_loss"] = (float(logs["val_loss"]) - penalty) / self.own_fraction + penalty

    class EpochSeeds(keras.callbacks.Callback):
        """Reseed every random layer's generator (Dropout's) at the start of each epoch from (seed, epoch, layer):
        an epoch's draws do not depend on the epochs before it, so a resumed run draws what an unbroken one would."""

        def __init__(self, seed):
            super().__init__()
            self.seed = seed

        def on_epoch_begin(self, epoch, logs=None):
            generators = [layer._random_generator for layer in self.model.submodules
                          if hasattr(getattr(layer, "_random_generator", None), "_maybe_init")]
            for k, generator in enumerate(generators):
                generator._maybe_init()
                if generator._generator is not None:  # None: a layer built before generators were enabled
                    state = np.random.SeedSequence([self.seed, epoch, k]).generate_state(1)[0]
                    generator._generator.reset_from_seed(int(state))

    class LearningRate(keras.callbacks.Callback):
        """Record the learning rate of each epoch in the history."""

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["lr"] = float(keras.backend.get_value(self.model.optimizer.learning_rate))

    class EpochLog(keras.callbacks.Callback):
        """Where Keras's own bar is not shown (output not a terminal): the batches as periodic progress lines
        and one line per epoch, through the pipeline's log."""

        def __init__(self, epochs, steps):
            super().__init__()
            self.epochs, self.steps = epochs, steps

        def on_epoch_begin(self, epoch, logs=None):
            self.progress = Progress(f"epoch {epoch + 1}/{self.epochs}", self.steps, "batches")
            self.start = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            self.progress.advance()

        def on_epoch_end(self, epoch, logs=None):
            self.progress.close()
            shown = ", ".join(f"{k} {v:.4g}" for k, v in (logs or {}).items())
            log.info("epoch %d/%d in %.0fs: %s", epoch + 1, self.epochs, time.monotonic() - self.start, shown)

    return keras, TimeBudget, LearningRate, EpochLog, EpochSeeds, BestWeights, ValidationLoss


def own_rows_accuracy():
    """Keras's categorical accuracy (named `accuracy`) over the rows with a weight above 0, each counted once."""
    import tensorflow as tf
    import tf_keras as keras

    class OwnRowsAccuracy(keras.metrics.CategoricalAccuracy):
        def update_state(self, y_true, y_pred, sample_weight=None):
            if sample_weight is not None:
                sample_weight = tf.cast(sample_weight > 0, y_pred.dtype)
            return super().update_state(y_true, y_pred, sample_weight)

    return OwnRowsAccuracy(name="accuracy")


def keras_verbose():
    """Keras's verbosity: its progress bars on a terminal; in a log none (fit logs its own lines, EpochLog)."""
    return 1 if sys.stderr.isatty() else 0


def learning_rate_at(epoch, section):
    """The `cosine` schedule's learning rate for a 0-based epoch: linear warm-up, then cosine decay to min_lr."""
    peak, low, warmup, total = section.learning_rate, section.min_lr, section.warmup_epochs, section.epochs
    if epoch < warmup:
        return peak * (epoch + 1) / (warmup + 1)
    span = max(total - warmup - 1, 1)
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * min(epoch - warmup, span) / span))


def _schedule_callbacks(keras, section):
    if section.schedule == "plateau":
        return [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=section.lr_factor,
                                                  patience=section.lr_patience, min_lr=section.min_lr, verbose=0)]
    if section.schedule == "cosine":
        return [keras.callbacks.LearningRateScheduler(lambda epoch, lr: learning_rate_at(epoch, section))]
    return []


def _optimizer(keras, section, steps_per_epoch):
    average = {} if section.ema_momentum is None else {
        # Overwriting once per epoch puts the average in the model before each validation and checkpoint.
        "use_ema": True, "ema_momentum": section.ema_momentum, "ema_overwrite_frequency": max(steps_per_epoch, 2)}
    if section.optimizer == "sgd":
        return keras.optimizers.SGD(section.learning_rate, momentum=section.momentum, **average)
    if section.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(section.learning_rate, momentum=section.momentum, **average)
    return keras.optimizers.Adam(section.learning_rate, **average)


def _restore(backer, strategy):
    """Restore the epoch every worker process of `strategy` has backed up: the earliest of their last ones (they
    end one epoch apart when one was killed while the others wrote theirs). None when there is none, or when
    some worker lacks it: then all start over."""
    found = resume.backed_up(backer.folder)
    common = distribute.fewest(strategy, max(found, default=0))
    lacking = common > 0 and common not in found
    if distribute.any_worker(strategy, lacking):
        log.warning("the workers' backups in %s have no epoch in common: training starts over", backer.folder)
        return None
    return backer.restore(common) if common else None


def fit(model, train, validation, section, files, backup=None, **fit_kwargs):
    """Compile and fit `model`; keep the best epoch by validation accuracy; write history and curves.

    `section` is the train_head or finetune config (epochs, learning rate and schedule, label smoothing,
    patience, max_minutes, ...). `train` is a batch source (pipeline.train.inputs), read as tf.data, or an (x, y)
    tuple of arrays; `validation` likewise. A model built inside a tf.distribute strategy's scope trains under it,
    on batches of `batch_size` per replica. `backup`: a folder where the state after each epoch is kept, from which
    a run killed before the end goes on at the next epoch (pipeline.train.resume); None: no backup. Returns a
    summary dict of the run.
    """
    keras, TimeBudget, LearningRate, EpochLog, EpochSeeds, BestWeights, ValidationLoss = _callbacks()
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=section.label_smoothing)
    x, y = train if isinstance(train, tuple) else (train, None)
    placement = distribute.describe(model.distribute_strategy, section.batch_size, section.learning_rate)
    batch_size = placement["global_batch_size"]  # a batch source is made with it; arrays are batched here
    steps_per_epoch = len(x) if y is None else math.ceil(len(x) / batch_size)
    # Batches filled up for the replicas (pipeline.train.inputs) weight their rows; accuracy counts their own rows.
    # Made in the strategy's scope, its counts are summed over every replica, as a metric named in compile is.
    with model.distribute_strategy.scope():
        accuracy = {"weighted_metrics": [own_rows_accuracy()]} if y is None and placement["replicas"] > 1 else {
            "metrics": ["accuracy"]}
    model.compile(optimizer=_optimizer(keras, section, steps_per_epoch), loss=loss, **accuracy)
    budget = TimeBudget(section.max_minutes)
    callbacks = [
        EpochSeeds(section.seed),
        *_schedule_callbacks(keras, section),
        LearningRate(),
        BestWeights(files.checkpoint),
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=section.patience,
                                      restore_best_weights=True, verbose=0),
        budget,
    ]
    backer = None
    if backup is not None:  # after the callbacks whose state it keeps, before the line that reports the epoch
        backer = EpochBackup(backup, list(callbacks), budget, files.checkpoint, section.epochs)
        backer.set_model(model)
        callbacks.append(backer)
    if keras_verbose() == 0:
        callbacks.append(EpochLog(section.epochs, steps_per_epoch))  # after LearningRate: the line shows lr
    class_weights = None
    if section.class_weight == "balanced":
        labels = x.labels if y is None else np.asarray(y).argmax(axis=1)
        n_classes = x.n_classes if y is None else np.asarray(y).shape[1]
        class_weights = balance.class_weights(labels, n_classes)
    seed_everything(section.seed)
    restored = _restore(backer, model.distribute_strategy) if backer is not None else None
    done = restored["epoch"] if restored else 0
    t0 = time.monotonic()
    rows = list(restored["history"]) if restored else []
    if not (restored and restored["finished"]):
        if y is None:
            # A batch source draws each epoch's order from its seed and the epoch, so the dataset can start at
            # the resumed epoch; Keras's own shuffling would draw from NumPy's global generator, which cannot.
            strategy, replicas = model.distribute_strategy, placement["replicas"]
            if replicas > 1:  # before every callback that reads the validation loss
                callbacks.insert(0, ValidationLoss(inputs.filled_fraction(validation, replicas)))
                fit_kwargs["validation_steps"] = len(validation)  # a distributed dataset has no cardinality
            x, validation = (inputs.distributed(strategy, x, done, section.epochs, class_weights=class_weights),
                             inputs.distributed(strategy, validation, batch_means=False))
            fit_kwargs["steps_per_epoch"] = steps_per_epoch
        elif class_weights is not None:  # arrays; a batch source's batches carry them in their sample weights
            fit_kwargs["class_weight"] = class_weights
        history = model.fit(x, y, validation_data=validation, epochs=section.epochs, initial_epoch=done,
                            callbacks=callbacks, batch_size=batch_size if y is not None else None,
                            shuffle=y is not None, verbose=keras_verbose(), **fit_kwargs)
        rows += [dict(epoch=e + 1, **{k: float(v[i]) for k, v in history.history.items()})
                 for i, e in enumerate(history.epoch)]
    seconds = time.monotonic() - t0
    model.load_weights(str(files.checkpoint))  # the best epoch, whatever stopped training
    files.checkpoint.unlink()
    write_history(files, rows)
    best = max(rows, key=lambda r: r["val_accuracy"])
    summary = {"epochs_run": len(rows), "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
               "val_loss": best["val_loss"], "stopped_by_time_budget": budget.stopped_at is not None,
               "distribute": placement}
    # The file holds what was learnt, never how long it took: a rerun that learns the same writes the same bytes,
    # and the stages below stay fresh. The seconds go into the stage's manifest with the rest of its summary.
    fileio.write_json(files.summary, summary)
    return {**summary, "fit_seconds": round(seconds, 1), **({"resumed_after_epoch": done} if restored else {})}


def write_history(files, rows):
    """Write the per-epoch history as CSV and plot its loss and accuracy curves."""
    fileio.write_csv(files.history, list(rows[0]) if rows else ["epoch"], rows)
    from pipeline.reporting.report import plot_curves

    plot_curves(rows, files.curves)
