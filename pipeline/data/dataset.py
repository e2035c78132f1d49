"""Finding a labelled image folder: layouts, archives, the default download, and hash-based split assignment."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline import fileio
from pipeline.data.images import is_image_name
from pipeline.environment import keras_home
from pipeline.errors import DataError

log = logging.getLogger("pipeline.dataset")

SPLITS = ("train", "val", "test")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
COMPLETE = ".complete"  # an unpacked archive's marker, written last: the archive and the size of every file

# The default dataset: the snacks images of "Machine Learning by Tutorials", as published on Hugging Face.
SNACKS_URL = "https://huggingface.co/datasets/Matthijs/snacks/resolve/main/images.zip"
SNACKS_ARCHIVE = "snacks-images.zip"
SNACKS_COUNTS = {"train": 4838, "val": 955, "test": 952}

LAYOUTS_HELP = ("accepted layouts: (1) a folder with train/ and val/ (or valid/, validation/) and optionally "
                "test/, each holding one folder per class; (2) a folder holding one folder per class, "
                "which ingest splits itself; either may be packed as .zip or .tar.gz")


@dataclass(frozen=True)
class Layout:
    """A dataset folder as found: its root, its kind, the folder of each split it has, and the folder it was
    found from (root, or a folder wrapping it), which symbolic links may not lead out of."""

    root: Path
    kind: str  # "splits" or "classes"
    split_dirs: dict
    source: Path


def is_archive(path):
    """True if the path names a dataset archive by its suffix."""
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def label_of(folder_name):
    """A class label from its folder name (Unicode NFC, so names typed on macOS and Linux agree)."""
    return unicodedata.normalize("NFC", folder_name)


def os_reason(exc):
    """The OS's words for an OSError (e.g. 'Permission denied'), without the path the message would repeat."""
    return exc.strerror or str(exc)


def list_folder(folder):
    """The entries of a dataset folder, sorted; a DataError naming the folder and the fix if it cannot be listed."""
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
        for entry in entries:
            entry.lstat()  # a folder that can be read but not searched (no x bit) lists names that cannot be opened
    except OSError as exc:
        raise DataError(f"dataset folder '{folder}' cannot be listed ({os_reason(exc)}); fix its permissions "
                        f"(chmod -R a+rX '{folder}') or remove it from the dataset") from exc
    return entries


def walk(folder):
    """Every file and folder beneath `folder`, depth first in sorted order (as sorted(folder.rglob('*')) gives
    them), never descending into a symbolic link; a DataError if a folder on the way cannot be listed."""
    for entry in list_folder(folder):
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            yield from walk(entry)


def _subdirs(folder):
    return [p for p in list_folder(folder) if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]


def detect_layout(root):
    """Recognise the layout of a dataset folder, descending through single wrapper folders."""
    root = source = Path(root)
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
            return Layout(root, "splits", split_dirs, source)
        subdirs = list(by_name.values())
        loose = [p for p in list_folder(root) if p.is_file() and is_image_name(p)]
        if len(subdirs) == 1 and not loose:
            inner = subdirs[0]
            if any(p.is_file() and is_image_name(p) for p in list_folder(inner)) and not _subdirs(inner):
                raise DataError(f"dataset folder '{root}' holds a single class folder ('{inner.name}'); at least "
                                f"two classes are needed; {LAYOUTS_HELP}")
            root = inner
            continue
        if len(subdirs) < 2:
            raise DataError(f"dataset folder '{root}' has {len(subdirs)} class folder(s); at least two classes "
                            f"are needed; {LAYOUTS_HELP}")
        return Layout(root, "classes", {}, source)


def assign_split(sha256, seed, val_ratio, test_ratio):
    """The split of an image decided by its content hash alone, so adding images never moves existing ones."""
    u = int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < val_ratio:
        return "val"
    if u < val_ratio + test_ratio:
        return "test"
    return "train"


def unpack_archive(archive, sources_dir, limits):
    """Unpack a dataset archive into sources_dir/<content hash>/ (once) and return that folder.

    limits: the ingest config, whose max_archive_gb and max_compression_ratio bound what the archive may
    unpack; they are checked from the member headers first and enforced again while unpacking. Members that
    would land or link outside the folder are refused. On any failure nothing is left in sources_dir.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"dataset archive '{archive}' does not exist; pass --data PATH to a folder or archive")
    dest = unpacked_folder(sources_dir, _archive_hash(archive))
    if dest.exists():
        damage = unpacked_damage(dest)
        if damage is None:
            return dest
        log.warning("the unpacked copy '%s' of dataset archive '%s' cannot be reused as it is (%s); unpacking it "
                    "again", dest, archive, damage)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _make_unpack_folder(tmp, archive)
    try:
        budget = _Budget(archive, limits)
        if archive.name.lower().endswith(".zip"):
            _unpack_zip(archive, tmp, budget)
        else:
            _unpack_tar(archive, tmp, budget)
        fileio.write_json(tmp / COMPLETE, {"archive": str(archive), "files": _regular_files(tmp)})
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error,
            NotImplementedError) as exc:  # the last: a compression method zipfile does not support
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"dataset archive '{archive}' cannot be unpacked ({exc}); "
                        "check the file is a complete .zip or .tar.gz") from exc
    except BaseException:  # a refusal, or an interrupt: never leave a half-unpacked folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _archive_hash(archive):
    try:
        return fileio.sha256_file(archive)
    except OSError as exc:
        raise DataError(f"dataset archive '{archive}' cannot be read ({os_reason(exc)}); fix its permissions "
                        f"(chmod a+r '{archive}') or pass --data to a readable copy") from exc


def unpacked_folder(sources_dir, sha256):
    """Where unpack_archive unpacks the archive of content hash `sha256` under `sources_dir`."""
    return Path(sources_dir) / sha256[:16]


def unpacked_damage(folder):
    """Why an archive's unpacked copy `folder` cannot be reused as it is (its marker missing or of an older
    version, a file the marker lists missing or of another size), or None if it is intact."""
    try:
        files = fileio.read_json(folder / COMPLETE)["files"]
        if not isinstance(files, dict):
            raise TypeError("no file list")
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {COMPLETE} marker is missing, or from an older version without the list of its files"
    for name, size in files.items():
        try:
            info = (folder / name).lstat()
        except OSError as exc:
            return f"'{name}' is gone ({os_reason(exc)})"
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return f"'{name}' has changed"
    return None


def _regular_files(folder):
    """{path relative to `folder`: size} of every regular file beneath it (links and folders left out)."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath, name)
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                files[path.relative_to(folder).as_posix()] = info.st_size
    files.pop(COMPLETE, None)  # a member of that name is replaced by the marker
    return dict(sorted(files.items()))


def _make_unpack_folder(folder, archive):
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise DataError(f"cannot unpack dataset archive '{archive}': the folder '{folder.parent}' is not writable "
                        f"({exc}); fix its permissions or pass --artifacts to a writable folder, or unpack the "
                        "archive yourself and pass --data FOLDER") from exc


def _size(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class _Budget:
    """What an archive may unpack: at most ingest.max_archive_gb, and at most ingest.max_compression_ratio
    times the archive's own size. Photos barely compress, so a far higher ratio is an archive bomb."""

    def __init__(self, archive, limits):
        self.archive = archive
        self.limits = limits
        self.archive_size = max(archive.stat().st_size, 1)
        self.written = 0

    def check_declared(self, total):
        """Refuse the archive if its member headers add up to more than the limits allow."""
        self._check(total, f"would unpack to {_size(total)}")

    def copy(self, src, dst):
        """Copy one member's data, counting it against the limits: headers can understate sizes."""
        while block := src.read(1 << 20):
            self.written += len(block)
            self._check(self.written, f"unpacks to more than its headers declare ({_size(self.written)} so far)")
            dst.write(block)

    def _check(self, total, what):
        gb, ratio = self.limits.max_archive_gb, self.limits.max_compression_ratio
        if total > gb * 1e9:
            raise DataError(f"dataset archive '{self.archive}' {what}, more than ingest.max_archive_gb "
                            f"({gb:g} GB); refusing to unpack it; if the archive is genuine, raise "
                            "ingest.max_archive_gb in the config")
        if total > ratio * self.archive_size:
            raise DataError(f"dataset archive '{self.archive}' {what}, {total / self.archive_size:,.0f} times its "
                            f"own size ({_size(self.archive_size)}), more than ingest.max_compression_ratio "
                            f"({ratio:g}), as an archive bomb would; refusing to unpack it; if the archive is "
                            "genuine, raise ingest.max_compression_ratio in the config")


def _unpack_zip(archive, dest, budget):
    # zipfile never makes links: a link member is unpacked as a small file holding the target's name.
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        _check_members(archive, [m.filename for m in members])
        encrypted = [m.filename for m in members if m.flag_bits & 0x1]
        if encrypted:
            raise DataError(f"dataset archive '{archive}' holds encrypted files ('{encrypted[0]}'...); unpack it "
                            "with its password and pass --data FOLDER")
        budget.check_declared(sum(m.file_size for m in members))
        for member in members:
            target = _make_place(dest, member.filename, member.is_dir())
            if target is None:
                continue
            with zf.open(member) as src, open(target, "wb") as dst:
                budget.copy(src, dst)


def _unpack_tar(archive, dest, budget):
    # Our own extraction rather than extractall: it counts bytes, and it checks links from the headers alone
    # (no realpath on a half-built tree). Symbolic links are made last, so nothing is ever written through one.
    with tarfile.open(archive) as tf:
        members = []
        for member in tf:
            members.append(member)
            budget.check_declared(tf.offset)  # the stream read so far: a header bomb is stopped early too
        _check_members(archive, [m.name for m in members])
        _check_tar_links(archive, members)
        symlinks = []
        for member in members:
            target = _make_place(dest, member.name, member.isdir())
            if target is None:
                continue
            if member.isreg():
                with tf.extractfile(member) as src, open(target, "wb") as dst:
                    budget.copy(src, dst)
            elif member.islnk():
                os.link(_member_path(dest, posixpath.normpath(member.linkname)), target)  # checked: no links on the way
            else:
                symlinks.append((target, member.linkname))
        for target, linkname in symlinks:
            os.symlink(linkname, target)


def _make_place(dest, name, is_dir):
    """Make the folder of member `name` under `dest`: the member's own for a folder (then None), else its
    parent (then the path to write it to)."""
    target = _member_path(dest, name)
    if is_dir:
        target.mkdir(parents=True, exist_ok=True)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _member_path(dest, name):
    return dest.joinpath(*PurePosixPath(name).parts)


def _check_members(archive, names):
    for name in names:
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise DataError(f"dataset archive '{archive}' holds an unsafe path '{name}'; refusing to unpack it")


def _key(parts):
    # How a file system may compare names: case-insensitively (macOS, Windows) and after Unicode normalisation.
    return tuple(unicodedata.normalize("NFC", part).casefold() for part in parts)


def _check_tar_links(archive, members):
    """Refuse special files, members inside a link, and links that lead outside the archive or through a link."""
    links = {_key(PurePosixPath(m.name).parts) for m in members if m.issym() or m.islnk()}
    files = set()
    for member in members:
        parts = PurePosixPath(member.name).parts
        inside = next((parts[:i] for i in range(1, len(parts)) if _key(parts[:i]) in links), None)
        if inside:
            raise DataError(f"dataset archive '{archive}' holds '{member.name}', which lies inside the link "
                            f"'{'/'.join(inside)}'; refusing to unpack it")
        if member.issym() or member.islnk():
            base = parts[:-1] if member.issym() else ()  # a hard link's target is named from the archive's top
            target = _link_target(base, member.linkname, links)
            if target is None:
                raise DataError(f"dataset archive '{archive}' holds a link '{member.name}' -> '{member.linkname}' "
                                "that leads outside the archive or through another link; refusing to unpack it")
            if member.islnk() and _key(target) not in files:
                raise DataError(f"dataset archive '{archive}' holds a hard link '{member.name}' to "
                                f"'{member.linkname}', which is not a file earlier in the archive; refusing to "
                                "unpack it")
        elif member.isreg():
            files.add(_key(parts))
        elif not member.isdir():
            raise DataError(f"dataset archive '{archive}' holds '{member.name}', a device or FIFO, not a file; "
                            "refusing to unpack it")


def _link_target(base, linkname, links):
    """The archive path `linkname` leads to from folder `base`, or None if it leaves the archive or goes on
    through another link (where '..' would no longer mean the folder above)."""
    if linkname.startswith("/"):
        return None
    path = list(base)
    parts = PurePosixPath(linkname).parts
    for i, part in enumerate(parts):
        if part == "..":
            if not path:
                return None
            path.pop()
            continue
        path.append(part)
        if i < len(parts) - 1 and _key(path) in links:
            return None
    return tuple(path)


def download_snacks(limits):
    """Download the snacks archive into the Keras cache (once), unpack it within `limits` (the ingest config),
    and check its image counts."""
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
    root = unpack_archive(archive, Path(archive).parent / "snacks", limits)
    layout = detect_layout(root)
    counts = {split: sum(1 for p in folder.rglob("*") if p.is_file() and is_image_name(p))
              for split, folder in layout.split_dirs.items()}
    if counts != SNACKS_COUNTS:
        raise DataError(f"the downloaded snacks dataset at '{archive}' has {counts} images, the dataset card says "
                        f"{SNACKS_COUNTS}; delete '{archive}' and '{root}' and run again")
    return root
