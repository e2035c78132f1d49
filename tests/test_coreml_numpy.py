"""The NumPy Core ML checker: hand-built specs with known answers, a converted Keras model, and the bugs it exists for."""
import numpy as np
import pytest

from pipeline import coreml_numpy
from pipeline.config import ExportConfig
from pipeline.coreml_numpy import CannotVerify
from pipeline.exporters import coreml, in_label_order
from pipeline.parity import measure
from test_exporters import LABELS, meta, model, pixels  # noqa: F401  (model, pixels: fixtures)

RNG = np.random.default_rng(7)


def image_spec(width, height, scale=1.0, rgb_bias=(0.0, 0.0, 0.0), bgr=False):
    """A neural-network spec with one RGB/BGR image input 'image' and its scaler, and no layers yet."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.specificationVersion = 4
    inp = spec.description.input.add()
    inp.name = "image"
    inp.type.imageType.width, inp.type.imageType.height = width, height
    inp.type.imageType.colorSpace = coreml_numpy.BGR if bgr else coreml_numpy.RGB
    spec.description.output.add().name = "out"
    nn = spec.neuralNetwork
    nn.imageInputShapeMapping = 1  # [1, C, H, W]
    scaler = nn.preprocessing.add()
    scaler.featureName = "image"
    scaler.scaler.channelScale = scale
    scaler.scaler.redBias, scaler.scaler.greenBias, scaler.scaler.blueBias = rgb_bias
    return spec


def add_layer(spec, kind, name="layer", inputs=("image",), output="out"):
    layer = spec.neuralNetwork.layers.add()
    layer.name = name
    layer.input.extend(inputs)
    layer.output.append(output)
    return getattr(layer, kind)


@pytest.mark.parametrize("bgr", [False, True], ids=["RGB", "BGR"])
def test_image_preprocessing_comes_from_the_spec(bgr):
    spec = image_spec(3, 2, scale=0.5, rgb_bias=(10.0, 20.0, 30.0), bgr=bgr)
    add_layer(spec, "activation").linear.alpha = 1.0
    px = RNG.uniform(0, 255, (2, 2, 3, 3)).astype(np.float32)  # N, H, W, RGB
    out = coreml_numpy.run(spec, px, ["out"])["out"]
    assert out.shape == (2, 1, 3, 2, 3)  # batch of single predictions, each [1, C, H, W]
    channels = [2, 1, 0] if bgr else [0, 1, 2]
    biases = {0: 10.0, 1: 20.0, 2: 30.0}
    for position, channel in enumerate(channels):
        np.testing.assert_allclose(out[:, 0, position], px[..., channel] * 0.5 + biases[channel], rtol=1e-6)


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
    from pipeline.exporters import ExportMeta

    m = ExportMeta(labels=labels, image_size=24, scale=2 / 255, bias=-1.0, author="t", license="t",
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
    spec.description.input[0].type.imageType.colorSpace = coreml_numpy.BGR


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
