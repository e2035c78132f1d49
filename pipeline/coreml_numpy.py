"""Core ML on Linux: compute a neural-network `.mlmodel` spec's outputs in NumPy, layer by layer.

Core ML itself runs only on Apple OSes, so this module reads the spec with coremltools and evaluates it the way
NeuralNetwork.proto defines each layer. Images go in as decoded RGB pixels (0-255), and the spec's own image
preprocessing (colour order, channel scale, per-channel biases) is applied: nothing is taken from our config.
A layer type, option or weight encoding this module does not implement raises `CannotVerify`, never a guess.

Tensors carry one extra leading axis: the images of a batch, each evaluated as its own Core ML prediction of
batch size 1. So Core ML axis `a` is NumPy axis `a + 1` (negative axes are the same in both).
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import ExportError

RGB, BGR = 20, 10  # ImageFeatureType.ColorSpace


class CannotVerify(ExportError):
    """The spec uses something this checker does not implement, so its outputs cannot be computed."""


def network(spec):
    """The spec's NeuralNetwork message (plain, classifier or regressor)."""
    kind = spec.WhichOneof("Type")
    if kind not in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
        raise CannotVerify(f"cannot verify: model type {kind} (only neural networks are implemented)")
    return getattr(spec, kind)


def image_tensors(spec, pixels):
    """The network's input tensors for decoded RGB pixels (N, H, W, 3, 0-255), as Core ML would build them."""
    nn = network(spec)
    pixels = np.asarray(pixels, dtype=np.float32)
    scalers = {p.featureName: p for p in nn.preprocessing}
    tensors = {}
    for feature in spec.description.input:
        if feature.type.WhichOneof("Type") != "imageType":
            raise CannotVerify(f"cannot verify: input '{feature.name}' is {feature.type.WhichOneof('Type')}, "
                               "only image inputs are implemented")
        image = feature.type.imageType
        if pixels.shape[1:] != (image.height, image.width, 3):
            raise ExportError(f"input '{feature.name}' takes {image.width}x{image.height} RGB images, "
                              f"got pixels of shape {pixels.shape[1:]}")
        if image.colorSpace not in (RGB, BGR):
            raise CannotVerify(f"cannot verify: input '{feature.name}' colour space {image.colorSpace}")
        x = pixels if image.colorSpace == RGB else pixels[..., ::-1]
        x = x.transpose(0, 3, 1, 2)  # NHWC -> N, C, H, W
        step = scalers.get(feature.name)
        if step is not None:
            if step.WhichOneof("preprocessor") != "scaler":
                raise CannotVerify(f"cannot verify: preprocessing {step.WhichOneof('preprocessor')} of "
                                   f"'{feature.name}'")
            s = step.scaler
            first, last = (s.redBias, s.blueBias) if image.colorSpace == RGB else (s.blueBias, s.redBias)
            x = x * np.float32(s.channelScale or 1.0) + np.array([first, s.greenBias, last],
                                                                 dtype=np.float32)[:, None, None]
        shape = (1,) if nn.imageInputShapeMapping == 1 else (1, 1)  # RANK4 [1,C,H,W] or RANK5 [1,1,C,H,W]
        tensors[feature.name] = x.reshape((len(x), *shape, *x.shape[1:])).astype(np.float32)
    return tensors


def run(spec, pixels, outputs, batch_size=16):
    """The named blobs of the network for RGB pixels (N, H, W, 3), computed in batches: {blob name: array}."""
    nn = network(spec)
    last_use = {name: i for i, layer in enumerate(nn.layers) for name in layer.input}
    results = {name: [] for name in outputs}
    for start in range(0, len(pixels), batch_size):
        blobs = image_tensors(spec, pixels[start:start + batch_size])
        for i, layer in enumerate(nn.layers):
            kind = layer.WhichOneof("layer")
            compute = _LAYERS.get(kind)
            if compute is None:
                raise CannotVerify(f"cannot verify: layer '{layer.name}' of type {kind} is not implemented")
            values = compute(getattr(layer, kind), [blobs[name] for name in layer.input], layer.name)
            for name, value in zip(layer.output, values if isinstance(values, list) else [values]):
                blobs[name] = value.astype(np.float32, copy=False)
            for name in set(layer.input) - set(outputs):
                if last_use[name] == i:
                    del blobs[name]  # keeps memory to a few activations, not the whole network's
        for name in outputs:
            if name not in blobs:
                raise ExportError(f"the network computes no blob named '{name}'")
            results[name].append(blobs[name])
    return {name: np.concatenate(parts) for name, parts in results.items()}


def class_labels(spec):
    """A classifier spec's class labels, in the order of its probability output."""
    nn = network(spec)
    kind = nn.WhichOneof("ClassLabels") if spec.WhichOneof("Type") == "neuralNetworkClassifier" else None
    if kind is None:
        raise ExportError("the model is not a neural network classifier with class labels")
    return list(getattr(nn, kind).vector)


def class_probabilities(spec, pixels, batch_size=16):
    """A classifier's (labels, probabilities (N, classes)) for RGB pixels, labels in the spec's own order."""
    nn = network(spec)
    labels = class_labels(spec)
    blob = nn.labelProbabilityLayerName or nn.layers[-1].output[0]
    probabilities = run(spec, pixels, [blob], batch_size)[blob]
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

def _pair(values, default):
    return tuple(int(v) for v in values) if len(values) else default


def _window_padding(params, oneof, in_hw, kernel, stride, layer):
    """((top, bottom), (left, right)) zero padding of a convolution or pooling layer's valid/same option."""
    kind = params.WhichOneof(oneof)
    if kind == "valid" or kind is None:
        amounts = params.valid.paddingAmounts.borderAmounts
        if len(amounts) == 0:
            return (0, 0), (0, 0)
        return tuple((int(a.startEdgeSize), int(a.endEdgeSize)) for a in amounts)
    if kind == "same":
        pads = []
        for size, k, s in zip(in_hw, kernel, stride):
            total = max(0, (-(-size // s) - 1) * s + k - size)
            small = total // 2
            pads.append((small, total - small) if params.same.asymmetryMode == 0 else (total - small, small))
        return tuple(pads)
    raise CannotVerify(f"cannot verify: layer '{layer}' uses {kind} padding")


def _windows(x, kernel, stride, dilation=(1, 1)):
    """Sliding windows over the last two axes: (..., H_out, W_out, kH, kW)."""
    span = ((kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1)
    view = np.lib.stride_tricks.sliding_window_view(x, span, axis=(-2, -1))
    return view[..., ::stride[0], ::stride[1], ::dilation[0], ::dilation[1]]


def _convolution(p, inputs, layer):
    if p.isDeconvolution or len(inputs) != 1:
        raise CannotVerify(f"cannot verify: layer '{layer}' is a deconvolution or takes its weights as an input")
    x = inputs[0]
    kernel, stride = _pair(p.kernelSize, (3, 3)), _pair(p.stride, (1, 1))
    dilation, groups = _pair(p.dilationFactor, (1, 1)), int(p.nGroups or 1)
    w = weights(p.weights, (p.outputChannels, p.kernelChannels, *kernel), layer)
    lead, (c, h, wid) = x.shape[:-3], x.shape[-3:]
    x = x.reshape(-1, c, h, wid)
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    (top, bottom), (left, right) = _window_padding(p, "ConvolutionPaddingType", (h, wid), span, stride, layer)
    if top or bottom or left or right:
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    if groups == c and p.kernelChannels == 1 and p.outputChannels == c:  # depthwise: 9 shifted products
        out_hw = [(n - s_) // st + 1 for n, s_, st in zip(x.shape[2:], span, stride)]
        y = np.zeros((len(x), c, *out_hw), dtype=np.float32)
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                top_, left_ = i * dilation[0], j * dilation[1]
                y += w[None, :, 0, i, j, None, None] * x[:, :, top_:top_ + (out_hw[0] - 1) * stride[0] + 1:stride[0],
                                                         left_:left_ + (out_hw[1] - 1) * stride[1] + 1:stride[1]]
    elif kernel == (1, 1) and groups == 1:
        xs = x[:, :, ::stride[0], ::stride[1]]
        y = np.matmul(w[:, :, 0, 0], xs.reshape(len(xs), c, -1)).reshape(len(xs), -1, *xs.shape[2:])
    else:
        per_in, per_out = c // groups, int(p.outputChannels) // groups
        y = np.concatenate([
            np.einsum("mchwij,ocij->mohw", _windows(x[:, g * per_in:(g + 1) * per_in], kernel, stride, dilation),
                      w[g * per_out:(g + 1) * per_out], optimize=True) for g in range(groups)], axis=1)
    if p.hasBias:
        y = y + weights(p.bias, (p.outputChannels,), layer)[:, None, None]
    return y.reshape(*lead, *y.shape[1:])


def _pooling(p, inputs, layer):
    x = inputs[0]
    if p.globalPooling:
        kernel, stride, pads = x.shape[-2:], (1, 1), ((0, 0), (0, 0))
    else:
        kernel, stride = _pair(p.kernelSize, (3, 3)), _pair(p.stride, (1, 1))
        if p.WhichOneof("PoolingPaddingType") == "includeLastPixel":
            raise CannotVerify(f"cannot verify: layer '{layer}' uses includeLastPixel pooling padding")
        pads = _window_padding(p, "PoolingPaddingType", x.shape[-2:], kernel, stride, layer)
    spec_pads = ((0, 0),) * (x.ndim - 2) + tuple(pads)
    if p.type == 0:  # MAX
        return _windows(np.pad(x, spec_pads, constant_values=-np.inf), kernel, stride).max(axis=(-2, -1))
    if p.type != 1:
        raise CannotVerify(f"cannot verify: layer '{layer}' uses L2 pooling")
    sums = _windows(np.pad(x, spec_pads), kernel, stride).sum(axis=(-2, -1))
    if p.avgPoolExcludePadding:
        counts = _windows(np.pad(np.ones(x.shape[-2:], np.float32), pads), kernel, stride).sum(axis=(-2, -1))
        return sums / counts
    return sums / (kernel[0] * kernel[1])


def _padding(p, inputs, layer):
    x = inputs[0]
    amounts = [(int(a.startEdgeSize), int(a.endEdgeSize)) for a in p.paddingAmounts.borderAmounts] or [(0, 0)] * 2
    pads = ((0, 0),) * (x.ndim - 2) + tuple(amounts)
    kind = p.WhichOneof("PaddingType")
    if kind == "constant":
        return np.pad(x, pads, constant_values=p.constant.value)
    return np.pad(x, pads, mode={"reflection": "reflect", "replication": "edge"}[kind])


def _activation(p, inputs, layer):
    x, kind = inputs[0], p.WhichOneof("NonlinearityType")
    a = getattr(p, kind)
    if kind == "ReLU":
        return np.maximum(x, 0)
    if kind == "leakyReLU":
        return np.where(x >= 0, x, a.alpha * x)
    if kind == "linear":
        return a.alpha * x + a.beta
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
        return np.where(x > a.alpha, x, 0)
    if kind == "softsign":
        return x / (1 + np.abs(x))
    if kind == "softplus":
        return np.logaddexp(0, x)
    if kind == "PReLU":
        alpha = weights(a.alpha, (x.shape[-3],), layer)
        return np.where(x >= 0, x, alpha[:, None, None] * x)
    raise CannotVerify(f"cannot verify: layer '{layer}' has activation {kind}")


def _unary(p, inputs, layer):
    x = (p.scale or 1.0) * inputs[0] + p.shift
    eps = p.epsilon or 1e-6
    functions = {0: np.sqrt, 1: lambda v: 1 / np.sqrt(v + eps), 2: lambda v: 1 / (v + eps),
                 3: lambda v: np.power(v, p.alpha), 4: np.exp, 5: np.log, 6: np.abs,
                 7: lambda v: np.maximum(v, p.alpha)}
    if p.type not in functions:
        raise CannotVerify(f"cannot verify: layer '{layer}' has unary function {p.type}")
    return functions[p.type](x)


def _clip(p, inputs, layer):
    return np.clip(inputs[0], p.minVal, p.maxVal)


def _batchnorm(p, inputs, layer):
    if p.computeMeanVar:
        raise CannotVerify(f"cannot verify: layer '{layer}' computes its mean and variance at run time")
    c = (int(p.channels),)
    gamma, beta, mean, var = (weights(getattr(p, n), c, layer) for n in ("gamma", "beta", "mean", "variance"))
    scale = gamma / np.sqrt(var + (p.epsilon or 1e-5))
    return inputs[0] * scale[:, None, None] + (beta - mean * scale)[:, None, None]


def _inner_product(p, inputs, layer):
    if p.int8DynamicQuantize:
        raise CannotVerify(f"cannot verify: layer '{layer}' uses int8 dynamic quantization")
    x = inputs[0]
    w = weights(p.weights, (p.outputChannels, p.inputChannels), layer)
    rank = x.ndim - 1
    rows = x.reshape(len(x), -1, p.inputChannels) if rank <= 3 else \
        x.reshape(len(x), *x.shape[1:rank - 2], p.inputChannels)
    y = rows @ w.T
    if p.hasBias:
        y = y + weights(p.bias, (p.outputChannels,), layer)
    if rank == 1:
        return y.reshape(len(x), -1)
    if rank <= 3:
        return y.reshape(*x.shape[:-1], -1)
    return y.reshape(*y.shape, 1, 1)


def _batched_matmul(p, inputs, layer):
    if p.int8DynamicQuantize:
        raise CannotVerify(f"cannot verify: layer '{layer}' uses int8 dynamic quantization")
    if len(inputs) == 2:
        a, b = inputs
        return (np.swapaxes(a, -1, -2) if p.transposeA else a) @ (np.swapaxes(b, -1, -2) if p.transposeB else b)
    rows, cols = int(p.weightMatrixFirstDimension), int(p.weightMatrixSecondDimension)
    y = inputs[0] @ weights(p.weights, (cols, rows), layer).T  # stored column-major: [X2, X1] row-major
    if p.hasBias:
        y = y + weights(p.bias, (cols,), layer)
    return y


def _softmax(p, inputs, layer):
    return _softmax_along(inputs[0], -3)


def _softmax_nd(p, inputs, layer):
    return _softmax_along(inputs[0], _axis(p.axis))


def _softmax_along(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _axis(axis):
    return axis + 1 if axis >= 0 else axis


def _reduction(function):
    def compute(p, inputs, layer):
        x = inputs[0]
        axes = tuple(range(1, x.ndim)) if p.reduceAll else tuple(_axis(a) for a in p.axes)
        return function(x, axis=axes, keepdims=p.keepDims)
    return compute


def _transpose(p, inputs, layer):
    return inputs[0].transpose(0, *(a + 1 for a in p.axes))


def _flatten(p, inputs, layer):
    x = inputs[0]
    if p.mode == 1:  # CHANNEL_LAST
        x = np.moveaxis(x, -3, -1)
    return x.reshape(*x.shape[:-3], -1, 1, 1)


def _flatten_to_2d(p, inputs, layer):
    x = inputs[0]
    axis = p.axis if p.axis >= 0 else p.axis + x.ndim - 1
    return x.reshape(len(x), int(np.prod(x.shape[1:axis + 1])), -1)


def _reshape_static(p, inputs, layer):
    return inputs[0].reshape(len(inputs[0]), *p.targetShape)


def _squeeze(p, inputs, layer):
    x = inputs[0]
    if p.squeezeAll:
        return x.reshape(len(x), *[d for d in x.shape[1:] if d != 1])
    return np.squeeze(x, axis=tuple(_axis(a) for a in p.axes))


def _expand_dims(p, inputs, layer):
    x = inputs[0]
    for a in sorted(p.axes):
        x = np.expand_dims(x, _axis(a) if a >= 0 else a)
    return x


def _elementwise(function):
    def compute(p, inputs, layer):
        if len(inputs) == 1:
            return function(inputs[0], np.float32(p.alpha))
        result = inputs[0]
        for other in inputs[1:]:
            result = function(result, other)
        return result
    return compute


def _broadcastable(function):
    def compute(p, inputs, layer):
        a, b = inputs
        # ranks may differ: pad the smaller one's Core ML shape on the left, keeping our batch axis first
        if a.ndim != b.ndim:
            short, long_ = (a, b) if a.ndim < b.ndim else (b, a)
            short = short.reshape(len(short), *(1,) * (long_.ndim - short.ndim), *short.shape[1:])
            a, b = (short, long_) if a.ndim < b.ndim else (long_, short)
        return function(a, b)
    return compute


def _concat(p, inputs, layer):
    return np.concatenate(inputs, axis=-5 if p.sequenceConcat else -3)


def _concat_nd(p, inputs, layer):
    return np.concatenate(inputs, axis=_axis(p.axis))


def _scale(p, inputs, layer):
    x = inputs[0] * _channel_shaped(weights(p.scale, tuple(p.shapeScale), layer))
    if p.hasBias:
        x = x + _channel_shaped(weights(p.bias, tuple(p.shapeBias), layer))
    return x


def _bias(p, inputs, layer):
    return inputs[0] + _channel_shaped(weights(p.bias, tuple(p.shape), layer))


def _channel_shaped(values):
    """A [1], [C], [1, H, W] or [C, H, W] parameter shaped to broadcast over (..., C, H, W)."""
    return values.reshape(-1, 1, 1) if values.ndim == 1 else values


_LAYERS = {
    "convolution": _convolution,
    "pooling": _pooling,
    "padding": _padding,
    "activation": _activation,
    "unary": _unary,
    "clip": _clip,
    "batchnorm": _batchnorm,
    "innerProduct": _inner_product,
    "batchedMatmul": _batched_matmul,
    "softmax": _softmax,
    "softmaxND": _softmax_nd,
    "reduceMean": _reduction(np.mean),
    "reduceSum": _reduction(np.sum),
    "reduceMax": _reduction(np.max),
    "reduceMin": _reduction(np.min),
    "transpose": _transpose,
    "flatten": _flatten,
    "flattenTo2D": _flatten_to_2d,
    "reshapeStatic": _reshape_static,
    "squeeze": _squeeze,
    "expandDims": _expand_dims,
    "add": _elementwise(np.add),
    "multiply": _elementwise(np.multiply),
    "addBroadcastable": _broadcastable(np.add),
    "subtractBroadcastable": _broadcastable(np.subtract),
    "multiplyBroadcastable": _broadcastable(np.multiply),
    "divideBroadcastable": _broadcastable(np.divide),
    "concat": _concat,
    "concatND": _concat_nd,
    "scale": _scale,
    "bias": _bias,
}

SUPPORTED_LAYERS = tuple(sorted(_LAYERS))
