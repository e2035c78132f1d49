"""The one table of export formats, and what every exporter is given.

Each format's module has `export(model, meta, path)` and `check(path, meta, pixels, expected)`. Core ML
takes the trained model with the preprocessing in its image input; ONNX and TFLite take the same model
behind a Rescaling layer, so every format is fed raw RGB pixels (0-255) and none needs our Python code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Format:
    """One export format: its config name, file suffix, module, and how it is checked on Linux."""

    name: str
    title: str
    suffix: str
    module: str
    checked_by: str

    def exporter(self):
        """The module that exports and checks this format."""
        return importlib.import_module(self.module)


FORMATS = {f.name: f for f in (
    Format("coreml", "Core ML", ".mlmodel", "pipeline.exporters.coreml", "spec fields (Core ML runs only on Apple OSes)"),
    Format("onnx", "ONNX", ".onnx", "pipeline.exporters.onnx", "onnxruntime"),
    Format("tflite", "TFLite", ".tflite", "pipeline.exporters.tflite", "ai-edge-litert Interpreter"),
)}


@dataclass(frozen=True)
class ExportMeta:
    """What every exported file carries: labels, input size and preprocessing, and descriptive metadata."""

    labels: list
    image_size: int
    scale: float
    bias: float
    author: str
    license: str
    description: str
    version: str
    user: dict = field(default_factory=dict)

    def preprocessing(self):
        """The input contract as strings, for formats with free-form metadata."""
        return {"input_layout": "NHWC", "input_color_order": "RGB", "input_range": "0-255",
                "input_size": f"{self.image_size}x{self.image_size}", "scale": repr(self.scale),
                "bias": repr(self.bias)}


def with_preprocessing(model, meta):
    """The model behind a Rescaling layer that maps raw 0-255 RGB pixels to the backbone's input range."""
    import tf_keras as keras

    inputs = keras.Input((meta.image_size, meta.image_size, 3), name="image")
    x = keras.layers.Rescaling(meta.scale, offset=meta.bias, name="preprocess")(inputs)
    return keras.Model(inputs, model(x), name="multisnacks_raw_pixels")


def compare(probabilities, expected):
    """Top-1 agreement and largest absolute probability difference between an export and Keras."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return {"images": int(len(expected)),
            "top1_agreement": float((probabilities.argmax(1) == expected.argmax(1)).mean()),
            "max_probability_difference": float(np.abs(probabilities - expected).max())}
