"""How an iOS app's Vision request feeds a photo to the model, compared with how training does.

Training squashes every photo to the square model input (`pipeline.data.images.load_array`: upright RGB,
bilinear resize to size x size, aspect ratio not kept). An app that classifies through Vision lets Vision
do the resizing, and Vision's default is *not* what training does:

* ``VNCoreMLRequest.imageCropAndScaleOption`` (iOS 11+) is a ``VNImageCropAndScaleOption``. Its default is
  ``.centerCrop`` (raw value 0, the first case of the enum; Apple's property page shows the options but does
  not spell the default out in words).
* ``CoreMLRequest.cropAndScaleAction`` (iOS 18+, the Swift-only Vision API) is an
  ``ImageCropAndScaleAction`` whose cases are ``.centerCrop``, ``.scaleToFit``, ``.scaleToFill`` (plus the
  ``...Plus90CcwRotation`` variants). Apple: "The default value is ImageCropAndScaleAction.scaleToFill".

What Apple's documentation says each option does (stored copies of developer.apple.com, read for this
module):

* centerCrop: "scales the image to fit its shorter side within the input dimensions, while preserving its
  aspect ratio, and center-crops the image" (``VNImageCropAndScaleOption.centerCrop``); the iOS 18 action:
  "scales the image and maintains the aspect ratio to fit on the short side and crop centered on the long
  side". The Vision header (VNTypes.h) says the same: "crop centered on the long side". So it is the centre.
  https://developer.apple.com/documentation/vision/vnimagecropandscaleoption/centercrop
  https://developer.apple.com/documentation/vision/imagecropandscaleaction/centercrop
* scaleFill / scaleToFill: "scales the image to fill the input dimensions, resizing it if necessary", i.e.
  stretch both sides, which is what our training does.
  https://developer.apple.com/documentation/vision/vnimagecropandscaleoption/scalefill
  https://developer.apple.com/documentation/vision/imagecropandscaleaction/scaletofill
* scaleFit / scaleToFit: "scales the image to fit its longer side within the input dimensions, while
  preserving its aspect ratio"; "This option fills the remaining space with transparent pixels to maintain
  aspect ratio." (Microsoft's binding of the same enum: "adding transparency in the other dimension".)
  https://developer.apple.com/documentation/vision/vnimagecropandscaleoption/scalefit
  https://developer.apple.com/documentation/vision/imagecropandscaleaction/scaletofit
  https://developer.apple.com/documentation/vision/coremlrequest/cropandscaleaction
  https://developer.apple.com/documentation/vision/vncoremlrequest/imagecropandscaleoption

The padding value. Apple says "transparent pixels", not "black". A transparent pixel is (0, 0, 0, 0); a
model whose input is an RGB image never sees the alpha channel, so it gets 0 in every channel: black. That
is what this module pads with (0.0). Not every public account agrees: a blog post (blog.csdn.net, 2019)
says scaleFit leaves white borders, and a 2019 comment by an experienced Core ML author
(github.com/hollance/YOLO-CoreML-MPSNNGraph issue 58) thought Vision pads only the bottom/right. Neither is
Apple's word; Apple's figure on the pages above shows the scaled image centred between bands. We pad
evenly on both sides with zeros; if that ever matters, measure it on a device.

Rounding (what "the option feeds it" means here, pixel by pixel):

* scale_fill: exactly ``images.load_array(path, size)`` (Pillow bilinear resize), as float32.
* center_crop: the centre square of the source (side = the short side; its offset may be a half pixel) is
  resized to size x size in one bilinear step (Pillow ``resize(box=...)``). That equals "scale the short
  side to size, then cut the centre" without rounding the scaled long side, so nothing is rounded.
* scale_fit: the long side becomes ``size``; the short side becomes ``short * size / long`` rounded to the
  nearest whole pixel (halves round up, never below 1 pixel). The rest is zero padding split evenly; when
  the padding is odd, the extra row goes to the bottom (extra column to the right).

Pure functions: nothing here reads the config or the stage outputs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data import images

PAD_VALUE = 0.0  # what scale_fit pads with: Apple's "transparent pixels" seen by an RGB input
TRAINING_OPTION = "scale_fill"  # what pipeline.data.images.load_array (training) does


@dataclass(frozen=True)
class CropOption:
    """One way Vision can crop and scale the photo to the model's square input."""

    name: str  # our config / report name
    vision: str  # Swift, VNCoreMLRequest.imageCropAndScaleOption (VNImageCropAndScaleOption)
    coreml_request: str  # Swift, iOS 18 CoreMLRequest.cropAndScaleAction (ImageCropAndScaleAction)
    vision_default: bool  # the default of VNCoreMLRequest
    coreml_request_default: bool  # the default of CoreMLRequest
    summary: str  # one line for a report


OPTIONS = (
    CropOption("center_crop", ".centerCrop", ".centerCrop", True, False,
               "scale the short side to the input size and keep the centre square (the sides are cut off)"),
    CropOption("scale_fill", ".scaleFill", ".scaleToFill", False, True,
               "stretch the whole photo to the square input (what training does)"),
    CropOption("scale_fit", ".scaleFit", ".scaleToFit", False, False,
               "scale the long side to the input size and pad the rest with black (letterbox)"),
)
NAMES = tuple(option.name for option in OPTIONS)
_BY_NAME = {option.name: option for option in OPTIONS}
_SWIFT_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def get_option(option):
    """The CropOption for a name ("center_crop", "scale_fill", "scale_fit") or a CropOption itself."""
    if isinstance(option, CropOption):
        return option
    try:
        return _BY_NAME[option]
    except (KeyError, TypeError):
        raise ValueError(f"unknown crop-and-scale option {option!r}; expected one of {', '.join(NAMES)}") from None


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive whole number of pixels, not {size!r}")
    return int(size)


def _round_half_up(value):
    return int(math.floor(value + 0.5))


def fit_extent(width, height, size):
    """For scale_fit: the (width, height) the photo is scaled to inside size x size, before padding.

    The long side becomes `size`; the short side is `short * size / long` rounded to the nearest pixel
    (halves round up), at least 1.
    """
    size = _check_size(size)
    if width >= height:
        return size, max(1, min(size, _round_half_up(height * size / width)))
    return max(1, min(size, _round_half_up(width * size / height))), size


def arrange(image, size, option):
    """An upright RGB Pillow image as `option` feeds it to a size x size model: (size, size, 3) float32 0-255.

    scale_fill is the training resize; center_crop resizes the centre square in one bilinear step;
    scale_fit scales to fit (short side rounded to the nearest pixel) and pads with zeros, the extra odd
    row or column at the bottom or right. See the module docstring.
    """
    option = get_option(option)
    size = _check_size(size)
    if not isinstance(image, Image.Image):
        raise TypeError(f"arrange needs a Pillow image, not {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"arrange needs an upright RGB image (see pipeline.data.images.to_rgb), not mode {image.mode}")
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError("image has no pixels")
    if option.name == "scale_fill":
        resized = image.resize((size, size), images.RESAMPLE)
        return np.asarray(resized, dtype=np.uint8).astype(np.float32)
    if option.name == "center_crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        resized = image.resize((size, size), images.RESAMPLE, box=(left, top, left + side, top + side))
        return np.asarray(resized, dtype=np.uint8).astype(np.float32)
    fit_w, fit_h = fit_extent(width, height, size)
    band = np.asarray(image.resize((fit_w, fit_h), images.RESAMPLE), dtype=np.uint8).astype(np.float32)
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.float32)
    top, left = (size - fit_h) // 2, (size - fit_w) // 2
    out[top:top + fit_h, left:left + fit_w] = band
    return out


def load_as(path, size, option):
    """An image file's raw RGB pixels as `option` feeds them: (size, size, 3) float32 0-255.

    Decoding is `pipeline.data.images.load_rgb` (upright 8-bit RGB), the same as training; scale_fill equals
    `images.load_array(path, size)` exactly.
    """
    return arrange(images.load_rgb(path), size, option)


def swift_snippet(model_class, option, fence=True, threshold=None):
    """Swift lines that classify a CGImage `cgImage` with `option`, for both Vision APIs, for a Markdown report.

    First `VNCoreMLRequest` (iOS 11+, `request.imageCropAndScaleOption`), then the iOS 18 `CoreMLRequest`
    (`cropAndScaleAction`). `model_class` is the class Xcode generates for the model (e.g. "MultiSnacks").
    With `threshold` (a confidence in (0, 1]), a best class below it is shown as "not sure". With `fence` the
    code is wrapped in a ```swift block.
    """
    option = get_option(option)
    if not isinstance(model_class, str) or not _SWIFT_IDENTIFIER.match(model_class):
        raise ValueError(f"model_class must be a Swift type name such as 'MultiSnacks', not {model_class!r}")
    vision_note = "the default" if option.vision_default else "not the default (.centerCrop), so set it"
    request_note = "the default" if option.coreml_request_default else "not the default (.scaleToFill), so set it"
    lines = [
        "import CoreML",
        "import Vision",
        "",
        f"// {option.name}: {option.summary}",
        f"// VNCoreMLRequest (iOS 11+): {option.vision} is {vision_note}.",
        f"let visionModel = try VNCoreMLModel(for: {model_class}(configuration: MLModelConfiguration()).model)",
        "let request = VNCoreMLRequest(model: visionModel) { request, _ in",
        "    let results = request.results as? [VNClassificationObservation] ?? []",
        "    if let best = results.max(by: { $0.confidence < $1.confidence }) {",
        *_show_best(threshold, "        "),
        "    }",
        "}",
        f"request.imageCropAndScaleOption = {option.vision}",
        "try VNImageRequestHandler(cgImage: cgImage, options: [:]).perform([request])",
        "",
        f"// CoreMLRequest (iOS 18+, in an async throwing function): {option.coreml_request} is {request_note}.",
        "let container = try CoreMLModelContainer(",
        f"    model: {model_class}(configuration: MLModelConfiguration()).model)",
        "var coreMLRequest = CoreMLRequest(model: container)",
        f"coreMLRequest.cropAndScaleAction = {option.coreml_request}",
        "let observations = try await coreMLRequest.perform(on: cgImage)",
        "let classifications = observations.compactMap { $0 as? ClassificationObservation }",
        "if let best = classifications.max(by: { $0.confidence < $1.confidence }) {",
        *_show_best(threshold, "    "),
        "}",
    ]
    code = "\n".join(lines) + "\n"
    return f"```swift\n{code}```\n" if fence else code


def recommend(accuracies):
    """The option name to recommend from {option_name: accuracy}: the most accurate.

    Ties (within 1e-12) go to scale_fill, the training's own resize, when it is among the best; otherwise to
    the first tied option in OPTIONS order.
    """
    if not accuracies:
        raise ValueError("recommend needs at least one {option_name: accuracy}")
    scores = {}
    for name, accuracy in accuracies.items():
        name = get_option(name).name
        value = float(accuracy)
        if math.isnan(value):
            raise ValueError(f"accuracy for {name} is NaN")
        scores[name] = value
    best = max(scores.values())
    tied = [name for name in NAMES if name in scores and math.isclose(scores[name], best, rel_tol=0, abs_tol=1e-12)]
    return TRAINING_OPTION if TRAINING_OPTION in tied else tied[0]


def _show_best(threshold, indent):
    """The Swift lines that show the best class, or "not sure" below `threshold` (if any)."""
    if threshold is None:
        return [f"{indent}print(best.identifier, best.confidence)"]
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a confidence in (0, 1], not {threshold!r}")
    return [f"{indent}if best.confidence < {threshold:.4f} {{  // the model's \"none of these\" threshold",
            f"{indent}    print(\"not sure; best guess:\", best.identifier, best.confidence)",
            f"{indent}}} else {{",
            f"{indent}    print(best.identifier, best.confidence)",
            f"{indent}}}"]
