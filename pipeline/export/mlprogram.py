"""Core ML ML Program export (`.mlpackage`), converted from the same model: fp16 or fp32, or compressed weights.

On Linux its outputs are computed by `pipeline.checkers.mlprogram_numpy` (the NumPy ML Program checker), from the saved
package alone; the spec check reads the image scale and bias from the program's own first operations.

Compressed weights (per-channel int8, 8- or 6-bit k-means palettes, or int8 with the largest weights in 6-bit
palettes, sized to a quarter of the fp32 program) are applied by coremltools.optimize.coreml to a program
computing in fp16, and each op's bias is then corrected for the mean shift its compressed weights cause, on
calibration (training) images (pipeline.export.bias_correction). They are stored in constexpr ops, which Core ML runs
from iOS 16 / macOS 13 (Core ML spec 7), so those programs are converted for iOS 16; fp16 and fp32 programs
stay at iOS 15.
"""
from __future__ import annotations

import numpy as np

from pipeline import fileio
from pipeline.checkers.kernels import DamagedFile
from pipeline.export import bias_correction, coreml

COMPRESSED = ("int8", "palette8", "palette6", "mixed")
QUARTER_MARGIN = 0.98  # "mixed" aims its estimated size at 98% of a quarter of the fp32 program's


def deployment_target(precision):
    """The lowest Core ML deployment target a program of `precision` runs on, as a coremltools target."""
    import coremltools as ct

    return ct.target.iOS16 if precision in COMPRESSED else ct.target.iOS15


def compress(mlmodel, precision):
    """The fp16 program `mlmodel` with its weights compressed for `precision` by coremltools.optimize.coreml:
    int8 (per-channel, symmetric), palette8 / palette6 (k-means, one palette per tensor), or mixed (int8, but
    the weights `quarter_size_palette6` names in 6-bit palettes)."""
    import coremltools.optimize.coreml as cto

    int8 = cto.OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel")
    if precision == "int8":
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=int8))
    if precision in ("palette8", "palette6"):
        palette = cto.OpPalettizerConfig(mode="kmeans", nbits=int(precision[-1]))
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=palette))
    six = quarter_size_palette6(mlmodel)
    mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(
        global_config=int8, op_name_configs={name: None for name in six}))
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs={
        name: cto.OpPalettizerConfig(mode="kmeans", nbits=6) for name in six}))


def quarter_size_palette6(mlmodel, threshold=2048):
    """The names of the conv/linear weight consts, largest first, that go to 6-bit palettes instead of int8 until
    the program's estimated size is QUARTER_MARGIN of a quarter of its fp32 size.

    Estimated bytes per const of n values: fp32 4n; int8 n plus an fp16 scale per output channel; a 6-bit
    palette 0.75n plus its 64 fp16 entries; a const under `threshold` values (coremltools' default, which it
    leaves alone) stays fp16, 2n. The spec's own bytes count in both sizes.
    """
    function = mlmodel._mil_program.functions["main"]
    consts = [op for op in function.operations if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)
              and op.outputs[0].val.dtype.kind == "f"]
    weights = {op.inputs["weight"].op.name for op in function.operations
               if op.op_type in ("conv", "linear") and op.inputs["weight"].op is not None}
    spec = len(mlmodel.get_spec().SerializeToString())
    fp32 = spec + sum(4 * op.outputs[0].val.size for op in consts)
    cost = {}
    for op in consts:
        value = op.outputs[0].val
        cost[op.name] = value.size + 2 * value.shape[0] if value.size >= threshold else 2 * value.size
    size, budget = spec + sum(cost.values()), QUARTER_MARGIN * fp32 / 4
    chosen = []
    for op in sorted((op for op in consts if op.name in weights and op.outputs[0].val.size >= threshold),
                     key=lambda op: (-op.outputs[0].val.size, op.name)):
        if size <= budget:
            break
        six_bit = int(np.ceil(0.75 * op.outputs[0].val.size)) + 64 * 2
        size += six_bit - cost[op.name]
        chosen.append(op.name)
    return chosen


def export(model, meta, path, precision="fp16", calibration=None):
    """Write `model` as an ML Program `.mlpackage` folder at `path`.

    precision: fp16 or fp32 (weights and computation), or int8 / palette8 / palette6 / mixed (fp16 computation
    with compressed weights, see `compress`; iOS 16+), their biases corrected on `calibration`: raw RGB training
    images (N, size, size, 3, 0-255), see pipeline.export.bias_correction.
    """
    import coremltools as ct

    from pipeline.errors import ExportError

    if precision not in ("fp16", "fp32", *COMPRESSED):
        raise ExportError(f"an ML Program has no precision '{precision}'; one of fp16, fp32, {', '.join(COMPRESSED)}")
    if precision in COMPRESSED and (calibration is None or len(calibration) == 0):
        raise ExportError(f"an ML Program with {precision} weights needs calibration images for its bias "
                          "correction (export.calibration_images)")
    mlmodel = ct.convert(model, convert_to="mlprogram", inputs=[coreml.image_input(meta)],
                         classifier_config=ct.ClassifierConfig(list(meta.labels)),
                         minimum_deployment_target=deployment_target(precision),
                         compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16)
    if precision in COMPRESSED:
        # an all-zero output channel gets scale 0 and warns of 0/0; it decompresses to zeros all the same
        with np.errstate(divide="ignore", invalid="ignore"):
            compressed = compress(mlmodel, precision)
        mlmodel = bias_correction.correct(mlmodel, compressed, np.asarray(calibration, dtype=np.float32))
    spec = mlmodel.get_spec()
    coreml.describe(spec, meta)
    described = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
    with fileio.atomic_folder(path) as tmp:
        described.save(str(tmp))


def read_spec(path):
    """The protobuf spec inside an `.mlpackage`. A package that cannot be read, or whose weights are missing or cut
    short, is a DamagedFile (pipeline.checkers.mlprogram_numpy.opened)."""
    from pipeline.checkers import mlprogram_numpy

    return mlprogram_numpy.opened(path).get_spec()


def problems(path, meta):
    """What is wrong with the package's input, outputs, metadata, labels and image preprocessing, or that it cannot
    be read."""
    try:
        spec = read_spec(path)
    except DamagedFile as error:
        return [error.problem]  # the loader's DamagedFile names the file, the reason and the fix
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
    """A predictor that computes the package's outputs in NumPy (pipeline.checkers.mlprogram_numpy), with its own
    labels."""
    from pipeline.checkers import mlprogram_numpy

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
