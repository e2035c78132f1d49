"""Bias correction for an ML Program whose weights were compressed (int8, palettes), on calibration images.

Compressing the weights W of an op y = W x + b to W + E moves the op's output by E x: noise, and a shift of its
mean by E mean(x), the same for every image. After ReLU6 an input's channels have large positive means, so in a
network of fifty such ops the shifts add up. Subtracting each shift from the op's bias removes it ("empirical
bias correction", Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.2): for each `conv` and `linear` op with a bias whose weights the compression changed,
b' = b - E m, where m holds the op's input channel means over the calibration images, computed through the
uncompressed program by pipeline.checkers.mlprogram_numpy. A conv's E is summed over its kernel window, so m
stands for every position of the window (zero padding at the borders is not counted apart). What it changed on
snacks: bench/RESULTS.md, "What bias correction changed".
"""
from __future__ import annotations

import numpy as np

_WEIGHTED = ("conv", "linear")


def input_means(reference, pixels, batch_size=None):
    """{op name: the channel means of its input} for each conv/linear op of the `reference` program (a
    `pipeline.checkers.mlprogram_numpy` Package or anything it reads), over `pixels` (raw RGB, 0-255), a batch of
    `batch_size` (default the checker's own) at a time, so that only one batch's activations are held."""
    from pipeline.checkers import mlprogram_numpy

    batch_size = batch_size or mlprogram_numpy.BATCH
    package = mlprogram_numpy.read(reference)
    ops = [op for op in package.function.operations if op.op_type in _WEIGHTED]
    names = sorted({op.inputs["x"].name for op in ops})
    (image,) = mlprogram_numpy.image_input_names(package)
    sums, count = {}, {}
    for start in range(0, len(pixels), batch_size):
        values = mlprogram_numpy.run(package, {image: pixels[start:start + batch_size]}, names, batch_size)
        for name, value in values.items():
            # (N, 1, C, *spatial) for a conv's input, (N, *leading, C) for a linear's: the channel axis apart
            axis = 2 if value.ndim > 3 else value.ndim - 1
            axes = tuple(a for a in range(value.ndim) if a != axis)
            sums[name] = sums.get(name, 0.0) + value.astype(np.float64).sum(axis=axes)
            count[name] = count.get(name, 0) + value.size // value.shape[axis]
    return {op.name: sums[op.inputs["x"].name] / count[op.inputs["x"].name] for op in ops}


def corrected_biases(reference, compressed, means):
    """{op name: corrected bias} for the `compressed` program's conv/linear ops whose weights differ from the
    `reference` program's (same op names: one conversion, then compressed), given `input_means`' means."""
    from pipeline.checkers import mlprogram_numpy

    reference, compressed = mlprogram_numpy.read(reference), mlprogram_numpy.read(compressed)
    ref_values, values = mlprogram_numpy.constant_values(reference), mlprogram_numpy.constant_values(compressed)
    ref_ops = {op.name: op for op in reference.function.operations if op.op_type in _WEIGHTED}
    biases = {}
    for op in compressed.function.operations:
        if op.op_type not in _WEIGHTED or op.name not in ref_ops or op.inputs.get("bias") is None:
            continue
        weight = values[id(op.inputs["weight"])][0].astype(np.float64)
        error = weight - ref_values[id(ref_ops[op.name].inputs["weight"])][0]
        if not error.any():
            continue
        shift = mean_shift(error, means[op.name], int(op.inputs["groups"].val) if "groups" in op.inputs else 1)
        biases[op.name] = values[id(op.inputs["bias"])][0].astype(np.float64) - shift
    return biases


def mean_shift(error, means, groups=1):
    """The change in an op's output channel means that the weight change `error` makes, for input channel
    `means`: error (C_out, C_in / groups, *kernel) for a conv (C_out, C_in) for a linear."""
    c_out, per_group = error.shape[:2]
    summed = error.reshape(groups, c_out // groups, per_group, -1).sum(axis=-1)  # over the kernel window
    return np.einsum("gop,gp->go", summed, np.asarray(means, np.float64).reshape(groups, per_group)).reshape(c_out)


def apply(mlmodel, biases):
    """A copy of the ML Program `mlmodel` (coremltools MLModel) with the biases of the ops named in `biases`
    replaced, each stored in its old bias's dtype (fp16 or fp32)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil import types
    from coremltools.models.utils import _apply_graph_pass

    class _SetBiases(AbstractGraphPass):
        def apply(self, prog):
            block = prog.functions["main"]
            with block:
                for op in list(block.operations):
                    if op.name not in biases:
                        continue
                    old = op.inputs["bias"]
                    dtype = np.float16 if types.builtin_to_string(old.dtype) == "fp16" else np.float32
                    new = mb.const(val=np.asarray(biases[op.name]).astype(dtype), name=f"{old.name}_corrected",
                                   before_op=op)
                    block.replace_uses_of_var_after_op(anchor_op=new.op, old_var=old, new_var=new, end_op=op)

    return _apply_graph_pass(mlmodel, _SetBiases(), spec_version=mlmodel.get_spec().specificationVersion,
                             skip_model_load=True)


def correct(reference, compressed, pixels):
    """The compressed MLModel with its biases corrected (see the module's doc) on calibration `pixels`.

    reference: the same program before compression (an MLModel); compressed: the MLModel compression gave.
    """
    from pipeline.checkers import mlprogram_numpy

    reference_program = mlprogram_numpy.read(reference)  # read once: its constants are kept for both uses
    means = input_means(reference_program, pixels)
    return apply(compressed, corrected_biases(reference_program, compressed, means))
