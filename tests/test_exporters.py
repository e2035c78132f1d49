"""Exporters on a small model with a known answer: each class is a colour, so label order and preprocessing show."""
import json

import numpy as np
import pytest
from conftest import EXPORT_LABELS, backbone_classifier, backbones_to_export, varied_images

from pipeline.export import coreml, mlprogram, tflite
from pipeline.export import onnx as onnx_export
from pipeline.export.formats import FORMATS, PRECISIONS
from pipeline.export.meta import ExportMeta
from pipeline.export.parity import compare

LABELS = EXPORT_LABELS
PROTOTYPES = np.array([[0, 0, 255], [255, 0, 0], [255, 255, 0]], dtype=np.float32)  # RGB 0-255
SIZE = 16


def colour_model():
    """Preprocessed image -> mean colour -> nearest colour prototype (softmax over -distance^2)."""
    import tf_keras as keras

    protos = PROTOTYPES * 2 / 255 - 1
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    dense = keras.layers.Dense(len(LABELS), name="logits")
    x = keras.layers.Activation("softmax", name="probabilities")(dense(x))
    dense.set_weights([4 * protos.T, -2 * (protos ** 2).sum(1)])
    return keras.Model(inputs, x)


def meta():
    return ExportMeta(labels=LABELS, image_size=SIZE, scale=2 / 255, bias=(-1.0, -1.0, -1.0), author="tests", license="MIT",
                      description="colour test model", version="0.0", user={"backbone": "none"})


def solid(rgb):
    return np.full((SIZE, SIZE, 3), rgb, dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    return colour_model()


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(0)
    images = [solid(p) for p in PROTOTYPES] + [rng.uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
                                               for _ in range(5)]
    return np.stack(images)


def test_the_colour_model_knows_its_colours(model, pixels):
    probs = model.predict(pixels[:3] * 2 / 255 - 1, verbose=0)
    assert list(probs.argmax(1)) == [0, 1, 2]


def calibration_images():
    """Stand-ins for training images: each prototype colour, lightly textured."""
    rng = np.random.default_rng(3)
    return np.clip(PROTOTYPES[np.arange(12) % 3, None, None] + rng.normal(0, 20, (12, SIZE, SIZE, 3)), 0, 255
                   ).astype(np.float32)


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.runtime])
def test_every_runnable_export_agrees_with_keras(tmp_path, model, pixels, name):
    fmt = FORMATS[name]
    path = tmp_path / f"m{fmt.suffix}"
    module = fmt.exporter()
    module.export(model, meta(), path, fmt.precision, **({"calibration": calibration_images()} if fmt.calibrated
                                                         else {}))
    assert module.problems(path, meta()) == []
    expected = model.predict(pixels * 2 / 255 - 1, verbose=0)
    predictor = module.load(path, LABELS)
    assert predictor.labels == LABELS and predictor.image_size == SIZE
    probs = predictor.predict(pixels)
    assert list(probs[:3].argmax(1)) == [0, 1, 2]  # raw red pixels in -> "red square" out
    result = compare(probs, expected)
    assert result["top1_agreement"] == 1.0
    assert result["max_probability_difference"] < (1e-5 if fmt.precision == "fp32" else 2e-2)


def test_onnx_metadata_reads_back(tmp_path, model):
    import onnx

    path = tmp_path / "m.onnx"
    onnx_export.export(model, meta(), path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["labels"]) == LABELS
    assert props["input_layout"] == "NHWC" and props["input_range"] == "0-255"
    assert json.loads(props["bias"]) == [-1.0, -1.0, -1.0] and abs(float(props["scale"]) - 2 / 255) < 1e-12
    assert [o.name for o in proto.graph.output] == ["labelProbability"]


@pytest.fixture(scope="module")
def coreml_spec(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("coreml") / "m.mlmodel"
    coreml.export(model, meta(), path)
    return coreml.read_spec(path)


def test_coreml_spec_fields(coreml_spec):
    spec = coreml_spec
    assert coreml.spec_problems(spec, meta()) == []
    (inp,) = spec.description.input
    assert inp.name == "image" and inp.type.imageType.width == SIZE and inp.type.imageType.height == SIZE
    scaler = spec.neuralNetworkClassifier.preprocessing[0].scaler
    assert abs(scaler.channelScale - 2 / 255) < 1e-7
    assert (scaler.redBias, scaler.greenBias, scaler.blueBias) == (-1, -1, -1)
    assert list(spec.neuralNetworkClassifier.stringClassLabels.vector) == LABELS
    assert {o.name for o in spec.description.output} == {"labelProbability", "label"}
    assert spec.description.predictedProbabilitiesName == "labelProbability"
    assert spec.description.predictedFeatureName == "label"
    md = spec.description.metadata
    assert (md.author, md.license, md.versionString) == ("tests", "MIT", "0.0")
    assert md.shortDescription == "colour test model"
    assert md.userDefined["com.apple.coreml.model.preview.type"] == "imageClassifier"
    assert md.userDefined["backbone"] == "none"
    assert spec.description.input[0].shortDescription


@pytest.mark.parametrize("break_it, words", [
    (lambda s: setattr(s.neuralNetworkClassifier.preprocessing[0].scaler, "redBias", 0.0), "redBias"),
    (lambda s: setattr(s.neuralNetworkClassifier.preprocessing[0].scaler, "channelScale", 1.0), "channelScale"),
    (lambda s: s.neuralNetworkClassifier.stringClassLabels.vector.insert(0, s.neuralNetworkClassifier
                                                                          .stringClassLabels.vector.pop()), "labels"),
    (lambda s: setattr(s.description.input[0].type.imageType, "colorSpace", 30), "colour space"),
    (lambda s: setattr(s.description.output[0], "name", "Identity"), "outputs"),
])
def test_coreml_spec_check_catches_wrong_fields(coreml_spec, break_it, words):
    spec = type(coreml_spec)()
    spec.CopyFrom(coreml_spec)
    break_it(spec)
    problems = coreml.spec_problems(spec, meta())
    assert any(words in p for p in problems), problems


def test_format_table_names_existing_modules():
    for fmt in FORMATS.values():
        module = fmt.exporter()
        assert callable(module.export) and callable(module.problems) and callable(module.load)
        assert fmt.suffix.startswith((".", "-"))
        assert fmt.precision in PRECISIONS
        assert fmt.runtime  # since the ML Program checker, every format is computed on Linux
    assert len({f.suffix for f in FORMATS.values()}) == len(FORMATS)
    calibrated = [n for n, f in FORMATS.items() if f.calibrated]  # activation ranges, or bias correction
    assert calibrated == ["coreml-mlprogram-int8", "coreml-mlprogram-palette8", "coreml-mlprogram-palette6",
                          "coreml-mlprogram-mixed", "tflite-int8-full"]
    assert "coreml-int8" in FORMATS  # the legacy 8-bit .mlmodel stays available by name


def test_reduced_coreml_variants_store_smaller_weights(tmp_path, model):
    sizes = {}
    for precision in ("fp32", "fp16", "int8"):
        path = tmp_path / f"{precision}.mlmodel"
        coreml.export(model, meta(), path, precision)
        layer = next(l for l in coreml.read_spec(path).neuralNetworkClassifier.layers
                     if l.WhichOneof("layer") == "innerProduct")
        weights = layer.innerProduct.weights
        sizes[precision] = (len(weights.floatValue), len(weights.float16Value), len(weights.rawValue))
    assert sizes == {"fp32": (9, 0, 0), "fp16": (0, 18, 0), "int8": (0, 0, 9)}


def test_ml_program_package_spec(tmp_path, model):
    path = tmp_path / "m.mlpackage"
    mlprogram.export(model, meta(), path)
    assert path.is_dir()
    assert mlprogram.load(path).labels == LABELS  # computed by the NumPy ML Program checker
    assert mlprogram.problems(path, meta()) == []
    spec = mlprogram.read_spec(path)  # read back with coremltools
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.description.metadata.author == "tests"
    assert spec.description.metadata.userDefined["backbone"] == "none"
    wrong = ExportMeta(**{**meta().__dict__, "labels": LABELS[1:] + LABELS[:1], "bias": (0.0, 0.0, 0.0)})
    problems = mlprogram.problems(path, wrong)
    assert any("labels" in p for p in problems) and any("redBias" in p for p in problems), problems


def test_tflite_interface_is_checked(tmp_path, model):
    path = tmp_path / "m.tflite"
    tflite.export(model, meta(), path)
    wrong = ExportMeta(**{**meta().__dict__, "labels": LABELS + ["extra"], "image_size": SIZE * 2})
    problems = tflite.problems(path, wrong)
    assert any("input should be" in p for p in problems) and any("output should be" in p for p in problems)


@pytest.fixture(scope="module", params=backbones_to_export())
def classifier(request):
    """(name, model, meta) of the shared small classifier on each registered backbone (conftest)."""
    return (request.param, *backbone_classifier(request.param))


@pytest.mark.parametrize("name", ["coreml", "onnx", "tflite"])  # the ML Program: tests/test_mlprogram_numpy.py
def test_every_backbone_exports_and_agrees_with_keras(tmp_path, classifier, name):
    backbone, model, backbone_meta = classifier
    fmt = FORMATS[name]
    path = tmp_path / f"m{fmt.suffix}"
    module = fmt.exporter()
    module.export(model, backbone_meta, path, fmt.precision)
    assert module.problems(path, backbone_meta) == []  # the backbone's own scale and per-channel bias included
    pixels = varied_images(24, 32, 2)
    expected = model.predict(pixels * backbone_meta.scale + np.array(backbone_meta.bias, dtype=np.float32), verbose=0)
    assert len(set(expected.argmax(1))) == 3 and expected.max(axis=1).min() < 0.99  # varied, not saturated
    result = compare(module.load(path, LABELS).predict(pixels), expected)
    assert result["top1_agreement"] == 1.0, backbone
    assert result["max_probability_difference"] < 1e-4, backbone


def conv_model():
    """A small convolutional classifier whose second convolution (3x3x16x32 = 4,608 weights) is above
    coremltools' default 2,048-element threshold for compressing a weight."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(LABELS), activation="softmax")(x))


def program_ops(path):
    spec = mlprogram.read_spec(path)
    main = spec.mlProgram.functions["main"]
    return spec, {op.type for op in main.block_specializations[main.opset].operations}


# Core ML spec versions (coremltools.target): 6 = iOS 15 / macOS 12, 7 = iOS 16 / macOS 13.
@pytest.mark.parametrize("name, compressed_op, spec_version, bits", [
    ("coreml-mlprogram-fp32", None, 6, 32),
    ("coreml-mlprogram", None, 6, 16),
    ("coreml-mlprogram-int8", "constexpr_affine_dequantize", 7, 8),
    ("coreml-mlprogram-palette8", "constexpr_lut_to_dense", 7, 8),
    ("coreml-mlprogram-palette6", "constexpr_lut_to_dense", 7, 6),
    ("coreml-mlprogram-mixed", "constexpr_lut_to_dense", 7, 6),  # the one big weight is the largest: 6-bit
])
def test_ml_programs_store_their_weights_as_named_and_need_the_target_in_their_title(tmp_path, name, compressed_op,
                                                                                        spec_version, bits):
    fmt = FORMATS[name]
    path = tmp_path / f"m{fmt.suffix}"
    mlprogram.export(conv_model(), meta(), path, fmt.precision,
                     calibration=calibration_images() if fmt.calibrated else None)
    spec, ops = program_ops(path)
    assert spec.specificationVersion == spec_version
    assert ("iOS 16+" if spec_version == 7 else "iOS 15+") in fmt.title
    assert not any(op.startswith("constexpr_") for op in ops) if compressed_op is None else compressed_op in ops
    assert mlprogram.problems(path, meta()) == []
    weights = sum(p.stat().st_size for p in path.rglob("weight.bin"))
    big = 3 * 3 * 16 * 32  # the one weight above the threshold; the rest (about 800 values) stays fp16 or fp32
    assert weights < big * bits / 8 + 800 * 4 + 4096, weights  # plus the palettes, scales and blob headers


def test_full_integer_tflite_computes_in_int8_behind_float_input_and_output(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    path = tmp_path / "m-int8-full.tflite"
    tflite.export(conv_model(), meta(), path, "int8-full", calibration=calibration_images())
    assert tflite.problems(path, meta()) == []  # float32 pixels in, float32 probabilities out
    interpreter = Interpreter(model_path=str(path))
    kernels = [t for t in interpreter.get_tensor_details() if len(t["shape"]) == 4 and t["dtype"] == np.int8]
    assert kernels  # the convolutions hold int8 weights and activations


def test_full_integer_tflite_refuses_to_export_without_calibration_images(tmp_path):
    from pipeline.errors import ExportError

    with pytest.raises(ExportError, match="calibration images"):
        tflite.export(conv_model(), meta(), tmp_path / "m.tflite", "int8-full")


def test_the_mixed_program_is_at_most_a_quarter_of_the_fp32_one_with_its_largest_weights_in_6_bits(tmp_path):
    import tf_keras as keras

    keras.utils.set_random_seed(5)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = inputs
    for width in (64, 96, 192, 256):  # 1x1 convs of 192, 6144, 18432 and 49152 weights
        x = keras.layers.Conv2D(width, 1, activation="relu")(x)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    sizes = {}
    for precision in ("fp32", "int8", "mixed"):
        path = tmp_path / f"m-{precision}.mlpackage"
        mlprogram.export(model, meta(), path, precision, calibration=calibration_images())
        sizes[precision] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert sizes["int8"] > sizes["fp32"] / 4 >= sizes["mixed"], sizes  # int8 alone is not small enough
    spec, _ = program_ops(tmp_path / "m-mixed.mlpackage")
    main = spec.mlProgram.functions["main"]
    ops = list(main.block_specializations[main.opset].operations)
    palettized = sorted(int(np.prod([d.constant.size for d in op.outputs[0].type.tensorType.dimensions]))
                        for op in ops if op.type == "constexpr_lut_to_dense")
    quantized = [int(np.prod([d.constant.size for d in op.outputs[0].type.tensorType.dimensions]))
                 for op in ops if op.type == "constexpr_affine_dequantize"]
    assert palettized and quantized and min(palettized) > max(quantized)  # the largest go to 6 bits
    assert mlprogram.problems(tmp_path / "m-mixed.mlpackage", meta()) == []
