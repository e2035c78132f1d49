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


def test_vision_options_are_measured_and_recommended_in_the_report(world):
    import json

    from pipeline.data import vision_crop
    from pipeline.train import models
    from pipeline.backbones import BACKBONES

    artifacts = world["artifacts"]
    metrics = json.loads((artifacts / "evaluate" / "metrics.json").read_text())
    scores = metrics["vision_options"]
    assert set(scores) == {"center_crop", "scale_fill", "scale_fit"}
    assert scores["scale_fill"] == metrics["accuracy"]  # training's own resize is the plain pass
    # center_crop recomputed here: the photos cropped as Vision does, through the backbone's x * scale + bias
    catalog = Catalog(artifacts)
    rows = catalog.stage("ingest").read_index("test")
    classes = catalog.stage("ingest").read_classes()
    cfg = config.load(SMOKE_CONFIG)
    spec = BACKBONES[cfg.model.backbone]
    pixels = np.stack([vision_crop.load_as(r["path"], cfg.model.image_size, "center_crop") for r in rows])
    model = models.load(artifacts / "finetune" / "model.h5")
    probs = model.predict(pixels * spec.input_scale + np.array(spec.input_bias, dtype=np.float32), verbose=0)
    truth = np.array([classes.index(r["label"]) for r in rows])
    assert scores["center_crop"] == pytest.approx(float((probs.argmax(1) == truth).mean()))
    assert metrics["recommended_crop"] == max(scores, key=lambda k: (scores[k], k == "scale_fill"))
    report = (artifacts / "evaluate" / "report.md").read_text()
    assert "## Using the model in your app" in report and "imageCropAndScaleOption" in report
    assert "cropAndScaleAction" in report and "MultiSnacks(configuration:" in report


def test_swift_class_name_is_what_xcode_generates():
    assert evaluate.swift_class_name("MultiSnacks") == "MultiSnacks"
    assert evaluate.swift_class_name("my-model") == "my_model"
    assert evaluate.swift_class_name("3d") == "_3d"
