"""The classifier, its head, and splitting it at a block for fine-tuning on cached activations."""
import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.train import models

CFG = ModelConfig(backbone="mobilenet", alpha=0.25, image_size=32, weights=None)


@pytest.fixture(scope="module")
def classifier():
    return models.build_classifier(CFG, 3)


def test_classifier_shape_and_frozen_base(classifier):
    assert classifier.input.name.startswith("image")
    assert classifier.output_shape == (None, 3)
    assert not models.backbone_of(classifier).trainable
    assert [w.name for w in classifier.trainable_weights] == ["logits/kernel:0", "logits/bias:0"]


@pytest.mark.parametrize("block", ["block7", "block12", "block13"])
def test_split_at_block_composes_to_the_classifier(classifier, block):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    lower, upper = models.split_at(classifier, "mobilenet", block)
    np.testing.assert_allclose(upper.predict(lower.predict(x, verbose=0), verbose=0),
                               classifier.predict(x, verbose=0), atol=1e-6)
    # The upper part shares the classifier's layers: changing one changes the other.
    dense = upper.get_layer("logits")
    assert dense is classifier.get_layer("logits")


@pytest.mark.parametrize("block", ["block7", "block13"])
def test_features_and_activations_are_the_extractor_and_the_frozen_part_in_one_pass(classifier, block):
    x = np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    features, activations = (out.numpy() for out in
                             models.features_and_activations(classifier, "mobilenet", block)(x, training=False))
    lower, _ = models.split_at(classifier, "mobilenet", block)
    # The same layers on the same batch: equal up to float32 rounding of the same operations.
    np.testing.assert_allclose(features, models.feature_extractor(classifier)(x, training=False).numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(activations, lower(x, training=False).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backbone, cut", [("efficientnet_lite0", "block2b"), ("efficientnet_lite0", "block6a"),
                                           ("efficientnet_lite0", "top"), ("mobilenet_v2", "block_3"),
                                           ("mobilenet_v2", "block_16")])
def test_split_inside_a_residual_network_composes_to_the_classifier(backbone, cut):
    """A cut just before a residual block: its input feeds both the block and the skip connection."""
    model = models.build_classifier(ModelConfig(backbone=backbone, image_size=32, weights=None), 3)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    lower, upper = models.split_at(model, backbone, cut)
    np.testing.assert_allclose(upper.predict(lower.predict(x, verbose=0), verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)
    frozen = {layer.name for layer in lower.layers}
    trained = {layer.name for layer in upper.get_layer("trained_blocks").layers}
    assert not (frozen & trained) - {lower.layers[0].name}


def test_backbone_runs_in_inference_mode_even_when_trainable():
    """The classifier calls its backbone with training=False: BatchNorm keeps its moving statistics."""
    model = models.build_classifier(ModelConfig(backbone="efficientnet_lite0", image_size=32, weights=None), 3)
    models.backbone_of(model).trainable = True
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    features = models.feature_extractor(model)  # the head's Dropout does obey training=True
    np.testing.assert_allclose(features(x, training=True).numpy(), features(x, training=False).numpy(), atol=1e-6)


def test_head_weights_copy_into_the_classifier(classifier):
    head = models.build_head(CFG, 3, 256)
    kernel = np.random.default_rng(1).normal(size=(256, 3)).astype(np.float32)
    head.get_layer("logits").set_weights([kernel, np.zeros(3, np.float32)])
    models.copy_head(head, classifier)
    np.testing.assert_array_equal(classifier.get_layer("logits").get_weights()[0], kernel)


@pytest.mark.parametrize("backbone, size, hidden", [("mynet", 28, 200), ("smallcnn", 32, 128)])
def test_small_networks_train_whole_and_are_what_their_definitions_say(backbone, size, hidden):
    model = models.build_classifier(ModelConfig(backbone=backbone, image_size=size, weights=None), 4)
    base = models.backbone_of(model)
    assert base.trainable and all(layer.trainable for layer in base.layers)
    assert models.feature_extractor(model).output_shape == (None, hidden)  # no pooling of a vector
    dense = [layer for layer in base.layers if type(layer).__name__ == "Dense"]
    assert [d.units for d in dense] == [hidden] and dense[0].activation.__name__ == "relu"
    if backbone == "smallcnn":  # two convolution + max-pooling blocks of 32 and 64 3x3 filters
        convs = [layer for layer in base.layers if type(layer).__name__ == "Conv2D"]
        pools = [layer for layer in base.layers if type(layer).__name__ == "MaxPooling2D"]
        assert [(c.filters, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3))] and len(pools) == 2
    else:  # MyNet: 28 x 28 x 3 pixels into 200 units
        assert dense[0].kernel.shape == (28 * 28 * 3, 200)
    assert model.output_shape == (None, 4)


def test_pretrained_backbones_stay_frozen():
    model = models.build_classifier(ModelConfig(backbone="mobilenet", alpha=0.25, image_size=32, weights=None), 3)
    assert not models.backbone_of(model).trainable


def test_logits_are_the_dense_layers_output_and_divided_logits_soften_the_softmax():
    from scipy.special import softmax

    classifier = models.build_classifier(CFG, 3)  # its own: the module's is shared
    classifier.get_layer("logits").set_weights([w * 40 for w in classifier.get_layer("logits").get_weights()])
    pixels = np.random.default_rng(0).uniform(-1, 1, (4, *classifier.input_shape[1:])).astype(np.float32)
    logits, probabilities = models.logits_and_probabilities(classifier).predict(pixels, verbose=0)
    np.testing.assert_allclose(probabilities, softmax(logits, axis=1), rtol=1e-5, atol=1e-7)
    models.divide_logits(classifier, 2.5)
    np.testing.assert_allclose(classifier.predict(pixels, verbose=0), softmax(logits.astype(np.float64) / 2.5, axis=1),
                               rtol=1e-5, atol=1e-7)
