"""The evaluate stage's metrics and its error for an empty test split."""
import shutil

import numpy as np
import pytest

from conftest import SMOKE_CONFIG
from pipeline import config
from pipeline.catalog import Catalog
from pipeline.errors import DataError
from pipeline.runner import StageContext
from pipeline.stages import evaluate


def test_metrics_on_known_predictions():
    classes = ["a", "b", "c"]
    labels = np.array([0, 0, 1, 2])
    probs = np.array([[0.9, 0.1, 0], [0.2, 0.7, 0.1], [0, 1, 0], [0, 0, 1]])
    m = evaluate.metrics(labels, probs, classes)
    assert m["accuracy"] == 0.75
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert m["per_class"]["b"]["precision"] == 0.5 and m["per_class"]["a"]["recall"] == 0.5


def test_empty_test_split_is_a_clear_error(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    index = artifacts / "ingest" / "index.csv"
    lines = index.read_text(encoding="utf-8").splitlines(keepends=True)
    index.write_text("".join(line for line in lines if not line.startswith("test,")), encoding="utf-8")
    catalog = Catalog(artifacts)
    inputs = {name: catalog.stage(name) for name in ("ingest", "augment", "train-head", "finetune")}
    out = catalog.stage("evaluate", tmp_path / "out")
    with pytest.raises(DataError, match="test split in .*index.csv is empty"):
        evaluate.run(StageContext(config.load(SMOKE_CONFIG), inputs, out))
