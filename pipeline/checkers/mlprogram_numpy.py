"""Core ML ML Program on Linux: compute a saved `.mlpackage` program's outputs in NumPy, operation by operation.

coremltools runs an ML Program only on macOS, but it reads one anywhere: `milproto.load` turns the package's
spec and `weights/weight.bin` into a MIL `Program`. This module evaluates that program's function (`main`)
the way the MIL op definitions (coremltools/converters/mil/mil/ops/defs, iOS 15 to iOS 18 sets) define each
op. The image preprocessing is whatever the program computes (the converter puts the image scale and bias in
its first `mul`/`add` ops): nothing comes from our config. An op whose output is fp16 has its result rounded
to float16, as a program converted with fp16 compute precision computes it; `cast` ops convert. Compressed
weights (`constexpr_*` ops) are decompressed by the ops' own `decompress` methods. An op type, an input, an
input value or a dtype this module does not implement raises `CannotVerify` (pipeline.checkers.kernels),
never a guess.

Like pipeline.checkers.coreml_numpy, every tensor carries one extra leading axis: the images (or tensors) of a
batch, each evaluated as its own prediction. So MIL axis `a` is NumPy axis `a + 1`, a MIL rank-0 value has shape
(N,), and a constant has a batch axis of size 1, which broadcasts. Values are held as float32 (an fp16 value
as the float32 of its float16 rounding), int32 or bool.

Speed, without changing what is computed: convolutions are `pipeline.checkers.kernels.conv2d` (padding, strides,
dilations, groups and weight layout are this code's; TensorFlow's CPU kernels do the multiply-adds, in NHWC,
so a batch's sums can come out in another order than for one image alone: results are deterministic for a
given batch size, not independent of it); each conv's weights are put in TensorFlow's layout once per package
(`Package.kernels`), not per batch or call; a conv adds its bias and, when its output is fp16, rounds it in
TensorFlow (a float16 cast and back, exactly NumPy's float16 cast), giving a read-only array; other fp16
rounding is `_round_to_fp16`, also exactly NumPy's cast, in place; an op whose inputs die at it writes its
output over them when nothing else shares their memory (and they are writable); and
ops that only select or move fp16 values (relu6, pad, transpose, ...) are not rounded, as rounding them changes
nothing. Batches of `pipeline.checkers.kernels.BATCH` images ran fastest.
"""
from __future__ import annotations

import inspect
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from pipeline.checkers.kernels import (
    BATCH,
    CannotVerify,
    DamagedFile,
    channels_first,
    conv2d,
    conv_kernels,
    one_line,
    padded,
)
from pipeline.errors import ExportError

KIND = "Core ML ML Program (.mlpackage)"
# The start of the record before each weight in a weights file (MIL blob storage): a sentinel, the weight's type,
# its size in bytes and where its data starts.
_BLOB_RECORD = struct.Struct("<IIQQ")
_BLOB_SENTINEL = 0xDEADBEEF
# What coremltools' MIL loader raises (milproto/load.py, and the op definitions it builds ops with) for a program
# it cannot read back.
_LOADER_ERRORS = (ValueError, TypeError, KeyError, NotImplementedError, AssertionError, RuntimeError)


# -- reading a package ---------------------------------------------------------------------------------------

@dataclass
class Package:
    """A loaded ML Program: its spec (None for a bare MIL Program), the MIL Program, and the function to run.

    constants: the values of the function's const and constexpr ops, computed once and reused by every run.
    kernels: each conv op's weights in TensorFlow's layout, made at its first run and reused by the later ones
        (and by every batch), {id(op): (weight, bias, kernels)}; an entry is used only while the op's weight
        and bias are still those very constant arrays (bias None when the op has none).
    """

    spec: object
    program: object
    function_name: str = "main"
    constants: dict = field(default=None, repr=False)
    kernels: dict = field(default_factory=dict, repr=False)

    @property
    def function(self):
        try:
            return self.program.functions[self.function_name]
        except KeyError:
            raise ExportError(f"the program has no function '{self.function_name}', only "
                              f"{sorted(self.program.functions)}") from None


def read(source):
    """A Package from an `.mlpackage` path, a coremltools MLModel, a MIL Program or a Package (returned as is).

    A package that cannot be read is a DamagedFile (see `opened`); a program coremltools' own loader cannot read
    back is a CannotVerify naming the loader's reason.
    """
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.converters.mil.mil import Program

    if isinstance(source, Package):
        return source
    if isinstance(source, Program):
        return Package(spec=None, program=source)
    if isinstance(source, ct.models.MLModel):
        model, where = source, source.package_path or "the model"
        _check_weights(model, where)
    else:
        model, where = opened(source), source
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise CannotVerify(f"cannot verify: model type {spec.WhichOneof('Type')} (only ML Programs are "
                           "implemented here; neural networks are pipeline.checkers.coreml_numpy's)")
    try:
        program = milproto_load(spec, spec.specificationVersion, model.weights_dir or "")
    except _LOADER_ERRORS as error:
        raise CannotVerify(f"cannot verify: coremltools' MIL loader cannot read back the program of {where} "
                           f"({one_line(error)})") from error
    return Package(spec=spec, program=program, function_name=spec.description.defaultFunctionName or "main")


def opened(path):
    """The `.mlpackage` at `path` as a coremltools MLModel, not compiled, whose weights files hold every weight its
    program reads. A package that cannot be read, or whose weights are missing or cut short, is a DamagedFile."""
    import coremltools as ct
    from google.protobuf.message import DecodeError

    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
    except (DecodeError, OSError, RuntimeError) as error:  # RuntimeError: its manifest, or an item it lists
        raise DamagedFile.reading(path, KIND, error) from error
    _check_weights(model, path)
    return model


def _check_weights(model, where):
    """Raise a DamagedFile for `where` if the MLModel's weights files do not hold every weight its program reads."""
    damage = _weights_damage(model.get_spec(), model.weights_dir)
    if damage:
        raise DamagedFile.reading(where, KIND, damage)


def _weights_damage(spec, weights_dir):
    """Why the weights folder cannot give the program every weight it reads, or None when it can: the folder or a
    file is missing or unreadable, or a file ends before a weight it should hold (a copy cut short)."""
    offsets = {}
    for name, offset in _blob_references(spec.mlProgram):
        offsets.setdefault(name, []).append(offset)
    if offsets and weights_dir is None:
        return f"its program reads weights from {', '.join(sorted(offsets))}, and it has no weights folder"
    for name, starts in sorted(offsets.items()):
        path = Path(weights_dir) / name.split("/")[-1]  # where coremltools' loader looks for it
        try:
            with open(path, "rb") as weights:
                damage = _blob_damage(weights, sorted(set(starts)))
        except OSError as error:
            return f"weights file weights/{path.name}: {error}"
        if damage:
            return f"weights file weights/{path.name} {damage}"
    return None


def _blob_damage(weights, offsets):
    """Why the open weights file does not hold a whole weight at each of `offsets`, or None."""
    size = os.fstat(weights.fileno()).st_size
    for offset in offsets:
        weights.seek(offset)
        record = weights.read(_BLOB_RECORD.size)
        if len(record) < _BLOB_RECORD.size:
            return f"ends at byte {size}, before the weight recorded at byte {offset}"
        sentinel, _, length, start = _BLOB_RECORD.unpack(record)
        if sentinel != _BLOB_SENTINEL:
            return f"holds no weight record at byte {offset}"
        if start + length > size:
            return f"ends at byte {size}, before the end of its weight at byte {start + length}"
    return None


def _blob_references(message):
    """(file name, offset) of every value in the message (part of an ML Program spec) kept in a weights file."""
    from google.protobuf.message import Message

    if message.DESCRIPTOR.name == "BlobFileValue":
        return [(message.fileName, message.offset)]
    found = []
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            value = value.values() if descriptor.message_type.fields_by_name["value"].message_type else ()
        elif isinstance(value, Message):
            value = [value]
        for item in value:
            found += _blob_references(item)
    return found


# -- running -------------------------------------------------------------------------------------------------

def run(program_or_path, inputs, outputs=None, batch_size=BATCH):
    """The program's outputs for a batch of inputs, computed in chunks of `batch_size`: {name: array}.

    program_or_path: an `.mlpackage` path, an MLModel, a Package (see `read`) or a MIL Program.
    inputs: {input name: array}, each with the batch on its first axis. An input the spec declares as an image
        takes decoded pixels (0-255), (N, H, W, 3) RGB for RGB and BGR images (BGR ones are reversed here, as
        Core ML does), (N, H, W) gray levels for grayscale ones. Any other input (and every input of a bare MIL
        Program, which knows no images) takes (N, *its shape).
    outputs: the names of the values to return (function outputs or any op's output); default the function's
        outputs. A `classify` op's label output is an array of N labels, its probability dictionary an
        (N, classes) array in the order of the op's classes (see `class_labels`).
    """
    package = read(program_or_path)
    function = package.function
    wanted = list(outputs) if outputs is not None else [var.name for var in function.outputs]
    targets = _named(function, wanted)
    constants = _constants(package)
    feeds = _feeds(package, inputs)
    count = len(next(iter(feeds.values()))) if feeds else 1
    results = {name: [] for name in wanted}
    for start in range(0, count, batch_size):
        chunk = {key: value[start:start + batch_size] for key, value in feeds.items()}
        values = _evaluate(function, constants, chunk, targets, package.kernels)
        size = min(batch_size, count - start)
        for name, var in zip(wanted, targets):  # a value that does not depend on the inputs has a batch axis of 1
            value = values[id(var)]
            results[name].append(np.repeat(value, size, axis=0) if len(value) != size else value)
    return {name: parts[0] if len(parts) == 1 else np.concatenate(parts) for name, parts in results.items()}


def _named(function, names):
    """The vars of these names: function outputs and inputs first, then op outputs (whose names must be unique).

    Vars are told apart by identity, not name: coremltools' loader gives the literals it turns into consts
    names that can repeat the program's own.
    """
    known = {var.name: var for var in function.inputs.values()}
    known.update({var.name: var for var in function.outputs})
    found = []
    for name in names:
        if name in known:
            found.append(known[name])
            continue
        matches = [var for op in function.operations for var in op.outputs if var.name == name]
        if len(matches) != 1:
            raise ExportError(f"the program computes {'no' if not matches else len(matches)} tensors named '{name}'")
        found.append(matches[0])
    return found


def class_labels(program_or_path):
    """The class labels of the program's `classify` op, in the order of its probabilities."""
    return _classify(read(program_or_path).function)[1]


def class_probabilities(program_or_path, pixels, batch_size=BATCH):
    """A classifier's (labels, probabilities (N, classes)) for decoded pixels (see `run`), labels in its order."""
    package = read(program_or_path)
    op, labels = _classify(package.function)
    image = _image_inputs(package)
    if len(package.function.inputs) != 1 or not image:
        raise CannotVerify("cannot verify: the classifier should have one image input, it has inputs "
                           f"{list(package.function.inputs)}")
    name = op.outputs[1].name
    probabilities = run(package, {next(iter(image)): pixels}, [name], batch_size)[name]
    return labels, probabilities


def predictor(path, labels=None):
    """A Predictor computing the package's probabilities in NumPy, labelled as its `classify` op labels them.

    labels: unused (the program carries its own labels); taken for the exporters' `load(path, labels)` interface.
    """
    from pipeline.checkers.predictor import Predictor

    package = read(path)
    images = _image_inputs(package)
    if len(images) != 1:
        raise CannotVerify(f"cannot verify: the package has {len(images)} image inputs, a classifier takes one")
    image = next(iter(images.values()))
    _constants(package)  # decompressed once, for every batch the predictor is given
    return Predictor(labels=list(class_labels(package)), image_size=int(image.width),
                     predict=lambda pixels: class_probabilities(package, pixels)[1])


def _classify(function):
    ops = [op for op in function.operations if op.op_type == "classify"]
    if len(ops) != 1:
        raise ExportError(f"the program has {len(ops)} classify ops, a classifier has one")
    classes = ops[0].inputs["classes"].val
    labels = list(getattr(classes, "ls", classes))
    return ops[0], [label.item() if isinstance(label, np.generic) else label for label in labels]


def image_input_names(program_or_path):
    """The names of the program's image inputs (none for a bare MIL Program)."""
    return list(_image_inputs(read(program_or_path)))


def constant_values(program_or_path):
    """{id(var): value} of the function's const and constexpr outputs (decompressed), each with a batch axis of
    1; the Package keeps them for its later runs."""
    return _constants(read(program_or_path))


def _image_inputs(package):
    """{input name: ImageFeatureType} of the spec's image inputs (none for a bare MIL Program)."""
    if package.spec is None:
        return {}
    return {f.name: f.type.imageType for f in package.spec.description.input if f.type.WhichOneof("Type") == "imageType"}


def _feeds(package, inputs):
    """The function's input values, batched: {name: (N, *shape) array of the input's dtype}."""
    function = package.function
    missing, extra = set(function.inputs) - set(inputs), set(inputs) - set(function.inputs)
    if missing or extra:
        raise ExportError(f"the program takes inputs {sorted(function.inputs)}, got {sorted(inputs)}")
    images = _image_inputs(package)
    feeds = {}
    for name, var in function.inputs.items():
        shape = _static_shape(var, f"input '{name}'")
        if name in images:
            x = channels_first(name, images[name], np.asarray(inputs[name], dtype=np.float32))
            if shape != (1, *x.shape[1:]):
                raise CannotVerify(f"cannot verify: image input '{name}' is a tensor of shape {shape} in the program, "
                                   f"not (1, {', '.join(map(str, x.shape[1:]))})")
            value = x[:, None]
        else:
            value = np.asarray(inputs[name])
            if value.shape[1:] != shape:
                raise ExportError(f"input '{name}' takes a batch of tensors of shape {shape}, got an array of shape "
                                  f"{value.shape}")
        feeds[id(var)] = _typed(value, var, f"input '{name}'")
    lengths = {len(v) for v in feeds.values()}
    if len(lengths) > 1:
        raise ExportError(f"the inputs hold different numbers of items: {sorted(lengths)}")
    return feeds


def _static_shape(var, what):
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    shape = tuple(var.shape)
    if any(is_symbolic(d) for d in shape):
        raise CannotVerify(f"cannot verify: {what} has a flexible shape {shape}")
    return tuple(int(d) for d in shape)


def _dtype_name(var):
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


_STORAGE = {"fp32": np.float32, "fp16": np.float32, "int32": np.int32, "bool": np.bool_}


def _typed(value, var, what):
    """value held as var's dtype: float32 (rounded to float16 first for fp16), int32 or bool."""
    dtype = _dtype_name(var)
    if dtype not in _STORAGE:
        raise CannotVerify(f"cannot verify: {what} is {dtype}; the checker holds fp32, fp16, int32 and bool values")
    value = np.asarray(value)
    if dtype == "fp16":
        return value.astype(np.float16).astype(np.float32)
    return value.astype(_STORAGE[dtype], copy=False)


def _constants(package):
    """The values of the function's const and constexpr ops, batched (a batch axis of 1), computed once."""
    if package.constants is None:
        constants = {}
        for op in package.function.operations:
            if op.op_type == "const":
                constants[id(op.outputs[0])] = _constant(op)
            elif op.op_type.startswith("constexpr_"):
                for var, value in zip(op.outputs, _decompressed(op, constants)):
                    constants[id(var)] = value
        package.constants = constants
    return package.constants


def _constant(op):
    from coremltools.converters.mil.mil import types

    var = op.outputs[0]
    value = var.val
    numeric = types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type)
    if numeric and _dtype_name(var) in _STORAGE and value is not None and not isinstance(value, str):
        return _typed(value, var, f"const '{var.name}'")[None]
    return None  # a string, list or sub-byte constant: used as an attribute or by a constexpr op, as var.val


def _decompressed(op, constants):
    """A constexpr op's output values, batched, from its own `decompress` (or, for constexpr_cast, a cast)."""
    def raw(name):
        var = op.inputs.get(name)
        if var is None:
            return None
        if var.op is not None and var.op.op_type.startswith("constexpr_"):
            return constants[id(var)][0]
        if var.val is None:
            raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' input '{name}' is not a constant")
        return var.val

    if op.op_type == "constexpr_cast":  # no decompress method: a cast of its constant (fp16 to fp32)
        _only_inputs(op, {"source_val", "output_dtype"})
        dtype = raw("output_dtype")
        if dtype not in ("fp16", "fp32"):
            raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' casts to {dtype}")
        values = [np.asarray(raw("source_val")).astype(np.float32)]
    else:
        decompress = getattr(type(op), "decompress", None)
        if decompress is None:
            raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' (compressed weights) is not implemented")
        names = list(inspect.signature(decompress).parameters)
        _only_inputs(op, set(names))
        values = decompress(**{name: raw(name) for name in names})
        values = list(values) if isinstance(values, tuple) else [values]
    if len(values) != len(op.outputs):
        raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' decompresses {len(values)} values for "
                           f"{len(op.outputs)} outputs")
    out = []
    for var, value in zip(op.outputs, values):
        value = _typed(value, var, f"op {op.op_type} '{op.name}' output") if _dtype_name(var) in _STORAGE \
            else np.asarray(value)  # a uint1 mask, read by a following constexpr op
        if tuple(value.shape) != _static_shape(var, f"op {op.op_type} '{op.name}' output"):
            raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' decompresses a {value.shape} tensor, the "
                               f"program declares {tuple(var.shape)}")
        out.append(value[None])
    return out


def _only_inputs(op, known):
    unknown = sorted(set(op.inputs) - set(known))
    if unknown:
        raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' sets input(s) {', '.join(unknown)}, which "
                           "this checker does not implement")


def _evaluate(function, constants, feeds, wanted, kernels=None):
    """Every op of the function on one chunk of the batch: {id(var): value}, holding the `wanted` vars.

    kernels: the conv ops' TensorFlow weights, kept from batch to batch (see `Package`); default a new dict.
    """
    kernels = {} if kernels is None else kernels
    values = dict(constants)
    values.update(feeds)
    operations = list(function.operations)
    last_use = {}
    for i, op in enumerate(operations):
        for var in _input_vars(op):
            last_use[id(var)] = i
    keep = {id(var) for var in wanted}
    private = set()  # ids of op outputs whose memory no other value (nor a constant, nor the caller) shares
    for i, op in enumerate(operations):
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            continue
        if op.blocks:
            raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' has nested blocks (control flow is "
                               "not implemented)")
        kind = _OPS.get(op.op_type)
        if kind is None:
            raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' is not implemented")
        _only_inputs(op, kind.data | kind.attributes)
        inputs = list(_input_vars(op))
        dying = {id(var) for var in inputs if id(var) in private and last_use.get(id(var)) == i
                 and id(var) not in keep and sum(v is var for v in inputs) == 1}
        args = _Args(op, values, dying, kernels)
        try:
            results = kind.compute(args)
        except (ValueError, IndexError) as error:  # shapes NumPy cannot combine: the program and our rules disagree
            raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}': {error}") from error
        results = results if isinstance(results, list) else [results]
        if len(results) != len(op.outputs):
            raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' has {len(op.outputs)} outputs, the "
                               f"checker computes {len(results)}")
        for var, value in zip(op.outputs, results):
            if kind.raw_outputs:
                values[id(var)] = value
                continue
            shared = [id(v) for v in inputs if isinstance(values.get(id(v)), np.ndarray)
                      and np.may_share_memory(value, values[id(v)])]
            values[id(var)] = _checked(op, var, value, writable=all(s in dying for s in shared), rounded=args.rounded)
            _track(private, id(var), (values[id(var)] is not value or all(s in dying for s in shared))
                   and values[id(var)].flags.writeable, shared)  # a conv's output is TensorFlow's, read-only
        for var in inputs:
            if last_use.get(id(var)) == i and id(var) not in keep:
                values.pop(id(var), None)  # a few activations in memory, not the whole network's
                private.discard(id(var))
    missing = [var.name for var in wanted if values.get(id(var)) is None]
    if missing:
        raise CannotVerify(f"cannot verify: the checker holds no numeric value for {missing}")
    return values


def _track(private, key, alone, shared):
    """Keep `private` the set of values whose memory nothing else shares, now that value `key` is computed.

    alone: the value is a new writable array, or was written over inputs that die at its op. Otherwise it is a
    view of an input (reshape, transpose, squeeze), and neither it nor the inputs it shares memory with may be
    overwritten, or a read-only array (a conv's output, in TensorFlow's memory).
    """
    if alone:
        private.add(key)
    else:
        private.discard(key)
        private.difference_update(shared)


def _input_vars(op):
    for value in op.inputs.values():
        yield from (value if isinstance(value, (list, tuple)) else [value])


def _checked(op, var, value, writable=False, rounded=False):
    """An op's output value as its declared dtype (fp16: rounded), if its shape is the program's declared one.

    writable: the value's memory is the op's own (a new array, or inputs that die at the op), so an fp16 value
    is rounded in place; otherwise (or when the array is read-only) a rounded copy is returned. An op of
    `_EXACT_IN_FP16` on fp16 operands needs no rounding: its values are some of its operands' (or an fp16
    constant), already float16 values. rounded: the op rounded its fp16 output itself (conv, in TensorFlow).
    """
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    dtype = _dtype_name(var)
    if dtype == "fp16" and isinstance(value, np.ndarray) and value.dtype == np.float32:
        if not rounded and not _exact_in_fp16(op):
            value = _round_to_fp16(value if writable and value.flags.writeable else value.copy(order="K"))
    else:
        value = _typed(value, var, f"op {op.op_type} '{op.name}' output")
    declared = tuple(var.shape)
    if value.ndim - 1 != len(declared) or any(not is_symbolic(d) and int(d) != n
                                              for d, n in zip(declared, value.shape[1:])):
        raise CannotVerify(f"cannot verify: op {op.op_type} '{op.name}' computes shape {value.shape[1:]}, the "
                           f"program declares {declared}")
    return value


_EXACT_IN_FP16 = frozenset("relu relu6 maximum minimum clip transpose reshape squeeze expand_dims concat pad "
                           "max_pool reduce_max reduce_min".split())


def _exact_in_fp16(op):
    """Whether the op only selects or moves values, and every float input (data and attributes) is fp16."""
    from coremltools.converters.mil.mil import types

    if op.op_type not in _EXACT_IN_FP16:
        return False
    for var in _input_vars(op):
        if not types.is_tensor(var.sym_type) and not types.is_scalar(var.sym_type):
            continue
        if types.is_float(var.dtype) and _dtype_name(var) != "fp16":
            return False
    return True


def _round_to_fp16(x):
    """x (float32) rounded in place to the nearest float16 value, ties to even, held as float32; returns x.

    Exactly x.astype(float16).astype(float32) (signs of zero, subnormals, infinities and NaN included), in
    about a sixth of its time: adding s = 1.5 * 2 ** (e + 13), where 2 ** e is x's power of two clamped to
    [2 ** -14, 2 ** 15] (float16's smallest normal and largest power), leaves the sum's last bit worth float16's
    spacing at x, so float32's own round-to-nearest-even rounds x there; subtracting s again is exact. Sums
    beyond float16's largest value (65504) become infinities, as float16 overflows. Blocks of 2 ** 15 values
    keep the steps in the cache.
    """
    flat = _flat(x)
    if flat is None:  # not laid out densely in any axis order: round a copy
        np.copyto(x, _round_to_fp16(np.ascontiguousarray(x)))
        return x
    bits = flat.view(np.uint32)
    size = min(_BLOCK, flat.size)
    shift, sign = np.empty(size, np.uint32), np.empty(size, np.uint32)
    for start in range(0, flat.size, _BLOCK):
        values, raw = flat[start:start + _BLOCK], bits[start:start + _BLOCK]
        s, g = shift[:len(values)], sign[:len(values)]
        np.bitwise_and(raw, 0x80000000, out=g)
        np.bitwise_and(raw, 0x7F800000, out=s)  # the power of two, 2 ** e
        np.clip(s, 0x38800000, 0x47000000, out=s)  # 2 ** -14 to 2 ** 15
        large = s.max() == 0x47000000  # some |x| >= 2 ** 15 (or inf, NaN): may overflow
        np.add(s, (13 << 23) | 0x00400000, out=s)  # times 2 ** 13, mantissa 1.5
        np.add(values, s.view(np.float32), out=values)
        np.subtract(values, s.view(np.float32), out=values)
        np.bitwise_or(raw, g, out=raw)  # x - s + s is +0 for a negative x rounding to zero; float16 keeps -0
        if large:
            values[np.abs(values) > 65504] *= np.inf
    return x


_BLOCK = 1 << 15


def _flat(x):
    """A 1-D view of x's memory in memory order, if x fills its memory densely in some order of its axes."""
    order = sorted(range(x.ndim), key=lambda axis: -abs(x.strides[axis]))
    dense = x.transpose(order)
    return dense.reshape(-1) if dense.flags.c_contiguous else None


class _Args:
    """An op's inputs: data tensors (batched values) and attributes (constants, read from the program).

    kernels: the conv ops' TensorFlow weights (see `Package`). rounded: set by an op that rounds its own fp16
    output to float16, so that `_checked` does not round it again.
    """

    def __init__(self, op, values, dying=frozenset(), kernels=None):
        self.op, self.values, self.dying = op, values, dying
        self.kernels = {} if kernels is None else kernels
        self.rounded = False

    def spare(self, name, shape):
        """Data input `name`'s array for a ufunc's out=, if it dies at this op, nothing else shares its memory and
        it has this shape; else None (a new array)."""
        var = self.op.inputs.get(name)
        value = self.values.get(id(var)) if var is not None and not isinstance(var, (list, tuple)) else None
        if id(var) in self.dying and value is not None and value.shape == tuple(shape) and value.dtype == np.float32:
            return value
        return None

    def where(self):
        return f"op {self.op.op_type} '{self.op.name}'"

    def data(self, name, default=None, floats_only=True):
        """A data input's batched value (`default` when the input is absent); fp16 or fp32 unless not floats_only."""
        var = self.op.inputs.get(name)
        if var is None:
            return default
        if isinstance(var, (list, tuple)):
            return [self._value(v, name, floats_only) for v in var]
        return self._value(var, name, floats_only)

    def _value(self, var, name, floats_only):
        value = self.values.get(id(var))
        if value is None:
            raise CannotVerify(f"cannot verify: {self.where()} reads '{var.name}' ({name}), which the checker "
                               "holds no numeric value for")
        if floats_only and _dtype_name(var) not in ("fp16", "fp32"):
            raise CannotVerify(f"cannot verify: {self.where()} input '{name}' is {_dtype_name(var)}; the checker "
                               "implements this op on fp16 and fp32 tensors")
        return value

    def attr(self, name, default=None):
        """A constant input's value (numpy or Python), or `default` when the input is absent."""
        var = self.op.inputs.get(name)
        if var is None:
            return default
        if var.op is None or var.op.op_type != "const":
            raise CannotVerify(f"cannot verify: {self.where()} input '{name}' is computed at run time, the checker "
                               "implements it as a constant")
        value = var.val
        return getattr(value, "ls", value)

    def weight(self, name, default=None):
        """A data input that must not depend on the batch (a weight): its value without the batch axis."""
        value = self.data(name)
        if value is None:
            return default
        if len(value) != 1:
            raise CannotVerify(f"cannot verify: {self.where()} input '{name}' is computed from the inputs (dynamic "
                               "weights are not implemented)")
        return value[0]

    def fail(self, what):
        raise CannotVerify(f"cannot verify: {self.where()} {what}")


def _aligned(*arrays):
    """Batched arrays with their MIL ranks made equal by 1s on the left (after the batch axis), to broadcast."""
    rank = max(a.ndim for a in arrays)
    return [a.reshape(len(a), *(1,) * (rank - a.ndim), *a.shape[1:]) for a in arrays]


def _axis(a, axis, rank, name="axis"):
    """The NumPy axis of MIL axis `axis` of a rank `rank` tensor."""
    axis = int(axis)
    if not -rank <= axis < rank:
        a.fail(f"has {name} {axis} for a rank {rank} tensor")
    return axis % rank + 1


# -- ops: each takes _Args and returns an array or a list of arrays -------------------------------------------

def _binary(function):
    def compute(a):
        x, y = _aligned(a.data("x"), a.data("y"))
        shape = np.broadcast_shapes(x.shape, y.shape)
        out = a.spare("x", shape)
        return function(x, y, out=out if out is not None else a.spare("y", shape))
    return compute


def _unary(function):
    def compute(a):
        return function(a.data("x"))
    return compute


def _in_place(function):
    """An element-wise op function(x, out) that may write over x when x dies at the op."""
    def compute(a):
        x = a.data("x")
        return function(x, a.spare("x", x.shape))
    return compute


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _clip(a):
    x = a.data("x")
    return np.clip(x, np.float32(a.attr("alpha")), np.float32(a.attr("beta")), out=a.spare("x", x.shape))


def _leaky_relu(a):
    x = a.data("x")
    return np.where(x >= 0, x, np.float32(a.attr("alpha")) * x)


def _cast(a):
    dtype, source = str(a.attr("dtype")), _dtype_name(a.op.inputs["x"])
    if dtype not in ("fp16", "fp32") or source not in ("fp16", "fp32", "int32", "bool"):
        a.fail(f"casts {source} to {dtype}; the checker implements casts to fp16 and fp32 (from fp16, fp32, int32, "
               "bool)")
    return a.data("x", floats_only=False).astype(np.float32)  # rounded to fp16 by the output's dtype


def _transpose(a):
    x, perm = a.data("x"), [int(p) for p in a.attr("perm")]
    rank = x.ndim - 1
    axes = [_axis(a, p, rank, "perm entry") for p in perm]
    if sorted(axes) != list(range(1, rank + 1)):
        a.fail(f"has perm {perm} for a rank {rank} tensor")
    return x.transpose(0, *axes)


def _reshape(a):
    x = a.data("x")
    shape = _static_shape(a.op.outputs[0], f"{a.where()} output")
    if a.op.inputs["shape"].op is not None and a.op.inputs["shape"].op.op_type == "const":
        target = [int(d) for d in a.attr("shape")]
        if len(target) != len(shape) or any(t > 0 and t != s for t, s in zip(target, shape)):
            a.fail(f"has shape {target}, the program declares its output {shape}")
    if int(np.prod(shape)) != int(np.prod(x.shape[1:])):
        a.fail(f"reshapes {x.shape[1:]} to {shape}")
    return x.reshape(len(x), *shape)  # row-major order, as MIL defines it; -1 and 0 resolved by the declared shape


def _squeeze(a):
    x, rank = a.data("x"), a.data("x").ndim - 1
    axes = a.attr("axes")
    if axes is None:
        positions = [i for i in range(1, rank + 1) if x.shape[i] == 1]
    else:
        positions = sorted({_axis(a, axis, rank, "axes entry") for axis in np.ravel(axes)})
        if any(x.shape[p] != 1 for p in positions):
            a.fail(f"squeezes axes {list(np.ravel(axes))} of shape {x.shape[1:]}")
    return np.squeeze(x, axis=tuple(positions))


def _expand_dims(a):
    x = a.data("x")
    axes = [int(v) for v in np.ravel(a.attr("axes"))]
    rank = x.ndim - 1 + len(axes)  # the axes index the output
    positions = sorted(_axis(a, axis, rank, "axes entry") for axis in axes)
    if not positions or len(set(positions)) != len(positions):
        a.fail(f"has axes {axes}")
    shape = list(x.shape)
    for position in positions:
        shape.insert(position, 1)
    return x.reshape(shape)


def _pad(a):
    x = a.data("x")
    amounts = [int(v) for v in np.ravel(a.attr("pad"))]
    mode = str(a.attr("mode", "constant"))
    rank = x.ndim - 1
    if len(amounts) % 2 or len(amounts) // 2 > rank or min(amounts, default=0) < 0:
        a.fail(f"has pad {amounts} for a rank {rank} tensor")
    pairs = [(amounts[2 * i], amounts[2 * i + 1]) for i in range(len(amounts) // 2)]
    pads = [(0, 0)] * (x.ndim - len(pairs)) + pairs
    sizes = x.shape[x.ndim - len(pairs):]
    if mode == "constant":
        return padded(x, pads, np.float32(a.attr("constant_val", 0.0)))
    limit = {"reflect": 1, "replicate": 0}.get(mode)
    if limit is None:
        a.fail(f"has pad mode '{mode}'")
    if any(max(p) > n - limit for p, n in zip(pairs, sizes)):
        a.fail(f"{mode}-pads {pairs} of dimensions {tuple(sizes)} (at most {'size - 1' if limit else 'size'} each)")
    return np.pad(x, pads, mode={"reflect": "reflect", "replicate": "edge"}[mode])


def _window_pads(a, pad_type, sizes, kernel, strides, dilations):
    """[(before, after)] per spatial dimension for pad_type valid, custom, same (extra after) or same_lower."""
    pad_type = str(pad_type).lower()
    n = len(sizes)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        amounts = [int(v) for v in np.ravel(a.attr("pad", [0] * 2 * n))]
        if len(amounts) != 2 * n or min(amounts) < 0:
            a.fail(f"has custom pad {amounts} for {n} spatial dimensions")
        return [(amounts[2 * i], amounts[2 * i + 1]) for i in range(n)]
    if pad_type not in ("same", "same_lower"):
        a.fail(f"has pad_type '{pad_type}'")
    pads = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        # aggregated_pad in ops/defs/_utils.py; the odd one goes after ('same') or before ('same_lower')
        total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        pads.append((small, total - small) if pad_type == "same" else (total - small, small))
    return pads


def _spatial(a, name, values, n, default):
    values = [int(v) for v in np.ravel(values)] if values is not None else [default] * n
    if len(values) != n or min(values) < 1:
        a.fail(f"has {name} {values} for {n} spatial dimensions")
    return values


def _as_2d(a, x, what):
    """x (N, n, C, *D) with one or two spatial dimensions as (B, C, H, W), and the function undoing it."""
    spatial = x.ndim - 3  # the batch axis, MIL's n and C
    if spatial not in (1, 2):
        a.fail(f"has {spatial} spatial dimensions; the checker implements 1-D and 2-D {what}")
    lead = x.shape[:2]
    x4 = x.reshape(-1, *x.shape[2:]) if spatial == 2 else x.reshape(-1, x.shape[2], 1, x.shape[3])

    def back(y):
        return y.reshape(*lead, *y.shape[1:]) if spatial == 2 else y.reshape(*lead, y.shape[1], y.shape[3])
    return x4, spatial, back


def _window_2d(a, sizes, kernel, strides, dilations):
    """The (kernel, strides, dilations, pads) of the op's window, for the spatial `sizes`, made 2-D."""
    pads = _window_pads(a, a.attr("pad_type", "valid"), sizes, kernel, strides, dilations)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if any(n + p0 + p1 < s for n, (p0, p1), s in zip(sizes, pads, span)):
        a.fail(f"has a {span} window over a padded input of {[n + sum(p) for n, p in zip(sizes, pads)]}")
    if len(sizes) == 1:  # a 1-D window is a 2-D one of height 1
        return [1, *kernel], [1, *strides], [1, *dilations], [(0, 0), *pads]
    return list(kernel), list(strides), list(dilations), pads


def _conv(a):
    x, weight = a.data("x"), a.weight("weight")
    x4, spatial, back = _as_2d(a, x, "convolutions")
    if weight.ndim != spatial + 2:
        a.fail(f"has a weight of shape {weight.shape} for {spatial} spatial dimensions")
    groups = int(a.attr("groups", 1))
    c, c_out, per_group = x.shape[2], weight.shape[0], weight.shape[1]
    if groups < 1 or c != per_group * groups or c_out % groups:
        a.fail(f"gets {c} input channels for a weight of shape {weight.shape} and groups {groups}")
    kernel, strides, dilations, pads = _window_2d(
        a, x.shape[3:], weight.shape[2:], _spatial(a, "strides", a.attr("strides"), spatial, 1),
        _spatial(a, "dilations", a.attr("dilations"), spatial, 1))
    bias = a.weight("bias")
    if bias is not None and bias.shape != (c_out,):
        a.fail(f"has a bias of shape {bias.shape} for {c_out} output channels")
    if any(p for pair in pads for p in pair):
        x4 = padded(x4, pads)
    sources = a.data("weight"), a.data("bias")  # the constants' own arrays (a.weight gives new views of them)
    cached = a.kernels.get(id(a.op))
    if cached is None or cached[0] is not sources[0] or cached[1] is not sources[1]:  # once, for every batch and run
        cached = (*sources, conv_kernels(weight.reshape(c_out, per_group, *kernel), groups, bias))
        a.kernels[id(a.op)] = cached
    a.rounded = _dtype_name(a.op.outputs[0]) == "fp16"  # rounded by conv2d, after the bias, as _checked would
    return back(conv2d(x4, cached[2], strides, dilations, fp16=a.rounded))


def _pool(kind):
    def compute(a):
        x = a.data("x")
        x4, spatial, back = _as_2d(a, x, "pooling")
        if a.attr("ceil_mode", False):
            a.fail("sets ceil_mode, which the checker does not implement")
        kernel, strides, _, pads = _window_2d(
            a, x.shape[3:], _spatial(a, "kernel_sizes", a.attr("kernel_sizes"), spatial, 1),
            _spatial(a, "strides", a.attr("strides"), spatial, 1), [1] * spatial)
        widths = ((0, 0), (0, 0), *pads)
        if kind == "max":
            return back(_windows(np.pad(x4, widths, constant_values=-np.inf), kernel, strides, (1, 1))
                        .max(axis=(-2, -1)))
        sums = _windows(np.pad(x4, widths), kernel, strides, (1, 1)).sum(axis=(-2, -1))
        if a.attr("exclude_padding_from_average", False):
            counts = _windows(np.pad(np.ones(x4.shape[2:], np.float32), pads), kernel, strides, (1, 1))
            return back(sums / counts.sum(axis=(-2, -1)))
        return back(sums / np.float32(kernel[0] * kernel[1]))
    return compute


def _windows(x, span, strides, dilations):
    """Sliding windows over the last two axes: (..., H_out, W_out, kH, kW)."""
    view = np.lib.stride_tricks.sliding_window_view(x, span, axis=(-2, -1))
    return view[..., ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]


def _reduce(function):
    def compute(a):
        x = a.data("x")
        rank = x.ndim - 1
        axes = a.attr("axes")
        positions = range(1, rank + 1) if axes is None else \
            sorted({_axis(a, axis, rank, "axes entry") for axis in np.ravel(axes)})
        return function(x, axis=tuple(positions), keepdims=bool(a.attr("keep_dims", False)))
    return compute


def _softmax(a):
    x = a.data("x")
    axis = _axis(a, a.attr("axis", -1), x.ndim - 1)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _linear(a):
    x, weight, bias = a.data("x"), a.weight("weight"), a.weight("bias")
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1] or not 1 <= x.ndim - 1 <= 3:
        a.fail(f"multiplies an input of shape {x.shape[1:]} by a weight of shape {weight.shape}")
    y = np.matmul(x[:, None], weight.T)[:, 0] if x.ndim == 2 else np.matmul(x, weight.T)  # per image, as conv
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            a.fail(f"has a bias of shape {bias.shape} for a weight of shape {weight.shape}")
        y = y + bias
    return y


def _matmul(a):
    x, y = a.data("x"), a.data("y")
    tx, ty = bool(a.attr("transpose_x", False)), bool(a.attr("transpose_y", False))
    x_rank, y_rank = x.ndim - 1, y.ndim - 1
    if (tx and x_rank == 1) or (ty and y_rank == 1):
        a.fail("transposes a rank-1 operand, which the op definition does not allow")
    xm = x[:, None, :] if x_rank == 1 else (np.swapaxes(x, -1, -2) if tx else x)  # (D) -> (1, D)
    ym = y[:, :, None] if y_rank == 1 else (np.swapaxes(y, -1, -2) if ty else y)  # (D) -> (D, 1)
    if xm.shape[-1] != ym.shape[-2]:
        a.fail(f"multiplies {xm.shape[-2:]} by {ym.shape[-2:]} matrices")
    out = np.matmul(*_aligned(xm, ym))
    if y_rank == 1:
        out = out[..., 0]
    if x_rank == 1:
        out = out[..., 0, :] if y_rank > 1 else out[..., 0]
    return out


def _concat(a):
    values = a.data("values")
    if not values:
        a.fail("concatenates no tensors")
    if len({v.ndim for v in values}) > 1:
        a.fail(f"concatenates tensors of different ranks {[v.shape[1:] for v in values]}")
    batch = max(len(v) for v in values)
    values = [np.broadcast_to(v, (batch, *v.shape[1:])) for v in values]  # constants have a batch axis of 1
    axis = _axis(a, a.attr("axis"), values[0].ndim - 1)
    if not a.attr("interleave", False):
        return np.concatenate(values, axis=axis)
    if any(v.shape != values[0].shape for v in values):
        a.fail(f"interleaves tensors of different shapes {[v.shape[1:] for v in values]}")
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return np.stack(values, axis=axis + 1).reshape(shape)  # output[i::n] along the axis is input i


def _batch_norm(a):
    x = a.data("x")
    if not 3 <= x.ndim - 1 <= 5:
        a.fail(f"normalizes a tensor of shape {x.shape[1:]} (rank 3 to 5)")
    c = x.shape[2]
    mean, variance = a.weight("mean"), a.weight("variance")
    gamma, beta = a.weight("gamma", np.ones(c, np.float32)), a.weight("beta", np.zeros(c, np.float32))
    if any(v.shape != (c,) for v in (mean, variance, gamma, beta)):
        a.fail(f"has statistics that are not one per channel of shape {x.shape[1:]}")
    shape = (c,) + (1,) * (x.ndim - 3)
    scale = gamma / np.sqrt(variance + np.float32(a.attr("epsilon", 1e-5)))
    return (x - mean.reshape(shape)) * scale.reshape(shape) + beta.reshape(shape)


def _classify_op(a):
    probabilities = a.data("probabilities")
    labels = _classify_labels(a)
    flat = probabilities.reshape(len(probabilities), -1)
    if flat.shape[1] != len(labels):
        a.fail(f"has {len(labels)} classes for {flat.shape[1]} probabilities")
    best = np.array([labels[i] for i in flat.argmax(axis=1)], dtype=object)
    return [best, flat.astype(np.float32)]


def _classify_labels(a):
    classes = a.attr("classes")
    return [c.item() if isinstance(c, np.generic) else c for c in classes]


class _Kind(NamedTuple):
    compute: Callable
    data: frozenset  # inputs read as tensors
    attributes: frozenset  # inputs read as constants; any other input an op sets raises CannotVerify
    raw_outputs: bool = False  # outputs not tensors (classify's label and dictionary)


def _kind(compute, data="x", attributes="", raw_outputs=False):
    return _Kind(compute, frozenset(data.split()), frozenset(attributes.split()), raw_outputs)


_WINDOW = "strides pad_type pad"
_OPS = {
    "add": _kind(_binary(np.add), "x y"),
    "sub": _kind(_binary(np.subtract), "x y"),
    "mul": _kind(_binary(np.multiply), "x y"),
    "real_div": _kind(_binary(np.divide), "x y"),
    "maximum": _kind(_binary(np.maximum), "x y"),
    "minimum": _kind(_binary(np.minimum), "x y"),
    "relu": _kind(_in_place(lambda x, out: np.maximum(x, 0, out=out))),
    "relu6": _kind(_in_place(lambda x, out: np.clip(x, 0, 6, out=out))),  # min(max(x, 0), 6)
    "sigmoid": _kind(_unary(_sigmoid)),
    "tanh": _kind(_unary(np.tanh)),
    "silu": _kind(_unary(lambda x: x * _sigmoid(x))),
    "clip": _kind(_clip, attributes="alpha beta"),
    "leaky_relu": _kind(_leaky_relu, attributes="alpha"),
    "cast": _kind(_cast, attributes="dtype"),
    "transpose": _kind(_transpose, attributes="perm"),
    "reshape": _kind(_reshape, attributes="shape"),
    "squeeze": _kind(_squeeze, attributes="axes"),
    "expand_dims": _kind(_expand_dims, attributes="axes"),
    "pad": _kind(_pad, attributes="pad mode constant_val"),
    "conv": _kind(_conv, "x weight bias", f"{_WINDOW} dilations groups"),
    "max_pool": _kind(_pool("max"), attributes=f"kernel_sizes {_WINDOW} ceil_mode"),
    "avg_pool": _kind(_pool("avg"), attributes=f"kernel_sizes {_WINDOW} ceil_mode exclude_padding_from_average"),
    "reduce_mean": _kind(_reduce(np.mean), attributes="axes keep_dims"),
    "reduce_sum": _kind(_reduce(np.sum), attributes="axes keep_dims"),
    "reduce_max": _kind(_reduce(np.max), attributes="axes keep_dims"),
    "reduce_min": _kind(_reduce(np.min), attributes="axes keep_dims"),
    "softmax": _kind(_softmax, attributes="axis"),
    "linear": _kind(_linear, "x weight bias"),
    "matmul": _kind(_matmul, "x y", "transpose_x transpose_y"),
    "concat": _kind(_concat, "values", "axis interleave"),
    "batch_norm": _kind(_batch_norm, "x mean variance gamma beta", "epsilon"),
    "classify": _kind(_classify_op, "probabilities", "classes", raw_outputs=True),
}

SUPPORTED_OPS = tuple(sorted(["const", *_OPS]))
"""The op types computed here, besides the constexpr_* weight ops that have a `decompress` method."""
