"""A training stage in several local worker processes (distribute.strategy: multi_worker, distribute.local_workers):
what they learn against one process, what they leave behind, and what a killed worker does to the run."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from conftest import REPO, base_args, invoke, processes_running, ran

from pipeline import local_workers
from pipeline.catalog import Catalog
from pipeline.config import Config, DistributeConfig
from pipeline.errors import ConfigError, TrainingError
from pipeline.stages import BY_NAME
from pipeline.train import resume

TWO_WORKERS = ("--set", "distribute.strategy=multi_worker", "--set", "distribute.local_workers=2")
# Plain SGD without dropout: each step moves the weights by the learning rate times the gradient, so the float32
# rounding of one sum against another stays at that size. (Adam divides by the gradient's running size, so where
# the smoke model learns nothing its steps follow the rounding's signs, and two correct runs drift apart.)
# A second augmented view, which no run has cached yet: the workers compute it together, each a share.
LINEAR = [a for key in ("train_head", "finetune") for a in (
    "--set", f"{key}.optimizer=sgd", "--set", f"{key}.learning_rate=0.1", "--set", f"{key}.epochs=2")] + [
    "--set", "model.dropout=0", "--set", "train_head.augmented_views=2"]


def _batch(size):
    return [a for key in ("train_head", "finetune") for a in ("--set", f"{key}.batch_size={size}")]


def _weights(artifacts, stage):
    found = {}

    def keep(name, item):  # visititems stops at the first call that returns anything but None
        if isinstance(item, h5py.Dataset):
            found[name] = item[()]

    with h5py.File(artifacts / stage / "model.h5", "r") as h5:
        h5["model_weights"].visititems(keep)
    return found


def _run(world, tmp_path, name, *overrides):
    artifacts = tmp_path / name
    shutil.copytree(world["artifacts"], artifacts)
    process = subprocess.run([sys.executable, "-m", "pipeline", *base_args(world, artifacts), *overrides, "finetune"],
                             cwd=REPO, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert process.returncode == 0, process.stderr[-3000:]
    assert ran(SimpleNamespace(stderr=process.stderr)) == ["train-head", "finetune"]
    return artifacts, process.stderr


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the worker processes in /proc")
def test_two_local_workers_learn_what_one_process_learns_with_the_same_global_batch(world, tmp_path):
    workers, log = _run(world, tmp_path, "workers", *TWO_WORKERS, *LINEAR, *_batch(4))
    assert "computed augmented view 2 of the training images (share 1/2)" in log  # the chief's share of it
    one, _ = _run(world, tmp_path, "one", *LINEAR, *_batch(8))
    other_batch, _ = _run(world, tmp_path, "other-batch", *LINEAR, *_batch(4))
    assert processes_running(local_workers.WORKER_MODULE) == []
    for stage in ("train-head", "finetune"):
        manifest = json.loads((workers / stage / "manifest.json").read_text())
        digests = manifest["summary"]["worker_weights"]
        assert len(digests) == 2 and digests[0] == digests[1]  # both workers ended with the same weights
        placement = json.loads((workers / stage / "training.json").read_text())["distribute"]
        assert placement == {"strategy": "MultiWorkerMirroredStrategy", "workers": 2, "replicas": 2,
                             "batch_size_per_replica": 4, "global_batch_size": 8, "learning_rate": 0.1}
        for name in ("history.csv",):
            rows = {run: list(csv.DictReader(open(run / stage / name))) for run in (workers, one)}
            assert [r["val_accuracy"] for r in rows[workers]] == [r["val_accuracy"] for r in rows[one]]
            # The validation loss over the validation images themselves, filler rows out: as one process has it.
            np.testing.assert_allclose([float(r["val_loss"]) for r in rows[workers]],
                                       [float(r["val_loss"]) for r in rows[one]], rtol=1e-5)
        # The same sums in another order: each worker's gradient over its half batch, then the two added, against
        # one sum over the batch; float32 rounding (6e-8 relative) at each of the steps (about 50 in the two
        # stages), carried into the weights a step at a time: within 1e-5 relative. A wrong split or scaling
        # (a batch seen twice, the gradient halved) changes each step's size, as the global batch of 4 does here.
        got, want, far = _weights(workers, stage), _weights(one, stage), _weights(other_batch, stage)
        assert got.keys() == want.keys()
        moved = 0.0
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
            moved = max(moved, float(np.max(np.abs(far[name] - want[name]), initial=0)))
        assert moved > 1e-3  # the tolerance tells a wrong global batch from the right one
    # The chief alone wrote: no worker's folder, temporary file or backup is left in the artifacts folder.
    assert not (workers / ".tmp").exists() and not (workers / ".resume").exists()
    assert sorted(p.name for p in workers.iterdir()) == sorted(p.name for p in one.iterdir())


def _worker_pid(parent, index):
    for pid in processes_running(local_workers.WORKER_MODULE):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == parent and command[-3].decode() == str(index):
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the worker processes in /proc")
def test_a_killed_worker_fails_the_run_with_one_line_and_the_same_command_resumes(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    args = [*base_args(world, artifacts), *TWO_WORKERS, "--set", "finetune.epochs=12", "--set",
            "finetune.patience=12", "finetune"]
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "epoch 2/12" in line:  # the chief's line: epoch 2 done, so the backup holds it
                victim = _worker_pid(process.pid, 1)
                assert victim is not None, "worker 1 not found"
                os.kill(victim, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "no epoch line in time"
        lines += process.stderr.readlines()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1, "".join(lines[-20:])
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and f"finetune: worker 1 (pid {victim}) was killed by SIGKILL" in errors[0]
    assert "run the same command again to go on from the last one" in errors[0]
    assert lines[-1] == errors[0] and not any("Traceback" in line for line in lines)
    assert processes_running(local_workers.WORKER_MODULE) == []  # the chief was stopped too
    backup, = Catalog(artifacts).backups("finetune")
    done, _ = resume.latest(backup)
    assert done >= 2
    assert sorted(resume.backed_up(backup)) == [done - 1, done]  # the last two epochs kept

    before = json.loads((backup / f"epoch-{done}" / resume.STATE).read_text())["history"]
    again = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=600, start_new_session=True)  # the chief logs in a process of its own
    assert again.returncode == 0, again.stderr[-3000:]
    assert ran(again) == ["finetune"] and f"resuming training after epoch {done} of 12" in again.stderr
    rows = list(csv.DictReader(open(artifacts / "finetune" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    assert [float(r["val_loss"]) for r in rows[:done]] == [r["val_loss"] for r in before]
    assert not (artifacts / ".resume").exists() and not (artifacts / ".tmp").exists()
    assert ran(invoke(*args)) == []  # fresh
    assert processes_running(local_workers.WORKER_MODULE) == []


def test_only_training_stages_under_multi_worker_run_in_local_workers():
    cfg = Config(distribute=DistributeConfig("multi_worker", 3))
    assert [local_workers.count(cfg, BY_NAME[name]) for name in ("ingest", "train-head", "finetune", "export")] == [
        0, 3, 3, 0]
    assert local_workers.count(Config(), BY_NAME["finetune"]) == 0


def test_local_workers_need_multi_worker():
    from pipeline.config import from_dict

    with pytest.raises(ConfigError, match="distribute.local_workers"):
        from_dict({"distribute": {"strategy": "mirrored", "local_workers": 2}})
    with pytest.raises(ConfigError, match="distribute.local_workers"):
        from_dict({"distribute": {"strategy": "multi_worker", "local_workers": -1}})


def test_free_ports_are_distinct():
    ports = local_workers.free_ports(4)
    assert len(set(ports)) == 4 and all(0 < port < 65536 for port in ports)


def _ended(code):
    return SimpleNamespace(returncode=code, pid=4242)


def test_a_workers_death_is_one_line_saying_what_to_run(tmp_path):
    backup = tmp_path / "backup"
    error = local_workers._failure("finetune", tmp_path, 1, _ended(-signal.SIGKILL), backup)
    assert isinstance(error, TrainingError) and "\n" not in str(error)
    assert str(error).startswith("finetune: worker 1 (pid 4242) was killed by SIGKILL; the other workers were stopped")
    assert "no epoch had finished: run the same command again to start it over" in str(error)
    (backup / "epoch-3").mkdir(parents=True)
    error = local_workers._failure("finetune", tmp_path, 0, _ended(1), backup)
    assert "failed with exit status 1" in str(error) and "go on from the last one" in str(error)


def test_a_workers_own_pipeline_error_is_raised_as_itself(tmp_path):
    local_workers.error_file(tmp_path, 0).write_text(json.dumps({"type": "ConfigError", "message": "key 'x' is bad"}))
    error = local_workers._failure("train-head", tmp_path, 0, _ended(3), None)
    assert isinstance(error, ConfigError) and str(error) == "key 'x' is bad"


def test_a_worker_killed_by_a_signal_is_blamed_before_those_its_death_broke():
    ended = [SimpleNamespace(poll=lambda code=code: code) for code in (1, -signal.SIGKILL, None)]
    assert local_workers._wait(ended, 0, 1) == 1
    assert local_workers._wait([SimpleNamespace(poll=lambda: 0), SimpleNamespace(poll=lambda: 1)], 0, 1) == 1


def test_a_workers_traceback_is_shown_with_its_failure(tmp_path, capsys):
    local_workers.traceback_file(tmp_path, 1).write_text("Traceback (most recent call last):\nValueError: x\n")
    error = local_workers._failure("finetune", tmp_path, 1, _ended(1), None)
    assert "ValueError: x" in capsys.readouterr().err and "its traceback is above" in str(error)
