"""Computed features kept between runs, under a key of everything they depend on, so other runs reuse them.

The frozen backbone's outputs for fixed views of the images (train-head's pooled features, cached
fine-tuning's activations at its cut point) depend on the images, the frozen layers, the view and the code that
computes them, but not on what trains on them. The stage folders are replaced whenever a training setting
changes, so these outputs live here instead: a run (or a sweep combination) that changes only the head or the
fine-tuning settings finds them and skips straight to training. Each entry is a sealed folder named by its key
(pipeline.cache.sealed_folder): `entry.json`, written last, records the digest of each file, and an entry whose
files do not match it is discarded and recomputed, never used. The least recently used entries beyond `keep`
are removed, so the store holds a few datasets' outputs at most.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.cache.sealed_folder import SealedFolder, first_difference, read_manifest

log = logging.getLogger("pipeline.cache.feature_store")

ENTRY = "entry.json"


class FeatureStore:
    """A folder of entries, each a folder of files computed once for one key."""

    group = None
    """Worker processes that compute its entries together (pipeline.train.view_store.SharedWork), or None."""

    def __init__(self, root, keep=24):
        self.root, self.keep = Path(root), keep

    @property
    def scratch(self):
        """Where entries are written before they are renamed into place."""
        return self.root / ".tmp"

    @property
    def shares(self):
        """Where worker processes that compute entries together keep their shares until the entries are stored."""
        return self.root / ".shares.tmp"

    def folder(self, key):
        """The folder entry `key` is (or would be) kept in."""
        return self.root / key

    def get(self, key):
        """The folder of entry `key` if it is complete and unaltered (its use recorded), else None."""
        folder = self.folder(key)
        if not folder.exists():
            return None
        problem = _problem(folder)
        if problem:
            log.warning("feature store entry %s is incomplete or altered (%s); computing it again", folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        os.utime(folder / ENTRY)  # most recently used
        return folder

    def get_or_make(self, key, make, what="features"):
        """The folder of entry `key`, made by `make(folder)` (which writes its files there) unless present.

        Returns (folder, reused).
        """
        found = self.get(key)
        if found is not None:
            log.info("reusing %s computed by an earlier run (%s)", what, found)
            return found, True
        return self.make_several([key], lambda folders: make(folders[0]))[0], False

    def make_several(self, keys, make):
        """Make the entries `keys` together: `make(folders)` writes each one's files into its folder (one
        computation with several results). Returns their folders; none is stored unless all are written."""
        # Not replacing: an entry another run stored under the same key meanwhile is the same computation.
        with contextlib.ExitStack() as stack:
            entries = [stack.enter_context(SealedFolder(self.folder(key), self.scratch, ENTRY, "files",
                                                        replace=False)) for key in keys]
            make([entry.path for entry in entries])
            for key, entry in zip(keys, entries):
                entry.seal({"key": key, "made": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self._evict(keep_keys=set(keys))
        return [self.folder(key) for key in keys]

    def remove_leftovers(self):
        """Remove the temporary folders of writes that never finished (a killed run's); call with the lock held."""
        for leftover in [self.scratch, *self.root.glob(".*.tmp")] if self.root.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)

    def _evict(self, keep_keys):
        entries = sorted((p for p in self.root.iterdir() if (p / ENTRY).is_file() and p.name not in keep_keys),
                         key=lambda p: (p / ENTRY).stat().st_mtime, reverse=True)
        for old in entries[max(self.keep - len(keep_keys), 0):]:
            log.info("feature store: removing the least recently used entry %s", old)
            shutil.rmtree(old, ignore_errors=True)


class ChiefsStore(FeatureStore):
    """A worker's view of the chief worker's feature store, when several worker processes run one training stage:
    entries are read from the chief's store, and this worker writes none there (the chief stores what the workers
    compute together: pipeline.train.view_store)."""

    def __init__(self, chiefs):
        super().__init__(chiefs.root, chiefs.keep)

    def get(self, key):
        """The folder of entry `key` if the chief has stored it whole, else None (as the chief's own `get` decides,
        but reading only: an altered entry is left to the chief to remove)."""
        folder = self.folder(key)
        return folder if folder.exists() and not _problem(folder) else None

    def make_several(self, keys, make):
        raise RuntimeError("a worker that is not the chief writes no feature-store entry")

    def remove_leftovers(self):
        """Nothing: the leftovers are the chief's to remove."""


def _problem(folder):
    """What is wrong with the entry in `folder` (no entry.json, a file altered or missing), or None."""
    try:
        entry = read_manifest(folder, ENTRY, "files")
        return "no entry.json" if entry is None else first_difference(folder, entry["files"])
    except (OSError, ValueError) as exc:
        return str(exc)
