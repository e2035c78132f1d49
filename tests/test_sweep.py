"""The sweep: every combination up to training, in its own folder, shared stages reused, chosen on validation."""
import csv
import shutil

import pytest
from conftest import SMOKE_CONFIG, base_args, invoke

from pipeline import config, sweep
from pipeline.errors import ConfigError


def test_grid_parsing_and_combinations():
    grid = sweep.parse_grid(["model.dropout=0,0.2", "export.formats=[coreml, onnx],[tflite]"])
    assert grid == {"model.dropout": ["0", "0.2"], "export.formats": ["[coreml, onnx]", "[tflite]"]}
    assert len(sweep.combinations(grid)) == 4
    assert sweep.combinations(grid, sample=3, seed=1) == sweep.combinations(grid, sample=3, seed=1)
    assert len(sweep.combinations(grid, sample=3)) == 3
    for bad in (["dropout=0,1"], ["model.dropout"], ["model.dropout=0", "model.dropout=1"], []):
        with pytest.raises(ConfigError):
            sweep.parse_grid(bad)


def test_a_sweep_never_reaches_the_test_split(world, tmp_path, monkeypatch):
    from pipeline.data import augmentation, images, vision_crop

    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    shutil.rmtree(artifacts / "feature-store")  # so the first combination reads the images itself
    test_images = {row["path"] for row in csv.DictReader(open(artifacts / "ingest" / "index.csv"))
                   if row["split"] == "test"}
    read = []
    real = images.load_array

    def recording(path, size):
        read.append(str(path))
        return real(path, size)

    for module in (images, augmentation):
        monkeypatch.setattr(module, "load_array", recording)
    monkeypatch.setattr(vision_crop, "load_as", lambda *a: pytest.fail("a sweep fed Vision-cropped test photos"))
    result = invoke(*base_args(world, artifacts), "sweep", "--set", "model.dropout=0.1,0.3", "--until", "train-head")
    assert read and not set(read) & test_images  # training and validation images only
    rows = list(csv.DictReader(open(artifacts / "sweep" / "sweep.csv")))
    assert [r["model.dropout"] for r in rows] == ["0.1", "0.3"]
    assert all(0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    assert (artifacts / "sweep" / "sweep.png").stat().st_size > 10_000
    best = config.load(artifacts / "sweep" / "best.yaml")
    assert best.model.dropout == float(max(rows, key=lambda r: (float(r["val_accuracy"]), -float(r["val_loss"])))
                                       ["model.dropout"])
    assert "reusing ingest" in result.stderr  # what every combination shares is not recomputed
    assert "reusing the backbone's features" in result.stderr  # computed once, by the first combination
    assert not (artifacts / "sweep" / "runs" / "01-dropout-0.1" / "evaluate").exists()


def test_until_evaluate_is_refused(world, tmp_path):
    with pytest.raises(ConfigError, match="never evaluates"):
        sweep.run(lambda combo: config.load(SMOKE_CONFIG), tmp_path, {"model.dropout": ["0.1"]}, until="evaluate")
