"""Core ML on Linux: compute a neural-network `.mlmodel` spec's outputs in NumPy, layer by layer.

Core ML itself runs only on Apple OSes, so this module reads the spec with coremltools and evaluates it the way
NeuralNetwork.proto defines each layer. Images go in as decoded pixels (0-255): RGB for RGB and BGR inputs, one
gray channel for grayscale ones. The spec's own image preprocessing (colour order, channel scale, per-channel
biases) is applied: nothing is taken from our config. A layer type, option, weight encoding or input shape this
module does not implement raises `CannotVerify`, never a guess.

Tensors carry one extra leading axis: the images of a batch, each evaluated as its own Core ML prediction of
batch size 1. So Core ML axis `a` is NumPy axis `a + 1`, and a tensor's Core ML rank is its `ndim - 1`. Core ML
has no rank-0 tensors: a result with every axis removed has shape (1,).

Convolutions are pipeline.checkers.kernels' `conv2d`, their weights put in TensorFlow's layout once per `run`
(or per `cache`), not per batch; TensorFlow adds the bias. Their NCHW results are read-only views of NHWC memory
that TensorFlow owns, which padding keeps; element-wise layers write over an input that dies at them when no other
blob shares its memory and it is writable. The four layers the NeuralNetwork converter writes for relu6 (ReLU,
linear -1, threshold -6, linear -1) are computed at once, as min(max(x, 0), 6) + 0, which is what they compute, bit
for bit (`_relu6_cap`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from pipeline.checkers.kernels import (BATCH, BGR, GRAYSCALE, RGB, CannotVerify, channels_first, conv2d, conv_kernels,
                                       padded)
from pipeline.errors import ExportError

def network(spec):
    """The spec's NeuralNetwork message (plain, classifier or regressor)."""
    kind = spec.WhichOneof("Type")
    if kind not in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
        raise CannotVerify(f"cannot verify: model type {kind} (only neural networks are implemented)")
    return getattr(spec, kind)


def image_tensors(spec, pixels):
    """The network's input tensors for decoded pixels (0-255), as Core ML would build them.

    pixels: (N, H, W, 3) RGB for RGB and BGR inputs; (N, H, W) or (N, H, W, 1) gray levels for grayscale inputs.
    RGB pixels for a grayscale input raise CannotVerify: Core ML takes a one-channel image, and the RGB-to-gray
    conversion is done by whatever hands it the image (Vision, Core Image), with a formula the spec does not hold.
    """
    nn = network(spec)
    pixels = np.asarray(pixels, dtype=np.float32)
    scalers = {p.featureName: p for p in nn.preprocessing}
    tensors = {}
    for feature in spec.description.input:
        if feature.type.WhichOneof("Type") != "imageType":
            raise CannotVerify(f"cannot verify: input '{feature.name}' is {feature.type.WhichOneof('Type')}, "
                               "only image inputs are implemented")
        image = feature.type.imageType
        x = channels_first(feature.name, image, pixels)
        step = scalers.get(feature.name)
        if step is not None:
            x = _scaled(feature.name, image.colorSpace, x, step)
        shape = (1,) if nn.imageInputShapeMapping == 1 else (1, 1)  # RANK4 [1,C,H,W] or RANK5 [1,1,C,H,W]
        tensors[feature.name] = x.reshape((len(x), *shape, *x.shape[1:])).astype(np.float32)
    return tensors


def _scaled(name, color_space, x, step):
    """x (N, C, H, W) after the input's scaler: channelScale * x plus each channel's bias, named by its colour."""
    if step.WhichOneof("preprocessor") != "scaler":
        raise CannotVerify(f"cannot verify: preprocessing {step.WhichOneof('preprocessor')} of '{name}'")
    s = step.scaler
    biases = {GRAYSCALE: [s.grayBias], RGB: [s.redBias, s.greenBias, s.blueBias],
              BGR: [s.blueBias, s.greenBias, s.redBias]}[color_space]
    return x * np.float32(s.channelScale or 1.0) + np.array(biases, dtype=np.float32)[:, None, None]


def run(spec, pixels, outputs, batch_size=BATCH, cache=None):
    """The named blobs of the network for pixels (see `image_tensors`), computed in batches: {blob name: array}.

    cache: a dict that keeps each convolution's weights in TensorFlow's layout (made once, for every batch);
        pass the same dict to later calls on the same, unchanged spec to reuse them. Default: a new one.
    """
    nn = network(spec)
    layers = list(nn.layers)
    last_use = {name: i for i, layer in enumerate(layers) for name in layer.input}
    steps = _steps(layers, outputs)
    cache = {} if cache is None else cache
    results = {name: [] for name in outputs}
    for start in range(0, len(pixels), batch_size):
        blobs = image_tensors(spec, pixels[start:start + batch_size])
        private = set()  # blobs whose memory no other blob (nor the caller) shares
        for i, group, cap in steps:
            layer, last = group[0], group[-1]
            missing = [name for name in layer.input if name not in blobs]
            if missing:
                raise ExportError(f"layer '{layer.name}' reads {missing}, which no input or earlier layer computes")
            inputs = [blobs[name] for name in layer.input]
            dying = [name for name in layer.input if name in private and last_use[name] == i and name not in outputs
                     and list(layer.input).count(name) == 1]
            spare = [blobs[name] for name in dying]
            if cap is None:
                values = _compute(layer, inputs, spare, cache.setdefault(i, {}))
            else:
                values = [_relu6(group, inputs[0], cap, spare)]
            for name, value in zip(last.output, values):
                blobs[name] = value.astype(np.float32, copy=False)
                _track(private, name, blobs[name], dict(zip(layer.input, inputs)), dying)
            for name in set(layer.input) - set(outputs):
                if last_use[name] == i:
                    del blobs[name]  # keeps memory to a few activations, not the whole network's
                    private.discard(name)
        for name in outputs:
            if name not in blobs:
                raise ExportError(f"the network computes no blob named '{name}'")
            results[name].append(blobs[name])
    return {name: np.concatenate(parts) for name, parts in results.items()}


def _steps(layers, outputs):
    """The layers in order as (index of the first, [layers], cap): one layer (cap None) at a time, except the
    NeuralNetwork converter's four-layer relu6 chains (see `_relu6_cap`), one step each."""
    reads = {}
    for layer in layers:
        for name in layer.input:
            reads[name] = reads.get(name, 0) + 1
    steps, i = [], 0
    while i < len(layers):
        cap = _relu6_cap(layers[i:i + 4], reads, outputs)
        count = 1 if cap is None else 4
        steps.append((i, layers[i:i + count], cap))
        i += count
    return steps


def _relu6_cap(group, reads, outputs):
    """t if the layers are ReLU, linear(-1), threshold(-t), linear(-1): min(max(x, 0), t) in four layers; else None.

    That is how coremltools' NeuralNetwork converter writes relu6 (t = 6). It matches only when each layer reads
    the one blob the one before writes, which no other layer reads and no caller asks for, and when nothing else
    is set: ReLU; activation linear alpha -1, beta 0; unary THRESHOLD alpha -t < 0, scale 1 (or unset), shift 0;
    activation linear alpha -1, beta 0.
    """
    kinds = [layer.WhichOneof("layer") for layer in group]
    if kinds != ["activation", "activation", "unary", "activation"]:
        return None
    if any(len(layer.input) != 1 or len(layer.output) != 1 for layer in group):
        return None
    for before, after in zip(group, group[1:]):
        blob = before.output[0]
        if after.input[0] != blob or reads.get(blob) != 1 or blob in outputs:
            return None
    relu, negate, threshold, negate_again = (getattr(layer, kind) for layer, kind in zip(group, kinds))
    if [f.name for f, _ in relu.ListFields()] != ["ReLU"] or relu.ReLU.ListFields():
        return None
    for linear in (negate, negate_again):
        if linear.WhichOneof("NonlinearityType") != "linear" or _unimplemented(linear, {"linear.alpha"}) \
                or linear.linear.alpha != -1 or linear.linear.beta != 0:
            return None
    if threshold.type != 7 or _unimplemented(threshold, {"type", "alpha", "epsilon", "scale", "shift"}) \
            or threshold.scale not in (0, 1) or threshold.shift != 0 or not threshold.alpha < 0:
        return None
    return np.float32(-threshold.alpha)


def _relu6(group, x, cap, spare=()):
    """The four layers of a relu6 chain (see `_relu6_cap`) at once: min(max(x, 0), cap) + 0.

    Exactly what the four compute, value for value: negating is exact, max(-a, -t) is -min(a, t), and their
    additions of 0 (the linear layers' beta, the threshold's shift) only turn -0 into +0, as the + 0 here does.
    The ranks the four layers declare are checked, as layer by layer.
    """
    for layer in group:
        _check_declared_ranks(layer.name, "input", layer.inputTensor, [x])
        _check_declared_ranks(layer.name, "output", layer.outputTensor, [x])
    y = np.clip(x, np.float32(0), cap, out=_spare(spare, x.shape))
    return np.add(y, np.float32(0), out=y)


def _track(private, name, value, inputs, dying):
    """Keep `private` the set of blobs whose arrays nothing else shares, now that blob `name` holds `value`.

    A layer's output can share memory only with its inputs: a view (reshape, squeeze) makes both shared, so
    neither may be overwritten; an output written over an input that dies at this layer is private, as a new
    array is, unless it is read-only (a convolution's output is TensorFlow's memory).
    """
    shared = [n for n, x in inputs.items() if np.may_share_memory(value, x)]
    if all(n in dying for n in shared) and value.flags.writeable:  # not a convolution's (TensorFlow's memory)
        private.add(name)
    else:
        private.discard(name)
        private.difference_update(shared)


def _compute(layer, inputs, spare=(), cache=None):
    """One layer's output arrays, once its type, the fields it sets and its inputs are known to be implemented.

    spare: inputs that die at this layer, whose memory nothing else shares: a layer that computes element by
    element may write its output over one of them instead of allocating it.
    cache: this layer's own dict, kept from batch to batch (a convolution keeps its TensorFlow weights in it).
    """
    kind = layer.WhichOneof("layer")
    if kind not in _LAYERS:
        raise CannotVerify(f"cannot verify: layer '{layer.name}' of type {kind} is not implemented")
    compute, fields, (fewest, most), in_place, cached = _LAYERS[kind]
    params = getattr(layer, kind)
    unknown = _unimplemented(params, fields)
    if unknown:
        raise CannotVerify(f"cannot verify: layer '{layer.name}' ({kind}) sets {', '.join(unknown)}, "
                           "which this checker does not implement")
    if len(inputs) < fewest or (most is not None and len(inputs) > most):
        raise CannotVerify(f"cannot verify: layer '{layer.name}' ({kind}) has {len(inputs)} inputs, it takes "
                           f"{_between(fewest, most)}")
    _check_declared_ranks(layer.name, "input", layer.inputTensor, inputs)
    try:
        options = {"spare": spare} if in_place else {}
        if cached:
            options["cache"] = cache
        values = compute(params, inputs, layer.name, **options)
    except (ValueError, IndexError) as error:  # shapes NumPy cannot combine: the spec and our shape rules disagree
        raise CannotVerify(f"cannot verify: layer '{layer.name}' ({kind}): {error}") from error
    values = values if isinstance(values, list) else [values]
    if len(values) != len(layer.output):
        raise CannotVerify(f"cannot verify: layer '{layer.name}' ({kind}) names {len(layer.output)} outputs, "
                           f"it computes {len(values)}")
    _check_declared_ranks(layer.name, "output", layer.outputTensor, values)
    return values


def _unimplemented(message, known, prefix=""):
    """Dotted names of the fields `message` sets that are not `known`; a known name covers all its sub-fields."""
    found = []
    for field, value in message.ListFields():
        name = prefix + field.name
        if name in known:
            continue
        if hasattr(value, "ListFields") and any(k.startswith(name + ".") for k in known):  # a singular message
            found += _unimplemented(value, known, name + ".")
        else:
            found.append(name)
    return found


def _check_declared_ranks(layer, what, declared, arrays):
    # only the rank: coremltools' builder stores target-shape codes (0, -1) in some layers' dimValue
    for i, (tensor, x) in enumerate(zip(declared, arrays)):
        if tensor.rank and tensor.rank != x.ndim - 1:
            raise CannotVerify(f"cannot verify: layer '{layer}' declares {what} {i} of rank {tensor.rank}, "
                               f"the checker has shape {x.shape[1:]}")


def class_labels(spec):
    """A classifier spec's class labels, in the order of its probability output."""
    nn = network(spec)
    kind = nn.WhichOneof("ClassLabels") if spec.WhichOneof("Type") == "neuralNetworkClassifier" else None
    if kind is None:
        raise ExportError("the model is not a neural network classifier with class labels")
    return list(getattr(nn, kind).vector)


def class_probabilities(spec, pixels, batch_size=BATCH, cache=None):
    """A classifier's (labels, probabilities (N, classes)) for pixels (see `image_tensors`), labels in spec order.

    cache: as `run`'s, for repeated calls on one unchanged spec.
    """
    nn = network(spec)
    labels = class_labels(spec)
    blob = nn.labelProbabilityLayerName or nn.layers[-1].output[0]
    probabilities = run(spec, pixels, [blob], batch_size, cache)[blob]
    return labels, probabilities.reshape(len(probabilities), -1)


# -- weights ------------------------------------------------------------------------------------------------

def weights(params, shape, layer):
    """The float32 values of a WeightParams (float32, float16, or 8-bit linear / lookup-table quantized)."""
    count = int(np.prod(shape))
    if len(params.floatValue):
        values = np.asarray(params.floatValue, dtype=np.float32)
    elif params.float16Value:
        values = np.frombuffer(params.float16Value, dtype="<f2").astype(np.float32)
    elif params.rawValue or params.int8RawValue:
        values = _dequantize(params, count, layer)
    else:
        values = np.zeros(0, dtype=np.float32)
    if values.size != count:
        raise ExportError(f"layer '{layer}': weights hold {values.size} values, shape {tuple(shape)} needs {count}")
    return values.reshape(shape)


def _stored_count(params):
    """How many values a WeightParams holds (counting 8-bit quantized values, the only ones implemented)."""
    return len(params.floatValue) or len(params.float16Value) // 2 or len(params.rawValue) or len(params.int8RawValue)


def _dequantize(params, count, layer):
    q = params.quantization
    if q.numberOfBits != 8:
        raise CannotVerify(f"cannot verify: layer '{layer}' has {q.numberOfBits}-bit quantized weights")
    raw = np.frombuffer(params.rawValue, dtype=np.uint8) if params.rawValue else \
        np.frombuffer(params.int8RawValue, dtype=np.int8)
    raw = raw.astype(np.float32)
    kind = q.WhichOneof("QuantizationType")
    if kind == "lookupTableQuantization":
        return np.asarray(q.lookupTableQuantization.floatValue, dtype=np.float32)[raw.astype(np.int64)]
    if kind == "linearQuantization":
        scale = np.asarray(q.linearQuantization.scale, dtype=np.float32)
        bias = np.asarray(q.linearQuantization.bias or [0.0], dtype=np.float32)
        rows = raw.reshape(max(len(scale), len(bias)), -1) if raw.size == count else raw
        return (rows * scale[:, None] + bias[:, None]).reshape(-1)
    raise CannotVerify(f"cannot verify: layer '{layer}' has quantized weights of type {kind}")


# -- layers: each takes (params, input arrays, layer name) and returns an array or a list of arrays ---------

def _need_rank(x, layer, fewest, most=None):
    """x, if its Core ML rank is in [fewest, most]."""
    rank = x.ndim - 1
    if rank < fewest or (most is not None and rank > most):
        raise CannotVerify(f"cannot verify: layer '{layer}' takes an input of rank {_between(fewest, most)}, "
                           f"got shape {x.shape[1:]}")
    return x


def _between(fewest, most):
    return f"{fewest}" if most == fewest else f"{fewest} or more" if most is None else f"{fewest} to {most}"


def _axis(axis, rank, layer):
    """The NumPy axis (>= 1) of Core ML axis `axis` (negative ones count from the end) of a rank `rank` tensor."""
    if not -rank <= axis < rank:
        raise CannotVerify(f"cannot verify: layer '{layer}' uses axis {axis} of a rank {rank} tensor")
    return axis % rank + 1


def _at_least_rank_1(x):
    return x.reshape(len(x), 1) if x.ndim == 1 else x


def _same_rank(a, b):
    """a and b with the lower-rank one's Core ML shape padded with 1s on the left (after our batch axis)."""
    if a.ndim == b.ndim:
        return a, b
    short, long_ = (a, b) if a.ndim < b.ndim else (b, a)
    short = short.reshape(len(short), *(1,) * (long_.ndim - short.ndim), *short.shape[1:])
    return (short, long_) if a.ndim < b.ndim else (long_, short)


def _same_ranks(inputs, layer):
    if len({x.ndim for x in inputs}) > 1:
        raise CannotVerify(f"cannot verify: layer '{layer}' takes inputs of one rank, got shapes "
                           f"{[x.shape[1:] for x in inputs]}")
    return inputs


def _pair(values, default, name, layer):
    if len(values) == 0:
        return default
    if len(values) != 2 or min(values) < 1:
        raise CannotVerify(f"cannot verify: layer '{layer}' has {name} {list(values)} (two positive sizes, [H, W])")
    return tuple(int(v) for v in values)


def _window_padding(params, oneof, in_hw, kernel, stride, layer):
    """((top, bottom), (left, right)) zero padding of a convolution or pooling layer's valid/same option."""
    kind = params.WhichOneof(oneof)
    if kind == "valid" or kind is None:
        amounts = params.valid.paddingAmounts.borderAmounts
        if len(amounts) not in (0, 2):
            raise CannotVerify(f"cannot verify: layer '{layer}' has {len(amounts)} border amounts, not [H, W]")
        return tuple((int(a.startEdgeSize), int(a.endEdgeSize)) for a in amounts) or ((0, 0), (0, 0))
    if params.same.asymmetryMode not in (0, 1):
        raise CannotVerify(f"cannot verify: layer '{layer}' has same-padding mode {params.same.asymmetryMode}")
    pads = []
    for size, k, s in zip(in_hw, kernel, stride):
        total = max(0, (-(-size // s) - 1) * s + k - size)
        small = total // 2
        pads.append((small, total - small) if params.same.asymmetryMode == 0 else (total - small, small))
    return tuple(pads)


def _check_window(hw, pads, span, layer):
    padded_hw = [n + before + after for n, (before, after) in zip(hw, pads)]
    if any(n < s for n, s in zip(padded_hw, span)):
        raise CannotVerify(f"cannot verify: layer '{layer}' has a {span[0]}x{span[1]} window over a padded "
                           f"{padded_hw[0]}x{padded_hw[1]} input")


def _windows(x, kernel, stride, dilation=(1, 1)):
    """Sliding windows over the last two axes: (..., H_out, W_out, kH, kW)."""
    span = ((kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1)
    view = np.lib.stride_tricks.sliding_window_view(x, span, axis=(-2, -1))
    return view[..., ::stride[0], ::stride[1], ::dilation[0], ::dilation[1]]


def _convolution(p, inputs, layer, cache=None):
    x = _need_rank(inputs[0], layer, 4)
    kernel, stride = _pair(p.kernelSize, (3, 3), "kernelSize", layer), _pair(p.stride, (1, 1), "stride", layer)
    dilation, groups = _pair(p.dilationFactor, (1, 1), "dilationFactor", layer), int(p.nGroups or 1)
    lead, (c, h, wid) = x.shape[:-3], x.shape[-3:]
    if c != p.kernelChannels * groups or p.outputChannels % groups or not p.outputChannels:
        raise CannotVerify(f"cannot verify: layer '{layer}' gets {c} input channels, its {p.outputChannels} kernels "
                           f"take kernelChannels {p.kernelChannels} x nGroups {groups}")
    x = x.reshape(-1, c, h, wid)
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    (top, bottom), (left, right) = _window_padding(p, "ConvolutionPaddingType", (h, wid), span, stride, layer)
    _check_window((h, wid), ((top, bottom), (left, right)), span, layer)
    if top or bottom or left or right:
        x = padded(x, ((top, bottom), (left, right)))
    kernels = cache.get("kernels") if cache is not None else None
    if kernels is None:  # once per run (or per cache): not for every batch
        kernels = conv_kernels(weights(p.weights, (p.outputChannels, p.kernelChannels, *kernel), layer), groups,
                                weights(p.bias, (p.outputChannels,), layer) if p.hasBias else None)
        if cache is not None:
            cache["kernels"] = kernels
    y = conv2d(x, kernels, stride, dilation)
    return y.reshape(*lead, *y.shape[1:])


def _pooling(p, inputs, layer):
    x = _need_rank(inputs[0], layer, 4)
    if p.type not in (0, 1):
        raise CannotVerify(f"cannot verify: layer '{layer}' uses pooling type {p.type} (L2 or unknown)")
    if p.globalPooling:
        kernel, stride, pads = x.shape[-2:], (1, 1), ((0, 0), (0, 0))
    else:
        kernel, stride = _pair(p.kernelSize, (3, 3), "kernelSize", layer), _pair(p.stride, (1, 1), "stride", layer)
        pads = _window_padding(p, "PoolingPaddingType", x.shape[-2:], kernel, stride, layer)
        _check_window(x.shape[-2:], pads, kernel, layer)
    spec_pads = ((0, 0),) * (x.ndim - 2) + tuple(pads)
    if p.type == 0:  # MAX
        return _windows(np.pad(x, spec_pads, constant_values=-np.inf), kernel, stride).max(axis=(-2, -1))
    sums = _windows(np.pad(x, spec_pads), kernel, stride).sum(axis=(-2, -1))
    if p.avgPoolExcludePadding:
        counts = _windows(np.pad(np.ones(x.shape[-2:], np.float32), pads), kernel, stride).sum(axis=(-2, -1))
        return sums / counts
    return sums / (kernel[0] * kernel[1])


def _padding(p, inputs, layer):
    x = _need_rank(inputs[0], layer, 2)
    amounts = [(int(a.startEdgeSize), int(a.endEdgeSize)) for a in p.paddingAmounts.borderAmounts] or [(0, 0)] * 2
    kind = p.WhichOneof("PaddingType")
    if kind is None or len(amounts) != 2:
        raise CannotVerify(f"cannot verify: layer '{layer}' has padding type {kind} and {len(amounts)} border amounts")
    if kind == "reflection" and any(max(a) >= n for a, n in zip(amounts, x.shape[-2:])):
        raise CannotVerify(f"cannot verify: layer '{layer}' reflects {amounts} rows/columns of a {x.shape[-2:]} input")
    pads = ((0, 0),) * (x.ndim - 2) + tuple(amounts)
    if kind == "constant":
        return padded(x, amounts, np.float32(p.constant.value))
    return np.pad(x, pads, mode={"reflection": "reflect", "replication": "edge"}[kind])


def _spare(spare, shape):
    """An array of `spare` (see _compute) of this shape, for a ufunc's out=; None (a new array) if there is none."""
    return next((x for x in spare if x.shape == tuple(shape) and x.dtype == np.float32), None)


def _activation(p, inputs, layer, spare=()):
    x, kind = inputs[0], p.WhichOneof("NonlinearityType")
    if kind is None:
        raise CannotVerify(f"cannot verify: layer '{layer}' sets no activation function")
    a = getattr(p, kind)
    if kind == "ReLU":
        return np.maximum(x, 0, out=_spare(spare, x.shape))
    if kind == "leakyReLU":
        return np.where(x >= 0, x, a.alpha * x)
    if kind == "linear":  # alpha * x + beta
        y = np.multiply(x, a.alpha, out=_spare(spare, x.shape))
        return np.add(y, a.beta, out=y)
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if kind == "tanh":
        return np.tanh(x)
    if kind == "scaledTanh":
        return a.alpha * np.tanh(a.beta * x)
    if kind == "sigmoidHard":
        return np.clip(a.alpha * x + a.beta, 0, 1)
    if kind == "ELU":
        return np.where(x >= 0, x, a.alpha * (np.exp(x) - 1))
    if kind == "thresholdedReLU":
        return np.where(x >= a.alpha, x, 0)
    if kind == "softsign":
        return x / (1 + np.abs(x))
    if kind == "softplus":
        return np.logaddexp(0, x)
    if kind == "PReLU":
        c = _need_rank(x, layer, 3).shape[-3]
        alpha = weights(a.alpha, (1 if _stored_count(a.alpha) == 1 else c,), layer)  # one per channel, or shared
        return np.where(x >= 0, x, alpha[:, None, None] * x)
    raise CannotVerify(f"cannot verify: layer '{layer}' has activation {kind}")


def _unary(p, inputs, layer, spare=()):
    out = _spare(spare, inputs[0].shape)
    scale = p.scale or 1.0
    x = np.multiply(inputs[0], scale, out=out) if scale != 1 else inputs[0]  # x * 1 is x
    x = np.add(x, p.shift, out=out)  # scale * x + shift
    eps = p.epsilon or 1e-6
    functions = {0: np.sqrt, 1: lambda v: 1 / np.sqrt(v + eps), 2: lambda v: 1 / (v + eps),
                 3: lambda v: np.power(v, p.alpha), 4: np.exp, 5: np.log, 6: np.abs,
                 7: lambda v: np.maximum(v, p.alpha)}
    if p.type not in functions:
        raise CannotVerify(f"cannot verify: layer '{layer}' has unary function {p.type}")
    if p.type == 7:  # threshold, in place: x is this layer's own array
        return np.maximum(x, p.alpha, out=x)
    return functions[p.type](x)


def _clip(p, inputs, layer, spare=()):
    return np.clip(inputs[0], p.minVal, p.maxVal, out=_spare(spare, inputs[0].shape))


def _batchnorm(p, inputs, layer):
    x = _need_rank(inputs[0], layer, 3)
    if x.shape[-3] != p.channels:
        raise CannotVerify(f"cannot verify: layer '{layer}' has {p.channels} channels, its input shape {x.shape[1:]}")
    c = (int(p.channels),)
    gamma, beta, mean, var = (weights(getattr(p, n), c, layer) for n in ("gamma", "beta", "mean", "variance"))
    scale = gamma / np.sqrt(var + (p.epsilon or 1e-5))
    return x * scale[:, None, None] + (beta - mean * scale)[:, None, None]


def _inner_product(p, inputs, layer):
    x = _need_rank(inputs[0], layer, 1, 5)
    rank, c_in = x.ndim - 1, int(p.inputChannels)
    # ranks 1-3 multiply the last axis; ranks 4 and 5 the last three, flattened: (.., C_in) -> (.., C_out, 1, 1)
    rows = x if rank <= 3 else x.reshape(*x.shape[:-3], -1)
    if rows.shape[-1] != c_in:
        raise CannotVerify(f"cannot verify: layer '{layer}' has inputChannels {c_in}, its input has shape "
                           f"{x.shape[1:]}")
    y = rows @ weights(p.weights, (p.outputChannels, c_in), layer).T
    if p.hasBias:
        y = y + weights(p.bias, (p.outputChannels,), layer)
    return y if rank <= 3 else y[..., None, None]


def _batched_matmul(p, inputs, layer):
    if len(inputs) == 2:
        return _matmul_of_inputs(p, *inputs, layer)
    a, rows, cols = inputs[0], int(p.weightMatrixFirstDimension), int(p.weightMatrixSecondDimension)
    if a.shape[-1] != rows:
        raise CannotVerify(f"cannot verify: layer '{layer}' multiplies an input of shape {a.shape[1:]} by a "
                           f"{rows}x{cols} weight matrix")
    y = a @ weights(p.weights, (cols, rows), layer).T  # stored column-major: [X2, X1] row-major
    if p.hasBias:
        y = y + weights(p.bias, (cols,), layer)
    return y


def _matmul_of_inputs(p, a, b, layer):
    """a @ b by the proto's rules: rank-1 a is a row (1, D), rank-1 b a column (D, 1); the result stays rank >= 2."""
    if p.hasBias:
        raise CannotVerify(f"cannot verify: layer '{layer}' has a bias, which the proto defines for one input only")
    if (p.transposeA and a.ndim == 2) or (p.transposeB and b.ndim == 2):
        raise CannotVerify(f"cannot verify: layer '{layer}' transposes a rank-1 operand, which the proto leaves "
                           "undefined")
    a = a[:, None, :] if a.ndim == 2 else a
    b = b[:, :, None] if b.ndim == 2 else b
    a, b = _same_rank(np.swapaxes(a, -1, -2) if p.transposeA else a, np.swapaxes(b, -1, -2) if p.transposeB else b)
    if a.shape[-1] != b.shape[-2]:
        raise CannotVerify(f"cannot verify: layer '{layer}' multiplies {a.shape[-2:]} by {b.shape[-2:]} matrices")
    return a @ b


def _softmax(p, inputs, layer):
    return _softmax_along(_need_rank(inputs[0], layer, 3), -3)


def _softmax_nd(p, inputs, layer):
    return _softmax_along(inputs[0], _axis(p.axis, inputs[0].ndim - 1, layer))


def _softmax_along(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reduction(function):
    def compute(p, inputs, layer):
        x = inputs[0]
        if not p.reduceAll and not p.axes:
            raise CannotVerify(f"cannot verify: layer '{layer}' sets neither axes nor reduceAll")
        axes = range(1, x.ndim) if p.reduceAll else [_axis(a, x.ndim - 1, layer) for a in p.axes]
        return _at_least_rank_1(function(x, axis=tuple(axes), keepdims=p.keepDims))
    return compute


def _transpose(p, inputs, layer):
    x = inputs[0]
    if sorted(p.axes) != list(range(x.ndim - 1)):
        raise CannotVerify(f"cannot verify: layer '{layer}' permutes axes {list(p.axes)} of shape {x.shape[1:]}")
    return x.transpose(0, *(a + 1 for a in p.axes))


def _flatten(p, inputs, layer):
    x = _need_rank(inputs[0], layer, 3)
    if p.mode not in (0, 1):
        raise CannotVerify(f"cannot verify: layer '{layer}' has flatten order {p.mode}")
    if p.mode == 1:  # CHANNEL_LAST
        x = np.moveaxis(x, -3, -1)
    return x.reshape(*x.shape[:-3], -1, 1, 1)


def _flatten_to_2d(p, inputs, layer):
    x = inputs[0]
    rank = x.ndim - 1
    if not -rank <= p.axis <= rank:
        raise CannotVerify(f"cannot verify: layer '{layer}' flattens at axis {p.axis} a tensor of shape {x.shape[1:]}")
    axis = p.axis if p.axis >= 0 else p.axis + rank
    return x.reshape(len(x), int(np.prod(x.shape[1:axis + 1])), -1)


def _reshape_static(p, inputs, layer):
    if any(d == 0 or d < -1 for d in p.targetShape):  # -1 is inferred, as coremltools emits it
        raise CannotVerify(f"cannot verify: layer '{layer}' has targetShape {list(p.targetShape)}")
    return inputs[0].reshape(len(inputs[0]), *p.targetShape)


def _squeeze(p, inputs, layer):
    x = inputs[0]
    if p.squeezeAll:
        axes = [a for a in range(1, x.ndim) if x.shape[a] == 1]
    elif not p.axes:
        raise CannotVerify(f"cannot verify: layer '{layer}' sets neither axes nor squeezeAll")
    else:
        axes = [_axis(a, x.ndim - 1, layer) for a in p.axes]
        if any(x.shape[a] != 1 for a in axes):
            raise CannotVerify(f"cannot verify: layer '{layer}' squeezes axes {list(p.axes)} of shape {x.shape[1:]}")
    return _at_least_rank_1(np.squeeze(x, axis=tuple(axes)))


def _expand_dims(p, inputs, layer):
    # the axes index the output, of rank (input rank + number of axes): (10, 5) with axes (-2, -1) is (10, 5, 1, 1)
    x = inputs[0]
    positions = sorted(_axis(a, x.ndim - 1 + len(p.axes), layer) for a in p.axes)
    if not positions or len(set(positions)) != len(positions):
        raise CannotVerify(f"cannot verify: layer '{layer}' has axes {list(p.axes)}")
    shape = list(x.shape)
    for position in positions:
        shape.insert(position, 1)
    return x.reshape(shape)


def _elementwise(function):
    def compute(p, inputs, layer, spare=()):
        if len(inputs) == 1:
            return function(inputs[0], np.float32(p.alpha), out=_spare(spare, inputs[0].shape))
        result, *others = _same_ranks(inputs, layer)
        writable = list(spare)
        for other in others:  # each step may write over its own operands only: a spare input or an earlier step's
            out = _spare([x for x in (result, other) if any(x is w for w in writable)],
                         np.broadcast_shapes(result.shape, other.shape))
            result = function(result, other, out=out)
            writable.append(result)
        return result
    return compute


def _broadcastable(function):
    def compute(p, inputs, layer):
        return function(*_same_rank(*inputs))
    return compute


def _concat(p, inputs, layer):
    for x in _same_ranks(inputs, layer):
        _need_rank(x, layer, 5 if p.sequenceConcat else 3)
    return np.concatenate(inputs, axis=-5 if p.sequenceConcat else -3)


def _concat_nd(p, inputs, layer):
    first = _same_ranks(inputs, layer)[0]
    axis = _axis(p.axis, first.ndim - 1, layer)
    if not p.interleave:
        return np.concatenate(inputs, axis=axis)
    if any(x.shape != first.shape for x in inputs):
        raise CannotVerify(f"cannot verify: layer '{layer}' interleaves inputs of different shapes "
                           f"{[x.shape[1:] for x in inputs]}")
    # output[i::n] along the axis is input i: stack the n inputs just after the axis, then merge the two axes
    shape = list(first.shape)
    shape[axis] *= len(inputs)
    return np.stack(inputs, axis=axis + 1).reshape(shape)


def _scale(p, inputs, layer):
    x = _need_rank(inputs[0], layer, 3)
    y = x * _channel_shaped(weights(p.scale, tuple(p.shapeScale), layer), x, "shapeScale", layer)
    if p.hasBias:
        y = y + _channel_shaped(weights(p.bias, tuple(p.shapeBias), layer), x, "shapeBias", layer)
    return y


def _bias(p, inputs, layer):
    x = _need_rank(inputs[0], layer, 3)
    return x + _channel_shaped(weights(p.bias, tuple(p.shape), layer), x, "shape", layer)


def _channel_shaped(values, x, name, layer):
    """A [1], [C], [1, H, W] or [C, H, W] parameter of input x (..., C, H, W), shaped to broadcast over it."""
    c, h, w = x.shape[-3:]
    if values.shape not in ((1,), (c,), (1, h, w), (c, h, w)):
        raise CannotVerify(f"cannot verify: layer '{layer}' has {name} {list(values.shape)} for an input of shape "
                           f"{x.shape[1:]}")
    return values.reshape(-1, 1, 1) if values.ndim == 1 else values


class _Kind(NamedTuple):
    compute: Callable
    fields: frozenset  # the params fields `compute` implements; anything else set raises CannotVerify
    inputs: tuple  # (fewest, most) inputs; None: no upper limit
    in_place: bool = False  # compute takes spare= (see _compute)
    cached: bool = False  # compute takes cache=, the layer's dict kept from batch to batch (see _compute)


def _kind(compute, fields="", inputs=(1, 1), in_place=False, cached=False):
    return _Kind(compute, frozenset(fields.split()), inputs, in_place, cached)


_WINDOW = "kernelSize stride valid.paddingAmounts same.asymmetryMode"
_REDUCE = "axes keepDims reduceAll"
_ACTIVATIONS = ("linear.alpha linear.beta ReLU leakyReLU.alpha thresholdedReLU.alpha PReLU.alpha tanh "
                "scaledTanh.alpha scaledTanh.beta sigmoid sigmoidHard.alpha sigmoidHard.beta ELU.alpha softsign "
                "softplus")

# Not implemented, so they raise CannotVerify when set: convolution isDeconvolution, outputShape and weights as
# a second input; pooling includeLastPixel; batchnorm computeMeanVar, instanceNormalization; int8DynamicQuantize.
_LAYERS = {
    "convolution": _kind(_convolution, f"outputChannels kernelChannels nGroups dilationFactor hasBias weights "
                                       f"bias {_WINDOW}", cached=True),
    "pooling": _kind(_pooling, f"type avgPoolExcludePadding globalPooling {_WINDOW}"),
    "padding": _kind(_padding, "constant.value reflection replication paddingAmounts"),
    "activation": _kind(_activation, _ACTIVATIONS, in_place=True),
    "unary": _kind(_unary, "type alpha epsilon shift scale", in_place=True),
    "clip": _kind(_clip, "minVal maxVal", in_place=True),
    "batchnorm": _kind(_batchnorm, "channels epsilon gamma beta mean variance"),
    "innerProduct": _kind(_inner_product, "inputChannels outputChannels hasBias weights bias"),
    "batchedMatmul": _kind(_batched_matmul, "transposeA transposeB weightMatrixFirstDimension "
                                            "weightMatrixSecondDimension hasBias weights bias", (1, 2)),
    "softmax": _kind(_softmax),
    "softmaxND": _kind(_softmax_nd, "axis"),
    "reduceMean": _kind(_reduction(np.mean), _REDUCE),
    "reduceSum": _kind(_reduction(np.sum), _REDUCE),
    "reduceMax": _kind(_reduction(np.max), _REDUCE),
    "reduceMin": _kind(_reduction(np.min), _REDUCE),
    "transpose": _kind(_transpose, "axes"),
    "flatten": _kind(_flatten, "mode"),
    "flattenTo2D": _kind(_flatten_to_2d, "axis"),
    "reshapeStatic": _kind(_reshape_static, "targetShape"),
    "squeeze": _kind(_squeeze, "axes squeezeAll"),
    "expandDims": _kind(_expand_dims, "axes"),
    "add": _kind(_elementwise(np.add), "alpha", (1, None), in_place=True),
    "multiply": _kind(_elementwise(np.multiply), "alpha", (1, None), in_place=True),
    "addBroadcastable": _kind(_broadcastable(np.add), inputs=(2, 2)),
    "subtractBroadcastable": _kind(_broadcastable(np.subtract), inputs=(2, 2)),
    "multiplyBroadcastable": _kind(_broadcastable(np.multiply), inputs=(2, 2)),
    "divideBroadcastable": _kind(_broadcastable(np.divide), inputs=(2, 2)),
    "concat": _kind(_concat, "sequenceConcat", (2, None)),
    "concatND": _kind(_concat_nd, "axis interleave", (2, None)),
    "scale": _kind(_scale, "shapeScale scale hasBias shapeBias bias"),
    "bias": _kind(_bias, "shape bias"),
}

SUPPORTED_LAYERS = tuple(sorted(_LAYERS))
