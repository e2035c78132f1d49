"""A worker process's own parts: the private context of a worker that is not the chief, and its weights digest."""
import os

import h5py
import numpy as np

from pipeline.cache.feature_store import ChiefsStore, FeatureStore
from pipeline.catalog import TrainFiles
from pipeline.runner import StageContext
from pipeline.train import worker


def test_a_worker_that_is_not_the_chief_writes_only_in_its_own_folder(tmp_path):
    chiefs_backup = tmp_path / "artifacts" / ".resume" / "finetune-abc"
    (chiefs_backup / "epoch-2").mkdir(parents=True)
    (chiefs_backup / "epoch-2" / "state.json").write_text("{}")
    context = StageContext(cfg=None, inputs={}, out=TrainFiles(tmp_path / "artifacts" / ".finetune.tmp" / "x"),
                           store=FeatureStore(tmp_path / "artifacts" / "feature-store"), backup=chiefs_backup)
    private = worker.private_context(context, tmp_path / "worker-1")
    assert isinstance(private.out, TrainFiles) and private.out.root == tmp_path / "worker-1" / "out"
    assert private.out.root.is_dir()
    assert isinstance(private.store, ChiefsStore) and private.store.root == context.store.root
    copied = private.backup / "epoch-2" / "state.json"
    assert private.backup == tmp_path / "worker-1" / "backup"
    assert os.path.samefile(copied, chiefs_backup / "epoch-2" / "state.json")  # a hard link, not a copy
    copied.unlink()  # what the worker's own backups do to older epochs: the chief's stays
    assert (chiefs_backup / "epoch-2" / "state.json").is_file()


def test_no_backup_stays_none(tmp_path):
    context = StageContext(cfg=None, inputs={}, out=TrainFiles(tmp_path / "o"), store=FeatureStore(tmp_path / "s"))
    assert worker.private_context(context, tmp_path / "w").backup is None


def _h5(path, arrays):
    with h5py.File(path, "w") as h5:
        for name, array in arrays.items():
            h5[name] = array
    return path


def test_the_weights_digest_sees_every_value_and_nothing_else(tmp_path):
    arrays = {"dense/kernel:0": np.ones((2, 3), np.float32), "dense/bias:0": np.zeros(3, np.float32)}
    first = worker.weights_digest(_h5(tmp_path / "a.h5", arrays))
    assert worker.weights_digest(_h5(tmp_path / "b.h5", dict(reversed(arrays.items())))) == first  # order written
    arrays["dense/bias:0"][1] = np.float32(1e-7)
    assert worker.weights_digest(_h5(tmp_path / "c.h5", arrays)) != first


def test_local_workers_share_the_cores_this_process_may_run_on():
    import json

    cores = len(os.sched_getaffinity(0))
    cluster = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    assert worker.cores_per_worker({"TF_CONFIG": json.dumps(cluster)}) == max(1, cores // 2)
    cluster["cluster"]["worker"] *= cores  # more workers than cores: one thread each
    assert worker.cores_per_worker({"TF_CONFIG": json.dumps(cluster)}) == 1
