"""pipeline.data.vision_crop: the pixels each Vision crop-and-scale option feeds the model, and the report helpers.

Expected pixels are worked out by hand in the comments, not taken from the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import exif_jpeg
from PIL import Image

from pipeline.data import images
from pipeline.data.vision_crop import (NAMES, OPTIONS, CropOption, arrange, fit_extent, get_option, load_as, recommend,
                                  swift_snippet)

# Four distinct column colours for a 4 x 2 (w x h) image: red, green, blue, yellow.
COLUMNS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
ZERO = [0.0, 0.0, 0.0]


def columns_image(colours, height):
    """An RGB image whose column x is colours[x] from top to bottom."""
    array = np.zeros((height, len(colours), 3), dtype=np.uint8)
    for x, colour in enumerate(colours):
        array[:, x] = colour
    return Image.fromarray(array, "RGB")


def rows_image(colours, width):
    """An RGB image whose row y is colours[y] from left to right."""
    array = np.zeros((len(colours), width, 3), dtype=np.uint8)
    for y, colour in enumerate(colours):
        array[y, :] = colour
    return Image.fromarray(array, "RGB")


def solid(width, height, colour):
    return Image.new("RGB", (width, height), colour)


# -- the options table -----------------------------------------------------------------------------

def test_options_table_names_and_swift_spellings():
    assert NAMES == ("center_crop", "scale_fill", "scale_fit")
    table = {o.name: (o.vision, o.coreml_request) for o in OPTIONS}
    assert table == {
        "center_crop": (".centerCrop", ".centerCrop"),
        "scale_fill": (".scaleFill", ".scaleToFill"),
        "scale_fit": (".scaleFit", ".scaleToFit"),
    }


def test_options_table_defaults_one_per_api():
    # VNCoreMLRequest defaults to .centerCrop; iOS 18 CoreMLRequest to .scaleToFill.
    assert [o.name for o in OPTIONS if o.vision_default] == ["center_crop"]
    assert [o.name for o in OPTIONS if o.coreml_request_default] == ["scale_fill"]


def test_options_are_frozen():
    with pytest.raises(Exception):
        OPTIONS[0].name = "other"


def test_get_option_by_name_or_object_and_unknown():
    assert get_option("scale_fit").vision == ".scaleFit"
    assert get_option(OPTIONS[0]) is OPTIONS[0]
    with pytest.raises(ValueError, match="center_crop, scale_fill, scale_fit"):
        get_option("letterbox")


# -- center_crop -----------------------------------------------------------------------------------

def test_center_crop_wide_keeps_the_middle_columns():
    # 4 x 2, short side 2 = size: no scaling; the centre 2 x 2 square is columns 1 and 2.
    out = arrange(columns_image(COLUMNS, 2), 2, "center_crop")
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    expected = [[list(map(float, COLUMNS[1])), list(map(float, COLUMNS[2]))]] * 2
    assert out.tolist() == expected


def test_center_crop_tall_keeps_the_middle_rows():
    # 2 x 4 (w x h): the centre square is rows 1 and 2.
    out = arrange(rows_image(COLUMNS, 2), 2, "center_crop")
    expected = [[list(map(float, COLUMNS[1]))] * 2, [list(map(float, COLUMNS[2]))] * 2]
    assert out.tolist() == expected


def test_center_crop_scales_and_takes_the_centre():
    # 12 x 4, red = 10*x + 5 in column x (so 10 * the column's centre coordinate). Short side 4 -> size 2:
    # scale 1/2, the centre square is x in [4, 8]; output pixel centres sit at x = 5 and x = 7, and a
    # symmetric bilinear filter on a linear ramp gives the ramp's value there: 50 and 70.
    # (A top-left crop would give 10 and 30.)
    array = np.zeros((4, 12, 3), dtype=np.uint8)
    array[:, :, 0] = (10 * np.arange(12) + 5)[None, :]
    out = arrange(Image.fromarray(array, "RGB"), 2, "center_crop")
    assert out[:, :, 0].tolist() == [[50.0, 70.0], [50.0, 70.0]]
    assert not out[:, :, 1:].any()


# -- scale_fit -------------------------------------------------------------------------------------

def test_scale_fit_wide_pads_top_and_bottom_with_zeros():
    # 4 x 2 into 4: scale 1, the band is 2 rows high, padding 4 - 2 = 2 -> 1 zero row above, 1 below.
    out = arrange(columns_image(COLUMNS, 2), 4, "scale_fit")
    image_row = [list(map(float, c)) for c in COLUMNS]
    assert out.tolist() == [[ZERO] * 4, image_row, image_row, [ZERO] * 4]


def test_scale_fit_downscaled_band_height():
    # 12 x 4 into 6: scale 1/2 -> 6 x 2 band, padding 4 -> rows 0-1 zero, rows 2-3 the colour, rows 4-5 zero.
    out = arrange(solid(12, 4, (10, 20, 30)), 6, "scale_fit")
    assert not out[:2].any() and not out[4:].any()
    assert (out[2:4] == np.array([10, 20, 30], dtype=np.float32)).all()


def test_scale_fit_tall_pads_left_and_right():
    # 2 x 4 into 4: the band is 2 columns wide, 1 zero column each side.
    out = arrange(rows_image(COLUMNS, 2), 4, "scale_fit")
    assert not out[:, 0].any() and not out[:, 3].any()
    assert out[:, 1].tolist() == [list(map(float, c)) for c in COLUMNS]
    assert out[:, 2].tolist() == out[:, 1].tolist()


def test_scale_fit_rounds_the_short_side_to_nearest():
    # 5 x 2 into 4: height 2 * 4 / 5 = 1.6 -> 2 rows (nearest; truncation would give 1).
    # Padding 2 -> 1 zero row above, 1 below.
    assert fit_extent(5, 2, 4) == (4, 2)
    out = arrange(solid(5, 2, (200, 100, 7)), 4, "scale_fit")
    assert not out[0].any() and not out[3].any()
    assert (out[1:3] == np.array([200, 100, 7], dtype=np.float32)).all()


def test_scale_fit_half_rounds_up_and_odd_padding_goes_to_the_bottom():
    # 8 x 5 into 4: height 5 * 4 / 8 = 2.5 -> 3 rows (half up; round-half-even would give 2).
    # Padding 1: 0 rows above, 1 below.
    assert fit_extent(8, 5, 4) == (4, 3)
    out = arrange(solid(8, 5, (9, 8, 7)), 4, "scale_fit")
    assert (out[:3] == np.array([9, 8, 7], dtype=np.float32)).all()
    assert not out[3].any()


def test_fit_extent_never_below_one_pixel():
    # 1000 x 1 into 4: 4 / 1000 = 0.004 rounds to 0, kept at 1.
    assert fit_extent(1000, 1, 4) == (4, 1)
    assert fit_extent(1, 1000, 4) == (1, 4)


# -- scale_fill and files --------------------------------------------------------------------------

def test_scale_fill_equals_training_load_array(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), "RGB").save(path)
    out = load_as(path, 16, "scale_fill")
    want = images.load_array(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert np.array_equal(out, want.astype(np.float32))


def test_load_as_center_crop_reads_the_file(tmp_path):
    path = tmp_path / "cols.png"
    columns_image(COLUMNS, 2).save(path)
    out = load_as(path, 2, "center_crop")
    assert out[0].tolist() == [list(map(float, COLUMNS[1])), list(map(float, COLUMNS[2]))]


def test_load_as_applies_exif_orientation_first(tmp_path):
    # Stored 8 x 4 with EXIF orientation 6 (rotate 90 degrees): upright it is 4 x 8, i.e. tall, so
    # scale_fit into 4 gives a 2-column band with one zero column each side (not zero rows).
    path = exif_jpeg(tmp_path / "rotated.jpg", solid(8, 4, (200, 200, 200)), 6)
    out = load_as(path, 4, "scale_fit")
    assert not out[:, 0].any() and not out[:, 3].any()
    assert (out[:, 1:3] > 150).all()


def test_square_image_is_the_same_under_all_options():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    want = np.asarray(image.resize((3, 3), Image.BILINEAR), dtype=np.uint8).astype(np.float32)
    for name in NAMES:
        assert np.array_equal(arrange(image, 3, name), want), name


def test_values_stay_raw_0_255():
    out = arrange(solid(3, 2, (255, 0, 128)), 2, "scale_fill")
    assert out.max() == 255.0 and out.min() == 0.0


def test_arrange_rejects_bad_input():
    with pytest.raises(ValueError, match="RGB"):
        arrange(Image.new("L", (4, 2)), 2, "scale_fill")
    with pytest.raises(ValueError, match="size"):
        arrange(solid(4, 2, (0, 0, 0)), 0, "scale_fill")
    with pytest.raises(ValueError, match="unknown"):
        arrange(solid(4, 2, (0, 0, 0)), 2, "stretch")


# -- recommend -------------------------------------------------------------------------------------

def test_recommend_highest_accuracy():
    assert recommend({"center_crop": 0.91, "scale_fill": 0.88, "scale_fit": 0.80}) == "center_crop"


def test_recommend_tie_goes_to_scale_fill():
    assert recommend({"center_crop": 0.9, "scale_fill": 0.9, "scale_fit": 0.7}) == "scale_fill"
    assert recommend({"scale_fit": 0.5, "scale_fill": 0.5}) == "scale_fill"
    # 0.1 + 0.2 != 0.3 in floating point; still a tie.
    assert recommend({"center_crop": 0.1 + 0.2, "scale_fill": 0.3}) == "scale_fill"


def test_recommend_tie_without_scale_fill_follows_table_order():
    assert recommend({"scale_fit": 0.9, "center_crop": 0.9, "scale_fill": 0.1}) == "center_crop"


def test_recommend_rejects_nonsense():
    with pytest.raises(ValueError):
        recommend({})
    with pytest.raises(ValueError, match="unknown"):
        recommend({"squash": 1.0})
    with pytest.raises(ValueError, match="NaN"):
        recommend({"scale_fill": float("nan")})


# -- swift_snippet ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, vision, action", [
    ("center_crop", ".centerCrop", ".centerCrop"),
    ("scale_fill", ".scaleFill", ".scaleToFill"),
    ("scale_fit", ".scaleFit", ".scaleToFit"),
])
def test_swift_snippet_mentions_model_and_both_spellings(name, vision, action):
    text = swift_snippet("MultiSnacks", name)
    assert text.startswith("```swift\n") and text.endswith("```\n")
    assert "VNCoreMLModel(for: MultiSnacks(configuration: MLModelConfiguration()).model)" in text
    assert f"request.imageCropAndScaleOption = {vision}\n" in text
    assert f"coreMLRequest.cropAndScaleAction = {action}\n" in text
    assert "VNImageRequestHandler(cgImage: cgImage, options: [:])" in text
    assert "try await coreMLRequest.perform(on: cgImage)" in text
    assert "ClassificationObservation" in text and "VNClassificationObservation" in text


def test_swift_snippet_unfenced_and_bad_class_name():
    text = swift_snippet("Snacks2", get_option("scale_fill"), fence=False)
    assert "```" not in text and "Snacks2(configuration:" in text
    with pytest.raises(ValueError):
        swift_snippet("Multi Snacks", "scale_fill")
    with pytest.raises(ValueError):
        swift_snippet("MultiSnacks", "fill")


def test_crop_option_is_a_dataclass_row():
    row = CropOption("x", ".a", ".b", False, False, "s")
    assert (row.name, row.vision, row.coreml_request) == ("x", ".a", ".b")


def test_swift_snippet_with_a_threshold_says_not_sure_below_it_in_both_apis():
    text = swift_snippet("MultiSnacks", "scale_fill", threshold=0.61234)
    assert text.count("if best.confidence < 0.6123 {") == 2
    assert text.count('print("not sure; best guess:", best.identifier, best.confidence)') == 2
    assert text.count("{") == text.count("}")  # balanced braces, as Swift needs
    assert "not sure" not in swift_snippet("MultiSnacks", "scale_fill")
    with pytest.raises(ValueError, match="threshold must be a confidence in"):
        swift_snippet("MultiSnacks", "scale_fill", threshold=1.5)
