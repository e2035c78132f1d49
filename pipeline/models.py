"""The classifier: backbone, then GlobalAveragePooling -> Dropout -> Dense(L2) -> softmax; saving and loading."""
from __future__ import annotations

from pipeline.backbones import build_base

HEAD_LAYERS = ("pool", "dropout", "logits", "probabilities")


def _head_layers(model_cfg, n_classes):
    import tf_keras as keras

    return [
        keras.layers.Dropout(model_cfg.dropout, name="dropout"),
        keras.layers.Dense(n_classes, kernel_regularizer=keras.regularizers.l2(model_cfg.l2), name="logits"),
        keras.layers.Activation("softmax", name="probabilities"),
    ]


def build_classifier(model_cfg, n_classes, weights_dir=None):
    """The full classifier with its backbone frozen (BatchNormalization then runs in inference mode)."""
    import tf_keras as keras

    base = build_base(model_cfg, weights_dir)
    base.trainable = False
    inputs = keras.Input((model_cfg.image_size, model_cfg.image_size, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(base(inputs))
    for layer in _head_layers(model_cfg, n_classes):
        x = layer(x)
    return keras.Model(inputs, x, name="multisnacks")


def build_head(model_cfg, n_classes, feature_dim):
    """The head alone, on pooled backbone features; its layers have the classifier's head layer names."""
    import tf_keras as keras

    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    for layer in _head_layers(model_cfg, n_classes):
        x = layer(x)
    return keras.Model(inputs, x, name="head")


def feature_extractor(classifier):
    """The classifier's backbone and pooling as a model from images to pooled features."""
    import tf_keras as keras

    return keras.Model(classifier.input, classifier.get_layer("pool").output, name="features")


def backbone_of(classifier):
    """The nested backbone model inside a classifier."""
    return classifier.layers[1]


def copy_head(head, classifier):
    """Copy trained head weights into the classifier's head layers."""
    for name in ("logits",):
        classifier.get_layer(name).set_weights(head.get_layer(name).get_weights())


def load(path):
    """Load a saved classifier (without its training configuration)."""
    import tf_keras as keras

    return keras.models.load_model(str(path), compile=False)
