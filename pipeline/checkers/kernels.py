"""What both Core ML checkers share: image inputs as NCHW arrays, the batch size, the error for what cannot be
verified (and its kind every exporter raises for a file it cannot read), and convolution: padding in NumPy, the
multiply-adds by TensorFlow's CPU kernels.

Convolutions (`conv2d`) decide here which products are summed (padding, done before, strides, dilations,
groups, weight layout) and let TensorFlow's CPU kernels (NHWC, VALID) do the multiply-adds: their summation
order can depend on the batch size and the CPU, so results are deterministic for a given batch size on a given
machine, not independent of either. Weights are put in TensorFlow's layout once (`conv_kernels`), not per batch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.errors import ExportError

GRAYSCALE, RGB, BGR = 10, 20, 30  # ImageFeatureType.ColorSpace (FeatureTypes.proto)
# Images computed at once by both Core ML checkers (the fastest batch measured: bench/RESULTS.md).
BATCH = 16


class CannotVerify(ExportError):
    """The spec uses something this checker does not implement, so its outputs cannot be computed."""


class DamagedFile(CannotVerify):
    """An exported file that cannot be read or parsed (truncated, overwritten, unreadable, a part missing).

    A CannotVerify, so that the parity table gives it a row instead of stopping. `problem` is what each exporter's
    `problems` reports for it, which fails that row: a few words, as the message (the row's other reason) already
    names the file, the reason and the fix.
    """

    def __init__(self, message, problem="damaged file"):
        super().__init__(message)
        self.problem = problem

    @classmethod
    def reading(cls, path, kind, cause):
        """The error for the file at `path`, a `kind` ("ONNX model", ...), kept from being read by `cause`: the
        reader's exception or a sentence, condensed to one line. The fix depends on whether the file exists and
        can be read."""
        if not Path(path).exists():
            problem, fix = "missing file", "it does not exist: run `python -m pipeline export` to write it"
        elif isinstance(cause, PermissionError) or not _readable(Path(path)):
            problem, fix = "unreadable file", "make it readable (check its permissions) or copy it again"
        else:
            problem = "damaged file"
            fix = "it is damaged or truncated: run `python -m pipeline export --force` to rewrite it, or copy it again"
        return cls(f"{path}: cannot read this {kind} ({one_line(cause)}); {fix}", problem)


def one_line(cause, limit=300):
    """An exception's message (or a sentence) on one line, cut to `limit` characters: the reason in an error."""
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _readable(path):
    """Whether the file, or the folder (an .mlpackage) and everything in it, can be read by this process."""
    parts = [path, *path.rglob("*")] if path.is_dir() else [path]
    return all(os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)) for p in parts if p.exists())


def channels_first(name, image, pixels):
    """The pixels as (N, C, H, W) in the input's channel order: gray, R G B, or B G R."""
    size = (image.height, image.width)
    if image.colorSpace == GRAYSCALE:
        if pixels.shape[1:] == (*size, 3):
            raise CannotVerify(f"cannot verify: input '{name}' is a grayscale image and the pixels are RGB; give "
                               "one channel, (N, H, W) or (N, H, W, 1): how RGB becomes gray is up to the caller "
                               "of Core ML (Vision, Core Image), not the spec")
        if pixels.shape[1:] not in (size, (*size, 1)):
            raise ExportError(f"input '{name}' takes {image.width}x{image.height} grayscale images (one channel), "
                              f"got pixels of shape {pixels.shape[1:]}")
        return pixels.reshape(len(pixels), 1, *size)
    if image.colorSpace not in (RGB, BGR):
        raise CannotVerify(f"cannot verify: input '{name}' colour space {image.colorSpace}")
    if pixels.shape[1:] != (*size, 3):
        raise ExportError(f"input '{name}' takes {image.width}x{image.height} RGB images, "
                          f"got pixels of shape {pixels.shape[1:]}")
    x = pixels if image.colorSpace == RGB else pixels[..., ::-1]
    return x.transpose(0, 3, 1, 2)


def padded(x, pads, value=0.0):
    """x with [(before, after)] of `value` around its last len(pads) axes, kept in x's memory layout.

    np.pad returns C order; an NCHW view of NHWC memory (what `conv2d` returns) stays one here, so the next
    convolution hands TensorFlow its NHWC memory without a transposing copy.
    """
    pads = [(0, 0)] * (x.ndim - len(pads)) + [tuple(int(v) for v in pair) for pair in pads]
    out = np.empty_like(x, shape=[n + before + after for n, (before, after) in zip(x.shape, pads)])  # order 'K'
    inner = tuple(slice(before, before + n) for n, (before, _) in zip(x.shape, pads))
    out[inner] = x
    for axis, (before, after) in enumerate(pads):  # the borders only: the inside is x
        lead = (slice(None),) * axis
        out[lead + (slice(0, before),)] = value
        out[lead + (slice(out.shape[axis] - after, None),)] = value
    return out


class Kernels(NamedTuple):
    """A convolution's weights as TensorFlow tensors, made once (`conv_kernels`) for every batch."""

    depthwise: bool  # groups == C > 1: one [kH, kW, C, multiplier] filter
    filters: list  # otherwise one [kH, kW, C / groups, C_out / groups] filter per group
    bias: object  # a (C_out,) tensor, or None
    channels: int  # C, the input channels
    groups: int


def conv_kernels(w, groups, bias=None):
    """w (C_out, C / groups, kH, kW) and an optional bias (C_out,) in TensorFlow's layouts, as `conv2d` takes them.

    Which products are summed is decided here: output channel o of group o // (C_out / groups) reads that group's
    input channels; a depthwise one (groups == C) reads channel o // (C_out / C).
    """
    import tensorflow as tf

    c_out, per_in = w.shape[0], w.shape[1]
    c = per_in * groups
    w = np.asarray(w, dtype=np.float32)
    if groups == c and groups > 1:
        filters = [tf.constant(w.reshape(c, c_out // c, *w.shape[2:]).transpose(2, 3, 0, 1))]  # [kH, kW, C, mult]
    else:
        per_out = c_out // groups
        filters = [tf.constant(w[g * per_out:(g + 1) * per_out].transpose(2, 3, 1, 0)) for g in range(groups)]
    b = None if bias is None else tf.constant(np.asarray(bias, dtype=np.float32))
    return Kernels(groups == c and groups > 1, filters, b, c, groups)


def conv2d(x, kernels, strides, dilations, fp16=False):
    """The convolution of already padded x (B, C, H, W) by `conv_kernels`: (B, C_out, H_out, W_out), plus its bias.

    The kernels decide which products are summed, and strides and dilations here; padding is the caller's, done
    before. TensorFlow's CPU kernels (NHWC, VALID: they add no padding) do the multiply-adds, summing in their own
    order, which can depend on the batch size, then add the bias (one float32 addition per value, as NumPy's).
    fp16: the result is rounded to float16 (a float32 to float16 to float32 cast, which rounds to nearest even
    exactly as NumPy's float16 cast does). The result is an NCHW view of NHWC memory that TensorFlow owns: a
    read-only array, which element-wise layers do not write over.
    """
    import tensorflow as tf

    if x.shape[1] != kernels.channels:
        raise ValueError(f"{x.shape[1]} input channels for a convolution of {kernels.channels}")
    step = tuple(strides) if max(dilations) == 1 else (1, 1)  # TF refuses strides with dilations: subsample below
    nhwc = _nhwc(x)
    if kernels.depthwise:
        y = tf.nn.depthwise_conv2d(nhwc, kernels.filters[0], [1, *step, 1], "VALID", dilations=list(dilations))
    else:
        per_in = kernels.channels // kernels.groups
        parts = [tf.nn.conv2d(nhwc if kernels.groups == 1 else nhwc[..., g * per_in:(g + 1) * per_in], f,
                              list(step), "VALID", dilations=list(dilations))
                 for g, f in enumerate(kernels.filters)]
        y = parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)
    if step != tuple(strides):  # stride-1 output i is the window starting at row/column i
        y = y[:, ::strides[0], ::strides[1]]
    if kernels.bias is not None:
        y = tf.nn.bias_add(y, kernels.bias)
    if fp16:
        y = tf.cast(tf.cast(y, tf.float16), tf.float32)
    return np.asarray(y).transpose(0, 3, 1, 2)


def _nhwc(x):
    """x (B, C, H, W) as a C-contiguous (B, H, W, C) array: a view when x's memory is laid out NHWC already."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
