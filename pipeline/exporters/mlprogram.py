"""Core ML ML Program export (`.mlpackage`), converted from the same model: fp16 or fp32, or compressed weights.

On Linux its outputs are computed by `pipeline.mlprogram_numpy` (the NumPy ML Program checker), from the saved
package alone; the spec check reads the image scale and bias from the program's own first operations.

Compressed weights (per-channel int8, 8- or 6-bit k-means palettes) are applied by coremltools.optimize.coreml
to a program computing in fp16. They are stored in constexpr ops, which Core ML runs from iOS 16 / macOS 13
(Core ML spec 7), so those programs are converted for iOS 16; fp16 and fp32 programs stay at iOS 15.
"""
from __future__ import annotations

import numpy as np

from pipeline import fileio
from pipeline.exporters import coreml

COMPRESSED = ("int8", "palette8", "palette6")


def deployment_target(precision):
    """The lowest Core ML deployment target a program of `precision` runs on, as a coremltools target."""
    import coremltools as ct

    return ct.target.iOS16 if precision in COMPRESSED else ct.target.iOS15


def compression_config(precision):
    """The coremltools.optimize.coreml config and function that compress the weights for `precision`."""
    import coremltools.optimize.coreml as cto

    if precision == "int8":
        return cto.linear_quantize_weights, cto.OptimizationConfig(
            global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel"))
    nbits = {"palette8": 8, "palette6": 6}[precision]
    return cto.palettize_weights, cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=nbits))


def export(model, meta, path, precision="fp16"):
    """Write `model` as an ML Program `.mlpackage` folder at `path`.

    precision: fp16 or fp32 (weights and computation), or int8 / palette8 / palette6 (fp16 computation with
    compressed weights, iOS 16+).
    """
    import coremltools as ct

    if precision not in ("fp16", "fp32", *COMPRESSED):
        from pipeline.errors import ExportError

        raise ExportError(f"an ML Program has no precision '{precision}'; one of fp16, fp32, {', '.join(COMPRESSED)}")
    mlmodel = ct.convert(model, convert_to="mlprogram", inputs=[coreml.image_input(meta)],
                         classifier_config=ct.ClassifierConfig(list(meta.labels)),
                         minimum_deployment_target=deployment_target(precision),
                         compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16)
    if precision in COMPRESSED:
        compress, config = compression_config(precision)
        # an all-zero output channel gets scale 0 and warns of 0/0; it decompresses to zeros all the same
        with np.errstate(divide="ignore", invalid="ignore"):
            mlmodel = compress(mlmodel, config)
    spec = mlmodel.get_spec()
    coreml.describe(spec, meta)
    described = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
    with fileio.atomic_folder(path) as tmp:
        described.save(str(tmp))


def read_spec(path):
    """The protobuf spec inside an `.mlpackage`."""
    import coremltools as ct

    return ct.utils.load_spec(str(path))


def problems(path, meta):
    """What is wrong with the package's input, outputs, metadata, labels and image preprocessing."""
    spec = read_spec(path)
    found = coreml.interface_problems(spec, meta)
    if spec.WhichOneof("Type") != "mlProgram":
        return found + [f"model should be an ML Program, got {spec.WhichOneof('Type')}"]
    operations = _operations(spec)
    labels = _classify_labels(operations)
    if labels != list(meta.labels):
        found.append(f"class labels differ from classes.txt: {labels} vs {list(meta.labels)}")
    scale, bias = _image_scale_bias(operations, coreml.INPUT_NAME)
    return found + coreml._scale_bias_problems(scale, bias, meta)


def load(path, labels=None):
    """A predictor that computes the package's outputs in NumPy (pipeline.mlprogram_numpy), with its own labels."""
    from pipeline import mlprogram_numpy

    return mlprogram_numpy.predictor(path, labels)


def _operations(spec):
    main = spec.mlProgram.functions["main"]
    return list(main.block_specializations[main.opset].operations)


def _constants(operations):
    return {op.outputs[0].name: _value(op.attributes["val"]) for op in operations if op.type == "const"}


def _value(attribute):
    """The Python value of an immediate MIL constant (strings, floats or ints)."""
    tensor = attribute.immediateValue.tensor
    for field in ("strings", "floats", "ints", "bytes"):
        if tensor.HasField(field):
            values = list(getattr(tensor, field).values)
            if field == "bytes":  # fp16 constants are stored as raw bytes
                values = np.frombuffer(getattr(tensor, field).values, dtype="<f2").astype(float).tolist()
            return values
    return None


def _classify_labels(operations):
    constants = _constants(operations)
    for op in operations:
        if op.type == "classify":
            argument = op.inputs["classes"].arguments[0]
            if argument.HasField("value"):  # the labels inline, as a list of one-string tensors
                return [label for item in argument.value.immediateValue.list.values
                        for label in item.immediateValue.tensor.strings.values]
            return constants.get(argument.name)
    return None


def _image_scale_bias(operations, input_name):
    """(scale, [red, green, blue] bias) of the mul/add the converter puts on the image.

    The converter leaves out a unit scale or a zero bias (x / 255 has no add), so a missing op means 1 or 0.
    """
    constants = _constants(operations)
    scale = bias = None
    current = input_name
    for op in operations:
        if op.type in ("mul", "add") and op.inputs["x"].arguments[0].name == current:
            value = np.asarray(constants.get(op.inputs["y"].arguments[0].name), dtype=float).ravel()
            if op.type == "mul":
                scale = float(value[0])
            else:
                bias = (list(value) * 3)[:3] if value.size == 1 else list(value)
            current = op.outputs[0].name
    return (1.0 if scale is None else scale), ([0.0, 0.0, 0.0] if bias is None else bias)
