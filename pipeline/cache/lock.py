"""One writing run at a time per artifacts folder: an exclusive lock on the folder itself while a run writes there.

The lock is the kernel's (`flock` on the folder), so it goes with its holder's process however that ends, SIGKILL
included: a killed run never leaves a stale lock behind. A process may take the lock of a folder it already holds
(a sweep holds its artifacts while each combination's run holds its own folder).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pipeline.errors import ArtifactsError

_held = {}  # this process's locks: the folder's resolved path -> [open descriptor, depth]


@contextlib.contextmanager
def holding(folder):
    """Hold the lock of the artifacts folder `folder` (created if missing) for the block.

    ArtifactsError if another process holds it, or if the folder cannot be created.
    """
    import fcntl

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = str(folder.resolve())
        if key in _held:
            _held[key][1] += 1
        else:
            fd = os.open(folder, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ArtifactsError(f"artifacts folder '{folder.absolute()}' is in use by another run; wait for it to "
                                     "finish, or pass --artifacts to another folder") from None
            _held[key] = [fd, 1]
    except OSError as exc:
        raise ArtifactsError.unwritable(folder, exc) from exc
    try:
        yield
    finally:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the descriptor releases the lock
