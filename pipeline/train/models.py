"""The classifier: backbone, then GlobalAveragePooling -> Dropout -> Dense(L2) -> softmax; saving and loading."""
from __future__ import annotations

from pipeline.backbones import BACKBONES, build_base, cut_layer

HEAD_ONLY = ("dropout", "l2")
"""The model keys that shape only the head, so the frozen backbone's outputs do not depend on them."""


def _keras():
    """tf_keras, with its random layers (Dropout) drawing from a tf.random.Generator each: one that training can
    reseed per epoch (pipeline.train.training), so that a resumed run draws what an unbroken one would have."""
    import tf_keras as keras

    keras.backend.experimental.enable_tf_random_generator()
    return keras


def _head_layers(model_cfg, n_classes):
    keras = _keras()

    return [
        keras.layers.Dropout(model_cfg.dropout, name="dropout"),
        keras.layers.Dense(n_classes, kernel_regularizer=keras.regularizers.l2(model_cfg.l2), name="logits"),
        keras.layers.Activation("softmax", name="probabilities"),
    ]


def build_classifier(model_cfg, n_classes):
    """The full classifier; the backbone always runs in inference mode, frozen unless it trains from scratch.

    A backbone ending in a feature map is pooled (GlobalAveragePooling); one ending in a vector (the small
    networks) passes it on unchanged through a layer of the same name, so every classifier has a "pool".
    """
    keras = _keras()

    base = build_base(model_cfg)
    base.trainable = BACKBONES[model_cfg.backbone].from_scratch
    inputs = keras.Input((model_cfg.image_size, model_cfg.image_size, 3), name="image")
    features = base(inputs, training=False)
    pool = (keras.layers.GlobalAveragePooling2D(name="pool") if len(features.shape) == 4
            else keras.layers.Activation("linear", name="pool"))
    x = pool(features)
    for layer in _head_layers(model_cfg, n_classes):
        x = layer(x)
    return keras.Model(inputs, x, name="multisnacks")


def build_head(model_cfg, n_classes, feature_dim):
    """The head alone, on pooled backbone features; its layers have the classifier's head layer names."""
    keras = _keras()

    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    for layer in _head_layers(model_cfg, n_classes):
        x = layer(x)
    return keras.Model(inputs, x, name="head")


def feature_extractor(classifier):
    """The classifier's backbone and pooling as a model from images to pooled features."""
    import tf_keras as keras

    return keras.Model(classifier.input, classifier.get_layer("pool").output, name="features")


def weights_digest(model):
    """The SHA-256 hex digest of a model's weights (every array's shape, dtype and bytes, in layer order)."""
    import hashlib

    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def split_at(classifier, backbone_name, cut):
    """Split a classifier at a cut point of its backbone: (frozen part, the rest as a model sharing its layers).

    The rest takes the frozen part's output; training it trains the classifier's own layers. Any cut point
    whose layers above depend only on the cut tensor works, residual networks included.
    """
    import tf_keras as keras

    base = backbone_of(classifier)
    cut_tensor = base.layers[cut_layer(base, backbone_name, cut)].input
    lower = keras.Model(base.input, cut_tensor, name="frozen_blocks")
    rest = keras.Model(cut_tensor, base.output, name="trained_blocks")
    inputs = keras.Input(cut_tensor.shape[1:], name="activations")
    x = rest(inputs, training=False)
    for name in ("pool", "dropout", "logits", "probabilities"):
        x = classifier.get_layer(name)(x)
    return lower, keras.Model(inputs, x, name="upper_blocks")


def features_and_activations(classifier, backbone_name, cut):
    """A model from images to (pooled features, the backbone's activations at cut point `cut`): one forward pass
    computes both, each as `feature_extractor` and `split_at`'s frozen part compute it alone."""
    import tf_keras as keras

    base = backbone_of(classifier)
    inner = keras.Model(base.input, [base.output, base.layers[cut_layer(base, backbone_name, cut)].input])
    images = keras.Input(classifier.input.shape[1:], name="image")
    features, activations = inner(images, training=False)
    return keras.Model(images, [classifier.get_layer("pool")(features), activations], name="features_and_activations")


def backbone_of(classifier):
    """The nested backbone model inside a classifier."""
    return classifier.layers[1]


def logits_and_probabilities(classifier):
    """A model of the classifier's layers that outputs [logits, probabilities]: the Dense layer's output before the
    softmax, and the classifier's own output."""
    keras = _keras()

    return keras.Model(classifier.inputs, [classifier.get_layer("logits").output, classifier.output])


def divide_logits(classifier, temperature):
    """Divide the classifier's logits by `temperature`, in place, by dividing its Dense layer's kernel and bias:
    its softmax then gives softmax(logits / temperature), and every format converted from it does too."""
    import numpy as np

    layer = classifier.get_layer("logits")
    kernel, bias = layer.get_weights()
    layer.set_weights([(kernel / np.float32(temperature)).astype(kernel.dtype),
                       (bias / np.float32(temperature)).astype(bias.dtype)])


def copy_head(head, classifier):
    """Copy trained head weights into the classifier's head (its Dense layer holds all of them)."""
    classifier.get_layer("logits").set_weights(head.get_layer("logits").get_weights())


def save(model, path):
    """Save a classifier as a Keras HDF5 file (the format coremltools, tf2onnx and older tools all read)."""
    import logging
    import warnings

    tf_logger = logging.getLogger("tensorflow")  # "compiled metrics have yet to be built": harmless here
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy")
            model.save(str(path))
    finally:
        tf_logger.setLevel(level)


def load(path):
    """Load a saved classifier (without its training configuration)."""
    keras = _keras()

    return keras.models.load_model(str(path), compile=False)
