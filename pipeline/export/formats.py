"""The one table of export formats: each format's config name, file suffix, exporter module and precision.

Each format's module has `export(model, meta, path, precision)`, `problems(path, meta)` (what is wrong with the
file's interface and metadata) and `load(path, labels)` (a `Predictor`, or None when nothing on Linux can run
it). A format whose `calibrated` is set also needs `export(..., calibration=pixels)`: raw RGB training images
(N, size, size, 3, 0-255) that set its activation ranges. Core ML takes the trained model with the
preprocessing in its image input; ONNX and TFLite take the same model behind a Rescaling layer, so every format
is fed raw RGB pixels (0-255) and none needs our Python code.

A leaf: it imports nothing from the pipeline (the exporter modules are imported by name, when asked for).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    """One exported file: its config name, file name suffix, module, weight precision, and what runs it here.

    precision: what its exporter stores and computes (one of PRECISIONS); any but fp32 is a reduced variant.
    runtime: what computes its outputs on Linux; empty when only its spec can be checked.
    timed: whether that runtime is the format's real one, so its batch-1 latency means something.
    native: whether the file is a Core ML model, which Core ML itself also runs where it exists (macOS;
        pipeline.export.coreml_runtime), as an extra row of the parity table.
    default: whether export.formats lists it unless a config says otherwise: the files an app ships, each of
        which passes its thresholds on the snacks test split. Left out, and exported only when named: the
        compressed ML Programs (they pass, but take longer to convert and check: ship -mixed when size matters),
        the variants that miss the top-1 agreement bar there, the fp32 ML Program (a check of the conversion; the
        fp16 one is the file to ship) and the fp16 .mlmodel (iOS 13-14 only: the fp16 ML Program is as small and
        is Core ML's current format). The measurements behind each choice: bench/RESULTS.md.
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


_COREML, _MLPROGRAM = "pipeline.export.coreml", "pipeline.export.mlprogram"
_ONNX, _TFLITE = "pipeline.export.onnx", "pipeline.export.tflite"
_CHECKER = "NumPy Core ML checker (pipeline.checkers.coreml_numpy)"
_ML_CHECKER = "NumPy ML Program checker (pipeline.checkers.mlprogram_numpy)"
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
