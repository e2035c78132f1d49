"""Training that resumes after a kill: at the epoch after the last one backed up, with the state an unbroken run
would have had, and never from another config's backup."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, base_args, invoke, ran

from pipeline.catalog import Catalog, TrainFiles
from pipeline.config import FinetuneConfig, ModelConfig
from pipeline.train import distribute, models, resume, training
from pipeline.train.activations import ArrayFile, CachedBatches


class _Killed(Exception):
    """Stands in for a kill: raised right after an epoch's backup is written."""


def _batches(tmp_path, name, seed, shuffle):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 96)
    x = rng.normal(size=(96, 8)).astype(np.float32) + 2 * np.eye(3, 8, dtype=np.float32)[y]
    np.save(tmp_path / f"{name}.npy", x)
    return CachedBatches(ArrayFile(tmp_path / f"{name}.npy"), y, 3, 16, shuffle=shuffle, seed=seed)


def _fit(tmp_path, run, backup, kill_after=None, monkeypatch=None, epochs=5):
    """A head with dropout fitted with Adam on the plateau schedule."""
    if kill_after is not None:
        original = resume.EpochBackup.on_epoch_end

        def on_epoch_end(self, epoch, logs=None):
            original(self, epoch, logs)
            if epoch + 1 == kill_after:
                raise _Killed

        monkeypatch.setattr(resume.EpochBackup, "on_epoch_end", on_epoch_end)
    files = TrainFiles(tmp_path / run)
    files.root.mkdir(exist_ok=True)
    training.seed_everything(0)
    head = models.build_head(ModelConfig(dropout=0.5), 3, 8)
    section = FinetuneConfig(epochs=epochs, batch_size=16, learning_rate=0.01, lr_patience=0, patience=epochs)
    summary = training.fit(head, _batches(tmp_path, "train", 1, True), _batches(tmp_path, "val", 2, False), section,
                           files, backup=backup)
    return head, summary, list(csv.DictReader(open(files.history)))


def test_a_fit_killed_after_epoch_k_goes_on_at_k_plus_1_as_if_never_killed(tmp_path, monkeypatch):
    unbroken, _, unbroken_rows = _fit(tmp_path, "unbroken", None)
    backup = tmp_path / "backup"
    with pytest.raises(_Killed):
        _fit(tmp_path, "killed", backup, kill_after=2, monkeypatch=monkeypatch)
    assert resume.latest(backup)[0] == 2 and sorted(resume.backed_up(backup)) == [1, 2]  # the last two kept
    monkeypatch.undo()
    resumed, summary, rows = _fit(tmp_path, "resumed", backup)
    assert summary["resumed_after_epoch"] == 2 and summary["epochs_run"] == 5
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    # The same computation as the unbroken run (the batch order replayed, the epoch's dropout draws reseeded,
    # Adam's moments and the plateau schedule's counters restored), in the same process: equal up to float32
    # rounding.
    for got, want in zip(rows, unbroken_rows):
        for key in want:
            np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)
    for got, want in zip(resumed.get_weights(), unbroken.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_backup_of_a_finished_fit_is_not_trained_again(tmp_path, monkeypatch):
    backup = tmp_path / "backup"
    first, _, first_rows = _fit(tmp_path, "first", backup, epochs=3)
    calls = []
    monkeypatch.setattr("tf_keras.Model.fit", lambda *a, **k: calls.append(a))
    again, summary, rows = _fit(tmp_path, "again", backup, epochs=3)
    assert calls == [] and rows == first_rows and summary["resumed_after_epoch"] == 3
    for got, want in zip(again.get_weights(), first.get_weights()):
        np.testing.assert_array_equal(got, want)  # the best epoch's weights, read back from the same file


@pytest.mark.parametrize("others_last, expected", [(1, 1), (2, 2), (0, None)])
def test_workers_go_on_from_the_last_epoch_all_backed_up(tmp_path, monkeypatch, others_last, expected):
    unbroken, _, unbroken_rows = _fit(tmp_path, "unbroken", None)
    backup = tmp_path / "backup"
    with pytest.raises(_Killed):
        _fit(tmp_path, "killed", backup, kill_after=2, monkeypatch=monkeypatch)
    monkeypatch.undo()
    # Another worker process whose last backup is `others_last` (0: none).
    monkeypatch.setattr(distribute, "fewest", lambda strategy, count: min(count, others_last))
    resumed, summary, rows = _fit(tmp_path, "resumed", backup)
    assert summary.get("resumed_after_epoch") == expected and summary["epochs_run"] == 5
    for got, want in zip(rows, unbroken_rows):  # whichever epoch it went on from, the same computation
        np.testing.assert_allclose(float(got["val_loss"]), float(want["val_loss"]), rtol=1e-5)
    for got, want in zip(resumed.get_weights(), unbroken.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_workers_lacking_their_common_epoch_all_start_over(tmp_path, monkeypatch):
    backup = tmp_path / "backup"
    with pytest.raises(_Killed):
        _fit(tmp_path, "killed", backup, kill_after=4, monkeypatch=monkeypatch)
    monkeypatch.undo()
    assert sorted(resume.backed_up(backup)) == [3, 4]
    monkeypatch.setattr(distribute, "fewest", lambda strategy, count: min(count, 1))  # another's last is 1
    _, summary, rows = _fit(tmp_path, "resumed", backup)
    assert "resumed_after_epoch" not in summary and [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]


def _finetune_process(world, artifacts, *overrides):
    args = [*base_args(world, artifacts), "--set", "finetune.epochs=40", "--set", "finetune.patience=40",
            *(a for o in overrides for a in ("--set", o)), "finetune"]
    return args, subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_after_epoch(process, epoch):
    deadline = time.monotonic() + 240
    for line in process.stderr:
        if f"epoch {epoch}/40" in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "no epoch line in time"
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the stage ended before the kill"


def _killed_finetune(world, tmp_path, epoch):
    """A copy of the world's artifacts whose 40-epoch finetune was SIGKILLed after `epoch`: (artifacts, the
    command's arguments, the backup folder it left)."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    args, process = _finetune_process(world, artifacts)
    _kill_after_epoch(process, epoch)
    backup, = Catalog(artifacts).backups("finetune")
    return artifacts, args, backup


def test_a_finetune_killed_mid_training_resumes_after_its_last_backed_up_epoch(world, tmp_path):
    artifacts, args, backup = _killed_finetune(world, tmp_path, 2)
    done, folder = resume.latest(backup)
    assert done >= 2
    before = json.loads((folder / resume.STATE).read_text())["history"]

    result = invoke(*args)
    assert ran(result) == ["finetune"] and f"resuming training after epoch {done} of 40" in result.stderr
    rows = list(csv.DictReader(open(artifacts / "finetune" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 41))
    assert [float(r["val_loss"]) for r in rows[:done]] == [r["val_loss"] for r in before]
    assert not (artifacts / ".resume").exists()  # removed once the stage completed
    assert ran(invoke(*args)) == []  # and the stage is fresh

    # What an unbroken run learns, epoch by epoch: the same computation, so equal up to float32 rounding.
    unbroken = tmp_path / "unbroken"
    shutil.copytree(world["artifacts"], unbroken)
    invoke(*[str(unbroken) if a == str(artifacts) else a for a in args])
    want = list(csv.DictReader(open(unbroken / "finetune" / "history.csv")))
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose([float(r[key]) for r in rows], [float(r[key]) for r in want], rtol=1e-5, atol=1e-7)


def test_a_changed_config_never_resumes_from_an_old_backup(world, tmp_path):
    artifacts, args, old = _killed_finetune(world, tmp_path, 1)
    assert resume.latest(old) is not None
    result = invoke("--set", "finetune.learning_rate=0.0003", *args)
    assert ran(result) == ["finetune"] and "resuming" not in result.stderr and not old.exists()
    rows = list(csv.DictReader(open(artifacts / "finetune" / "history.csv")))
    assert len(rows) == 40
