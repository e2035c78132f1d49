"""A registry of backbones: builder, input preprocessing, weight file names, and where to find the weights."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.catalog import keras_home
from pipeline.errors import WeightsError

WEIGHTS_DIR_ENV = "MULTISNACKS_WEIGHTS_DIR"


@dataclass(frozen=True)
class Backbone:
    """What the pipeline needs to know about one backbone family.

    input_scale, input_bias: the backbone's preprocess_input as `x * scale + bias` on 0-255 RGB pixels;
        the exports carry these so that phones feed raw pixels.
    weight_sizes: the input sizes Keras publishes ImageNet weights for.
    """

    name: str
    alphas: tuple
    weight_sizes: tuple
    input_scale: float
    input_bias: float
    builder: Callable
    preprocess_module: str
    weight_file: Callable

    def preprocess_input(self):
        """The backbone's own Keras preprocess_input function."""
        import importlib

        return importlib.import_module(self.preprocess_module).preprocess_input


def _mobilenet_builder(image_size, alpha, weights=None):
    import tf_keras as keras

    return keras.applications.MobileNet(input_shape=(image_size, image_size, 3), alpha=alpha,
                                        include_top=False, weights=weights)


def _mobilenet_weight_file(alpha, size):
    alpha_text = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}[alpha]
    return f"mobilenet_{alpha_text}_{size}_tf_no_top.h5"


BACKBONES = {
    "mobilenet": Backbone(
        name="mobilenet", alphas=(0.25, 0.5, 0.75, 1.0), weight_sizes=(128, 160, 192, 224),
        input_scale=2 / 255, input_bias=-1.0, builder=_mobilenet_builder,
        preprocess_module="tf_keras.applications.mobilenet", weight_file=_mobilenet_weight_file),
}


def block_start_layer(base, block):
    """Index of the first layer of MobileNet depthwise block `block` (1-13) in `base.layers`."""
    names = [layer.name for layer in base.layers]
    for candidate in (f"conv_pad_{block}", f"conv_dw_{block}"):
        if candidate in names:
            return names.index(candidate)
    raise ValueError(f"backbone '{base.name}' has no block {block}")


def keras_cache_dir():
    """The folder where Keras caches downloaded model weights."""
    return keras_home() / "models"


def candidate_weight_files(backbone, alpha, image_size, weights_dir=None):
    """The local files that can initialise this backbone, best first.

    The 224 px file fits a model of any input size (convolution weights do not depend on it), so it is
    a candidate wherever Keras would want a file for another size.
    """
    sizes = [image_size] if image_size in backbone.weight_sizes else []
    sizes += [s for s in (224,) if s not in sizes]
    folders = [Path(weights_dir)] if weights_dir else []
    folders.append(keras_cache_dir())
    return [folder / backbone.weight_file(alpha, size) for folder in folders for size in sizes]


def build_base(model_cfg, weights_dir=None):
    """Build the backbone without its top, with ImageNet weights from a local file or Keras's download."""
    backbone = BACKBONES[model_cfg.backbone]
    base = backbone.builder(model_cfg.image_size, model_cfg.alpha)
    if model_cfg.weights is None:
        return base
    weights_dir = weights_dir or os.environ.get(WEIGHTS_DIR_ENV) or None
    if weights_dir and not Path(weights_dir).is_dir():
        raise WeightsError(f"weights folder '{weights_dir}' (from ${WEIGHTS_DIR_ENV}) does not exist; "
                           "point it at a folder of Keras weight files or unset it")
    for path in candidate_weight_files(backbone, model_cfg.alpha, model_cfg.image_size, weights_dir):
        if path.is_file():
            base.load_weights(str(path))
            return base
    wanted = backbone.weight_file(model_cfg.alpha, model_cfg.image_size
                                  if model_cfg.image_size in backbone.weight_sizes else 224)
    try:
        return backbone.builder(model_cfg.image_size, model_cfg.alpha, weights="imagenet")
    except Exception as exc:  # Keras raises several kinds for a failed download
        raise WeightsError(
            f"cannot load ImageNet weights for {model_cfg.backbone} alpha {model_cfg.alpha}: the file "
            f"'{wanted}' is not in {keras_cache_dir()} and downloading it failed ({exc}). Download it "
            f"from Keras's releases into {keras_cache_dir()}, or set ${WEIGHTS_DIR_ENV} to a folder "
            f"holding it (the 224 px file serves any input size).") from exc
