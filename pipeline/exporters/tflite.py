"""TFLite export: raw RGB pixels in (normalisation inside the model), class probabilities out."""
from __future__ import annotations

import numpy as np

from pipeline import fileio
from pipeline.exporters import compare, with_preprocessing


def export(model, meta, path):
    """Write `model` with its preprocessing as a float32 TFLite flatbuffer at `path`."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(with_preprocessing(model, meta))
    data = converter.convert()
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(data)


def predict(path, pixels):
    """Class probabilities from the ai-edge-litert Interpreter for raw RGB pixels, one image at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    results = []
    for image in pixels:
        interpreter.set_tensor(inp, image[None].astype(np.float32))
        interpreter.invoke()
        results.append(interpreter.get_tensor(out)[0].copy())
    return np.stack(results)


def check(path, meta, pixels, expected):
    """Agreement of the TFLite interpreter's predictions with Keras's on the same images."""
    return compare(predict(path, pixels), expected)
