"""A folder's or archive's identity for a cache key: every file's name, size and content hash, so that a stage
reading it runs again when any of them changes, and only then."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline import fileio
from pipeline.data import dataset
from pipeline.errors import DataError


def source_fingerprint(path, sources_dir=None, follow_symlinks=False):
    """The identity of the folder or archive at `path`: its resolved path and every file's name, size and hash
    (a symbolic link not followed: its target's name, never its content; a file or folder that cannot be read:
    why, so that the key changes once it can be); an archive's hash; a missing path's name.

    sources_dir: where archives are unpacked; given, a damaged unpacked copy of the archive changes the key, so
    that the stage runs again and unpacks it anew.
    """
    path = Path(path).resolve()
    if path.is_file():
        return _archive_entry(path, sources_dir)
    if not path.is_dir():
        return {"missing": str(path)}
    return {"folder": str(path), "files": _file_entries(path, path, follow_symlinks, set())}


def _archive_entry(path, sources_dir):
    try:
        sha256 = _cached_hash(path)
    except OSError as exc:
        return {"archive": str(path), "sha256": f"unreadable: {dataset.os_reason(exc)}"}
    entry = {"archive": str(path), "sha256": sha256}
    copy = dataset.unpacked_folder(sources_dir, sha256) if sources_dir else None
    # An absent copy leaves the key as an intact one does: else the run that first unpacks it would be followed by
    # one more. After a damaged copy is unpacked again, ingest runs once more, to identical outputs.
    if copy and copy.exists() and (damage := dataset.unpacked_damage(copy)):
        entry["unpacked"] = f"damaged: {damage}"
    return entry


def _file_entries(folder, root, follow, seen):
    try:
        listing = dataset.list_folder(folder)
    except DataError as exc:
        return [[str(folder.relative_to(root)), "folder", f"unlistable: {dataset.os_reason(exc.__cause__)}"]]
    entries = []
    for p in listing:
        name = str(p.relative_to(root))
        if unfollowed_link(p, root, follow):
            entries.append([name, "link", os.readlink(p)])
        elif p.is_file():
            entries.append(_file_entry(p, name))
        elif p.is_dir() and (not p.is_symlink() or p.resolve() not in seen):
            if p.is_symlink():  # a folder link ingest may follow
                seen.add(p.resolve())
            entries += _file_entries(p, root, follow, seen)
    return entries


def _file_entry(path, name):
    size = None
    try:
        size = path.stat().st_size
        return [name, size, _cached_hash(path)]
    except OSError as exc:
        return [name, size, f"unreadable: {dataset.os_reason(exc)}"]


_HASHES = {}


def _cached_hash(path):
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)  # ctime: a chmod may make it unreadable
    if key not in _HASHES:
        _HASHES[key] = fileio.sha256_file(path)
    return _HASHES[key]


def unfollowed_link(path, root, follow):
    """Why ingest does not follow `path` if it is a symbolic link that is broken, or (unless `follow`) leads
    outside the resolved dataset folder `root`; None for anything else."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # a missing target, or a loop
        return f"broken symbolic link to '{os.readlink(path)}' (missing, or a loop)"
    if follow or target.is_relative_to(root):
        return None
    return (f"symbolic link to '{target}', outside the dataset folder '{root}'; not read "
            "(set ingest.follow_symlinks: true to read such links)")
