"""Reading images the one way every stage does: upright RGB, 8 bits per channel, resized with bilinear filtering."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
RESAMPLE = Image.BILINEAR

# We check sizes ourselves (ingest.max_image_pixels) and want a clear message, not Pillow's warning.
Image.MAX_IMAGE_PIXELS = None


class BadImage(Exception):
    """An image file that cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    """What ingest records about a readable image."""

    width: int
    height: int
    mode: str
    converted: str  # what was done to make it upright 8-bit RGB, or ""


def is_image_name(path):
    """True if the file name has an image extension and is not a hidden file."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def images_under(folder):
    """Every image file (by its name) under `folder` and its subfolders, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_name(p))


def to_rgb(image):
    """Convert a decoded Pillow image to upright 8-bit RGB; return it and a note of what was converted."""
    notes = []
    orientation = image.getexif().get(0x0112, 1)
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
        notes.append(f"rotated upright (EXIF orientation {orientation})")
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    return image, "; ".join(notes)


def inspect_bytes(data, max_pixels):
    """Decode image bytes fully and describe them; raise BadImage with the reason if unusable."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(f"absurdly large: {width}x{height} pixels (ingest.max_image_pixels is {max_pixels})")
            image.load()
            mode = image.mode
            rgb, note = to_rgb(image)
    except BadImage:
        raise
    except UnidentifiedImageError as exc:
        # Pillow's message names only its buffer ("<_io.BytesIO object at 0x...>"); the first bytes say more,
        # e.g. an HTML error page saved as .jpg.
        raise BadImage(f"does not decode as an image: not a format Pillow can read "
                       f"(the file starts with {data[:16]!r})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"does not decode as an image: {exc}") from exc
    if rgb.width == 0 or rgb.height == 0:
        raise BadImage("image has no pixels")
    return ImageInfo(rgb.width, rgb.height, mode, note)


def load_rgb(path):
    """Open an image file as upright 8-bit RGB (a Pillow image)."""
    with Image.open(path) as image:
        image.load()
        rgb, _ = to_rgb(image)
    return rgb


def load_array(path, size):
    """An image file as a (size, size, 3) uint8 array: upright RGB, resized with bilinear filtering."""
    return np.asarray(load_rgb(path).resize((size, size), RESAMPLE), dtype=np.uint8)
