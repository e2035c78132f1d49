"""One writing run at a time per artifacts folder: an exclusive lock on the folder itself while a run writes there.

The lock is the kernel's (`flock` on the folder), so it goes with its holder's process however that ends, SIGKILL
included: a killed run never leaves a stale lock behind. A process may take the lock of a folder it already holds
(a sweep holds its artifacts while each combination's run holds its own folder). The holder writes its PID and
command beside the lock, so a second run can say which run it waits for.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

from pipeline.errors import ArtifactsError

HOLDER = ".lock-holder.json"  # who holds the lock; only meaningful while the lock is held

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
                raise ArtifactsError(f"artifacts folder '{folder.absolute()}' is in use by another run"
                                     f"{_holder(folder)}; wait for it to finish, or pass --artifacts to another "
                                     "folder") from None
            _held[key] = [fd, 1]
            _write_holder(folder)
    except OSError as exc:
        raise ArtifactsError.unwritable(folder, exc) from exc
    try:
        yield
    finally:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            with contextlib.suppress(OSError):
                (folder / HOLDER).unlink()
            os.close(entry[0])  # closing the descriptor releases the lock


def _write_holder(folder):
    program = Path(sys.argv[0])
    program = f"python -m {program.parent.name}" if program.name == "__main__.py" else program.name
    record = {"pid": os.getpid(), "command": " ".join([program, shlex.join(sys.argv[1:])]).strip(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = folder / f"{HOLDER}.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / HOLDER)


def _holder(folder):
    """' (PID n: command, since time)' from the holder's record, or '' if it cannot be read."""
    try:
        record = json.loads((folder / HOLDER).read_text())
        return f" (PID {record['pid']}: {record['command']}, since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
