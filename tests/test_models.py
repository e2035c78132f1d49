"""The classifier, its head, and splitting it at a block for fine-tuning on cached activations."""
import numpy as np
import pytest

from pipeline import models
from pipeline.config import ModelConfig

CFG = ModelConfig(alpha=0.25, image_size=32, weights=None)


@pytest.fixture(scope="module")
def classifier():
    return models.build_classifier(CFG, 3)


def test_classifier_shape_and_frozen_base(classifier):
    assert classifier.input.name.startswith("image")
    assert classifier.output_shape == (None, 3)
    assert not models.backbone_of(classifier).trainable
    assert [w.name for w in classifier.trainable_weights] == ["logits/kernel:0", "logits/bias:0"]


@pytest.mark.parametrize("block", [7, 12, 13])
def test_split_at_block_composes_to_the_classifier(classifier, block):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    lower, upper = models.split_at_block(classifier, block)
    np.testing.assert_allclose(upper.predict(lower.predict(x, verbose=0), verbose=0),
                               classifier.predict(x, verbose=0), atol=1e-6)
    # The upper part shares the classifier's layers: changing one changes the other.
    dense = upper.get_layer("logits")
    assert dense is classifier.get_layer("logits")


def test_head_weights_copy_into_the_classifier(classifier):
    head = models.build_head(CFG, 3, 256)
    kernel = np.random.default_rng(1).normal(size=(256, 3)).astype(np.float32)
    head.get_layer("logits").set_weights([kernel, np.zeros(3, np.float32)])
    models.copy_head(head, classifier)
    np.testing.assert_array_equal(classifier.get_layer("logits").get_weights()[0], kernel)
