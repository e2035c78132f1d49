"""The feature store: entries made once per key, reused by later runs, never used when altered."""
import csv
import shutil

import numpy as np
import pytest
from conftest import base_args, invoke, ran

from pipeline.cache.feature_store import ENTRY, FeatureStore


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

    views = invoke(*base_args(world, artifacts), "--set", "train_head.flip_view=false", "train-head")
    assert "reusing the backbone's features" not in views.stderr  # other views are other features


def test_the_features_key_names_the_backbone_weights_and_views_not_the_head():
    from types import SimpleNamespace

    from pipeline import config
    from pipeline.stages.train_head import features_key

    def key(weights="w", **overrides):
        cfg = config.from_dict(config.apply_overrides({}, [f"{k}={v}" for k, v in overrides.items()]))
        return features_key(SimpleNamespace(cfg=cfg, key={"code": "c", "inputs": "i"}), weights)

    assert key() == key(**{"model.dropout": 0.1, "model.l2": 0.0, "train_head.learning_rate": 0.01})
    for changed in (key(weights="other"), key(**{"model.image_size": 192}), key(**{"train_head.flip_view": False}),
                    key(**{"train_head.augmented_views": 2})):
        assert changed != key()
