"""Config loading and validation: defaults, the shipped configs, and errors that name key, value and what is allowed."""
from pathlib import Path

import pytest

from pipeline import config
from pipeline.environment import WEIGHTS_DIR_ENV
from pipeline.errors import ConfigError
from pipeline.train.training import check_batch_size

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["multisnacks.yaml", "best.yaml", "lite0.yaml", "book.yaml", "smoke.yaml",
                                  "mobilenet.yaml", "mynet.yaml", "smallcnn.yaml"])
def test_shipped_configs_load(name):
    cfg = config.load(CONFIGS / name)
    assert cfg.model.backbone == {"multisnacks.yaml": "efficientnet_lite2", "best.yaml": "efficientnet_lite2",
                                  "lite0.yaml": "efficientnet_lite0",
                                  "mynet.yaml": "mynet", "smallcnn.yaml": "smallcnn"}.get(name, "mobilenet")


def test_the_default_config_file_is_the_dataclass_defaults():
    """One source of defaults: configs/multisnacks.yaml (what `make all` runs) sets nothing the dataclasses do not."""
    assert config.load(CONFIGS / "multisnacks.yaml") == config.from_dict({})
    cfg = config.from_dict({})
    assert (cfg.model.backbone, cfg.model.image_size) == ("efficientnet_lite2", 260)
    assert (cfg.train_head.features, cfg.finetune.inputs, cfg.finetune.unfreeze_from) == ("cached", "cached", "block6a")


def test_a_network_without_cut_points_needs_none_when_it_is_not_fine_tuned():
    cfg = config.from_dict({"model": {"backbone": "mynet", "weights": None}, "train_head": {"features": "live"},
                            "finetune": {"epochs": 0}})
    assert cfg.finetune.epochs == 0
    with pytest.raises(ConfigError, match="finetune.unfreeze_from.*a cut point of mynet: none"):
        config.from_dict({"model": {"backbone": "mynet", "weights": None}, "train_head": {"features": "live"},
                          "finetune": {"epochs": 1, "inputs": "live"}})


def test_book_config_is_the_books_recipe():
    cfg = config.load(CONFIGS / "book.yaml")
    assert (cfg.train_head.epochs, cfg.train_head.features, cfg.train_head.learning_rate) == (10, "live", 1e-3)
    assert (cfg.finetune.epochs, cfg.finetune.unfreeze_from, cfg.finetune.learning_rate) == (20, "all", 1e-4)
    assert cfg.model.image_size == 224 and cfg.model.dropout == 0.5 and cfg.model.l2 == 0.001


def test_missing_keys_take_defaults():
    cfg = config.from_dict({"model": {"backbone": "mobilenet", "alpha": 0.5}, "finetune": {"unfreeze_from": "block7"}})
    assert cfg.model.alpha == 0.5 and cfg.finetune.unfreeze_from == "block7"
    assert cfg.augment.rotation_range == 40 and cfg.augment.fill_mode == "nearest"


def test_data_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: /somewhere\n")
    assert config.load(path, data="/elsewhere").data.path == "/elsewhere"
    assert config.load(path).data.path == "/somewhere"


@pytest.mark.parametrize("raw, words", [
    ({"model": {"dropuot": 0.5}}, ["model.dropuot", "unknown", "dropout"]),
    ({"modle": {}}, ["modle", "is unknown", "model"]),
    ({"model": {"dropout": 1.0}}, ["model.dropout", "1.0", "[0, 1)"]),
    ({"model": {"dropout": -0.1}}, ["model.dropout", "-0.1"]),
    ({"model": {"dropout": "high"}}, ["model.dropout", "'high'", "a number"]),
    ({"train_head": {"learning_rate": 0}}, ["train_head.learning_rate", "0", "(0, 1]"]),
    ({"finetune": {"learning_rate": -1e-4}}, ["finetune.learning_rate", "-0.0001"]),
    ({"train_head": {"epochs": 2.5}}, ["train_head.epochs", "2.5", "an integer"]),
    ({"train_head": {"features": "sometimes"}}, ["train_head.features", "'live'", "'cached'"]),
    ({"ingest": {"on_bad_image": "ignore"}}, ["ingest.on_bad_image", "'skip'", "'fail'"]),
    ({"model": {"backbone": "mobilenet", "alpha": 0.6}}, ["model.alpha", "0.6", "0.75"]),
    ({"model": {"backbone": "efficientnet_lite0", "alpha": 0.75}}, ["model.alpha", "0.75", "[1.0]"]),
    ({"model": {"backbone": "resnet"}}, ["model.backbone", "'resnet'", "efficientnet_lite0"]),
    ({"model": {"backbone": "mobilenet"}, "finetune": {"unfreeze_from": "block14"}},
     ["finetune.unfreeze_from", "block14", "block13"]),
    ({"finetune": {"unfreeze_from": 7}}, ["finetune.unfreeze_from", "7", "a string"]),
    ({"model": {"backbone": "efficientnet_lite0"}, "finetune": {"unfreeze_from": "block7"}},
     ["finetune.unfreeze_from", "block7", "block6a", "top"]),
    ({"train_head": {"schedule": "step"}}, ["train_head.schedule", "'cosine'"]),
    ({"finetune": {"warmup_epochs": 20}}, ["finetune.warmup_epochs", "20", "finetune.epochs"]),
    ({"finetune": {"label_smoothing": 1.0}}, ["finetune.label_smoothing", "[0, 1)"]),
    ({"finetune": {"augmented_views": 1, "views_per_epoch": 4}}, ["finetune.views_per_epoch", "4", "[1, 3]"]),
    ({"export": {"formats": ["coreml", "pdf"]}}, ["export.formats", "pdf", "onnx"]),
    ({"augment": {"horizontal_flip": "yes"}}, ["augment.horizontal_flip", "true/false"]),
    ({"model": "big"}, ["model", "mapping"]),
    ({"train_head": {"augmented_views": -1}}, ["train_head.augmented_views", "-1", "[0, 50]"]),
    ({"finetune": {"augmented_views": 99}}, ["finetune.augmented_views", "99", "[0, 50]"]),
    ({"export": {"reduced_min_top1_agreement": 99}}, ["export.reduced_min_top1_agreement", "99", "[0, 1]"]),
    ({"export": {"latency_images": 0}}, ["export.latency_images", "0", "positive"]),
    ({"export": {"calibration_images": 0}}, ["export.calibration_images", "0", "from 1 to 10000"]),
    ({"export": {"calibration_images": 2.5}}, ["export.calibration_images", "2.5", "an integer"]),
    ({"export": {"formats": ["onnx", "onnx"]}}, ["export.formats", "twice"]),
])
def test_validation_errors_name_key_value_and_allowed(raw, words):
    with pytest.raises(ConfigError) as err:
        config.from_dict(raw)
    for word in words:
        assert word in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_error_from_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  learning_rate: -1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: config key 'finetune.learning_rate'"):
        config.load(path)


def test_batch_size_larger_than_training_set():
    check_batch_size("train_head", 8, 8)
    with pytest.raises(ConfigError, match=r"'train_head.batch_size' has value 64, larger than the training set \(10"):
        check_batch_size("train_head", 64, 10)


def test_readme_key_table_lists_every_config_key():
    """The README's table of config keys names exactly the fields of each section's dataclass (their meaning is
    documented once, in the dataclasses' docstrings)."""
    import dataclasses
    import re

    readme = (CONFIGS.parent / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", readme, flags=re.M))
    for f in dataclasses.fields(config.Config):
        listed = set(re.findall(r"`(\w+)`", rows.get(f.name, "")))
        fields = {g.name for g in dataclasses.fields(f.type if isinstance(f.type, type) else getattr(config, f.type))}
        assert listed == fields, (f.name, sorted(fields - listed), sorted(listed - fields))


def test_overrides_are_read_as_yaml_values():
    raw = config.apply_overrides({"finetune": {"epochs": 3}}, ["finetune.learning_rate=1e-4", "export.formats=[onnx]",
                                                               "model.alpha=null", "evaluate.tta_flip=false"])
    cfg = config.from_dict(raw)
    assert cfg.finetune.epochs == 3 and cfg.finetune.learning_rate == 1e-4
    assert cfg.export.formats == ["onnx"] and cfg.model.alpha is None and cfg.evaluate.tta_flip is False


def test_weights_dir_defaults_to_the_environment_variable(monkeypatch):
    monkeypatch.setenv(WEIGHTS_DIR_ENV, "/some/folder")
    assert config.from_dict({}).model.weights_dir == "/some/folder"
    assert config.from_dict({"model": {"weights_dir": "/other"}}).model.weights_dir == "/other"
    monkeypatch.delenv(WEIGHTS_DIR_ENV)
    assert config.from_dict({}).model.weights_dir is None


def test_default_export_list_holds_the_files_that_pass_on_snacks():
    formats = config.from_dict({}).export.formats
    assert {"coreml", "coreml-mlprogram", "onnx", "onnx-fp16", "tflite", "tflite-fp16"} == set(formats)
    for name in ("coreml-fp16", "coreml-int8", "tflite-int8", "coreml-mlprogram-fp32", "coreml-mlprogram-int8",
                 "coreml-mlprogram-palette8", "coreml-mlprogram-palette6", "coreml-mlprogram-mixed",
                 "tflite-int8-full"):  # exported when named
        assert name not in formats and config.from_dict({"export": {"formats": [name]}}).export.formats == [name]
    assert config.load(config.DEFAULT_CONFIG).export.formats == formats  # the make-all config lists the same


@pytest.mark.parametrize("raw, key", [
    ({"model": {"backbone": "mynet", "weights": "imagenet"}}, "model.weights"),
    ({"model": {"backbone": "mynet", "weights": None, "image_size": 4}}, "model.image_size"),
    ({"model": {"backbone": "smallcnn", "weights": None, "image_size": 32}, "train_head": {"features": "cached"}},
     "train_head.features"),
    ({"train_head": {"optimizer": "lbfgs"}}, "train_head.optimizer"),
    ({"finetune": {"momentum": 1.0}}, "finetune.momentum"),
    ({"train_head": {"class_weight": "auto"}}, "train_head.class_weight"),
])
def test_small_network_and_optimizer_keys_are_validated(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.from_dict(raw)


def test_the_small_network_configs_load():
    for name in ("mynet", "smallcnn"):
        cfg = config.load(CONFIGS / f"{name}.yaml")
        assert cfg.model.backbone == name and cfg.model.weights is None and cfg.finetune.epochs == 0
        assert cfg.train_head.optimizer == "sgd" and not cfg.augment.horizontal_flip
