"""pipeline.data.digits: scikit-learn's 8x8 digits written as a split folder of class folders of PNGs."""
from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import snapshot
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config import IngestConfig
from pipeline.data import digits as digits_module
from pipeline.data.dataset import detect_layout
from pipeline.data.digits import MANIFEST, write_digits
from pipeline.errors import ConfigError, DataError
from pipeline.stages import ingest

SPLITS = ("train", "val", "test")
LABELS = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def source():
    return load_digits()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One default write, shared (read only) by the tests below."""
    out = tmp_path_factory.mktemp("digits") / "digits"
    return out, write_digits(out)


def pngs(folder):
    return sorted(folder.glob("*/*/digit_*.png"))


def contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_counts_add_up_with_every_class_in_every_split(written, source):
    out, summary = written
    assert summary["images"] == 1797 and summary["size"] == 28
    assert sum(summary["splits"].values()) == 1797
    on_disk = Counter((p.parts[-3], p.parts[-2]) for p in pngs(out))
    for split in SPLITS:
        assert sorted(summary["counts"][split]) == LABELS
        for label in LABELS:
            assert summary["counts"][split][label] == on_disk[split, label] > 0
        assert summary["splits"][split] == sum(summary["counts"][split].values())
    # every load_digits image exactly once, in the folder of its own digit
    indices = [int(p.stem.split("_")[1]) for p in pngs(out)]
    assert sorted(indices) == list(range(1797))
    assert all(int(p.parts[-2]) == source.target[int(p.stem.split("_")[1])] for p in pngs(out))
    # stratified 70/15/15 within rounding, per class
    for label in LABELS:
        n = sum(summary["counts"][split][label] for split in SPLITS)
        assert n == int((source.target == int(label)).sum())
        for split in ("val", "test"):
            assert abs(summary["counts"][split][label] - 0.15 * n) <= 1


def bilinear(array, size):
    """Textbook bilinear upscaling with pixel centres at (i + 0.5) and edges clamped (Pillow's definition
    when enlarging), separable: the same 1-D interpolation along rows, then along columns."""
    def along(axis_len):
        centres = (np.arange(size) + 0.5) * axis_len / size - 0.5
        centres = np.clip(centres, 0, axis_len - 1)
        lo = np.floor(centres).astype(int)
        hi = np.minimum(lo + 1, axis_len - 1)
        w = centres - lo
        return lo, hi, w

    lo, hi, w = along(array.shape[1])
    rows = array[:, lo] * (1 - w) + array[:, hi] * w
    lo, hi, w = along(array.shape[0])
    return rows[lo, :] * (1 - w)[:, None] + rows[hi, :] * w[:, None]


@pytest.mark.parametrize("index", [0, 45, 1796])
def test_pixels_are_the_bilinear_upscaling_of_the_inverted_source(written, source, index):
    out, _ = written
    (path,) = out.glob(f"*/*/digit_{index:04d}.png")
    assert path.parent.name == str(source.target[index])
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (28, 28)
        pixels = np.asarray(image, dtype=np.int64)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    grey = pixels[..., 0]
    levels = 255.0 * (1.0 - source.images[index] / 16.0)  # 0 (no ink) -> white, 16 -> black
    expected = bilinear(levels, 28)
    assert np.abs(grey - expected).max() <= 0.5 + 1e-3  # the file holds the hand-computed value, rounded
    assert (grey == np.floor(expected + 0.5)).mean() > 0.99  # ties aside, rounded half up
    # and exactly Pillow's bilinear resize of the same 8x8 float image, rounded half up
    pillow = np.asarray(Image.fromarray(levels.astype(np.float32)).resize((28, 28), Image.BILINEAR))
    assert (grey == np.clip(np.floor(pillow + 0.5), 0, 255)).all()
    # light background, dark digit: the blank corner is white, the darkest stroke is near black
    assert grey[0, 0] == 255 and grey.min() < 40


def test_size_8_writes_the_source_pixels_themselves(tmp_path, source):
    out = tmp_path / "d8"
    write_digits(out, size=8)
    with Image.open(out.glob("*/*/digit_0007.png").__next__()) as image:
        grey = np.asarray(image)[..., 0]
    assert (grey == np.floor(255 * (1 - source.images[7] / 16) + 0.5)).all()


def test_rewrite_is_identical(written, tmp_path):
    out, summary = written
    other = tmp_path / "again"
    assert write_digits(other) == {**summary, "path": str(other)}
    assert contents(other) == contents(out)
    # writing again over a previous output replaces it with the same files
    before = contents(other)
    write_digits(other)
    assert contents(other) == before
    # another seed gives another split of the same images
    reseeded = tmp_path / "seed1"
    write_digits(reseeded, seed=1)
    assert {p.name for p in pngs(reseeded)} == {p.name for p in pngs(out)}
    assert {p.relative_to(reseeded) for p in pngs(reseeded)} != {p.relative_to(out) for p in pngs(out)}


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    before = snapshot(foreign)
    with pytest.raises(DataError, match="not empty") as info:
        write_digits(foreign)
    assert str(foreign) in str(info.value) and "new or empty folder" in str(info.value)
    assert snapshot(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no scratch folder left beside it


def test_refuses_a_previous_output_with_files_added(tmp_path):
    out = tmp_path / "digits"
    write_digits(out, size=8)
    (out / "train" / "3" / "my_own_three.png").write_bytes(b"added by hand")
    with pytest.raises(DataError, match="not empty"):
        write_digits(out, size=8)
    assert (out / "train" / "3" / "my_own_three.png").read_bytes() == b"added by hand"


def test_empty_folder_is_accepted(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert write_digits(out, size=8)["images"] == 1797
    assert json.loads((out / MANIFEST).read_text())["generator"] == digits_module.GENERATOR


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = digits_module.render

    def failing(image, size):
        calls.append(1)
        if len(calls) > 100:
            raise KeyboardInterrupt
        return real(image, size)

    monkeypatch.setattr(digits_module, "render", failing)
    with pytest.raises(KeyboardInterrupt):
        write_digits(tmp_path / "digits", size=8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"size": 4}, {"size": 28.0}, {"val_ratio": 0}, {"test_ratio": 1.2},
                                    {"val_ratio": 0.5, "test_ratio": 0.5}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        write_digits(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_ingest_accepts_the_output(written):
    out, summary = written
    layout = detect_layout(out)
    assert layout.kind == "splits" and layout.root == out
    assert layout.split_dirs == {split: out / split for split in SPLITS}
    cfg = SimpleNamespace(ingest=IngestConfig())
    rows, ignored, bad, notes = ingest.scan(layout, cfg)
    classes, counts, warnings, leaks = ingest.check(rows, layout, cfg)
    assert classes == LABELS  # label index == digit
    assert (ignored, bad, notes, warnings, leaks) == ([], [], [], [], 0)
    assert not any(row["converted"] for row in rows)  # already 8-bit RGB: nothing for ingest to convert
    assert {split: {label: counts[label][split] for label in LABELS} for split in SPLITS} == summary["counts"]
