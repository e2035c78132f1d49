"""Real small data, offline: scikit-learn's 8x8 handwritten digits written out as a folder of labelled PNGs.

`write_digits` turns `sklearn.datasets.load_digits` (1,797 images, digits 0-9, pixel values 0-16) into the
split-folder layout ingest reads, `<out>/{train,val,test}/<digit>/digit_<index>.png`, so the whole pipeline
runs on it like on any user's folder. The split is fixed here (stratified, seeded) rather than left to ingest's
content-hash split, so every run and every config measures on the same images.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import fileio
from pipeline.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
MANIFEST = "digits.json"
README = "README.txt"
GENERATOR = "pipeline.data.digits.write_digits"
FORMAT_VERSION = 1
RESAMPLE = Image.BILINEAR  # the filter pipeline.data.images resizes with, so the chain uses one definition
SOURCE_MAX = 16  # load_digits pixels count the "on" pixels of a 4x4 block: 0..16
UCI_URL = "https://archive.ics.uci.edu/ml/datasets/Optical+Recognition+of+Handwritten+Digits"


def grey_levels(image):
    """An 8x8 load_digits image (values 0-16) as float grey levels, dark digit on a light background.

    The mapping is inverted: 0 (no ink) becomes 255 (white) and 16 (all ink) becomes 0 (black), as ink on
    paper looks in a photo: level = 255 * (1 - value / 16).
    """
    return (255.0 * (1.0 - np.asarray(image, dtype=np.float64) / SOURCE_MAX)).astype(np.float32)


def render(image, size=28):
    """One load_digits image as a (size, size) uint8 array: `grey_levels`, upscaled with Pillow's bilinear
    filter on the float levels (mode "F"), then rounded half up and clipped to 0-255 once."""
    levels = Image.fromarray(grey_levels(image))  # float32: mode "F"
    resized = np.asarray(levels.resize((size, size), RESAMPLE), dtype=np.float64)
    return np.clip(np.floor(resized + 0.5), 0, 255).astype(np.uint8)


def split_indices(targets, seed=0, val_ratio=0.15, test_ratio=0.15):
    """A stratified split: {split: sorted image indices}. Each class's indices are shuffled by one generator
    seeded with `seed` (classes in ascending order), then the first round(n * val_ratio) go to val, the next
    round(n * test_ratio) to test (at least one each), and the rest to train."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = {split: [] for split in SPLITS}
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        n_val = max(1, round(len(members) * val_ratio))
        n_test = max(1, round(len(members) * test_ratio))
        if n_val + n_test >= len(members):
            raise ConfigError(f"digit {label} has {len(members)} images, too few for val_ratio {val_ratio} and "
                              f"test_ratio {test_ratio} to leave any for training; lower the ratios")
        chosen["val"] += members[:n_val].tolist()
        chosen["test"] += members[n_val:n_val + n_test].tolist()
        chosen["train"] += members[n_val + n_test:].tolist()
    return {split: sorted(indices) for split, indices in chosen.items()}


def image_path(split, label, index):
    """The relative path of one written image: <split>/<digit>/digit_<load_digits index, 4 digits>.png."""
    return f"{split}/{label}/digit_{index:04d}.png"


def write_digits(out_dir, size=28, seed=0, val_ratio=0.15, test_ratio=0.15):
    """Write scikit-learn's handwritten digits as a train/val/test folder of class folders of PNGs.

    Layout: `out_dir/{train,val,test}/{0..9}/digit_NNNN.png`, NNNN being the image's index in
    `load_digits()`; the class folder names are the digits, so ingest's labels (sorted folder names) are
    "0".."9" and a label's index is its digit. The split is stratified and fixed by `seed` (`split_indices`).
    Pixels: 0-16 mapped to 255-0, i.e. inverted, a dark digit on a light background (`grey_levels`), upscaled
    from 8x8 to `size` x `size` with bilinear filtering (`render`), saved as 8-bit RGB PNGs with three equal
    channels, which is what ingest and every stage read, so ingest records no conversion. Beside the splits:
    README.txt (source, licence, how the files were made) and digits.json (the arguments, the counts and
    the list of files written: the mark of this function's output).

    The folder is written beside `out_dir` and renamed into place, so a half-written dataset never appears.
    `out_dir` may be missing, empty, or a previous output of this function (which is replaced); any other
    folder is refused with a DataError. Writing twice with the same arguments gives identical files.

    Returns a summary: {"path", "size", "seed", "val_ratio", "test_ratio", "images" (1797),
    "splits" ({split: total}), "counts" ({split: {digit: count}})}.
    """
    from sklearn.datasets import load_digits

    size, val_ratio, test_ratio = _check_arguments(size, val_ratio, test_ratio)
    out_dir = Path(out_dir)
    _check_target(out_dir)
    digits = load_digits()
    splits = split_indices(digits.target, seed, val_ratio, test_ratio)
    counts = {split: {str(label): 0 for label in range(10)} for split in SPLITS}
    files = []
    with fileio.atomic_folder(out_dir) as tmp:
        for split, indices in splits.items():
            for index in indices:
                label = str(int(digits.target[index]))
                rel = image_path(split, label, index)
                path = tmp / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(render(digits.images[index], size)).convert("RGB").save(path, format="PNG")
                counts[split][label] += 1
                files.append(rel)
        summary = {"size": size, "seed": seed, "val_ratio": val_ratio, "test_ratio": test_ratio,
                   "images": sum(len(indices) for indices in splits.values()),
                   "splits": {split: len(splits[split]) for split in SPLITS}, "counts": counts}
        (tmp / README).write_text(_readme(summary), encoding="utf-8")
        manifest = {"generator": GENERATOR, "format": FORMAT_VERSION, **summary,
                    "files": sorted(files + [README])}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return {"path": str(out_dir), **summary}


def _check_arguments(size, val_ratio, test_ratio):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ConfigError(f"digits size {size!r} is not allowed: give a whole number of pixels of at least 8 "
                          "(the source images are 8x8; 28 is the default)")
    for name, ratio in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not 0 < ratio < 1:
            raise ConfigError(f"digits {name} {ratio!r} is not allowed: give a fraction between 0 and 1 "
                              "(0.15 is the default)")
    if val_ratio + test_ratio >= 1:
        raise ConfigError(f"digits val_ratio {val_ratio} + test_ratio {test_ratio} leave nothing for training; "
                          "make their sum less than 1")
    return int(size), float(val_ratio), float(test_ratio)


def is_digits_output(folder):
    """True if `folder` holds nothing but what a previous `write_digits` wrote there (by its digits.json)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        return False
    ours = set(manifest.get("files", [])) | {MANIFEST}
    folders = {str(Path(rel).parent) for rel in ours} | {str(Path(rel).parent.parent) for rel in ours}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or (path.is_dir() and rel not in folders) or (not path.is_dir() and rel not in ours):
            return False
    return True


def _check_target(out_dir):
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise DataError(f"cannot write the digits dataset to '{out_dir}': it is not a folder; "
                        "pass a new or empty folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_digits_output(out_dir):
        raise DataError(f"cannot write the digits dataset to '{out_dir}': the folder is not empty and is not a "
                        f"previous digits output (no {MANIFEST} listing all its files); pass a new or empty "
                        "folder, or remove this one yourself if nothing in it is needed")


def _readme(summary):
    counts = "\n".join(f"  {split:<5} {summary['splits'][split]:>4} images: "
                       + ", ".join(f"{label}: {n}" for label, n in summary["counts"][split].items())
                       for split in SPLITS)
    return f"""Handwritten digits (scikit-learn's copy of the UCI ML hand-written digits), as labelled PNGs

Source: sklearn.datasets.load_digits(), shipped with scikit-learn (no download). Its description says it is
a copy of the test set of the UCI ML hand-written digits dataset, "Optical Recognition of Handwritten
Digits", created by E. Alpaydin and C. Kaynak (Bogazici University, July 1998):
{UCI_URL}
Cite: C. Kaynak (1995) Methods of Combining Multiple Classifiers and Their Applications to Handwritten Digit
Recognition, MSc Thesis, Bogazici University; E. Alpaydin, C. Kaynak (1998) Cascading Classifiers,
Kybernetika.

Licence: scikit-learn's description of the dataset (load_digits().DESCR) states no licence. scikit-learn,
which ships the data file, is distributed under the BSD 3-Clause licence. The UCI repository lists the dataset
under the Creative Commons Attribution 4.0 International licence (CC BY 4.0); check the UCI page above
before redistributing these images.

How these files were made: each 8x8 image (values 0-16, the "on" pixels of a 4x4 block of a 32x32 bitmap) is
mapped to grey 255 * (1 - value / 16), i.e. inverted: a dark digit on a light background; upscaled to
{summary['size']}x{summary['size']} with Pillow's bilinear filter; rounded to 8 bits and saved as RGB PNG. The
file digit_NNNN.png is load_digits() image NNNN; its folder is its digit. Split: stratified per digit with
seed {summary['seed']}, val_ratio {summary['val_ratio']}, test_ratio {summary['test_ratio']}:
{counts}
Written by pipeline.data.digits.write_digits; digits.json lists the arguments and every file.
"""
