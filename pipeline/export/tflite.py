"""TFLite export: raw RGB pixels in (normalisation inside the model), class probabilities out.

The labels ship as labels.txt beside the model: the TFLite metadata writer (tflite-support) needs
protobuf < 4, which TensorFlow 2.21, coremltools 9 and onnx cannot run with.
"""
from __future__ import annotations

import numpy as np

from pipeline import fileio
from pipeline.checkers.kernels import DamagedFile
from pipeline.checkers.predictor import Predictor
from pipeline.export.meta import with_preprocessing


def export(model, meta, path, precision="fp32", calibration=None):
    """Write `model` with its preprocessing as a TFLite flatbuffer.

    precision: fp32; fp16 weights; int8 (dynamic range: int8 weights, float activations); or int8-full (int8
        weights and activations, TFLITE_BUILTINS_INT8 ops only, float32 input and output tensors kept).
    calibration: for int8-full, raw RGB training images (N, size, size, 3, 0-255) whose activations set the
        int8 ranges; ignored otherwise.
    """
    import tensorflow as tf

    from pipeline.errors import ExportError

    raw = with_preprocessing(model, meta)
    size = meta.image_size
    function = tf.function(lambda pixels: raw(pixels, training=False)).get_concrete_function(
        tf.TensorSpec([1, size, size, 3], tf.float32, name="image"))
    # From the traced function alone, not from_keras_model (or with the model as trackable_obj): those save and
    # reload the model as a SavedModel first, 16 of the 17 s a conversion of EfficientNet-Lite0 took, where
    # this takes 1.2 s. absl warns that this path (a frozen graph) is deprecated; the files compute the same
    # numbers, bit for bit (fp32 and fp16, 8 images), and are named `image` -> `Identity`.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    if precision != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # alone: int8 weights, float activations
    if precision == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if precision == "int8-full":
        if calibration is None or len(calibration) == 0:
            raise ExportError("a full-integer TFLite export needs calibration images (export.calibration_images)")
        images = np.asarray(calibration, dtype=np.float32)
        converter.representative_dataset = lambda: ([image[None]] for image in images)
        # inference_input_type / output_type stay float32: the model quantizes its input and dequantizes
        # its probabilities itself, so callers feed raw pixels as with every other format
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    data = converter.convert()
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _interpreter(path):
    """A LiteRT interpreter of the file, its tensors allocated; a file it cannot read is a DamagedFile."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline import quiet

    with quiet.native_stderr():  # "Created TensorFlow Lite XNNPACK delegate for CPU", printed from C
        try:
            interpreter = Interpreter(model_path=str(path))
        except ValueError as error:  # "Could not open ...", "The model is not a valid Flatbuffer buffer"
            raise DamagedFile.reading(path, "TFLite model", error) from error
        interpreter.allocate_tensors()
    return interpreter


def problems(path, meta):
    """What is wrong with the file's input and output tensors (empty when they are right), or that it cannot be
    read."""
    try:
        interpreter = _interpreter(path)
    except DamagedFile as error:
        return [error.problem]  # the loader's DamagedFile names the file, the reason and the fix
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    found = []
    if list(inp["shape"]) != [1, meta.image_size, meta.image_size, 3] or inp["dtype"] != np.float32:
        found.append(f"input should be float32 [1, {meta.image_size}, {meta.image_size}, 3], "
                     f"got {inp['dtype'].__name__} {list(inp['shape'])}")
    if list(out["shape"]) != [1, len(meta.labels)] or out["dtype"] != np.float32:
        found.append(f"output should be float32 [1, {len(meta.labels)}], "
                     f"got {out['dtype'].__name__} {list(out['shape'])}")
    return found


def load(path, labels):
    """An ai-edge-litert predictor, one image at a time, with the labels shipped beside the file."""
    interpreter = _interpreter(path)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]["index"]

    def predict(pixels):
        results = []
        for image in pixels:
            interpreter.set_tensor(inp["index"], image[None].astype(np.float32))
            interpreter.invoke()
            results.append(interpreter.get_tensor(out)[0].copy())
        return np.stack(results)

    return Predictor(labels=list(labels), image_size=int(inp["shape"][1]), predict=predict)
