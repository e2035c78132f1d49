"""The backbone registry: each entry says how to build the network, its input preprocessing, where its ImageNet
weights come from, and its named cut points for partial fine-tuning. Nothing else in the pipeline knows a
backbone's details.

Every backbone is called by the classifier with `training=False`, so its BatchNormalization layers always
normalise with their ImageNet statistics, frozen or not (the Keras transfer-learning recipe).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.environment import WEIGHTS_DIR_ENV, keras_cache_dir
from pipeline.errors import WeightsError


@dataclass(frozen=True)
class Backbone:
    """What the pipeline needs to know about one backbone family.

    input_scale, input_bias: the input preprocessing as `x * scale + bias` on 0-255 RGB pixels, one scale for
        all channels and a (red, green, blue) bias (Core ML's image scaler has exactly these); training applies
        it and the exports carry it, so that phones feed raw pixels. A network trained on BGR has the input
        channels of its first convolution reversed when its weights load, so every backbone takes RGB.
    alphas: the width multipliers it can be built with; the first is the default.
    build: (image_size, alpha) -> the network without its top, randomly initialised.
    pretrained: (image_size, alpha, weights_dir) -> the same network with its ImageNet weights, or a
        WeightsError naming the missing file and where to put it; None for a network trained from scratch
        (train-head then trains all of it, and model.weights must be null).
    cut_points: name -> the candidate names of the first layer after the cut, in the order to try; training
        from a cut point on trains that layer and everything above it.
    weights_source: where the ImageNet weights come from, in words.
    min_image_size: the smallest input it can be built for.
    """

    name: str
    input_scale: float
    input_bias: tuple
    alphas: tuple
    build: Callable
    pretrained: Callable
    cut_points: dict
    weights_source: str
    min_image_size: int = 32

    @property
    def from_scratch(self):
        """Whether the network has no pretrained weights and is trained whole from random initialisation."""
        return self.pretrained is None


def scale_bias(x, scale, bias):
    """A backbone's preprocessing on 0-255 RGB pixels (..., 3): `x * scale + bias`, bias per channel."""
    return x * np.float32(scale) + np.asarray(bias, dtype=np.float32)


# MobileNet v1 and v2, ResNet50: Keras's applications and their published no-top weight files.

def _keras_weights_loader(application, weight_file, weight_sizes, adapt=lambda base: base):
    """A `pretrained` function for a Keras application: a local file first, else Keras's own download.

    The 224 px file fits a model of any input size (convolution weights do not depend on it), so it is a
    candidate wherever Keras would want a file for another size. `adapt` is applied to the loaded network.
    """

    def pretrained(image_size, alpha, weights_dir=None):
        return adapt(_load(image_size, alpha, weights_dir))

    def _load(image_size, alpha, weights_dir):
        sizes = [image_size] if image_size in weight_sizes else []
        sizes += [s for s in (224,) if s not in sizes]
        folders = [Path(weights_dir)] if weights_dir else []
        folders.append(keras_cache_dir())
        for path in (folder / weight_file(alpha, size) for folder in folders for size in sizes):
            if path.is_file():
                base = application(image_size, alpha)
                base.load_weights(str(path))
                return base
        wanted = weight_file(alpha, image_size if image_size in weight_sizes else 224)
        try:
            return application(image_size, alpha, weights="imagenet")
        except Exception as exc:  # Keras raises several kinds for a failed download
            raise WeightsError(
                f"cannot load ImageNet weights: the file '{wanted}' is not in {keras_cache_dir()} and "
                f"downloading it failed ({exc}). Download it from Keras's releases into {keras_cache_dir()}, "
                f"or set ${WEIGHTS_DIR_ENV} (or --weights-dir) to a folder holding it (the 224 px file "
                "serves any input size).") from exc

    return pretrained


def _mobilenet(image_size, alpha, weights=None):
    import tf_keras as keras

    return keras.applications.MobileNet(input_shape=(image_size, image_size, 3), alpha=alpha,
                                        include_top=False, weights=weights)


def mobilenet_weight_file(alpha, size):
    """Keras's file name for MobileNet v1's no-top ImageNet weights."""
    alpha_text = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}[alpha]
    return f"mobilenet_{alpha_text}_{size}_tf_no_top.h5"


def _mobilenet_v2(image_size, alpha, weights=None):
    import tf_keras as keras

    return keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3), alpha=alpha,
                                          include_top=False, weights=weights)


def mobilenet_v2_weight_file(alpha, size):
    """Keras's file name for MobileNet v2's no-top ImageNet weights."""
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{size}_no_top.h5"


def _resnet50(image_size, alpha, weights=None):
    import tf_keras as keras

    return keras.applications.ResNet50(input_shape=(image_size, image_size, 3), include_top=False, weights=weights)


def resnet50_weight_file(alpha, size):
    """Keras's file name for ResNet50's no-top ImageNet weights (one file for every input size)."""
    return "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


def rgb_first_conv(base, layer_name="conv1_conv"):
    """Make a network trained on BGR input take RGB: reverse the input channels of its first convolution."""
    layer = base.get_layer(layer_name)
    kernel, *rest = layer.get_weights()
    layer.set_weights([kernel[:, :, ::-1, :], *rest])
    return base


def _resnet50_cut_points():
    blocks = {2: 3, 3: 4, 4: 6, 5: 3}  # ResNet50's residual blocks per stage
    return {f"conv{stage}_block{b}": (f"conv{stage}_block{b}_1_conv",)
            for stage, count in blocks.items() for b in range(1, count + 1)}


# Small networks trained from scratch: the head (Dropout, Dense softmax) goes on their last hidden layer.

def _mynet(image_size, alpha):
    """MyNet: the pixels flattened into one hidden layer of 200 ReLU units."""
    import tf_keras as keras

    inputs = keras.Input((image_size, image_size, 3), name="input")
    x = keras.layers.Flatten(name="flatten")(inputs)
    return keras.Model(inputs, keras.layers.Dense(200, activation="relu", name="hidden")(x), name="mynet")


def _smallcnn(image_size, alpha):
    """Two 3x3 convolution + 2x2 max-pooling blocks (32 and 64 filters), then a Dense layer of 128 ReLU units."""
    import tf_keras as keras

    layers = keras.layers
    inputs = keras.Input((image_size, image_size, 3), name="input")
    x = inputs
    for block, filters in ((1, 32), (2, 64)):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{block}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
    x = layers.Dense(128, activation="relu", name="hidden")(layers.Flatten(name="flatten")(x))
    return keras.Model(inputs, x, name="smallcnn")


# EfficientNet-Lite0, Lite1, Lite2: tf_keras's EfficientNet block configured as Lite, weights from registry
# packages; pipeline.backbones.efficientnet_lite holds each variant's scaling and checkpoint.

def _lite(name):
    """The registry entry of EfficientNet-Lite variant `name`: Google's `(x - 127) / 128` preprocessing, a cut
    point before every block and before the head, and the variant's weights package."""
    from pipeline.backbones import efficientnet_lite

    def build(image_size, alpha):
        return efficientnet_lite.build(image_size, name)

    def pretrained(image_size, alpha, weights_dir=None):
        state = efficientnet_lite.read_checkpoint(name)  # checks the file's SHA-256 before building anything
        base = efficientnet_lite.build(image_size, name)
        efficientnet_lite.load_weights(base, state, name)
        return base

    cuts = {block: (f"{block}_expand_conv", f"{block}_dwconv") for block in efficientnet_lite.block_names(name)}
    cuts["top"] = ("top_conv",)
    package = efficientnet_lite.VARIANTS[name].package
    return Backbone(name=name, input_scale=1 / 128, input_bias=(-127 / 128,) * 3, alphas=(1.0,), build=build,
                    pretrained=pretrained, cut_points=cuts,
                    weights_source=f"the {package} package (Google's checkpoint, read without torch)")


BACKBONES = {b.name: b for b in (
    Backbone(
        name="mobilenet", input_scale=2 / 255, input_bias=(-1.0, -1.0, -1.0), alphas=(0.75, 0.25, 0.5, 1.0),
        build=_mobilenet, pretrained=_keras_weights_loader(_mobilenet, mobilenet_weight_file, (128, 160, 192, 224)),
        cut_points={f"block{n}": (f"conv_pad_{n}", f"conv_dw_{n}") for n in range(1, 14)},
        weights_source="Keras's MobileNet v1 files (mobilenet_<alpha>_<size>_tf_no_top.h5) from --weights-dir, "
                       f"${WEIGHTS_DIR_ENV} or Keras's cache, else Keras's download"),
    Backbone(
        name="mobilenet_v2", input_scale=2 / 255, input_bias=(-1.0, -1.0, -1.0), alphas=(1.0, 0.35, 0.5, 0.75, 1.3, 1.4),
        build=_mobilenet_v2,
        pretrained=_keras_weights_loader(_mobilenet_v2, mobilenet_v2_weight_file, (96, 128, 160, 192, 224)),
        cut_points={"block_0": ("expanded_conv_depthwise",),
                    **{f"block_{i}": (f"block_{i}_expand",) for i in range(1, 17)}, "top": ("Conv_1",)},
        weights_source="Keras's MobileNet v2 files (mobilenet_v2_weights_tf_dim_ordering_tf_kernels_<alpha>_"
                       f"<size>_no_top.h5) from --weights-dir, ${WEIGHTS_DIR_ENV} or Keras's cache, else "
                       "Keras's download"),
    _lite("efficientnet_lite0"),
    _lite("efficientnet_lite1"),
    _lite("efficientnet_lite2"),
    Backbone(
        # Keras's "caffe" preprocessing: BGR minus the ImageNet mean, unscaled; the BGR order is folded into
        # the first convolution, so the input is RGB minus the mean in RGB order.
        name="resnet50", input_scale=1.0, input_bias=(-123.68, -116.779, -103.939), alphas=(1.0,),
        build=_resnet50,
        pretrained=_keras_weights_loader(_resnet50, resnet50_weight_file, (224,), adapt=rgb_first_conv),
        cut_points=_resnet50_cut_points(),
        weights_source="Keras's ResNet50 file (resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5) from "
                       f"--weights-dir, ${WEIGHTS_DIR_ENV} or Keras's cache, else Keras's download"),
    Backbone(
        name="mynet", input_scale=1 / 255, input_bias=(0.0, 0.0, 0.0), alphas=(1.0,), build=_mynet,
        pretrained=None, cut_points={}, weights_source="none: trained from scratch", min_image_size=8),
    Backbone(
        name="smallcnn", input_scale=1 / 255, input_bias=(0.0, 0.0, 0.0), alphas=(1.0,), build=_smallcnn,
        pretrained=None, cut_points={}, weights_source="none: trained from scratch", min_image_size=16),
)}


def alpha_of(model_cfg):
    """The width multiplier the config asks for: `model.alpha`, or the backbone's default when null."""
    return BACKBONES[model_cfg.backbone].alphas[0] if model_cfg.alpha is None else model_cfg.alpha


def cut_layer(base, backbone_name, cut):
    """Index in `base.layers` of the first layer after cut point `cut` of backbone `backbone_name`."""
    names = [layer.name for layer in base.layers]
    points = BACKBONES[backbone_name].cut_points
    if cut not in points:
        raise ValueError(f"backbone '{backbone_name}' has no cut point '{cut}'; it has {list(points)}")
    for candidate in points[cut]:
        if candidate in names:
            return names.index(candidate)
    raise ValueError(f"backbone '{base.name}' has no layer {points[cut]} for its cut point '{cut}'")


def build_base(model_cfg):
    """Build the backbone without its top: with ImageNet weights, or random ones when `model.weights` is null."""
    backbone = BACKBONES[model_cfg.backbone]
    alpha = alpha_of(model_cfg)
    if model_cfg.weights is None:
        return backbone.build(model_cfg.image_size, alpha)
    weights_dir = model_cfg.weights_dir
    if weights_dir and not Path(weights_dir).is_dir():
        raise WeightsError(f"weights folder '{weights_dir}' (model.weights_dir, from the config, --weights-dir or "
                           f"${WEIGHTS_DIR_ENV}) does not exist; point it at a folder of Keras weight files or unset it")
    try:
        return backbone.pretrained(model_cfg.image_size, alpha, weights_dir)
    except WeightsError as exc:
        raise WeightsError(f"{backbone.name} alpha {alpha}: {exc}") from exc
