"""Training that goes on where a killed run stopped, at the epoch after its last finished one.

After every epoch, `EpochBackup` writes into the stage's backup folder (the runner's, under the stage's cache
key, removed when the stage completes) what `fit` needs to go on: the model's and the optimizer's variables
(a TensorFlow checkpoint, so the learning rate, Adam's moments and a weight average come back too), the best
epoch's weights so far, the history, and the counters of the callbacks that carry state from epoch to epoch
(early stopping, the plateau schedule, the best value seen, the time budget's elapsed time). Each epoch is
written into a temporary folder renamed into place when complete, so a kill while writing leaves the previous
epoch's backup whole; the last KEPT epochs are kept, so that worker processes whose backups end one epoch apart
(one killed while the others wrote theirs) can all go on from the epoch they have in common. The run that finds
a backup replays the batch order up to that epoch and fits from the next one; a backup of a run that had already
stopped (early stopping, the time budget, the last epoch) is taken as finished, and training is not repeated.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from pipeline import fileio

log = logging.getLogger("pipeline.train.resume")

STATE = "state.json"
BEST = "best.h5"
VARIABLES = "variables"
KEPT = 2
"""Epochs whose backups are kept: the last and the one before."""
_EPOCH = re.compile(r"epoch-(\d+)")


def backed_up(folder):
    """{epoch number: folder} of the complete epochs backed up in `folder`."""
    if folder is None or not Path(folder).is_dir():
        return {}
    return {int(m.group(1)): p for p in Path(folder).glob("epoch-*")
            if (m := _EPOCH.fullmatch(p.name)) and (p / STATE).is_file()}


def latest(folder):
    """(epoch number, folder) of the last complete epoch backed up in `folder`, or None."""
    return max(backed_up(folder).items(), default=None, key=lambda item: item[0])


def _stateful(callbacks):
    """{name: (callback, the attributes it carries between epochs)} of the callbacks that need restoring: Keras's
    by type, the pipeline's own by their `RESUMED` (name, attributes)."""
    import tf_keras as keras

    kinds = {keras.callbacks.EarlyStopping: ("early_stopping", ("wait", "best", "best_epoch")),
             keras.callbacks.ReduceLROnPlateau: ("plateau", ("wait", "best", "cooldown_counter"))}
    found = {}
    for callback in callbacks:
        for kind, (name, attributes) in kinds.items():
            if isinstance(callback, kind):
                found[name] = (callback, attributes)
        if hasattr(callback, "RESUMED"):
            name, attributes = callback.RESUMED
            found[name] = (callback, attributes)
    return found


def _backup_base():
    import tf_keras as keras

    return keras.callbacks.Callback


class EpochBackup(_backup_base()):
    """Back up the training state after every epoch into `folder`, and restore it when training begins.

    callbacks: the fit's other callbacks (those with state are found by type); budget: the TimeBudget;
    checkpoint: the file BestWeights writes the best epoch's weights to; epochs: the planned epochs.
    Put it after the callbacks whose state it saves, and before any that reports an epoch as done.
    """

    def __init__(self, folder, callbacks, budget, checkpoint, epochs):
        super().__init__()
        self.folder, self.budget, self.checkpoint, self.epochs = Path(folder), budget, Path(checkpoint), epochs
        self.stateful = _stateful(callbacks)
        self.rows, self.restored = [], None

    def variables(self):
        """The TensorFlow checkpoint of the model's and its optimizer's variables."""
        import tensorflow as tf

        return tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)

    def restore(self, epoch=None):
        """Load backed-up epoch `epoch` (default: the last) into the model and the best-weights file; returns its
        state, or None when there is no such backup.

        Call after compiling the model and before fitting it."""
        found = backed_up(self.folder)
        epoch = max(found, default=None) if epoch is None else epoch
        if epoch not in found:
            return None
        folder = found[epoch]
        state = fileio.read_json(folder / STATE)
        self.model.optimizer.build(self.model.trainable_variables)  # its variables exist to be read into
        self.variables().read(str(folder / VARIABLES)).assert_existing_objects_matched()
        if (folder / BEST).is_file():
            shutil.copyfile(folder / BEST, self.checkpoint)
        self.rows, self.restored = list(state["history"]), state
        if state["finished"]:
            self.budget.resume(state["budget"])  # fit does not run, so neither does on_train_begin
        log.info("resuming training after epoch %d of %d from the backup in %s", epoch, self.epochs, self.folder)
        return state

    def on_train_begin(self, logs=None):
        # The other callbacks reset their counters here; a resumed run puts the backed-up ones back.
        if self.restored is None:
            return
        for name, (callback, attributes) in self.stateful.items():
            for attribute, value in self.restored["callbacks"].get(name, {}).items():
                setattr(callback, attribute, value)
        self.budget.resume(self.restored["budget"])

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append(dict(epoch=epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}))
        state = {"epoch": epoch + 1, "history": self.rows,
                 "finished": bool(self.model.stop_training) or epoch + 1 >= self.epochs,
                 "callbacks": {name: {a: _plain(getattr(callback, a)) for a in attributes}
                               for name, (callback, attributes) in self.stateful.items()},
                 "budget": self.budget.state()}
        scratch = self.folder / f".epoch-{epoch + 1}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        self.variables().write(str(scratch / VARIABLES))
        if self.checkpoint.is_file():
            shutil.copyfile(self.checkpoint, scratch / BEST)
        fileio.write_json(scratch / STATE, state)
        final = self.folder / f"epoch-{epoch + 1}"
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
        for number, older in backed_up(self.folder).items():
            if number <= epoch + 1 - KEPT or number > epoch + 1:  # beyond the last: a run that went further
                shutil.rmtree(older, ignore_errors=True)


def _plain(value):
    """A callback's counter as JSON holds it (NumPy scalars and infinities included)."""
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, float) else value
