"""The photos of none of the classes (`evaluate.unknown_data`): found in a folder or an archive, and identified
for the evaluate stage's cache key."""
from __future__ import annotations

from pathlib import Path

from pipeline.data import dataset
from pipeline.data.fingerprint import source_fingerprint
from pipeline.data.images import images_under
from pipeline.errors import DataError

KEY = "evaluate.unknown_data"


def fingerprint(cfg, sources_dir=None):
    """The unknown photos' identity for the evaluate stage's cache key (None when evaluate.unknown_data is unset)."""
    if cfg.evaluate.unknown_data is None:
        return None
    # every file the stage reads counts, through links too
    return source_fingerprint(cfg.evaluate.unknown_data, sources_dir, follow_symlinks=True)


def image_paths(path, sources_dir, limits):
    """Every image file (by its name) under the folder `path`, or under the archive `path` unpacked into
    `sources_dir` (within `limits`' max_archive_gb and max_compression_ratio, as a dataset archive is), sorted; an
    error names the key and the fix when there is none."""
    path = Path(path)
    if dataset.is_archive(path) and path.is_file():
        folder = dataset.unpack_archive(path, sources_dir, limits)
    elif path.is_dir():
        folder = path
    else:
        raise DataError(f"{KEY} '{path}' is not a folder or a .zip/.tar.gz archive: give a folder of photos that "
                        "show none of the classes, or set it to null")
    found = images_under(folder)
    if not found:
        raise DataError(f"{KEY} '{path}' holds no image files (.jpg, .png, ...): add photos that show none of the "
                        "classes, or set it to null")
    return found
