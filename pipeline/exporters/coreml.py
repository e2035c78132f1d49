"""Core ML export: a neural-network `.mlmodel` classifier that takes an RGB image and applies the scale/bias itself."""
from __future__ import annotations

import logging

from pipeline import fileio
from pipeline.errors import ExportError

log = logging.getLogger("pipeline.export.coreml")

INPUT_NAME = "image"
PROBABILITIES = "labelProbability"
LABEL = "label"


def convert(model, meta):
    """Convert a Keras classifier to a Core ML spec with our input, output names and metadata."""
    import coremltools as ct

    image = ct.ImageType(name=INPUT_NAME, shape=(1, meta.image_size, meta.image_size, 3), scale=meta.scale,
                         bias=[meta.bias] * 3, color_layout=ct.colorlayout.RGB)
    mlmodel = ct.convert(model, convert_to="neuralnetwork", inputs=[image],
                         classifier_config=ct.ClassifierConfig(list(meta.labels)))
    spec = mlmodel.get_spec()
    classifier = spec.description
    ct.utils.rename_feature(spec, classifier.predictedProbabilitiesName, PROBABILITIES)
    ct.utils.rename_feature(spec, classifier.predictedFeatureName, LABEL)
    description = spec.description
    description.metadata.author = meta.author
    description.metadata.license = meta.license
    description.metadata.shortDescription = meta.description
    description.metadata.versionString = meta.version
    description.input[0].shortDescription = (f"A photo, {meta.image_size}x{meta.image_size} RGB "
                                             "(Vision scales and crops it to fit)")
    for output in description.output:
        output.shortDescription = {PROBABILITIES: "Probability of each class",
                                   LABEL: "The most likely class"}[output.name]
    user = description.metadata.userDefined
    user["com.apple.coreml.model.preview.type"] = "imageClassifier"
    for key, value in meta.user.items():
        user[key] = str(value)
    return spec


def export(model, meta, path):
    """Write `model` as a Core ML `.mlmodel` at `path`."""
    import coremltools as ct

    spec = convert(model, meta)
    with fileio.atomic_path(path) as tmp:
        ct.utils.save_spec(spec, str(tmp))


def read_spec(path):
    """Load the protobuf spec of an `.mlmodel` file."""
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def spec_problems(spec, meta):
    """Every way the spec's interface differs from what the app expects (empty when it is right)."""
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
    if spec.WhichOneof("Type") != "neuralNetworkClassifier":
        return problems + [f"model should be a neural network classifier, got {spec.WhichOneof('Type')}"]
    nn = spec.neuralNetworkClassifier
    if len(nn.preprocessing) != 1 or nn.preprocessing[0].WhichOneof("preprocessor") != "scaler":
        problems.append("input should have exactly one scaler preprocessing step")
    else:
        scaler = nn.preprocessing[0].scaler
        expected = {"channelScale": meta.scale, "redBias": meta.bias, "greenBias": meta.bias, "blueBias": meta.bias}
        for field, value in expected.items():
            got = getattr(scaler, field)
            if abs(got - value) > 1e-6:
                problems.append(f"image {field} should be {value:.6g}, got {got:.6g}")
    labels = list(nn.stringClassLabels.vector)
    if labels != list(meta.labels):
        problems.append(f"class labels differ from classes.txt: {labels} vs {list(meta.labels)}")
    outputs = {o.name: o.type.WhichOneof("Type") for o in spec.description.output}
    if outputs != {PROBABILITIES: "dictionaryType", LABEL: "stringType"}:
        problems.append(f"outputs should be {PROBABILITIES} (dictionary) and {LABEL} (string), got {outputs}")
    if (spec.description.predictedProbabilitiesName, spec.description.predictedFeatureName) != (PROBABILITIES, LABEL):
        problems.append("classifier output names are not wired to labelProbability / label")
    return problems


def check(path, meta, pixels, expected):
    """Check the saved spec's interface field by field (Core ML cannot run predictions on Linux)."""
    problems = spec_problems(read_spec(path), meta)
    if problems:
        raise ExportError(f"{path}: " + "; ".join(problems))
    return {"checked": "spec: input image RGB, scale and bias, labels in classes.txt order, output names",
            "images": 0}
