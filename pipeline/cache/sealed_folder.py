"""A folder written whole or not at all: built in a temporary folder, sealed by a manifest of every file's SHA-256
written last, and renamed into place. A folder without its manifest, or whose files differ from it, is never
taken as valid. The stages' outputs, the feature store's entries and a sweep's reused stages are all such
folders.
"""
from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path

from pipeline import fileio


def file_digests(folder, exclude=()):
    """{path relative to `folder`: SHA-256} of every file beneath it but those at the relative paths `exclude`."""
    folder = Path(folder)
    return {rel: fileio.sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and (rel := p.relative_to(folder).as_posix()) not in exclude}


def first_difference(folder, recorded):
    """How the files beneath `folder` first differ from `recorded` ({relative path: SHA-256}): `<path> missing`
    or `<path> modified`; None when every recorded file is there with its digest."""
    for rel, digest in recorded.items():
        path = Path(folder) / rel
        if not path.is_file():
            return f"{rel} missing"
        if fileio.sha256_file(path) != digest:
            return f"{rel} modified"
    return None


class SealedFolder:
    """Builds the folder `final` in a new folder under `scratch`; use as a context manager.

    Inside the block, write the files into `.path`, then call `seal(record)`. On leaving the block after a seal,
    the folder is renamed onto `final`; an existing `final` is replaced if `replace`, else kept (another writer
    of the same content was first) and the new one dropped. Leaving by an exception, or without a seal, drops
    the new folder and leaves `final` as it was.
    manifest: the manifest's file name; digests_field: the manifest key of the {relative path: SHA-256} map.
    """

    def __init__(self, final, scratch, manifest, digests_field, replace=True):
        self.final, self.scratch, self.manifest = Path(final), Path(scratch), manifest
        self.digests_field, self.replace = digests_field, replace
        self.path = self.scratch / uuid.uuid4().hex
        self.sealed = None

    def __enter__(self):
        self.path.mkdir(parents=True, exist_ok=True)  # the caller may have made it, to report its own error
        return self

    def seal(self, record):
        """Write the manifest, `record` plus the digest of every file now in the folder, last. Returns it."""
        manifest = {**record, self.digests_field: file_digests(self.path, exclude={self.manifest})}
        fileio.write_json(self.path / self.manifest, manifest)
        self.sealed = manifest
        return manifest

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and self.sealed is not None:
                self._move_into_place()
        finally:
            shutil.rmtree(self.path, ignore_errors=True)
            with contextlib.suppress(OSError):  # the scratch folder too, unless another writer is using it
                self.scratch.rmdir()

    def _move_into_place(self):
        if self.final.exists():
            if not self.replace:
                return
            self.final.rename(self.scratch / f"old-{uuid.uuid4().hex}")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path.rename(self.final)
        for old in self.scratch.glob("old-*"):
            shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder, manifest, digests_field):
    """The manifest of a sealed folder, or None if it is absent; ValueError if it is not a manifest."""
    try:
        record = fileio.read_json(Path(folder) / manifest)
    except FileNotFoundError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get(digests_field), dict):
        raise ValueError(f"{Path(folder) / manifest} is not a manifest (no '{digests_field}' map)")
    return record
