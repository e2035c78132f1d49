"""The NumPy Core ML checker: hand-built specs with known answers, a converted Keras model, and the bugs it exists for."""
import numpy as np
import pytest

from pipeline.checkers import coreml_numpy
from pipeline.checkers.kernels import CannotVerify
from pipeline.checkers.predictor import in_label_order
from pipeline.config import ExportConfig
from pipeline.export import coreml
from pipeline.export.parity import measure
from test_exporters import LABELS, meta, model, pixels  # noqa: F401  (model, pixels: fixtures)

RNG = np.random.default_rng(7)


def colour_space(name):
    """The proto's ImageFeatureType.ColorSpace value (GRAYSCALE, RGB, BGR), not the checker's copy of it."""
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ImageFeatureType.ColorSpace.Value(name)


def image_spec(width, height, scale=1.0, rgb_bias=(0.0, 0.0, 0.0), colours="RGB", gray_bias=0.0):
    """A neural-network spec with one image input 'image' (RGB, BGR or GRAYSCALE) and its scaler, no layers yet."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.specificationVersion = 5
    inp = spec.description.input.add()
    inp.name = "image"
    inp.type.imageType.width, inp.type.imageType.height = width, height
    inp.type.imageType.colorSpace = colour_space(colours)
    spec.description.output.add().name = "out"
    nn = spec.neuralNetwork
    nn.imageInputShapeMapping = 1  # [1, C, H, W]
    scaler = nn.preprocessing.add()
    scaler.featureName = "image"
    scaler.scaler.channelScale = scale
    scaler.scaler.redBias, scaler.scaler.greenBias, scaler.scaler.blueBias = rgb_bias
    scaler.scaler.grayBias = gray_bias
    return spec


def add_layer(spec, kind, name="layer", inputs=("image",), output="out"):
    layer = spec.neuralNetwork.layers.add()
    layer.name = name
    layer.input.extend(inputs)
    layer.output.append(output)
    params = getattr(layer, kind)
    params.SetInParent()  # selects the layer type even when no field of it is set
    return params


@pytest.mark.parametrize("colours", ["RGB", "BGR"])
def test_image_preprocessing_comes_from_the_spec(colours):
    spec = image_spec(3, 2, scale=0.5, rgb_bias=(10.0, 20.0, 30.0), colours=colours)
    add_layer(spec, "activation").linear.alpha = 1.0
    px = RNG.uniform(0, 255, (2, 2, 3, 3)).astype(np.float32)  # N, H, W, RGB
    out = coreml_numpy.run(spec, px, ["out"])["out"]
    assert out.shape == (2, 1, 3, 2, 3)  # batch of single predictions, each [1, C, H, W]
    channels = [2, 1, 0] if colours == "BGR" else [0, 1, 2]
    biases = {0: 10.0, 1: 20.0, 2: 30.0}
    for position, channel in enumerate(channels):
        np.testing.assert_allclose(out[:, 0, position], px[..., channel] * 0.5 + biases[channel], rtol=1e-6)


def test_colour_space_constants_are_the_protos():
    assert (coreml_numpy.GRAYSCALE, coreml_numpy.RGB, coreml_numpy.BGR) == tuple(
        colour_space(name) for name in ("GRAYSCALE", "RGB", "BGR"))  # 10, 20, 30 in FeatureTypes.proto


@pytest.mark.parametrize("colours, expected", [("RGB", [6.0, 12.0, 18.0]), ("BGR", [18.0, 12.0, 6.0])])
def test_each_bias_applies_to_the_channel_of_its_colour(colours, expected):
    # NeuralNetworkImageScaler: BGR is Y[0] = scale * X[0] + blueBias, ...; RGB is Y[0] = scale * X[0] + redBias, ...
    spec = image_spec(1, 1, scale=0.5, rgb_bias=(1.0, 2.0, 3.0), colours=colours)
    add_layer(spec, "activation").linear.alpha = 1.0
    px = np.array([10.0, 20.0, 30.0], np.float32).reshape(1, 1, 1, 3)  # red 10, green 20, blue 30
    out = coreml_numpy.run(spec, px, ["out"])["out"]
    np.testing.assert_array_equal(out.reshape(3), expected)  # red 10 * 0.5 + 1, green 20 * 0.5 + 2, blue 30 * 0.5 + 3


@pytest.mark.parametrize("channel_axis", [False, True], ids=["N,H,W", "N,H,W,1"])
def test_a_grayscale_input_is_one_channel_with_the_gray_bias(channel_axis):
    spec = image_spec(3, 2, scale=0.5, rgb_bias=(10.0, 20.0, 30.0), colours="GRAYSCALE", gray_bias=4.0)
    add_layer(spec, "activation").linear.alpha = 1.0
    gray = RNG.uniform(0, 255, (2, 2, 3)).astype(np.float32)
    out = coreml_numpy.run(spec, gray[..., None] if channel_axis else gray, ["out"])["out"]
    assert out.shape == (2, 1, 1, 2, 3)  # RANK4_IMAGE_MAPPING: gray images are [1, 1, H, W]
    np.testing.assert_allclose(out[:, 0, 0], gray * 0.5 + 4.0, rtol=1e-6)  # Y[0] = channelScale * X[0] + grayBias


def test_rgb_pixels_for_a_grayscale_input_cannot_be_verified():
    spec = image_spec(3, 2, colours="GRAYSCALE")
    add_layer(spec, "activation").ReLU.SetInParent()
    with pytest.raises(CannotVerify, match="grayscale image and the pixels are RGB"):
        coreml_numpy.run(spec, np.zeros((1, 2, 3, 3), np.float32), ["out"])


def reference_convolution(x, w, bias, stride, pads, dilation, groups):
    """Core ML convolution by its definition, with plain loops: x (C, H, W), w (O, C/groups, kH, kW)."""
    x = np.pad(x, ((0, 0), *pads))
    out_c, per_in, kh, kw = w.shape
    span_h, span_w = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
    out_h, out_w = (x.shape[1] - span_h) // stride + 1, (x.shape[2] - span_w) // stride + 1
    y = np.zeros((out_c, out_h, out_w))
    for o in range(out_c):
        g = o // (out_c // groups)
        for i in range(out_h):
            for j in range(out_w):
                patch = x[g * per_in:(g + 1) * per_in, i * stride:i * stride + span_h:dilation,
                          j * stride:j * stride + span_w:dilation]
                y[o, i, j] = (patch * w[o]).sum() + bias[o]
    return y


@pytest.mark.parametrize("stride, padding, groups, dilation, out_c", [
    (1, "same", 1, 1, 4),
    (2, "same", 1, 1, 5),   # TF-style: the extra row/column of padding goes at the bottom/right
    (2, "valid", 3, 1, 6),  # grouped, with explicit border amounts like a ZeroPadding2D folded in
    (1, "same", 3, 2, 3),   # depthwise, dilated
    (2, "valid", 3, 1, 3),  # depthwise, strided
])
def test_convolution_matches_its_definition(stride, padding, groups, dilation, out_c):
    h, w_ = 7, 6
    spec = image_spec(w_, h)
    conv = add_layer(spec, "convolution")
    weights = RNG.standard_normal((out_c, 3 // groups, 3, 3)).astype(np.float32)
    bias = RNG.standard_normal(out_c).astype(np.float32)
    conv.outputChannels, conv.kernelChannels, conv.nGroups = out_c, 3 // groups, groups
    conv.kernelSize.extend([3, 3])
    conv.stride.extend([stride, stride])
    conv.dilationFactor.extend([dilation, dilation])
    conv.hasBias = True
    conv.weights.floatValue.extend(weights.ravel())
    conv.bias.floatValue.extend(bias)
    if padding == "same":
        conv.same.asymmetryMode = 0
        span = 2 * dilation + 1
        pads = []
        for size in (h, w_):
            total = max(0, (-(-size // stride) - 1) * stride + span - size)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(0, 1), (1, 0)]
        for start, end in pads:
            edge = conv.valid.paddingAmounts.borderAmounts.add()
            edge.startEdgeSize, edge.endEdgeSize = start, end
    px = RNG.uniform(0, 255, (2, h, w_, 3)).astype(np.float32)
    out = coreml_numpy.run(spec, px, ["out"])["out"][:, 0]
    for n in range(2):
        expected = reference_convolution(px[n].transpose(2, 0, 1).astype(np.float64), weights, bias, stride,
                                         pads, dilation, groups)
        np.testing.assert_allclose(out[n], expected, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("kind", ["max", "average", "average_exclude_padding"])
def test_pooling_matches_its_definition(kind):
    spec = image_spec(5, 5)
    pool = add_layer(spec, "pooling")
    pool.type = 0 if kind == "max" else 1
    pool.kernelSize.extend([3, 3])
    pool.stride.extend([2, 2])
    pool.same.asymmetryMode = 0
    pool.avgPoolExcludePadding = kind == "average_exclude_padding"
    px = RNG.uniform(0, 255, (1, 5, 5, 3)).astype(np.float32)
    out = coreml_numpy.run(spec, px, ["out"])["out"][0, 0]
    x = px[0].transpose(2, 0, 1)
    for i in range(3):
        for j in range(3):
            rows, cols = slice(max(0, 2 * i - 1), 2 * i + 2), slice(max(0, 2 * j - 1), 2 * j + 2)
            window = x[:, rows, cols]
            if kind == "max":
                expected = window.max(axis=(1, 2))
            elif kind == "average":
                expected = window.sum(axis=(1, 2)) / 9
            else:
                expected = window.mean(axis=(1, 2))
            np.testing.assert_allclose(out[:, i, j], expected, rtol=1e-5)


def test_weights_in_every_encoding_decode_to_the_same_values():
    from coremltools.proto import NeuralNetwork_pb2

    values = np.array([[0.5, -1.0, 2.0], [4.0, 0.5, -3.0]], dtype=np.float32)
    fp16 = NeuralNetwork_pb2.WeightParams(float16Value=values.astype("<f2").tobytes())
    np.testing.assert_array_equal(coreml_numpy.weights(fp16, (2, 3), "l"), values)
    linear = NeuralNetwork_pb2.WeightParams(rawValue=bytes([1, 0, 2, 2, 1, 0]))
    linear.quantization.numberOfBits = 8
    linear.quantization.linearQuantization.scale.extend([1.5, 3.5])  # one scale and bias per output channel
    linear.quantization.linearQuantization.bias.extend([-1.0, -3.0])
    np.testing.assert_allclose(coreml_numpy.weights(linear, (2, 3), "l"), values)
    table = NeuralNetwork_pb2.WeightParams(rawValue=bytes([2, 1, 3, 4, 2, 5]))
    table.quantization.numberOfBits = 8
    table.quantization.lookupTableQuantization.floatValue.extend([0.0, -1.0, 0.5, 2.0, 4.0, -3.0] + [0.0] * 250)
    np.testing.assert_allclose(coreml_numpy.weights(table, (2, 3), "l"), values)
    four_bit = NeuralNetwork_pb2.WeightParams(rawValue=bytes(3))
    four_bit.quantization.numberOfBits = 4
    with pytest.raises(CannotVerify, match="4-bit"):
        coreml_numpy.weights(four_bit, (2, 3), "l")


def test_a_layer_it_does_not_implement_is_an_explicit_failure():
    spec = image_spec(4, 4)
    add_layer(spec, "lrn", name="norm1").localSize = 3
    with pytest.raises(CannotVerify, match="layer 'norm1' of type lrn"):
        coreml_numpy.run(spec, np.zeros((1, 4, 4, 3), np.float32), ["out"])


def test_wrong_image_size_is_an_error():
    spec = image_spec(4, 4)
    add_layer(spec, "activation").ReLU.SetInParent()
    with pytest.raises(Exception, match="takes 4x4 RGB images"):
        coreml_numpy.run(spec, np.zeros((1, 5, 4, 3), np.float32), ["out"])


# -- shapes and options: the proto's own examples, or an explicit CannotVerify ------------------------------

def add_convolution(spec, name, out_c, kernel_c, groups, kernel=3):
    conv = add_layer(spec, "convolution", name=name)
    conv.outputChannels, conv.kernelChannels, conv.nGroups = out_c, kernel_c, groups
    conv.kernelSize.extend([kernel, kernel])
    conv.weights.floatValue.extend(RNG.standard_normal(out_c * kernel_c * kernel * kernel).astype(np.float32))
    return conv


def add_channel(spec, channel, output):
    """A 1x1 convolution that copies one colour channel of the image: [1, 3, H, W] -> [1, 1, H, W]."""
    conv = add_layer(spec, "convolution", name=output, output=output)
    conv.outputChannels, conv.kernelChannels = 1, 3
    conv.kernelSize.extend([1, 1])
    conv.weights.floatValue.extend(np.eye(3, dtype=np.float32)[channel])
    return conv


def add_reshape(spec, shape, name, inputs=("image",)):
    add_layer(spec, "reshapeStatic", name=name, inputs=inputs, output=name).targetShape.extend(shape)


@pytest.mark.parametrize("kernel_c, groups, out_c, kernel", [
    (1, 1, 2, 3),  # one group of 1-channel kernels takes 1 channel, the image has 3
    (2, 3, 3, 3),  # 3 groups of 2-channel kernels take 6
    (2, 1, 4, 1),  # 1x1 kernels of 2 channels take 2
])
def test_convolution_input_channels_must_be_kernel_channels_times_groups(kernel_c, groups, out_c, kernel):
    # ConvolutionLayerParams.kernelChannels: "Must be equal to inputChannels / nGroups"
    spec = image_spec(6, 6)
    add_convolution(spec, "conv", out_c, kernel_c, groups, kernel)
    with pytest.raises(CannotVerify, match="conv' gets 3 input channels"):
        coreml_numpy.run(spec, RNG.uniform(0, 255, (2, 6, 6, 3)).astype(np.float32), ["out"])


def _conv_output_shape(spec):
    add_convolution(spec, "l", 2, 3, 1).outputShape.extend([4, 4])  # only defined for deconvolution


def _instance_norm(spec):
    bn = add_layer(spec, "batchnorm", name="l")
    bn.channels, bn.instanceNormalization = 3, True
    for name in ("gamma", "beta", "mean", "variance"):
        getattr(bn, name).floatValue.extend([1.0, 1.0, 1.0])


def _matmul_bias_two_inputs(spec):
    add_reshape(spec, [3, 16], "a")
    add_reshape(spec, [16, 3], "b")
    mm = add_layer(spec, "batchedMatmul", name="l", inputs=("a", "b"))
    mm.hasBias = True
    mm.bias.floatValue.extend([1.0, 2.0, 3.0])


def _parametric_softplus(spec):
    add_layer(spec, "activation", name="l").parametricSoftplus.alpha.floatValue.append(1.0)


@pytest.mark.parametrize("build, unimplemented", [
    (_conv_output_shape, "sets outputShape"),
    (_instance_norm, "sets instanceNormalization"),
    (_matmul_bias_two_inputs, "bias, which the proto defines for one input only"),
    (_parametric_softplus, "sets parametricSoftplus"),
])
def test_a_field_the_checker_does_not_implement_cannot_be_verified(build, unimplemented):
    spec = image_spec(4, 4)
    build(spec)
    with pytest.raises(CannotVerify, match=f"layer 'l'.*{unimplemented}"):
        coreml_numpy.run(spec, RNG.uniform(0, 255, (1, 4, 4, 3)).astype(np.float32), ["out"])


def _batchnorm_of_one_channel(spec):
    bn = add_layer(spec, "batchnorm", name="l")
    bn.channels = 1  # the input has 3
    for name, value in (("gamma", 2.0), ("beta", 0.0), ("mean", 0.0), ("variance", 1.0)):
        getattr(bn, name).floatValue.append(value)


def _inner_product_of_the_wrong_width(spec):
    add_reshape(spec, [8, 6], "rows")  # rank 2: the last axis (6) must be inputChannels
    ip = add_layer(spec, "innerProduct", name="l", inputs=("rows",))
    ip.inputChannels, ip.outputChannels = 3, 2
    ip.weights.floatValue.extend(np.ones(6, np.float32))


def _add_of_two_ranks(spec):
    add_reshape(spec, [48], "flat")
    add_layer(spec, "add", name="l", inputs=("image", "flat"))


def _scale_of_two_channels(spec):
    scale = add_layer(spec, "scale", name="l")
    scale.shapeScale.append(2)
    scale.scale.floatValue.extend([1.0, 2.0])


@pytest.mark.parametrize("build, message", [
    (_batchnorm_of_one_channel, "has 1 channels"),
    (_inner_product_of_the_wrong_width, "has inputChannels 3"),
    (_add_of_two_ranks, "takes inputs of one rank"),
    (_scale_of_two_channels, r"has shapeScale \[2\]"),
])
def test_a_layer_given_a_shape_it_does_not_take_cannot_be_verified(build, message):
    spec = image_spec(4, 4)
    build(spec)
    with pytest.raises(CannotVerify, match=f"layer 'l'.*{message}"):
        coreml_numpy.run(spec, RNG.uniform(0, 255, (2, 4, 4, 3)).astype(np.float32), ["out"])


def test_prelu_with_one_alpha_and_thresholded_relu_at_its_threshold():
    # ActivationPReLU: alpha "of length C or 1"; ActivationThresholdedReLU: x if x >= alpha, else 0
    px = np.array([[[[0.0, 64.0, 128.0]]]], np.float32)  # 1x1 image, channels -1, 0, 1 after the scaler below
    spec = image_spec(1, 1, scale=1 / 64, rgb_bias=(-1.0, -1.0, -1.0))
    add_layer(spec, "activation", name="prelu", output="prelu").PReLU.alpha.floatValue.append(0.25)
    add_layer(spec, "activation", name="t", inputs=("image",)).thresholdedReLU.alpha = 1.0
    out = coreml_numpy.run(spec, px, ["prelu", "out"])
    np.testing.assert_allclose(out["prelu"].reshape(3), [-0.25, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(out["out"].reshape(3), [0.0, 0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("interleave, expected", [
    (False, [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]),
    (True, [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]]),
])
def test_concat_nd_interleave_is_the_protos_example(interleave, expected):
    # ConcatNDLayerParams' example: in1 [[1, 2], [3, 4], [5, 6]], in2 [[7, 8], [9, 10], [11, 12]], axis 0
    spec = image_spec(2, 3)
    add_channel(spec, 0, "red")
    add_reshape(spec, [3, 2], "in1", inputs=("red",))
    add_channel(spec, 1, "green")
    add_reshape(spec, [3, 2], "in2", inputs=("green",))
    concat = add_layer(spec, "concatND", name="concat", inputs=("in1", "in2"))
    concat.axis, concat.interleave = 0, interleave
    px = np.stack([np.arange(1, 7).reshape(3, 2), np.arange(7, 13).reshape(3, 2), np.zeros((3, 2))], axis=-1)
    out = coreml_numpy.run(spec, np.stack([px, px + 100]).astype(np.float32), ["out"])["out"]
    np.testing.assert_array_equal(out, [expected, np.array(expected) + 100])


def test_an_interleaved_channel_shuffle_differs_from_a_concatenation():
    spec = image_spec(2, 2)
    concat = add_layer(spec, "concatND", name="shuffle", inputs=("image", "image"))
    concat.axis, concat.interleave = -3, True
    px = RNG.uniform(0, 255, (2, 2, 2, 3)).astype(np.float32)
    out = coreml_numpy.run(spec, px, ["out"])["out"]
    rgb = px.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(out[:, 0], rgb[:, [0, 0, 1, 1, 2, 2]])  # output[0::2] = in1, output[1::2] = in2


@pytest.mark.parametrize("axes, shape", [((0, 1), (1, 1, 10, 5)), ((0, 2), (1, 10, 1, 5)), ((-2, -1), (10, 5, 1, 1))])
def test_expand_dims_is_the_protos_examples(axes, shape):
    spec = image_spec(5, 10)
    mean = add_layer(spec, "reduceMean", name="mean", output="rows")  # [1, 3, 10, 5] -> (10, 5)
    mean.axes.extend([0, 1])
    add_layer(spec, "expandDims", name="expand", inputs=("rows",)).axes.extend(axes)
    px = RNG.uniform(0, 255, (2, 10, 5, 3)).astype(np.float32)
    out = coreml_numpy.run(spec, px, ["out"])["out"]
    assert out.shape == (2, *shape)
    np.testing.assert_allclose(out.reshape(2, 10, 5), px.mean(axis=-1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["reduceSum", "reduceMax"])
@pytest.mark.parametrize("all_axes", [True, False], ids=["reduceAll", "axes 0-3"])
def test_a_reduction_over_every_axis_is_shape_1_not_rank_0(kind, all_axes):
    spec = image_spec(4, 3)
    reduce = add_layer(spec, kind)
    if all_axes:
        reduce.reduceAll = True
    else:
        reduce.axes.extend([0, 1, 2, -1])
    px = RNG.uniform(0, 255, (2, 3, 4, 3)).astype(np.float32)
    out = coreml_numpy.run(spec, px, ["out"])["out"]
    assert out.shape == (2, 1)  # Core ML tensors have rank >= 1
    expected = px.sum(axis=(1, 2, 3)) if kind == "reduceSum" else px.max(axis=(1, 2, 3))
    np.testing.assert_allclose(out[:, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("squeeze_all", [False, True], ids=["(1,) axes (0)", "(1, 1, 1, 1) squeezeAll"])
def test_a_squeeze_to_nothing_is_shape_1(squeeze_all):
    # SqueezeLayerParams' example: input shape (1,), axes (0), output shape (1,)
    spec = image_spec(4, 3)
    total = add_layer(spec, "reduceSum", name="total", output="total")
    total.reduceAll = total.keepDims = True  # [1, 1, 1, 1]
    if squeeze_all:
        add_layer(spec, "squeeze", name="squeeze", inputs=("total",)).squeezeAll = True
    else:
        add_reshape(spec, [1], "one", inputs=("total",))
        add_layer(spec, "squeeze", name="squeeze", inputs=("one",)).axes.append(0)
    px = RNG.uniform(0, 255, (2, 3, 4, 3)).astype(np.float32)
    out = coreml_numpy.run(spec, px, ["out"])["out"]
    assert out.shape == (2, 1)
    np.testing.assert_allclose(out[:, 0], px.sum(axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("a, b, shape", [
    ("vector", "wide", (1, 6)),    # first tensor 1-D: (D) -> (1, D)
    ("tall", "vector", (6, 1)),    # second tensor 1-D: (D) -> (D, 1)
    ("vector", "vector", (1, 1)),  # both; the output rank is max(2, rank(a), rank(b))
])
def test_batched_matmul_with_a_rank_1_operand_follows_the_proto(a, b, shape):
    spec = image_spec(3, 2)
    columns = add_layer(spec, "reduceSum", name="vector", output="vector")  # [1, 3, 2, 3] -> (3,): sum over C, H
    columns.axes.extend([0, 1, 2])
    add_reshape(spec, [3, 6], "wide")
    add_reshape(spec, [6, 3], "tall")
    add_layer(spec, "batchedMatmul", name="matmul", inputs=(a, b))
    px = RNG.uniform(0, 1, (2, 2, 3, 3)).astype(np.float32)  # two images: each is its own prediction
    out = coreml_numpy.run(spec, px, ["out"])["out"]
    assert out.shape == (2, *shape)
    for n in range(2):
        chw = px[n].transpose(2, 0, 1).astype(np.float64)
        tensors = {"vector": chw.sum(axis=(0, 1)), "wide": chw.reshape(3, 6), "tall": chw.reshape(6, 3)}
        left = tensors[a][None, :] if a == "vector" else tensors[a]
        right = tensors[b][:, None] if b == "vector" else tensors[b]
        np.testing.assert_allclose(out[n], left @ right, rtol=1e-5)


def test_batched_matmul_of_a_vector_by_its_column_major_weights():
    # one input: (X1,) -> (1, X1) @ W [X1, X2] -> (X2,); W's values are stored column-major
    spec = image_spec(3, 1)
    add_reshape(spec, [9], "vector")
    mm = add_layer(spec, "batchedMatmul", name="matmul", inputs=("vector",))
    w = RNG.standard_normal((9, 2)).astype(np.float32)
    mm.weightMatrixFirstDimension, mm.weightMatrixSecondDimension = 9, 2
    mm.weights.floatValue.extend(w.ravel(order="F"))
    px = RNG.uniform(0, 1, (2, 1, 3, 3)).astype(np.float32)
    out = coreml_numpy.run(spec, px, ["out"])["out"]
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, px.transpose(0, 3, 1, 2).reshape(2, 9) @ w, rtol=1e-5)


def test_transposing_a_rank_1_matmul_operand_cannot_be_verified():
    spec = image_spec(3, 1)
    add_reshape(spec, [9], "vector")
    add_layer(spec, "batchedMatmul", name="matmul", inputs=("vector", "vector")).transposeA = True
    with pytest.raises(CannotVerify, match="transposes a rank-1 operand"):
        coreml_numpy.run(spec, np.zeros((1, 1, 3, 3), np.float32), ["out"])


def varied_keras_model(size=24):
    """A small model using the layer types the converter emits for CNN backbones and heads."""
    import tf_keras as keras

    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(inputs)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)))(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="valid")(x)
    x = keras.layers.BatchNormalization()(x)
    branch = keras.layers.Conv2D(8, 1, activation="sigmoid")(x)
    x = keras.layers.Add()([x, branch])
    x = keras.layers.LeakyReLU(0.2)(x)
    x = keras.layers.Concatenate()([keras.layers.MaxPooling2D(2)(x), keras.layers.AveragePooling2D(2)(x)])
    x = keras.layers.Conv2D(6, 3, padding="same", activation="tanh")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, activation="softmax")(x)
    model = keras.Model(inputs, x)
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    bn.set_weights([RNG.uniform(0.5, 2, 8), RNG.normal(0, 1, 8), RNG.normal(0, 1, 8), RNG.uniform(0.5, 2, 8)])
    return model


def test_a_converted_keras_model_matches_keras(tmp_path):
    model = varied_keras_model()
    labels = ["a", "b", "c", "d", "e"]
    from pipeline.export.meta import ExportMeta

    m = ExportMeta(labels=labels, image_size=24, scale=2 / 255, bias=(-1.0, -1.0, -1.0), author="t", license="t",
                   description="t", version="t")
    path = tmp_path / "varied.mlmodel"
    coreml.export(model, m, path)
    kinds = {layer.WhichOneof("layer") for layer in coreml.read_spec(path).neuralNetworkClassifier.layers}
    assert {"convolution", "padding", "pooling", "add", "concat", "activation", "unary", "transpose", "reshapeStatic",
            "batchedMatmul", "softmaxND"} <= kinds
    px = RNG.uniform(0, 255, (6, 24, 24, 3)).astype(np.float32)
    expected = model.predict(px * 2 / 255 - 1, verbose=0)
    predictor = coreml.load(path)
    got = in_label_order(predictor.predict(px), predictor.labels, labels)
    assert expected.std(axis=0).max() > 1e-3  # the outputs vary with the image, so agreement means something
    np.testing.assert_allclose(got, expected, atol=1e-5)


# -- the bugs the checker exists for: each broken file is caught by the numbers, not only by the spec check --

def _bias_zero(spec):
    scaler = spec.neuralNetworkClassifier.preprocessing[0].scaler
    scaler.redBias = scaler.greenBias = scaler.blueBias = 0.0


def _labels_rotated(spec):
    labels = spec.neuralNetworkClassifier.stringClassLabels.vector
    labels.insert(0, labels.pop())


def _bgr(spec):
    spec.description.input[0].type.imageType.colorSpace = colour_space("BGR")  # ImageFeatureType.BGR = 30


@pytest.mark.parametrize("break_it", [None, _bias_zero, _labels_rotated, _bgr],
                         ids=["correct", "bias 0", "labels rotated", "BGR"])
def test_the_checker_catches_the_costly_bugs(tmp_path, model, pixels, break_it):  # noqa: F811
    import coremltools as ct

    path = tmp_path / "MultiSnacks.mlmodel"
    coreml.export(model, meta(), path)
    if break_it:
        spec = coreml.read_spec(path)
        break_it(spec)
        ct.utils.save_spec(spec, str(path))
    expected = model.predict(pixels * 2 / 255 - 1, verbose=0)
    predictor = coreml.load(path)
    probs = in_label_order(predictor.predict(pixels), predictor.labels, LABELS)
    difference = np.abs(probs - expected).max()
    h5 = tmp_path / "model.h5"
    model.save(h5)
    truth = np.array([0, 1, 2, 0, 0, 0, 0, 0])
    (row,) = measure({"coreml": path}, model, h5, meta(), pixels, truth, ExportConfig(latency_images=1))[1:]
    if break_it is None:
        assert difference < 1e-5 and row["passed"], row["verdict"]
    else:
        assert difference > 0.1  # the numeric check alone shows the bug
        assert not row["passed"] and "max probability difference" in row["verdict"]
        if break_it is not _bias_zero:  # a colour swap or label shift also changes solid colours' answers
            assert row["top1_agreement"] < 1


def test_a_blob_shared_by_a_view_is_not_overwritten_by_in_place_layers():
    # 'scaled' dies at the ReLU, but the reshape 'view' shares its memory and is read after it
    spec = image_spec(4, 3)
    add_layer(spec, "activation", name="scale", output="scaled").linear.alpha = -2.0
    add_reshape(spec, [1, 3, 3, 4], "view", inputs=("scaled",))
    add_layer(spec, "activation", name="relu", inputs=("scaled",), output="relu").ReLU.SetInParent()
    threshold = add_layer(spec, "unary", name="threshold", inputs=("relu",), output="threshold")
    threshold.type, threshold.alpha, threshold.shift = 7, 50.0, 1.0  # max(x + 1, 50)
    add_layer(spec, "add", name="sum", inputs=("threshold", "view", "threshold"))
    px = RNG.uniform(0, 255, (2, 3, 4, 3)).astype(np.float32)
    scaled = -2 * px.transpose(0, 3, 1, 2)
    threshold = np.maximum(np.maximum(scaled, 0) + 1, 50)
    out = coreml_numpy.run(spec, px, ["out"])["out"][:, 0]
    np.testing.assert_allclose(out, threshold + scaled + threshold, rtol=1e-6)


def relu6_spec(width=5, height=4):
    """The four layers coremltools' NeuralNetwork converter writes for relu6, on a 1x1 convolution's output."""
    spec = image_spec(width, height)
    conv = add_layer(spec, "convolution", "conv", output="c")
    w = RNG.standard_normal((2, 3, 1, 1)).astype(np.float32)
    conv.outputChannels, conv.kernelChannels, conv.hasBias = 2, 3, False
    conv.kernelSize.extend([1, 1])
    conv.weights.floatValue.extend(w.ravel())
    add_layer(spec, "activation", "relu", ("c",), "r").ReLU.SetInParent()
    negate = add_layer(spec, "activation", "negate", ("r",), "n").linear
    negate.alpha = -1.0
    threshold = add_layer(spec, "unary", "threshold", ("n",), "t")
    threshold.type, threshold.alpha, threshold.scale, threshold.epsilon = 7, -6.0, 1.0, 1e-6  # THRESHOLD
    add_layer(spec, "activation", "negate_again", ("t",), "out").linear.alpha = -1.0
    return spec, w


def test_the_converters_relu6_layers_are_computed_at_once_as_min_max():
    spec, w = relu6_spec()
    layers = list(spec.neuralNetwork.layers)
    assert [len(group) for _, group, _ in coreml_numpy._steps(layers, ["out"])] == [1, 4]
    assert [len(group) for _, group, _ in coreml_numpy._steps(layers, ["out", "n"])] == [1, 1, 1, 1, 1]
    px = RNG.uniform(0, 255, (3, 4, 5, 3)).astype(np.float32) / 30
    px[0, 0, 0] = 0  # a zero sum: +0 after the four layers
    fused = coreml_numpy.run(spec, px, ["out"])["out"]
    apart = coreml_numpy.run(spec, px, ["out", "n"])["out"]  # asking for 'n' keeps the four layers apart
    np.testing.assert_array_equal(fused.view(np.uint32), apart.view(np.uint32))
    want = np.clip(np.einsum("oc,nhwc->nohw", w[:, :, 0, 0].astype(np.float64), px.astype(np.float64)), 0, 6)
    np.testing.assert_allclose(fused[:, 0], want, rtol=1e-5, atol=1e-5)
    assert not np.signbit(fused).any()


def test_relu6_at_once_is_the_four_layers_bit_for_bit_on_special_values():
    spec, _ = relu6_spec()
    group = list(spec.neuralNetwork.layers)[1:]
    x = np.array([-np.inf, -7, -6, -1e-40, -0.0, 0.0, 1e-40, 2 ** -149, 1, 5.9999995, 6, 6.0000005, 7, 3.4e38, np.inf,
                  np.nan, -np.nan], np.float32)
    x = np.concatenate([x, np.random.default_rng(2).integers(0, 2 ** 32, 100_000, dtype=np.uint64).astype(np.uint32)
                        .view(np.float32)]).reshape(1, 1, 1, -1)
    y = x
    with np.errstate(all="ignore"):
        for layer in group:
            y = coreml_numpy._compute(layer, [y])[0]
        z = coreml_numpy._relu6(group, x.copy(), np.float32(6))
    np.testing.assert_array_equal(z.view(np.uint32), y.view(np.uint32))


def test_cached_convolution_weights_give_the_same_answers_on_later_calls_and_other_batch_splits():
    spec, w = relu6_spec(6, 5)
    px = RNG.uniform(0, 255, (5, 5, 6, 3)).astype(np.float32)
    want = np.einsum("oc,nhwc->nohw", w[:, :, 0, 0].astype(np.float64), px.astype(np.float64))
    cache = {}
    first = coreml_numpy.run(spec, px, ["c"], batch_size=4, cache=cache)["c"]
    kernels = cache[0]["kernels"]
    again = coreml_numpy.run(spec, px, ["c"], batch_size=2, cache=cache)["c"]
    assert cache[0]["kernels"] is kernels  # made once, reused by the later call
    for got in (first, again, coreml_numpy.run(spec, px, ["c"], batch_size=1)["c"]):
        np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-3)
