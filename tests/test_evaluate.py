"""The evaluate stage's metrics, its report's sections and its error for an empty test split."""
import csv
import shutil

import numpy as np
import pytest
from conftest import SMOKE_CONFIG, make_split_dataset

from pipeline import config
from pipeline.catalog import Catalog
from pipeline.errors import DataError
from pipeline.reporting.report import dataset_section
from pipeline.runner import Runner, StageContext
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

    from pipeline.backbones import BACKBONES
    from pipeline.data import vision_crop
    from pipeline.train import models

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


def test_report_opens_with_the_dataset_as_ingest_saw_it(tmp_path):
    data = make_split_dataset(tmp_path / "tv", counts={"train": 8, "val": 3}, splits=("train", "val"))
    shutil.copyfile(data / "val" / "circle" / "img_100.jpg", data / "val" / "circle" / "copy.jpg")
    (data / "train" / "circle" / "empty.jpg").write_bytes(b"")
    (data / "train" / "circle" / "notes.txt").write_text("taken on holiday")
    artifacts = tmp_path / "artifacts"
    assert Runner(config.load(SMOKE_CONFIG, data=data), artifacts).run(["evaluate"])[-1] == "evaluate"
    report = (artifacts / "evaluate" / "report.md").read_text(encoding="utf-8")
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Dataset"
    section = report.split("## Dataset\n", 1)[1].split("\n## ", 1)[0]
    assert "\n- no test/ folder: the test split was made from the training images (" in section
    assert "\n- 1 image(s) appear more than once within one split\n" in section
    assert "Bad images skipped: 1; files ignored: 1 " in section
    with open(artifacts / "ingest" / "index.csv", newline="", encoding="utf-8") as f:
        splits = [row["split"] for row in csv.DictReader(f)]
    for split in ("train", "val", "test"):
        assert f"\n| {split} | {splits.count(split)} |\n" in section
    page = (artifacts / "evaluate" / "report.html").read_text(encoding="utf-8")
    assert page.index("<h2>Dataset</h2>") < page.index("<h2>Per class</h2>")
    assert "<li>no test/ folder: the test split was made from the training images (" in page


def test_dataset_section_lists_twenty_warnings_and_counts_the_rest():
    warnings = [f"class 'c{i}' has no images in the val split" for i in range(23)]
    report = {"source": "/data/shapes", "layout": "classes", "classes": ["a", "b"],
              "images": {"train": 5, "val": 2, "test": 1}, "notes": [], "warnings": warnings,
              "bad_images": [], "ignored_files": []}
    lines = dataset_section(report, "../ingest/ingest_report.json")
    assert [line for line in lines if line.startswith("- ")] == [
        *(f"- {w}" for w in warnings[:20]), "- and 3 more in [ingest_report.json](../ingest/ingest_report.json)"]


def test_calibrated_model_is_the_fine_tuned_one_with_its_logits_divided(world, tmp_path):
    import json

    from scipy.special import softmax

    from pipeline.train import models

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    from conftest import shape_image

    shape_image("circle", 7).save(unknown / "a.png")
    (unknown / "damaged.jpg").write_bytes(b"\xff\xd8 not a photo")
    catalog = Catalog(world["artifacts"])
    inputs = {name: catalog.stage(name) for name in ("ingest", "augment", "train-head", "finetune")}
    out = Catalog(tmp_path / "artifacts").stage("evaluate", tmp_path / "out")
    cfg = config.load(SMOKE_CONFIG, overrides=["evaluate.calibrate=true", f"evaluate.unknown_data={unknown}"])
    summary = evaluate.run(StageContext(cfg, inputs, out, sources_dir=tmp_path / "sources"))
    metrics = json.loads(out.metrics.read_text())
    t = metrics["confidence"]["temperature"]
    assert metrics["confidence"]["calibrated"] and summary["temperature"] == t and t != 1.0
    assert metrics["confidence"]["unknown"] | {"auroc": None} == {
        "source": str(unknown), "images": 1, "unreadable": 1, "auroc": None,
        "rejected": metrics["confidence"]["unknown"]["rejected"]}
    pixels = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    logits, _ = models.logits_and_probabilities(models.load(inputs["finetune"].model)).predict(pixels, verbose=0)
    shipped = models.load(out.model).predict(pixels, verbose=0)
    np.testing.assert_allclose(shipped, softmax(logits.astype(np.float64) / t, axis=1), rtol=1e-5, atol=1e-7)
    report = out.report.read_text()
    assert "## Confidence" in report and "![reliability diagram](reliability.png)" in report
    assert out.reliability.stat().st_size > 0
    assert f"best.confidence < {metrics['confidence']['threshold']:.4f}" in report


def test_a_wrong_unknown_data_path_is_an_error_before_any_work(world, tmp_path, monkeypatch):
    from pipeline.train import models

    def no_model(path):
        raise AssertionError("the model was loaded before the path was checked")

    monkeypatch.setattr(models, "load", no_model)
    catalog = Catalog(world["artifacts"])
    inputs = {name: catalog.stage(name) for name in ("ingest", "augment", "train-head", "finetune")}
    cfg = config.load(SMOKE_CONFIG, overrides=[f"evaluate.unknown_data={tmp_path / 'no-such-folder'}"])
    with pytest.raises(DataError, match="evaluate.unknown_data '.*no-such-folder' is not a folder"):
        evaluate.run(StageContext(cfg, inputs, catalog.stage("evaluate", tmp_path / "out"), tmp_path / "sources"))
