"""Finding a labelled image folder: layouts, archives, the default download, and hash-based split assignment."""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import tarfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import fileio
from pipeline.catalog import keras_home
from pipeline.errors import DataError
from pipeline.images import is_image_name

SPLITS = ("train", "val", "test")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")

# The default dataset: the snacks images of "Machine Learning by Tutorials", as published on Hugging Face.
SNACKS_URL = "https://huggingface.co/datasets/Matthijs/snacks/resolve/main/images.zip"
SNACKS_ARCHIVE = "snacks-images.zip"
SNACKS_COUNTS = {"train": 4838, "val": 955, "test": 952}

LAYOUTS_HELP = ("accepted layouts: (1) a folder with train/ and val/ (or valid/, validation/) and optionally "
                "test/, each holding one folder per class; (2) a folder holding one folder per class, "
                "which ingest splits itself; either may be packed as .zip or .tar.gz")


@dataclass(frozen=True)
class Layout:
    """A dataset folder as found: its root, its kind, and the folder of each split it has."""

    root: Path
    kind: str  # "splits" or "classes"
    split_dirs: dict


def is_archive(path):
    """True if the path names a dataset archive by its suffix."""
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def label_of(folder_name):
    """A class label from its folder name (Unicode NFC, so names typed on macOS and Linux agree)."""
    return unicodedata.normalize("NFC", folder_name)


def _subdirs(folder):
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def detect_layout(root):
    """Recognise the layout of a dataset folder, descending through single wrapper folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder '{root}' does not exist; pass --data PATH or set data.path in the config; "
                        f"{LAYOUTS_HELP}")
    while True:
        by_name = {p.name.lower(): p for p in _subdirs(root)}
        split_dirs = {}
        for split, names in SPLIT_FOLDERS.items():
            found = [by_name[n] for n in names if n in by_name]
            if found:
                split_dirs[split] = found[0]
        if "train" in split_dirs:
            if "val" not in split_dirs:
                raise DataError(f"dataset folder '{root}' has train/ but no validation folder "
                                f"(val/, valid/ or validation/); {LAYOUTS_HELP}")
            return Layout(root, "splits", split_dirs)
        subdirs = list(by_name.values())
        loose = [p for p in root.iterdir() if p.is_file() and is_image_name(p)]
        if len(subdirs) == 1 and not loose:
            inner = subdirs[0]
            if any(p.is_file() and is_image_name(p) for p in inner.iterdir()) and not _subdirs(inner):
                raise DataError(f"dataset folder '{root}' holds a single class folder ('{inner.name}'); at least "
                                f"two classes are needed; {LAYOUTS_HELP}")
            root = inner
            continue
        if len(subdirs) < 2:
            raise DataError(f"dataset folder '{root}' has {len(subdirs)} class folder(s); at least two classes "
                            f"are needed; {LAYOUTS_HELP}")
        return Layout(root, "classes", {})


def assign_split(sha256, seed, val_ratio, test_ratio):
    """The split of an image decided by its content hash alone, so adding images never moves existing ones."""
    u = int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < val_ratio:
        return "val"
    if u < val_ratio + test_ratio:
        return "test"
    return "train"


def unpack_archive(archive, sources_dir):
    """Unpack a dataset archive into sources_dir/<content hash>/ (once) and return that folder."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"dataset archive '{archive}' does not exist; pass --data PATH to a folder or archive")
    dest = Path(sources_dir) / fileio.sha256_file(archive)[:16]
    if (dest / ".complete").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                _check_members(archive, zf.namelist())
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                _check_members(archive, tf.getnames())
                tf.extractall(tmp, filter="data")
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"dataset archive '{archive}' cannot be unpacked ({exc}); "
                        "check the file is a complete .zip or .tar.gz") from exc
    (tmp / ".complete").write_text(str(archive))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _check_members(archive, names):
    for name in names:
        if name.startswith("/") or ".." in Path(name).parts:
            raise DataError(f"dataset archive '{archive}' holds an unsafe path '{name}'; refusing to unpack it")


def download_snacks():
    """Download the snacks archive into the Keras cache (once), unpack it, and check its image counts."""
    import tf_keras as keras

    # tf_keras's get_file ignores $KERAS_HOME, and uses /tmp/.keras if the cache folder does not exist yet.
    cache_dir = keras_home()
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        archive = keras.utils.get_file(SNACKS_ARCHIVE, origin=SNACKS_URL, cache_dir=str(cache_dir),
                                       cache_subdir="datasets")
    except Exception as exc:  # get_file raises several kinds for network failures
        raise DataError(f"no dataset given and downloading the snacks dataset from {SNACKS_URL} failed ({exc}); "
                        "pass --data PATH to a local copy, or set data.path in the config") from exc
    root = unpack_archive(archive, Path(archive).parent / "snacks")
    layout = detect_layout(root)
    counts = {split: sum(1 for p in folder.rglob("*") if p.is_file() and is_image_name(p))
              for split, folder in layout.split_dirs.items()}
    if counts != SNACKS_COUNTS:
        raise DataError(f"the downloaded snacks dataset at '{archive}' has {counts} images, the dataset card says "
                        f"{SNACKS_COUNTS}; delete '{archive}' and '{root}' and run again")
    return root
