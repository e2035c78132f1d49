"""Fine-tuning: which layers unfreeze, and the live and cached input paths on the smoke world."""
import shutil

import numpy as np
import pytest
from conftest import SMOKE_CONFIG

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.runner import Runner
from pipeline.stages.finetune import unfreeze
from pipeline.train import models


@pytest.mark.parametrize("cut, freeze_bn, first", [("all", False, "conv1"), ("block7", True, "conv_dw_7"),
                                                  ("block12", False, "conv_dw_12")])
def test_unfreeze(cut, freeze_bn, first):
    import tf_keras as keras

    model = models.build_classifier(config.ModelConfig(backbone="mobilenet", alpha=0.25, image_size=32, weights=None), 3)
    unfreeze(model, "mobilenet", cut, freeze_bn)
    base = models.backbone_of(model)
    names = [layer.name for layer in base.layers if layer.trainable and layer.weights]
    assert names[0] == first
    assert "conv_pw_13" in names
    bn_trainable = [layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert any(bn_trainable) != freeze_bn


def test_cached_inputs_need_a_frozen_lower_part():
    with pytest.raises(ConfigError, match="finetune.unfreeze_from"):
        config.from_dict({"finetune": {"inputs": "cached", "unfreeze_from": "all", "freeze_batchnorm": True}})
    with pytest.raises(ConfigError, match="finetune.freeze_batchnorm"):
        config.from_dict({"finetune": {"inputs": "cached", "unfreeze_from": "block7", "freeze_batchnorm": False}})


@pytest.mark.parametrize("inputs", ["live", "cached"])
def test_finetune_trains_only_the_unfrozen_blocks(world, tmp_path, inputs, calibrated_weights_dir):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    raw = {name: config.load(SMOKE_CONFIG).section(name) for name in ("ingest", "augment", "model", "train_head", "evaluate")}
    raw["data"] = {"path": str(world["data"])}
    raw["model"]["weights"] = "imagenet"  # the calibrated stand-in: random weights make every gradient vanish
    raw["model"]["weights_dir"] = str(calibrated_weights_dir)
    raw["finetune"] = {"epochs": 1, "batch_size": 4, "learning_rate": 0.01, "unfreeze_from": "block12",
                       "freeze_batchnorm": True, "inputs": inputs, "augmented_views": 1}
    runner = Runner(config.from_dict(raw), artifacts)
    assert runner.run(["finetune"]) == ["train-head", "finetune"]  # augment reads model.backbone and model.image_size only
    before = models.backbone_of(models.load(artifacts / "train-head" / "model.h5"))
    after = models.backbone_of(models.load(artifacts / "finetune" / "model.h5"))
    changed = {layer.name for layer, old in zip(after.layers, before.layers)
               if any(not np.array_equal(a, b) for a, b in zip(layer.get_weights(), old.get_weights()))}
    assert "conv_pw_13" in changed
    assert not {"conv1", "conv_pw_11", "conv_dw_12_bn", "conv_pw_13_bn"} & changed
