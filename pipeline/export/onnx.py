"""ONNX export through tf2onnx: raw RGB pixels in, class probabilities out, labels and preprocessing in metadata."""
from __future__ import annotations

import json

import numpy as np

from pipeline import fileio
from pipeline.checkers.kernels import DamagedFile
from pipeline.checkers.predictor import Predictor
from pipeline.export.meta import with_preprocessing

KIND = "ONNX model"
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


def export(model, meta, path, precision="fp32"):
    """Write `model` as ONNX at `path`; fp16 stores weights and activations as float16, float32 in and out."""
    proto = convert(model, meta)
    if precision == "fp16":
        from onnxconverter_common import float16

        proto = float16.convert_float_to_float16(proto, keep_io_types=True)
    with fileio.atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())


def read_proto(path):
    """The file's ModelProto, read with the onnx package; a file that cannot be read or parsed is a DamagedFile."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError) as error:
        raise DamagedFile.reading(path, KIND, error) from error


def metadata(path):
    """The file's metadata_props as a dict, read with the onnx package."""
    return {p.key: p.value for p in read_proto(path).metadata_props}


def problems(path, meta):
    """What is wrong with the file's input, output and metadata (empty when it is right), or that it cannot be
    read."""
    try:
        proto = read_proto(path)
    except DamagedFile as error:
        return [error.problem]  # the loader's DamagedFile names the file, the reason and the fix
    props = {p.key: p.value for p in proto.metadata_props}
    found = []
    if json.loads(props.get("labels", "[]")) != list(meta.labels):
        found.append(f"metadata labels {props.get('labels')} differ from classes.txt")
    for key, value in meta.preprocessing().items():
        if props.get(key) != value:
            found.append(f"metadata {key} should be {value}, got {props.get(key)}")
    if [o.name for o in proto.graph.output] != [OUTPUT_NAME]:
        found.append(f"output should be '{OUTPUT_NAME}', got {[o.name for o in proto.graph.output]}")
    return found


def load(path, labels=None):
    """An onnxruntime predictor with the labels from the file's metadata."""
    session = _session(path)
    inp = session.get_inputs()[0]

    def predict(pixels, batch_size=32):
        return np.concatenate([session.run([OUTPUT_NAME], {inp.name: pixels[i:i + batch_size].astype(np.float32)})[0]
                               for i in range(0, len(pixels), batch_size)])

    return Predictor(labels=json.loads(metadata(path)["labels"]), image_size=int(inp.shape[1]), predict=predict)


def _session(path):
    """An onnxruntime CPU session of the file; one onnxruntime cannot read or parse is a DamagedFile."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except (Fail, InvalidGraph, InvalidProtobuf, NoSuchFile) as error:
        raise DamagedFile.reading(path, KIND, error) from error
