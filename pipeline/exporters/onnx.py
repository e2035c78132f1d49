"""ONNX export through tf2onnx: raw RGB pixels in, class probabilities out, labels and preprocessing in metadata."""
from __future__ import annotations

import json

import numpy as np

from pipeline import fileio
from pipeline.exporters import compare, with_preprocessing

OUTPUT_NAME = "labelProbability"
OPSET = 13


def convert(model, meta):
    """The ONNX ModelProto of the model with preprocessing, its output renamed and metadata set."""
    import tensorflow as tf
    import tf2onnx

    wrapped = with_preprocessing(model, meta)
    signature = [tf.TensorSpec((None, meta.image_size, meta.image_size, 3), tf.float32, name="image")]
    proto, _ = tf2onnx.convert.from_keras(wrapped, input_signature=signature, opset=OPSET)
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [OUTPUT_NAME if o == old else o for o in node.output]
        node.input[:] = [OUTPUT_NAME if i == old else i for i in node.input]
    proto.graph.output[0].name = OUTPUT_NAME
    props = {"labels": json.dumps(list(meta.labels), ensure_ascii=False), **meta.preprocessing(),
             "preprocessing": "applied inside the model: x * scale + bias", "author": meta.author,
             "license": meta.license, "description": meta.description, "version": meta.version,
             **{k: str(v) for k, v in meta.user.items()}}
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "multisnacks"
    proto.doc_string = meta.description
    return proto


def export(model, meta, path):
    """Write `model` as ONNX at `path`."""
    proto = convert(model, meta)
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())


def predict(path, pixels, batch_size=32):
    """Class probabilities from onnxruntime for raw RGB pixels (N, H, W, 3)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run([OUTPUT_NAME], {name: pixels[i:i + batch_size].astype(np.float32)})[0]
                           for i in range(0, len(pixels), batch_size)])


def check(path, meta, pixels, expected):
    """Agreement of onnxruntime's predictions with Keras's on the same images."""
    return compare(predict(path, pixels), expected)
