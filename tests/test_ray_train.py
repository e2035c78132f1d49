"""Training stages on Ray Train workers (pipeline.cluster.ray_train): the workers' command lines, and a run of two
workers on a Ray started on this machine (where the `cluster` extra is installed)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest
from conftest import REPO, base_args, processes_running

from pipeline.cluster import ray_train
from pipeline.train.worker import weights_digest


def test_the_chief_writes_to_the_artifacts_folder_and_each_other_worker_beside_it(tmp_path):
    assert ray_train.worker_folder(tmp_path / "a", 0) == str(tmp_path / "a")
    assert ray_train.worker_folder(tmp_path / "a", 2) == str(tmp_path / "a") + "-worker-2"
    args = ray_train.worker_arguments(["--config", "c.yaml", "finetune"], tmp_path / "a", 1)
    assert args == ["--artifacts", str(tmp_path / "a") + "-worker-1", "--set", "distribute.strategy=multi_worker",
                    "--set", "distribute.local_workers=0", "--config", "c.yaml", "finetune"]


@pytest.mark.parametrize("args, named", [
    (["--artifacts", "x", "finetune"], "--artifacts"),
    (["--artifacts=x", "finetune"], "--artifacts"),
    (["--set", "distribute.strategy=none", "finetune"], "distribute.strategy=none"),
    (["--set", "distribute.local_workers=2", "finetune"], "distribute.local_workers=2"),
])
def test_pipeline_arguments_that_would_undo_the_cluster_are_refused(args, named):
    with pytest.raises(click.UsageError, match=named):
        ray_train.check_arguments(args)
    ray_train.check_arguments(["--set", "finetune.epochs=2", "finetune"])


def test_a_runs_storage_is_removed_after_it_and_a_killed_runs_by_the_next(tmp_path):
    killed = tmp_path / (ray_train.STORAGE_PREFIX + "killed")  # a driver SIGKILLed: its folder left, unlocked
    (killed / "multisnacks").mkdir(parents=True)
    running = tmp_path / (ray_train.STORAGE_PREFIX + "running")  # another driver's, locked by its process
    running.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pipeline.cache.lock import holding\n"
                               "with holding(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(running)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with ray_train.run_storage(tmp_path) as storage:
            assert storage.is_dir() and storage.name.startswith(ray_train.STORAGE_PREFIX)
            assert not killed.exists() and running.is_dir()
            (storage / "records").write_text("Ray Train's")
        assert not storage.exists() and running.is_dir()
    finally:
        holder.kill()
        holder.wait()


def _ray_train(world, artifacts, *pipeline_args):
    """Run `python -m pipeline.cluster.ray_train --workers 2` on the smoke world; return the finished process."""
    options = [a for a in base_args(world, artifacts) if a not in ("--artifacts", str(artifacts))]
    # Ray's session folder holds Unix sockets, whose paths may not exceed 107 bytes: a short one, removed after
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        process = subprocess.run([sys.executable, "-m", "pipeline.cluster.ray_train", "--workers", "2", "--artifacts",
                                  str(artifacts), "--", *options, *pipeline_args],
                                 cwd=REPO, capture_output=True, text=True, timeout=900, start_new_session=True,
                                 env={**os.environ, "RAY_TMPDIR": ray_tmp})
        left = processes_running(ray_tmp)  # Ray's own processes (their command lines name the session folder)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert processes_running("pipeline.cluster.worker_process") == [] and left == []
    return process


needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None or not Path("/proc/self/cmdline").exists(),
                               reason="needs the cluster extra (Ray Train), and /proc to find leftover processes")


@needs_ray
def test_two_ray_workers_train_together_and_end_with_the_same_model(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    args = [a for key in ("train_head", "finetune") for a in ("--set", f"{key}.epochs=2")]
    process = _ray_train(world, artifacts, *args, "finetune")
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    other = Path(f"{artifacts}-worker-1")
    for stage in ("train-head", "finetune"):
        placement = json.loads((artifacts / stage / "training.json").read_text())["distribute"]
        assert placement["strategy"] == "MultiWorkerMirroredStrategy" and placement["workers"] == 2
        # The same all-reduced gradients applied to the same weights: the same computation, the same bytes.
        assert weights_digest(artifacts / stage / "model.h5") == weights_digest(other / stage / "model.h5")



@needs_ray
def test_a_failed_ray_run_ends_with_one_line_naming_the_worker(world, tmp_path):
    process = _ray_train(world, tmp_path / "artifacts", "--set", "finetune.no_such_key=1", "finetune")
    assert process.returncode == 1
    output = process.stdout + process.stderr
    assert "finetune.no_such_key" in output  # each worker's own error line, passed on by Ray
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: worker 0 (artifacts ") and "exited with 1; the other workers were stopped" in last


class _WorkerGroupError(Exception):
    """Stands in for Ray's WorkerGroupError: a message and each failed worker's error by rank."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors:\n...")
        self.worker_failures = failures


def test_a_failure_is_one_line_blaming_a_killed_worker_before_those_its_death_broke(tmp_path):
    broken = ray_train.WorkerExit(0, "a", 1)  # the chief's all-reduce failed when worker 2 died
    killed = ray_train.WorkerExit(2, "a-worker-2", -9)
    assert ray_train.failure_line(_WorkerGroupError({0: broken, 2: killed})) == (
        "worker 2 (artifacts a-worker-2) was killed by SIGKILL")
    failed = {3: ray_train.WorkerExit(3, "a-worker-3", 1), 1: ray_train.WorkerExit(1, "a-worker-1", 1)}
    assert ray_train.failure_line(_WorkerGroupError(failed)) == "worker 1 (artifacts a-worker-1) exited with 1"
    assert ray_train.failure_line(RuntimeError("the controller died\ntraceback ...")) == "the controller died"


def test_a_workers_exit_survives_pickling_as_ray_sends_it():
    import pickle

    again = pickle.loads(pickle.dumps(ray_train.WorkerExit(1, "a-worker-1", -15)))
    assert (again.rank, again.folder, again.code) == (1, "a-worker-1", -15)
    assert str(again) == "worker 1 (artifacts a-worker-1) was killed by SIGTERM"
