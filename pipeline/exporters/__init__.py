"""The one table of export formats, and what every exporter is given and gives back.

Each format's module has `export(model, meta, path, precision)`, `problems(path, meta)` (what is wrong with the
file's interface and metadata) and `load(path, labels)` (a `Predictor`, or None when nothing on Linux can run
it). A format whose `calibrated` is set also needs `export(..., calibration=pixels)`: raw RGB training images
(N, size, size, 3, 0-255) that set its activation ranges. Core ML takes the trained model with the
preprocessing in its image input; ONNX and TFLite take the same model behind a Rescaling layer, so every format
is fed raw RGB pixels (0-255) and none needs our Python code.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Format:
    """One exported file: its config name, file name suffix, module, weight precision, and what runs it here.

    precision: what its exporter stores and computes (one of PRECISIONS); any but fp32 is a reduced variant.
    runtime: what computes its outputs on Linux; empty when only its spec can be checked.
    timed: whether that runtime is the format's real one, so its batch-1 latency means something.
    native: whether the file is a Core ML model, which Core ML itself also runs where it exists (macOS;
        pipeline.exporters.coreml_runtime), as an extra row of the parity table.
    default: whether export.formats lists it unless a config says otherwise: the files an app ships, each of
        which passes its thresholds on snacks (all 952 test images, EfficientNet-Lite0 at 256 px). Left out,
        and exported only when named: the compressed ML Programs (they pass there, but each takes 40-60 s more
        to convert and check: ship -mixed when size matters), the variants that miss the 99% top-1 agreement bar
        (8-bit .mlmodel 96.3%, 6-bit palettes 97.8%, TFLite dynamic-range int8 98.5%, full-integer 98.1%); the
        fp32 ML Program (a check of the conversion: agrees on 952/952 to 7.1e-6, but the fp16 one is the file
        to ship); and the fp16 .mlmodel (iOS 13-14 only: the fp16 ML Program is as small and is Core ML's
        current format).
    calibrated: whether its exporter needs calibration images (`export(..., calibration=...)`).
    """

    name: str
    title: str
    suffix: str
    module: str
    precision: str
    runtime: str
    timed: bool
    default: bool = True
    calibrated: bool = False

    @property
    def native(self):
        """Whether Core ML itself can run this file (on macOS)."""
        return self.module in (_COREML, _MLPROGRAM)

    @property
    def reduced(self):
        """Whether the weights are smaller than float32 (judged by the looser variant thresholds)."""
        return self.precision != "fp32"

    def exporter(self):
        """The module that exports, checks and loads this format."""
        return importlib.import_module(self.module)


_COREML, _MLPROGRAM = "pipeline.exporters.coreml", "pipeline.exporters.mlprogram"
_ONNX, _TFLITE = "pipeline.exporters.onnx", "pipeline.exporters.tflite"
_CHECKER = "NumPy Core ML checker (pipeline.coreml_numpy)"
_ML_CHECKER = "NumPy ML Program checker (pipeline.mlprogram_numpy)"
_LITERT = "ai-edge-litert Interpreter"

PRECISIONS = {
    "fp32": "float32 weights and computation",
    "fp16": "float16 weights (and, for an ML Program or ONNX, float16 computation)",
    "int8": "8-bit linear weights: per-channel for an ML Program, dynamic-range for TFLite",
    "int8-full": "int8 weights and activations, calibrated on training images; float32 input and output",
    "palette8": "weights palettized to a 256-entry k-means lookup table (8-bit indices)",
    "palette6": "weights palettized to a 64-entry k-means lookup table (6-bit indices)",
    "mixed": "per-channel int8 weights, the largest ones in 6-bit palettes instead, until the file is about a "
             "quarter of its fp32 size",
}

# Compressed ML Programs hold their weights in constexpr ops (iOS 16: Core ML spec 7, opset CoreML6); per-channel int8
# and per-tensor palettes need nothing newer (iOS 18 is only for per-block scales, grouped palettes, int4).
FORMATS = {f.name: f for f in (
    Format("coreml", "Core ML", ".mlmodel", _COREML, "fp32", _CHECKER, False),
    Format("coreml-fp16", "Core ML, fp16 weights", "-fp16.mlmodel", _COREML, "fp16", _CHECKER, False, default=False),
    Format("coreml-int8", "Core ML, 8-bit weights", "-int8.mlmodel", _COREML, "int8", _CHECKER, False, default=False),
    Format("coreml-mlprogram", "Core ML ML Program (iOS 15+), fp16", ".mlpackage", _MLPROGRAM, "fp16", _ML_CHECKER,
           False),
    Format("coreml-mlprogram-fp32", "Core ML ML Program (iOS 15+), fp32", "-fp32.mlpackage", _MLPROGRAM, "fp32",
           _ML_CHECKER, False, default=False),
    Format("coreml-mlprogram-int8", "Core ML ML Program (iOS 16+), per-channel int8 weights", "-int8.mlpackage",
           _MLPROGRAM, "int8", _ML_CHECKER, False, default=False, calibrated=True),
    Format("coreml-mlprogram-palette8", "Core ML ML Program (iOS 16+), 8-bit palettized weights",
           "-palette8.mlpackage", _MLPROGRAM, "palette8", _ML_CHECKER, False, default=False, calibrated=True),
    Format("coreml-mlprogram-palette6", "Core ML ML Program (iOS 16+), 6-bit palettized weights",
           "-palette6.mlpackage", _MLPROGRAM, "palette6", _ML_CHECKER, False, default=False, calibrated=True),
    Format("coreml-mlprogram-mixed", "Core ML ML Program (iOS 16+), int8 weights, the largest in 6-bit palettes",
           "-mixed.mlpackage", _MLPROGRAM, "mixed", _ML_CHECKER, False, default=False, calibrated=True),
    Format("onnx", "ONNX", ".onnx", _ONNX, "fp32", "onnxruntime", True),
    Format("onnx-fp16", "ONNX, fp16", "-fp16.onnx", _ONNX, "fp16", "onnxruntime", True),
    Format("tflite", "TFLite", ".tflite", _TFLITE, "fp32", _LITERT, True),
    Format("tflite-fp16", "TFLite, fp16 weights", "-fp16.tflite", _TFLITE, "fp16", _LITERT, True),
    Format("tflite-int8", "TFLite, dynamic-range int8", "-int8.tflite", _TFLITE, "int8", _LITERT, True, default=False),
    Format("tflite-int8-full", "TFLite, full-integer int8 (float32 in and out)", "-int8-full.tflite", _TFLITE,
           "int8-full", _LITERT, True, default=False, calibrated=True),
)}


@dataclass(frozen=True)
class ExportMeta:
    """What every exported file carries: labels, input size and preprocessing, and descriptive metadata.

    scale, bias: the preprocessing `x * scale + bias` on 0-255 RGB pixels; bias is (red, green, blue).
    input_note: how an app should feed the image input (Vision's crop-and-scale option), for its description.
    """

    labels: list
    image_size: int
    scale: float
    bias: tuple
    author: str
    license: str
    description: str
    version: str
    user: dict = field(default_factory=dict)
    input_note: str = ""

    def preprocessing(self):
        """The input contract as strings, for formats with free-form metadata (bias: a JSON [red, green, blue])."""
        return {"input_layout": "NHWC", "input_color_order": "RGB", "input_range": "0-255",
                "input_size": f"{self.image_size}x{self.image_size}", "scale": repr(self.scale),
                "bias": json.dumps([float(b) for b in self.bias])}

    def preprocess(self, pixels):
        """Raw 0-255 RGB pixels (..., 3) as the network's input: `pixels * scale + bias`."""
        from pipeline.backbones import scale_bias

        return scale_bias(pixels, self.scale, self.bias)


def model_meta(model_cfg, labels, **descriptive):
    """The ExportMeta of a model built from `model_cfg`: its labels, input size and backbone's preprocessing.

    descriptive: author, license, description, version and user metadata (empty unless given).
    """
    from pipeline.backbones import BACKBONES

    backbone = BACKBONES[model_cfg.backbone]
    fields = {"author": "", "license": "", "description": "", "version": "", **descriptive}
    return ExportMeta(labels=list(labels), image_size=model_cfg.image_size, scale=backbone.input_scale,
                      bias=tuple(backbone.input_bias), **fields)


@dataclass(frozen=True)
class Predictor:
    """A loaded exported model: raw RGB pixels (N, size, size, 3, 0-255) in, probabilities in `labels` order out.

    labels: the class labels as the file itself carries them (or as shipped beside it).
    """

    labels: list
    image_size: int
    predict: Callable


def with_preprocessing(model, meta):
    """The model behind a Rescaling layer that maps raw 0-255 RGB pixels to the backbone's input range."""
    import tf_keras as keras

    inputs = keras.Input((meta.image_size, meta.image_size, 3), name="image")
    x = keras.layers.Rescaling(meta.scale, offset=list(meta.bias), name="preprocess")(inputs)
    return keras.Model(inputs, model(x), name="multisnacks_raw_pixels")


def in_label_order(probabilities, labels, wanted):
    """Probability columns reordered from `labels` (the file's order) to `wanted`; a missing label is an error."""
    missing = [label for label in wanted if label not in labels]
    if missing or len(labels) != len(wanted):
        from pipeline.errors import ExportError

        raise ExportError(f"the model's labels {list(labels)} are not the classes {list(wanted)}")
    return np.asarray(probabilities)[:, [list(labels).index(label) for label in wanted]]


def compare(probabilities, expected):
    """Top-1 agreement and largest absolute probability difference between an export and Keras."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return {"images": int(len(expected)),
            "top1_agreement": float((probabilities.argmax(1) == expected.argmax(1)).mean()),
            "max_probability_difference": float(np.abs(probabilities - expected).max())}
