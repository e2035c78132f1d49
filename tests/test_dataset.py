"""pipeline.data.dataset: layouts, hash-based splits, archives and the (offline) default download."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import zipfile
from collections import Counter

import pytest
from conftest import CLASSES, log_records, make_class_dataset, make_split_dataset, write_images, zip_folder

from pipeline import fileio
from pipeline.config import IngestConfig
from pipeline.data import dataset
from pipeline.data.dataset import assign_split, detect_layout, unpack_archive
from pipeline.errors import DataError

LIMITS = IngestConfig()  # the default archive limits

TINY = {"train": 1, "val": 1, "test": 1}


# -- layouts ---------------------------------------------------------------------------------------

def test_train_val_test_layout(tmp_path):
    root = make_split_dataset(tmp_path / "d", counts=TINY)
    layout = detect_layout(root)
    assert layout.kind == "splits" and layout.root == root
    assert layout.split_dirs == {"train": root / "train", "val": root / "val", "test": root / "test"}


@pytest.mark.parametrize("val_name", ["valid", "validation", "Val"])
def test_train_and_other_validation_names(tmp_path, val_name):
    root = make_split_dataset(tmp_path / "d", counts={"train": 1, val_name: 1}, splits=("train", val_name))
    layout = detect_layout(root)
    assert layout.kind == "splits"
    assert layout.split_dirs == {"train": root / "train", "val": root / val_name}  # no test


def test_bare_class_folders(tmp_path):
    root = make_class_dataset(tmp_path / "d", count=1)
    (root / ".git").mkdir()  # hidden folders are not classes
    layout = detect_layout(root)
    assert layout.kind == "classes" and layout.root == root and layout.split_dirs == {}


def test_layout_inside_one_wrapper_folder(tmp_path):
    outer = tmp_path / "unzipped"
    root = make_split_dataset(outer / "snacks", counts=TINY)
    (outer / "__MACOSX" / "snacks").mkdir(parents=True)  # as zips made on a Mac have
    layout = detect_layout(outer)
    assert layout.kind == "splits" and layout.root == root
    assert layout.split_dirs["train"] == root / "train"


def test_bare_layout_inside_two_wrapper_folders(tmp_path):
    root = make_class_dataset(tmp_path / "a" / "b" / "photos", count=1)
    layout = detect_layout(tmp_path / "a")
    assert layout.kind == "classes" and layout.root == root


def assert_layout_error(excinfo, folder):
    message = str(excinfo.value)
    assert str(folder) in message
    assert "accepted layouts" in message and "train/" in message and "one folder per class" in message


def test_missing_folder_is_an_error(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as excinfo:
        detect_layout(folder)
    assert_layout_error(excinfo, folder)


def test_train_without_validation_is_an_error(tmp_path):
    root = make_split_dataset(tmp_path / "d", counts={"train": 1, "test": 1}, splits=("train", "test"))
    with pytest.raises(DataError, match="no validation folder") as excinfo:
        detect_layout(root)
    assert_layout_error(excinfo, root)


def test_single_class_folder_is_an_error(tmp_path):
    root = tmp_path / "d"
    write_images(root / "circle", "circle", 2)
    with pytest.raises(DataError, match="at least two classes") as excinfo:
        detect_layout(root)
    assert_layout_error(excinfo, root)
    assert "single class folder ('circle')" in str(excinfo.value)


def test_empty_folder_is_an_error(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    with pytest.raises(DataError, match="at least two classes") as excinfo:
        detect_layout(root)
    assert_layout_error(excinfo, root)


# -- split assignment ------------------------------------------------------------------------------

FAKE_HASHES = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]


def test_assign_split_is_deterministic():
    first = [assign_split(h, 0, 0.15, 0.15) for h in FAKE_HASHES]
    assert first == [assign_split(h, 0, 0.15, 0.15) for h in FAKE_HASHES]
    other_seed = [assign_split(h, 1, 0.15, 0.15) for h in FAKE_HASHES]
    assert sum(a != b for a, b in zip(first, other_seed)) > 500  # the seed reshuffles


@pytest.mark.parametrize("val_ratio, test_ratio", [(0.15, 0.15), (0.1, 0.3), (0.25, 0.05)])
def test_assign_split_follows_the_ratios(val_ratio, test_ratio):
    counts = Counter(assign_split(h, 0, val_ratio, test_ratio) for h in FAKE_HASHES)
    n = len(FAKE_HASHES)
    assert set(counts) == {"train", "val", "test"}
    assert counts["val"] / n == pytest.approx(val_ratio, abs=0.025)
    assert counts["test"] / n == pytest.approx(test_ratio, abs=0.025)


def test_assign_split_never_moves_an_image_when_the_ratio_is_zero():
    assert {assign_split(h, 0, 0.0, 0.0) for h in FAKE_HASHES} == {"train"}


# -- archives --------------------------------------------------------------------------------------

def tar_folder(folder, archive):
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_unpack_archive_once(tmp_path, suffix):
    data = make_class_dataset(tmp_path / "shapes", count=2)
    archive = tmp_path / f"shapes{suffix}"
    (zip_folder if suffix == ".zip" else tar_folder)(data, archive)
    sources = tmp_path / "sources"

    dest = unpack_archive(archive, sources, LIMITS)
    assert dest.parent == sources and dest.name == hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    layout = detect_layout(dest)
    assert layout.kind == "classes" and layout.root == dest / "shapes"
    for label in CLASSES:
        assert (dest / "shapes" / label / "img_000.jpg").read_bytes() == (data / label / "img_000.jpg").read_bytes()

    marker = dest / "marker"
    marker.write_text("a re-extraction would delete me")
    assert unpack_archive(archive, sources, LIMITS) == dest
    assert marker.is_file()
    assert sorted(p.name for p in sources.iterdir()) == [dest.name]  # no leftover temporary folder


def test_unpacked_copy_lists_its_files(tmp_path):
    data = make_class_dataset(tmp_path / "shapes", count=2)
    dest = unpack_archive(zip_folder(data, tmp_path / "shapes.zip"), tmp_path / "sources", LIMITS)
    marker = fileio.read_json(dest / ".complete")
    assert marker["files"] == {f"shapes/{p.relative_to(data).as_posix()}": p.stat().st_size
                               for p in data.rglob("*") if p.is_file()}


@pytest.fixture
def dataset_warnings():
    """The warnings logged by pipeline.data.dataset."""
    with log_records("pipeline.dataset", logging.WARNING) as records:
        yield records


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
@pytest.mark.parametrize("damage", ["deleted", "shortened", "old marker"])
def test_damaged_unpacked_copy_is_unpacked_again(tmp_path, suffix, damage, dataset_warnings):
    data = make_class_dataset(tmp_path / "shapes", count=2)
    archive = tmp_path / f"shapes{suffix}"
    (zip_folder if suffix == ".zip" else tar_folder)(data, archive)
    sources = tmp_path / "sources"
    dest = unpack_archive(archive, sources, LIMITS)
    image = dest / "shapes" / "circle" / "img_001.jpg"
    original = image.read_bytes()
    if damage == "deleted":
        image.unlink()
    elif damage == "shortened":
        image.write_bytes(original[:100])
    else:
        (dest / ".complete").write_text(str(archive))  # as earlier versions wrote it
    assert unpack_archive(archive, sources, LIMITS) == dest
    assert image.read_bytes() == original
    assert [r.levelno for r in dataset_warnings] == [logging.WARNING]
    message = dataset_warnings[0].getMessage()
    assert f"'{dest}'" in message and f"'{archive}'" in message and "unpacking it again" in message
    assert sorted(p.name for p in sources.iterdir()) == [dest.name]
    assert unpack_archive(archive, sources, LIMITS) == dest and len(dataset_warnings) == 1  # intact again


@pytest.mark.parametrize("suffix, content", [(".zip", b"PK\x03\x04 not really a zip"),
                                             (".tar.gz", b"\x1f\x8b\x08 not really gzip"),
                                             (".zip", None)])
def test_corrupt_archive_names_the_file(tmp_path, suffix, content):
    archive = tmp_path / f"broken{suffix}"
    if content is None:  # a real zip cut short
        zip_folder(make_class_dataset(tmp_path / "shapes", count=2), tmp_path / "whole.zip")
        content = (tmp_path / "whole.zip").read_bytes()[:-200]
    archive.write_bytes(content)
    sources = tmp_path / "sources"
    with pytest.raises(DataError, match="cannot be unpacked") as excinfo:
        unpack_archive(archive, sources, LIMITS)
    assert str(archive) in str(excinfo.value)
    assert not any(p.is_dir() and (p / ".complete").exists() for p in sources.iterdir())


def test_missing_archive_names_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as excinfo:
        unpack_archive(tmp_path / "gone.zip", tmp_path / "sources", LIMITS)
    assert str(tmp_path / "gone.zip") in str(excinfo.value)


def evil_zip(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("shapes/circle/a.jpg", b"x")
        zf.writestr("../evil.txt", b"gotcha")


def evil_tar(path):
    with tarfile.open(path, "w:gz") as tf:
        for name in ("shapes/circle/a.jpg", "../evil.txt"):
            info = tarfile.TarInfo(name)
            info.size = 6
            tf.addfile(info, io.BytesIO(b"gotcha"))


@pytest.mark.parametrize("suffix, build", [(".zip", evil_zip), (".tar.gz", evil_tar)])
def test_archive_with_parent_path_is_refused(tmp_path, suffix, build):
    archive = tmp_path / "in" / f"evil{suffix}"
    archive.parent.mkdir()
    build(archive)
    sources = tmp_path / "work" / "sources"
    with pytest.raises(DataError, match="unsafe path '../evil.txt'") as excinfo:
        unpack_archive(archive, sources, LIMITS)
    assert str(archive) in str(excinfo.value)
    assert not [p for p in tmp_path.rglob("evil.txt")]
    assert not [p for p in tmp_path.rglob("a.jpg")]  # nothing at all was extracted
    assert not list(sources.iterdir())  # and no half-made folder is left behind


TAR_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}


def tar_members(path, members):
    """A .tar.gz of (name, kind, value) members: a file's bytes, or a link's target (kinds: TAR_TYPES)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.type = TAR_TYPES[kind]
            if kind == "file":
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))
            else:
                info.linkname = value or ""
                tf.addfile(info)
    return path


def pack(path, files):
    """A deflated .zip or a .tar.gz (by the suffix) of (name, bytes) files."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in files:
                zf.writestr(name, data)
        return path
    return tar_members(path, [(name, "file", data) for name, data in files])


def assert_nothing_left(sources):
    assert not sources.exists() or not list(sources.iterdir())


ZEROS = b"\0" * 2_000_000  # deflates about 1000 times: a small archive bomb


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_bomb_is_refused_before_unpacking(tmp_path, suffix):
    archive = pack(tmp_path / f"bomb{suffix}", [("shapes/circle/a.jpg", b"x"), ("shapes/zeros.bin", ZEROS)])
    assert archive.stat().st_size < 20_000
    sources = tmp_path / "sources"
    with pytest.raises(DataError) as excinfo:
        unpack_archive(archive, sources, LIMITS)
    message = str(excinfo.value)
    assert str(archive) in message and "would unpack to 2.0 MB" in message  # from the headers, before unpacking
    assert "ingest.max_compression_ratio (100)" in message and "raise ingest.max_compression_ratio" in message
    assert_nothing_left(sources)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_bomb_unpacks_when_the_ratio_is_raised(tmp_path, suffix):
    archive = pack(tmp_path / f"bomb{suffix}", [("shapes/circle/a.jpg", b"x"), ("shapes/zeros.bin", ZEROS)])
    dest = unpack_archive(archive, tmp_path / "sources", IngestConfig(max_compression_ratio=5000))
    assert (dest / "shapes" / "zeros.bin").read_bytes() == ZEROS


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_over_max_archive_gb_is_refused(tmp_path, suffix):
    photos = os.urandom(300_000)  # incompressible, like JPEGs
    archive = pack(tmp_path / f"big{suffix}", [("shapes/circle/a.jpg", photos)])
    sources = tmp_path / "sources"
    with pytest.raises(DataError) as excinfo:
        unpack_archive(archive, sources, IngestConfig(max_archive_gb=0.0001))
    message = str(excinfo.value)
    assert str(archive) in message and "would unpack to 300." in message  # KB, with tar headers a little more
    assert "ingest.max_archive_gb (0.0001 GB)" in message and "raise ingest.max_archive_gb" in message
    assert_nothing_left(sources)
    assert unpack_archive(archive, sources, IngestConfig(max_archive_gb=0.001)).is_dir()


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_whose_headers_lie_is_stopped_while_unpacking(tmp_path, suffix, monkeypatch):
    archive = pack(tmp_path / f"bomb{suffix}", [("shapes/circle/a.jpg", b"x"), ("shapes/zeros.bin", ZEROS)])
    monkeypatch.setattr(dataset._Budget, "check_declared", lambda self, total: None)  # the headers said nothing
    sources = tmp_path / "sources"
    with pytest.raises(DataError) as excinfo:
        unpack_archive(archive, sources, LIMITS)
    message = str(excinfo.value)
    assert str(archive) in message and "more than its headers declare" in message
    assert "ingest.max_compression_ratio" in message
    assert_nothing_left(sources)


GOOD = ("shapes/circle/a.jpg", "file", b"jpeg")


@pytest.mark.parametrize("evil, named", [
    ([("shapes/circle/b.jpg", "symlink", "/etc/passwd")], "'shapes/circle/b.jpg' -> '/etc/passwd'"),
    ([("shapes/circle/b.jpg", "symlink", "../../../etc/passwd")], "'shapes/circle/b.jpg' -> '../../../etc/passwd'"),
    ([("shapes/circle/b.jpg", "hardlink", "/etc/passwd")], "'shapes/circle/b.jpg' -> '/etc/passwd'"),
    ([("shapes/circle/b.jpg", "hardlink", "../etc/passwd")], "'shapes/circle/b.jpg' -> '../etc/passwd'"),
    # up leads to the archive's top; a member written through it would land one level above that
    ([("shapes/circle/up", "symlink", "../.."), ("shapes/circle/up/b.jpg", "symlink", "../x")],
     "'shapes/circle/up/b.jpg', which lies inside the link 'shapes/circle/up'"),
    ([("shapes/circle/up", "symlink", "../.."), ("shapes/b.jpg", "symlink", "circle/up/../../x")],
     "'shapes/b.jpg' -> 'circle/up/../../x'"),
    ([("shapes/circle/b.jpg", "hardlink", "shapes/circle/later.jpg"), ("shapes/circle/later.jpg", "file", b"x")],
     "hard link 'shapes/circle/b.jpg' to 'shapes/circle/later.jpg'"),
    ([("shapes/circle/pipe.jpg", "fifo", None)], "'shapes/circle/pipe.jpg', a device or FIFO"),
])
def test_tar_link_leading_outside_is_refused(tmp_path, evil, named):
    (tmp_path / "in").mkdir()
    archive = tar_members(tmp_path / "in" / "links.tar.gz", [GOOD, *evil])
    sources = tmp_path / "work" / "sources"
    with pytest.raises(DataError, match="refusing to unpack it") as excinfo:
        unpack_archive(archive, sources, LIMITS)
    assert str(archive) in str(excinfo.value) and named in str(excinfo.value)
    assert not [p for p in tmp_path.rglob("a.jpg")]  # refused from the headers: nothing was extracted
    assert not (tmp_path / "work" / "x").exists() and not (tmp_path / "x").exists()
    assert_nothing_left(sources)


def test_tar_links_inside_the_archive_are_kept(tmp_path):
    archive = tar_members(tmp_path / "links.tar.gz", [
        GOOD,
        ("shapes/circle/b.jpg", "symlink", "a.jpg"),
        ("shapes/circle/c.jpg", "hardlink", "shapes/circle/a.jpg"),
        ("shapes/round", "symlink", "circle"),
    ])
    dest = unpack_archive(archive, tmp_path / "sources", LIMITS)
    circle = dest / "shapes" / "circle"
    assert (circle / "b.jpg").is_symlink() and os.readlink(circle / "b.jpg") == "a.jpg"
    assert (circle / "b.jpg").read_bytes() == b"jpeg"
    assert not (circle / "c.jpg").is_symlink() and (circle / "c.jpg").read_bytes() == b"jpeg"
    assert (dest / "shapes" / "round").is_symlink() and (dest / "shapes" / "round" / "a.jpg").read_bytes() == b"jpeg"


def test_unwritable_sources_folder_is_a_clear_error(tmp_path):
    archive = zip_folder(make_class_dataset(tmp_path / "shapes", count=1), tmp_path / "shapes.zip")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")  # root ignores mode bits; this stops root too
    sources = blocker / "sources"
    with pytest.raises(DataError) as excinfo:
        unpack_archive(archive, sources, LIMITS)
    message = str(excinfo.value)
    assert str(archive) in message and f"'{sources}' is not writable" in message
    assert "--artifacts" in message and "--data" in message


def test_encrypted_zip_names_the_member_not_a_python_object(tmp_path):
    archive = pack(tmp_path / "locked.zip", [("shapes/circle/a.jpg", b"x" * 100)])
    data = bytearray(archive.read_bytes())
    data[data.index(b"PK\x01\x02") + 8] |= 0x01  # the central directory's "encrypted" flag
    archive.write_bytes(bytes(data))
    sources = tmp_path / "sources"
    with pytest.raises(DataError) as excinfo:  # zipfile's own RuntimeError names a <ZipInfo ...> object
        unpack_archive(archive, sources, LIMITS)
    message = str(excinfo.value)
    assert str(archive) in message and "encrypted files ('shapes/circle/a.jpg'" in message
    assert "password" in message and "ZipInfo" not in message
    assert_nothing_left(sources)

# -- the default download, offline -----------------------------------------------------------------

SNACK_COUNTS = {"train": 2, "val": 1, "test": 1}


@pytest.fixture
def offline_snacks(tmp_path, monkeypatch):
    """The snacks download pointed at a local zip; $KERAS_HOME and $HOME in tmp_path."""
    data = make_split_dataset(tmp_path / "build" / "images", counts=SNACK_COUNTS)
    archive = zip_folder(data, tmp_path / "build" / "images.zip")  # members under images/, like the real one
    keras_home = tmp_path / "keras-home"  # not created: the download must create it
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setenv("HOME", str(home))  # so that a download ignoring $KERAS_HOME cannot touch the real ~
    monkeypatch.setattr(dataset, "SNACKS_URL", archive.as_uri())
    monkeypatch.setattr(dataset, "SNACKS_COUNTS", {s: n * len(CLASSES) for s, n in SNACK_COUNTS.items()})
    return keras_home, home


def test_download_snacks_offline(offline_snacks, tmp_path, monkeypatch):
    keras_home, home = offline_snacks
    root = dataset.download_snacks(LIMITS)
    archive = keras_home / "datasets" / dataset.SNACKS_ARCHIVE
    assert archive.is_file()
    assert archive.read_bytes() == (tmp_path / "build" / "images.zip").read_bytes()
    assert not (home / ".keras").exists()
    assert root.is_relative_to(keras_home / "datasets")
    layout = detect_layout(root)
    assert layout.kind == "splits" and set(layout.split_dirs) == {"train", "val", "test"}
    assert sorted(p.name for p in layout.split_dirs["train"].iterdir()) == sorted(CLASSES)

    # A second call uses the cached archive and folder: the URL is no longer even reachable.
    monkeypatch.setattr(dataset, "SNACKS_URL", (tmp_path / "gone.zip").as_uri())
    assert dataset.download_snacks(LIMITS) == root


def test_download_snacks_count_mismatch(offline_snacks, monkeypatch):
    keras_home, _ = offline_snacks
    monkeypatch.setattr(dataset, "SNACKS_COUNTS", {"train": 4838, "val": 955, "test": 952})
    with pytest.raises(DataError, match="delete") as excinfo:
        dataset.download_snacks(LIMITS)
    message = str(excinfo.value)
    assert str(keras_home / "datasets" / dataset.SNACKS_ARCHIVE) in message
    assert "'train': 6" in message and "4838" in message


def test_download_snacks_failure_says_how_to_go_offline(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(dataset, "SNACKS_URL", (tmp_path / "nothing-here.zip").as_uri())
    with pytest.raises(DataError, match="--data PATH"):
        dataset.download_snacks(LIMITS)
