"""Core ML export: a neural-network `.mlmodel` classifier that takes an RGB image and applies the scale/bias itself.

Its outputs are computed on Linux by `pipeline.checkers.coreml_numpy`, from the saved spec alone.
"""
from __future__ import annotations

import logging

from pipeline import fileio
from pipeline.checkers import coreml_numpy
from pipeline.checkers.kernels import DamagedFile
from pipeline.checkers.predictor import Predictor

log = logging.getLogger("pipeline.export.coreml")

KIND = "Core ML model (.mlmodel)"
INPUT_NAME = "image"
PROBABILITIES = "labelProbability"
LABEL = "label"


def image_input(meta):
    """The Core ML image input: RGB pixels, scaled and biased by Core ML into the backbone's range."""
    import coremltools as ct

    return ct.ImageType(name=INPUT_NAME, shape=(1, meta.image_size, meta.image_size, 3), scale=meta.scale,
                        bias=list(meta.bias), color_layout=ct.colorlayout.RGB)


def convert(model, meta):
    """Convert a Keras classifier to a Core ML neural-network spec with our input, output names and metadata."""
    import coremltools as ct

    mlmodel = ct.convert(model, convert_to="neuralnetwork", inputs=[image_input(meta)],
                         classifier_config=ct.ClassifierConfig(list(meta.labels)))
    spec = mlmodel.get_spec()
    describe(spec, meta)
    return spec


def describe(spec, meta):
    """Name the classifier outputs labelProbability / label and fill in descriptions and metadata, in place."""
    import coremltools as ct

    ct.utils.rename_feature(spec, spec.description.predictedProbabilitiesName, PROBABILITIES)
    ct.utils.rename_feature(spec, spec.description.predictedFeatureName, LABEL)
    description = spec.description
    description.metadata.author = meta.author
    description.metadata.license = meta.license
    description.metadata.shortDescription = meta.description
    description.metadata.versionString = meta.version
    description.input[0].shortDescription = (f"A photo, {meta.image_size}x{meta.image_size} RGB. "
                                             + (meta.input_note or "Vision scales and crops it to fit."))
    for output in description.output:
        output.shortDescription = {PROBABILITIES: "Probability of each class" + (
            f". {meta.output_note}" if meta.output_note else ""), LABEL: "The most likely class"}[output.name]
    user = description.metadata.userDefined
    user["com.apple.coreml.model.preview.type"] = "imageClassifier"
    for key, value in meta.user.items():
        user[key] = str(value)


def export(model, meta, path, precision="fp32"):
    """Write `model` as a Core ML `.mlmodel` at `path`, with float32, float16 or 8-bit linear weights."""
    import coremltools as ct

    spec = convert(model, meta)
    if precision != "fp32":
        from coremltools.models.neural_network import quantization_utils

        bits = {"fp16": 16, "int8": 8}[precision]
        quantized = quantization_utils.quantize_weights(ct.models.MLModel(spec, skip_model_load=True), nbits=bits)
        spec = quantized.get_spec()
    with fileio.atomic_path(path) as tmp:
        ct.utils.save_spec(spec, str(tmp))


def read_spec(path):
    """Load the protobuf spec of an `.mlmodel` file; one that cannot be read or holds no model is a DamagedFile."""
    import coremltools as ct
    from google.protobuf.message import DecodeError

    try:
        spec = ct.utils.load_spec(str(path))
    except (DecodeError, OSError) as error:
        raise DamagedFile.reading(path, KIND, error) from error
    if spec.WhichOneof("Type") is None:  # an empty file, or one cut off before its model, parses as an empty spec
        raise DamagedFile.reading(path, KIND, "it holds no model")
    return spec


def interface_problems(spec, meta):
    """What is wrong with the spec's input, outputs and metadata, for a neural network or an ML Program."""
    problems = []
    inputs = spec.description.input
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        problems.append(f"input should be one feature named '{INPUT_NAME}', got {[i.name for i in inputs]}")
    elif inputs[0].type.WhichOneof("Type") != "imageType":
        problems.append(f"input '{INPUT_NAME}' should be an image, got {inputs[0].type.WhichOneof('Type')}")
    else:
        image = inputs[0].type.imageType
        if (image.width, image.height) != (meta.image_size, meta.image_size):
            problems.append(f"input size should be {meta.image_size}x{meta.image_size}, got {image.width}x{image.height}")
        if image.colorSpace != 20:  # ImageFeatureType.RGB
            problems.append(f"input colour space should be RGB, got {image.colorSpace}")
    outputs = {o.name: o.type.WhichOneof("Type") for o in spec.description.output}
    if outputs != {PROBABILITIES: "dictionaryType", LABEL: "stringType"}:
        problems.append(f"outputs should be {PROBABILITIES} (dictionary) and {LABEL} (string), got {outputs}")
    if (spec.description.predictedProbabilitiesName, spec.description.predictedFeatureName) != (PROBABILITIES, LABEL):
        problems.append("classifier output names are not wired to labelProbability / label")
    metadata = spec.description.metadata
    for field, value in (("author", meta.author), ("license", meta.license), ("versionString", meta.version)):
        if getattr(metadata, field) != value:
            problems.append(f"metadata {field} should be {value!r}, got {getattr(metadata, field)!r}")
    return problems


def spec_problems(spec, meta):
    """Every way a neural-network spec differs from what the app expects (empty when it is right)."""
    problems = interface_problems(spec, meta)
    if spec.WhichOneof("Type") != "neuralNetworkClassifier":
        return problems + [f"model should be a neural network classifier, got {spec.WhichOneof('Type')}"]
    nn = spec.neuralNetworkClassifier
    if len(nn.preprocessing) != 1 or nn.preprocessing[0].WhichOneof("preprocessor") != "scaler":
        problems.append("input should have exactly one scaler preprocessing step")
    else:
        problems += _scale_bias_problems(nn.preprocessing[0].scaler.channelScale,
                                         [getattr(nn.preprocessing[0].scaler, f"{c}Bias") for c in
                                          ("red", "green", "blue")], meta)
    labels = list(nn.stringClassLabels.vector)
    if labels != list(meta.labels):
        problems.append(f"class labels differ from classes.txt: {labels} vs {list(meta.labels)}")
    return problems


def _scale_bias_problems(scale, rgb_bias, meta):
    problems = []
    if abs(scale - meta.scale) > 1e-6:
        problems.append(f"image channelScale should be {meta.scale:.6g}, got {scale:.6g}")
    for colour, got, want in zip(("red", "green", "blue"), rgb_bias, meta.bias):
        if abs(got - want) > 1e-6 * max(1.0, abs(want)):  # the file stores float32
            problems.append(f"image {colour}Bias should be {want:.6g}, got {got:.6g}")
    return problems


def problems(path, meta):
    """What is wrong with the saved file's interface and metadata (empty when it is right), or that it cannot be
    read."""
    try:
        spec = read_spec(path)
    except DamagedFile as error:
        return [error.problem]  # the loader's DamagedFile names the file, the reason and the fix
    return spec_problems(spec, meta)


def load(path, labels=None):
    """A predictor that computes the file's outputs in NumPy, with the labels and preprocessing of its spec."""
    spec = read_spec(path)
    image = spec.description.input[0].type.imageType
    return Predictor(labels=list(coreml_numpy.class_labels(spec)), image_size=int(image.width),
                     predict=lambda pixels: coreml_numpy.class_probabilities(spec, pixels)[1])
