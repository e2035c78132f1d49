"""What every exported file carries (labels, input size, preprocessing, descriptive metadata), and the model
behind the preprocessing layer that the ONNX and TFLite exports are made from."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipeline.backbones import BACKBONES, scale_bias


@dataclass(frozen=True)
class ExportMeta:
    """What every exported file carries: labels, input size and preprocessing, and descriptive metadata.

    scale, bias: the preprocessing `x * scale + bias` on 0-255 RGB pixels; bias is (red, green, blue).
    input_note: how an app should feed the image input (Vision's crop-and-scale option), for its description.
    output_note: what the class probabilities are and when to trust them (calibration, the "none of these"
        threshold), for the probability output's description.
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
    output_note: str = ""

    def preprocessing(self):
        """The input contract as strings, for formats with free-form metadata (bias: a JSON [red, green, blue])."""
        return {"input_layout": "NHWC", "input_color_order": "RGB", "input_range": "0-255",
                "input_size": f"{self.image_size}x{self.image_size}", "scale": repr(self.scale),
                "bias": json.dumps([float(b) for b in self.bias])}

    def preprocess(self, pixels):
        """Raw 0-255 RGB pixels (..., 3) as the network's input: `pixels * scale + bias`."""
        return scale_bias(pixels, self.scale, self.bias)


def model_meta(model_cfg, labels, **descriptive):
    """The ExportMeta of a model built from `model_cfg`: its labels, input size and backbone's preprocessing.

    descriptive: author, license, description, version and user metadata (empty unless given).
    """
    backbone = BACKBONES[model_cfg.backbone]
    fields = {"author": "", "license": "", "description": "", "version": "", **descriptive}
    return ExportMeta(labels=list(labels), image_size=model_cfg.image_size, scale=backbone.input_scale,
                      bias=tuple(backbone.input_bias), **fields)


def with_preprocessing(model, meta):
    """The model behind a Rescaling layer that maps raw 0-255 RGB pixels to the backbone's input range."""
    import tf_keras as keras

    inputs = keras.Input((meta.image_size, meta.image_size, 3), name="image")
    x = keras.layers.Rescaling(meta.scale, offset=list(meta.bias), name="preprocess")(inputs)
    return keras.Model(inputs, model(x), name="multisnacks_raw_pixels")
