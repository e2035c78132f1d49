"""The feature store: entries made once per key, reused by later runs, never used when altered."""
import csv
import re
import shutil

import numpy as np
import pytest
from conftest import base_args, invoke, ran

from pipeline.cache.feature_store import ENTRY, ChiefsStore, FeatureStore

COMPUTED = re.compile(r"computed .+ \(\d+ images\) in")


def _maker(calls, value=1.0):
    def make(folder):
        calls.append(folder)
        np.save(folder / "a.npy", np.full(3, value))
    return make


def test_an_entry_is_made_once_and_then_reused(tmp_path):
    store, calls = FeatureStore(tmp_path / "store"), []
    folder, reused = store.get_or_make("k1", _maker(calls))
    assert not reused and np.array_equal(np.load(folder / "a.npy"), [1, 1, 1])
    again, reused = store.get_or_make("k1", _maker(calls, 2.0))
    assert reused and again == folder and len(calls) == 1
    assert not list((tmp_path / "store").glob(".*.tmp"))  # no temporary folder left behind


@pytest.mark.parametrize("damage", ["flip a byte", "delete a file", "delete the entry record", "garble the record"])
def test_an_altered_entry_is_computed_again_not_used(tmp_path, damage):
    store, calls = FeatureStore(tmp_path / "store"), []
    folder, _ = store.get_or_make("k", _maker(calls))
    data = folder / "a.npy"
    if damage == "flip a byte":
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 1
        data.write_bytes(bytes(raw))
    elif damage == "delete a file":
        data.unlink()
    elif damage == "delete the entry record":
        (folder / ENTRY).unlink()
    else:
        (folder / ENTRY).write_text("{not json")
    folder, reused = store.get_or_make("k", _maker(calls))
    assert not reused and len(calls) == 2
    assert np.array_equal(np.load(folder / "a.npy"), [1, 1, 1])


def test_a_failed_computation_leaves_nothing(tmp_path):
    store = FeatureStore(tmp_path / "store")

    def broken(folder):
        np.save(folder / "a.npy", np.zeros(2))
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        store.get_or_make("k", broken)
    assert store.get("k") is None and list((tmp_path / "store").iterdir()) == []


def test_entries_made_together_are_stored_together_or_not_at_all(tmp_path):
    store = FeatureStore(tmp_path / "store")

    def make(folders):
        for k, folder in enumerate(folders):
            np.save(folder / "a.npy", np.full(2, k))

    first, second = store.make_several(["a", "b"], make)
    assert np.array_equal(np.load(second / "a.npy"), [1, 1]) and store.get("a") == first

    def broken(folders):
        make(folders)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        store.make_several(["c", "d"], broken)
    assert store.get("c") is None and store.get("d") is None and not store.scratch.exists()


def test_the_least_recently_used_entries_beyond_keep_are_removed(tmp_path):
    import os
    import time

    store, calls = FeatureStore(tmp_path / "store", keep=2), []
    store.get_or_make("old", _maker(calls))
    store.get_or_make("used", _maker(calls))
    past = time.time() - 100
    os.utime(store.folder("old") / ENTRY, (past, past))
    os.utime(store.folder("used") / ENTRY, (past + 10, past + 10))
    store.get("used")  # a use makes it the most recent
    store.get_or_make("new", _maker(calls))
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["new", "used"]


def _history(artifacts):
    return list(csv.DictReader(open(artifacts / "train-head" / "history.csv")))


def test_train_head_reuses_features_when_only_the_head_changes(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    head_only = invoke(*base_args(world, artifacts), "--set", "model.dropout=0.2", "train-head")
    assert ran(head_only) == ["train-head"]
    assert "reusing the backbone's features" in head_only.stderr

    # the same run with nothing stored computes the same features, so trains the same head
    fresh = tmp_path / "fresh"
    shutil.copytree(world["artifacts"], fresh)
    shutil.rmtree(fresh / "feature-store")
    computed = invoke(*base_args(world, fresh), "--set", "model.dropout=0.2", "train-head")
    assert "reusing the backbone's features" not in computed.stderr
    assert _history(artifacts) == _history(fresh)

    # Without the mirrored view, the original and augmented views' features are still the same numbers.
    views = invoke(*base_args(world, artifacts), "--set", "train_head.flip_view=false", "train-head")
    assert "reusing the backbone's features of the original training images" in views.stderr
    assert not COMPUTED.search(views.stderr) and _history(artifacts) != _history(fresh)


def test_finetune_trains_on_the_activations_train_head_computed(world):
    finetune_log = re.split(r"I finetune\s+running \(", world["first"].stderr)[1]
    for view in ("original training images", "mirrored training images", "val images"):
        assert f"reusing the activations at block12 of the {view}" in finetune_log
        assert f"computed {view}" not in finetune_log


def test_a_finetune_setting_changed_reruns_it_without_computing_any_activations(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    result = invoke(*base_args(world, artifacts), "--set", "finetune.learning_rate=0.0003", "finetune")
    assert ran(result) == ["finetune"]
    assert "reusing the activations at block12" in result.stderr and not COMPUTED.search(result.stderr)
    seed = invoke(*base_args(world, artifacts), "--set", "finetune.seed=7", "finetune")
    assert len(COMPUTED.findall(seed.stderr)) == 1  # only the augmented view draws other transforms




def test_a_workers_view_of_the_chiefs_store_reads_whole_entries_and_writes_none(tmp_path):
    chiefs = FeatureStore(tmp_path / "store")
    view = ChiefsStore(chiefs)
    assert view.get("k") is None
    folder, _ = chiefs.get_or_make("k", _maker([]))
    assert view.get("k") == folder
    np.save(folder / "a.npy", np.zeros(3))  # altered: not used, and left for the chief to remove
    assert view.get("k") is None and folder.is_dir()
    with pytest.raises(RuntimeError):
        view.make_several(["other"], lambda folders: None)
