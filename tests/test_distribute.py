"""Training under tf.distribute: MirroredStrategy over two logical CPU devices learns what one device learns with
the same global batch, and the training stages run under it from the config."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, base_args, ran

from pipeline.catalog import Catalog
from pipeline.config import DistributeConfig
from pipeline.train import distribute

# TensorFlow makes logical devices only before its runtime starts, so each mirrored run is a process of its own.
TWO_CPUS = """
import sys
import pipeline
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""

COMPARE = TWO_CPUS + textwrap.dedent("""
    import json
    from pathlib import Path
    import numpy as np
    from pipeline.catalog import TrainFiles
    from pipeline.config import DistributeConfig, FinetuneConfig, ModelConfig
    from pipeline.train import distribute, models, training
    from pipeline.train.activations import ArrayFile, CachedBatches

    folder = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96)
    x = rng.normal(size=(96, 8)).astype(np.float32) + 2 * np.eye(3, 8, dtype=np.float32)[y]
    np.save(folder / "x.npy", x)
    runs = {}
    for name, per_replica in (("none", 16), ("mirrored", 8)):  # the same global batch
        section = FinetuneConfig(epochs=4, batch_size=per_replica, learning_rate=0.01, patience=4)
        chosen = distribute.strategy(DistributeConfig(name))
        batch = section.batch_size * chosen.num_replicas_in_sync
        data = CachedBatches(ArrayFile(folder / "x.npy"), y, 3, batch, shuffle=True, seed=3)
        training.seed_everything(0)
        with chosen.scope():
            head = models.build_head(ModelConfig(dropout=0.0), 3, 8)
        files = TrainFiles(folder / name)
        files.root.mkdir()
        summary = training.fit(head, data, data, section, files)
        runs[name] = {"weights": [w.tolist() for w in head.get_weights()], "distribute": summary["distribute"]}
    print(json.dumps(runs))
""")


def _run(code, *args, timeout=300):
    """Run `code` in a Python process of its own (its own process group, killed whole if it overruns)."""
    process = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, err[-3000:]
    return out, err


def test_none_and_auto_without_gpus_train_on_one_device():
    import tensorflow as tf

    assert distribute.strategy(DistributeConfig("none")).num_replicas_in_sync == 1
    if len(tf.config.list_logical_devices("GPU")) < 2:
        assert distribute.strategy(DistributeConfig("auto")).num_replicas_in_sync == 1
    info = distribute.describe(tf.distribute.get_strategy(), 16, 0.001)
    assert info == {"strategy": "none", "workers": 1, "replicas": 1, "batch_size_per_replica": 16,
                    "global_batch_size": 16, "learning_rate": 0.001}


def test_mirrored_over_two_cpus_learns_what_one_device_learns_with_the_same_global_batch(tmp_path):
    out, _ = _run(COMPARE, tmp_path)
    runs = json.loads(out.strip().splitlines()[-1])
    assert runs["mirrored"]["distribute"]["replicas"] == 2 and runs["none"]["distribute"]["replicas"] == 1
    assert (runs["mirrored"]["distribute"]["strategy"], runs["none"]["distribute"]["strategy"]) == ("MirroredStrategy",
                                                                                                  "none")
    assert runs["mirrored"]["distribute"]["global_batch_size"] == runs["none"]["distribute"]["global_batch_size"] == 16
    # The same sums in another order: each replica's gradient over its half batch, then the two added, against one
    # sum over the batch. Float32 rounding (6e-8 relative) differs at each of the 24 Adam steps, which can carry it
    # into the weights (up to 0.6 here) a few units in the last place at a time: within 1e-5 relative. A wrong
    # split or scaling (the gradient doubled or halved, a batch seen twice) moves them by Adam's step, 0.01.
    for got, want in zip(runs["mirrored"]["weights"], runs["none"]["weights"]):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_the_training_stages_run_mirrored_from_the_config(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    code = TWO_CPUS + "from pipeline.cli import cli\ncli(sys.argv[1:])\n"
    _, log = _run(code, *base_args(world, artifacts), "--set", "distribute.strategy=mirrored", "train-head", "finetune")
    assert ran(SimpleNamespace(stderr=log)) == ["train-head", "finetune"]  # the config changed their cache key
    for stage in ("train-head", "finetune"):
        summary = json.loads((artifacts / stage / "training.json").read_text())
        assert summary["distribute"]["replicas"] == 2, summary
        assert summary["distribute"]["global_batch_size"] == 2 * 4  # configs/smoke.yaml: batch_size 4 in both


def _cluster_of_two(world, tmp_path, *args, prepare=lambda index, artifacts: None):
    """Start two "machines" of a TF_CONFIG cluster on 127.0.0.1, each the pipeline's command line with its own copy
    of the world's artifacts (after `prepare`) and `args`, its messages in machine-<index>.log (a file: a pipe left
    unread could stop one, and with it the other); returns [(artifacts, process)]."""
    from pipeline import local_workers

    addresses = [f"127.0.0.1:{port}" for port in local_workers.free_ports(2)]
    machines = []
    for index in range(2):
        artifacts = tmp_path / f"machine-{index}"
        if not artifacts.exists():
            shutil.copytree(world["artifacts"], artifacts)
        prepare(index, artifacts)
        cluster = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        command = [sys.executable, "-m", "pipeline", *base_args(world, artifacts), "--set",
                   "distribute.strategy=multi_worker", *args]
        with open(tmp_path / f"machine-{index}.log", "w") as log:
            machines.append((artifacts, subprocess.Popen(
                command, cwd=REPO, env={**os.environ, "TF_CONFIG": json.dumps(cluster)}, stdout=subprocess.DEVNULL,
                stderr=log, start_new_session=True)))
    return machines


def _wait(machines, timeout=300):
    """Each machine's messages, once all have ended (within `timeout` seconds)."""
    for _, process in machines:
        process.wait(timeout=timeout)
    return [(artifacts.parent / f"{artifacts.name}.log").read_text() for artifacts, _ in machines]


def _stop(machines):
    for _, process in machines:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _cluster_run(world, tmp_path, *args, prepare=lambda index, artifacts: None):
    """Run the command on both machines of _cluster_of_two until both succeed; returns their messages."""
    machines = _cluster_of_two(world, tmp_path, *args, prepare=prepare)
    try:
        logs = _wait(machines)
    finally:
        _stop(machines)
    for (_, process), log in zip(machines, logs):
        assert process.returncode == 0, log[-3000:]
    return logs


def test_machines_of_a_tf_config_cluster_each_run_the_command_and_end_with_the_same_model(world, tmp_path):
    from pipeline.catalog import ViewFiles
    from pipeline.train.activations import ArrayFile
    from pipeline.train.worker import weights_digest

    def store(artifacts):
        return Catalog(artifacts).feature_store

    def prepare(index, artifacts):
        if index == 1:  # a machine new to the cluster: no feature computed yet
            shutil.rmtree(store(artifacts))

    logs = _cluster_run(world, tmp_path, "finetune", prepare=prepare)
    for stage in ("train-head", "finetune"):
        placement = json.loads((tmp_path / "machine-0" / stage / "training.json").read_text())["distribute"]
        assert placement["workers"] == 2 and placement["global_batch_size"] == 2 * 4
        # Each worker applies the same all-reduced gradients to the same weights: the same computation, bit for bit.
        assert weights_digest(tmp_path / "machine-0" / stage / "model.h5") == weights_digest(
            tmp_path / "machine-1" / stage / "model.h5")
    # The new machine's features: computed half by each machine, sent through the cluster's collective gather.
    assert "(share 1/2)" in logs[0] and "(share 2/2)" in logs[1] and "(share 1/2)" not in logs[1]
    computed = sorted(p.name for p in store(world["artifacts"]).glob("view-*"))
    assert computed and sorted(p.name for p in store(tmp_path / "machine-1").glob("view-*")) == computed
    for name in computed:
        alone, shared = (ViewFiles(store(root) / name) for root in (world["artifacts"], tmp_path / "machine-1"))
        alone_rows, shared_rows = (ArrayFile(files.outputs) for files in (alone, shared))
        assert shared_rows.shape == alone_rows.shape and shared_rows.dtype == alone_rows.dtype
        # The same batches through the same layers on the same CPU; only the thread count may differ, which can
        # reorder a sum: float32 to a few units in the last place, float16 to one unit of its 10-bit mantissa.
        rtol = 2.0 ** -10 if alone_rows.dtype == np.float16 else 1e-5
        np.testing.assert_allclose(shared_rows.block(0, len(shared_rows)).astype(np.float32),
                                   alone_rows.block(0, len(alone_rows)).astype(np.float32), rtol=rtol, atol=1e-6)
        np.testing.assert_array_equal(np.load(shared.labels), np.load(alone.labels))
    shares = store(tmp_path / "machine-1") / ".shares.tmp"
    assert not shares.exists() or not any(shares.iterdir())


def test_a_machine_lost_mid_training_fails_the_others_with_one_line_and_the_same_commands_go_on(world, tmp_path):
    import csv

    from pipeline.train.worker import weights_digest

    args = ["--set", "finetune.epochs=12", "--set", "finetune.patience=12", "finetune"]
    machines = _cluster_of_two(world, tmp_path, *args)
    (artifacts, chief), (_, other) = machines
    try:
        deadline = time.monotonic() + 300
        while "epoch 2/12" not in (tmp_path / "machine-0.log").read_text():
            assert time.monotonic() < deadline and chief.poll() is None, "no epoch line in time"
            time.sleep(0.05)
        os.killpg(other.pid, signal.SIGKILL)  # machine 1 goes down mid-training
        lines = _wait(machines, timeout=120)[0].splitlines(keepends=True)
    finally:
        _stop(machines)
    assert chief.returncode == 1, "".join(lines[-20:])
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]] and not any("Traceback" in line for line in lines), "".join(lines[-20:])
    assert errors[0].startswith("error: finetune: worker 1 of the cluster is gone (")
    assert "run it again on each to go on from the last finished epoch" in errors[0]
    assert Catalog(artifacts).backups("finetune")  # what it goes on from

    # The same commands again: each machine goes on from the last epoch both have backed up (their last backups
    # may be one epoch apart: machine 1 was killed while the chief may have been writing its own).
    for log in _cluster_run(world, tmp_path, *args):
        assert "resuming training after epoch" in log
    rows = list(csv.DictReader(open(artifacts / "finetune" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    assert weights_digest(artifacts / "finetune" / "model.h5") == weights_digest(
        tmp_path / "machine-1" / "finetune" / "model.h5")


def test_a_lost_worker_is_named_from_tensorflows_error_and_other_errors_are_left_alone():
    import tensorflow as tf

    # The message TensorFlow 2.21 gave the chief when worker 1 was SIGKILLed mid-epoch (the traceback part cut).
    message = ("Graph execution error:\n\nDetected at node CollectiveReduceV2_1 defined at (most recent call last):\n"
               "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error information "
               "from remote target /job:worker/replica:0/task:1 while calling /tensorflow.WorkerService/RecvBuf:\n"
               ':UNKNOWN:Error received from peer  {grpc_message:"recvmsg:Connection reset by peer", '
               "grpc_status:14}\nThe error could be from a previous operation. Restart your program to reset.")
    lost = distribute.lost_worker("finetune", tf.errors.UnavailableError(None, None, message))
    assert str(lost) == ("finetune: worker 1 of the cluster is gone (recvmsg:Connection reset by peer); stop the "
                         "command on every machine, then run it again on each to go on from the last finished epoch")
    unnamed = distribute.lost_worker("train-head", tf.errors.CancelledError(None, None, "cancelled"))
    assert str(unnamed).startswith("train-head: another worker of the cluster is gone (CancelledError);")
    # TensorFlow names no remote worker, but there is only one other: that one.
    only = distribute.lost_worker("finetune", tf.errors.UnavailableError(None, None, "at /job:worker/task:0"), [1])
    assert str(only).startswith("finetune: worker 1 of the cluster is gone (UnavailableError);")
    for other in (tf.errors.InvalidArgumentError(None, None, "bad shape"), ValueError("bad value")):
        assert distribute.lost_worker("finetune", other) is None


def test_one_process_gathers_only_its_own_array():
    import tensorflow as tf

    one = tf.distribute.get_strategy()
    array = np.arange(6, dtype=np.float16).reshape(2, 3)
    np.testing.assert_array_equal(distribute.all_gather(one, array), array[np.newaxis])
    assert distribute.worker_index(one) == 0 and distribute.fewest(one, 3) == 3
    assert distribute.any_worker(one, True) and not distribute.any_worker(one, False)
    with pytest.raises(TypeError, match="uint8"):  # TensorFlow's collective gather has no kernel for it
        distribute.all_gather(one, array.astype(np.uint8))


def test_multi_worker_without_local_workers_or_tf_config_is_a_config_error(monkeypatch):
    from pipeline.errors import ConfigError

    monkeypatch.delenv("TF_CONFIG", raising=False)
    distribute._multi_worker.cache_clear()
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.strategy(DistributeConfig("multi_worker"))
