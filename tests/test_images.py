"""pipeline.data.images: which files count as images, what is a bad image, and conversion to upright 8-bit RGB."""
from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import exif_jpeg, shape_image
from PIL import Image

from pipeline.data.images import BadImage, ImageInfo, inspect_bytes, is_image_name, load_array, load_rgb, to_rgb

BIG = 50_000_000
WHITE = (255, 255, 255)


def encode(image, fmt="JPEG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def close(pixel, expected, tol=0):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


# -- file names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a.jpg", "b.JPG", "c.jpeg", "d.Png", "e.webp", "f.tif", "g.bmp", "dir/h.JPEG"])
def test_image_names_accepted(name):
    assert is_image_name(name)


@pytest.mark.parametrize("name", [".DS_Store", ".hidden.jpg", "._photo.jpg", "notes.txt", "photo.jpg.txt",
                                  "Thumbs.db", "README", "dir/.x.png"])
def test_non_image_names_rejected(name):
    assert not is_image_name(name)


# -- bad images ------------------------------------------------------------------------------------

def test_empty_bytes_are_bad():
    with pytest.raises(BadImage, match="empty"):
        inspect_bytes(b"", BIG)


def test_garbage_bytes_are_bad():
    with pytest.raises(BadImage, match="does not decode"):
        inspect_bytes(b"this is not an image at all" * 10, BIG)


def test_unknown_format_says_what_the_file_holds_not_a_python_object():
    # Pillow's own message names its in-memory buffer: "cannot identify image file <_io.BytesIO object at 0x...>".
    with pytest.raises(BadImage) as excinfo:
        inspect_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>", BIG)
    message = str(excinfo.value)
    assert message.startswith("does not decode as an image: not a format Pillow can read")
    assert "the file starts with b'<!DOCTYPE html><'" in message
    assert "BytesIO" not in message and "object at 0x" not in message


def test_truncated_jpeg_is_bad():
    data = encode(shape_image("circle", 1, size=64), quality=95)
    inspect_bytes(data, BIG)  # the whole file is fine
    with pytest.raises(BadImage, match="does not decode"):
        inspect_bytes(data[: len(data) // 2], BIG)


def test_image_over_max_pixels_is_bad():
    data = encode(Image.new("RGB", (100, 50), (1, 2, 3)), "PNG")
    assert inspect_bytes(data, 5000) == ImageInfo(100, 50, "RGB", "")  # exactly at the limit is allowed
    with pytest.raises(BadImage, match="absurdly large") as excinfo:
        inspect_bytes(data, 4999)
    assert "100x50" in str(excinfo.value)


def test_inspect_reports_mode_and_conversion():
    info = inspect_bytes(encode(Image.new("L", (30, 20), 128)), BIG)
    assert (info.width, info.height, info.mode) == (30, 20, "L")
    assert "L converted to RGB" in info.converted


# -- conversion to upright 8-bit RGB ---------------------------------------------------------------

def test_rgb_is_left_alone():
    image = Image.new("RGB", (5, 4), (10, 20, 30))
    rgb, note = to_rgb(image)
    assert rgb.mode == "RGB" and note == "" and rgb.getpixel((2, 2)) == (10, 20, 30)


def test_grayscale_becomes_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (6, 4), 77).save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (6, 4)
    assert rgb.getpixel((3, 2)) == (77, 77, 77)


def palette_image(transparent_index=None):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 200, 0, 0] + [0, 0, 0] * 254)
    image.putpixel((1, 1), 1)
    return image


def test_palette_becomes_rgb(tmp_path):
    path = tmp_path / "palette.png"
    palette_image().save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (10, 20, 30)
    assert rgb.getpixel((1, 1)) == (200, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_composites_on_white(tmp_path, fmt):
    path = tmp_path / f"palette.{fmt.lower()}"
    palette_image().save(path, fmt, transparency=0)
    with Image.open(path) as opened:
        assert opened.mode == "P" and opened.info.get("transparency") == 0
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE  # palette entry 0 is transparent, not (10, 20, 30)
    assert rgb.getpixel((1, 1)) == (200, 0, 0)


def test_rgba_composites_on_white(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 0, 0), (0, 128, 0, 255), (0, 0, 0, 128)])
    path = tmp_path / "alpha.png"
    image.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE  # fully transparent black shows the white background
    assert rgb.getpixel((1, 0)) == (0, 128, 0)  # opaque is unchanged
    assert close(rgb.getpixel((2, 0)), (127, 127, 127), tol=1)  # half-transparent black is mid grey


def test_la_composites_on_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (50, 255)])
    rgb, note = to_rgb(image)
    assert rgb.getpixel((0, 0)) == WHITE and rgb.getpixel((1, 0)) == (50, 50, 50)
    assert "LA converted to RGB" in note


def test_cmyk_becomes_rgb(tmp_path):
    rgb, note = to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 0, 0)
    assert "CMYK converted to RGB" in note
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 255, 0)).save(path, quality=95)  # cyan + yellow = green
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and close(loaded.getpixel((8, 8)), (0, 255, 0), tol=8)


def test_16_bit_grayscale_png_is_scaled_to_8_bits(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert close(rgb.getpixel((1, 0)), (128, 128, 128), tol=1)
    assert rgb.getpixel((2, 0)) == WHITE
    info = inspect_bytes(path.read_bytes(), BIG)
    assert info.mode.startswith("I") and "converted to RGB" in info.converted


def test_dark_16_bit_image_stays_dark(tmp_path):
    """A 16-bit image is on a 0-65535 scale whatever its brightest pixel: 255/65535 is black, not white."""
    path = tmp_path / "dark.png"
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint16)).save(path)
    rgb = load_rgb(path)
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (0, 0, 0), (1, 1, 1)]


def marked_image(width=40, height=24):
    """White, with a red block in the stored top-left corner."""
    image = Image.new("RGB", (width, height), WHITE)
    image.paste((255, 0, 0), (0, 0, 8, 8))
    return image


def corners(image):
    w, h = image.size
    return {"top-left": image.getpixel((2, 2)), "top-right": image.getpixel((w - 3, 2)),
            "bottom-left": image.getpixel((2, h - 3)), "bottom-right": image.getpixel((w - 3, h - 3))}


# EXIF orientation 6: the stored first row is the displayed right side, the stored first column the top;
# orientation 8: the stored first row is the displayed left side, the stored first column the bottom.
@pytest.mark.parametrize("orientation, red_corner", [(1, "top-left"), (6, "top-right"), (8, "bottom-left"),
                                                     (3, "bottom-right")])
def test_exif_rotated_jpeg_is_turned_upright(tmp_path, orientation, red_corner):
    path = exif_jpeg(tmp_path / "rotated.jpg", marked_image(40, 24), orientation)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.size == ((24, 40) if orientation in (6, 8) else (40, 24))
    for corner, pixel in corners(rgb).items():
        if corner == red_corner:
            assert close(pixel, (255, 0, 0), tol=40), (corner, pixel)
        else:
            assert close(pixel, WHITE, tol=40), (corner, pixel)
    info = inspect_bytes(path.read_bytes(), BIG)
    assert (info.width, info.height) == rgb.size
    if orientation == 1:
        assert info.converted == ""
    else:
        assert f"EXIF orientation {orientation}" in info.converted


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "RGB"])
def test_load_array_is_square_uint8_rgb(tmp_path, mode):
    image = shape_image("circle", 3, size=30)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257))
    elif mode != "RGB":
        image = image.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    image.save(path)
    array = load_array(path, 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    assert array.min() < 200 < array.max()  # the shape is still there, on the light background


def test_load_array_resizes_bilinear(tmp_path):
    path = tmp_path / "halves.png"
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.paste((200, 200, 200), (2, 0, 4, 2))
    image.save(path)
    array = load_array(path, 8)
    assert array.shape == (8, 8, 3)
    row = array[4, :, 0]
    # bilinear gives 0 0 0 50 150 200 200 200; nearest has no 50/150, bicubic and lanczos overshoot past 200
    assert row.tolist() == [0, 0, 0, 50, 150, 200, 200, 200]
