"""The ingest stage, run through the Runner on tiny folders of coloured shapes."""
from __future__ import annotations

import builtins
import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import unicodedata
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import (
    CLASSES,
    SMOKE_CONFIG,
    exif_jpeg,
    invoke,
    log_records,
    make_class_dataset,
    make_split_dataset,
    shape_image,
    snapshot,
    write_images,
    zip_folder,
)
from PIL import Image

from pipeline import fileio
from pipeline.catalog import Catalog
from pipeline.config import from_dict
from pipeline.data.dataset import SPLITS, assign_split, is_archive
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.runner import Runner
from pipeline.stages import BY_NAME
from pipeline.stages.ingest import fingerprint

ETOILE = "\u00e9toile"  # NFC
NFD_ETOILE = "e\u0301toile"
DENIED = os.strerror(errno.EACCES)  # "Permission denied"


def runner_for(data, artifacts, **ingest):
    return Runner(from_dict({"data": {"path": str(data)}, "ingest": ingest}), artifacts)


def ingest(data, artifacts, **ingest_cfg):
    """Run the ingest stage and read back everything it wrote."""
    ran = runner_for(data, artifacts, **ingest_cfg).run(["ingest"])
    assert ran == ["ingest"]
    return outputs(artifacts)


def outputs(artifacts):
    files = Catalog(artifacts).stage("ingest")
    with open(files.index, newline="", encoding="utf-8") as f:
        index = list(csv.DictReader(f))
    with open(files.counts, newline="", encoding="utf-8") as f:
        counts = {row["label"]: {s: int(row[s]) for s in SPLITS} for row in csv.DictReader(f)}
    return SimpleNamespace(
        classes_text=files.classes.read_text(encoding="utf-8"),
        classes=files.classes.read_text(encoding="utf-8").splitlines(),
        index=index, by_path={row["path"]: row for row in index}, counts=counts,
        report=json.loads(files.report.read_text(encoding="utf-8")))


def warnings_about(out, text):
    return [w for w in out.report["warnings"] if text in w]


def folder_split(path, root):
    """The split folder an indexed file sits in."""
    return Path(path).relative_to(root).parts[0]


# -- the basic outputs -----------------------------------------------------------------------------

def test_classes_counts_and_index(split_dataset, tmp_path):
    out = ingest(split_dataset, tmp_path / "artifacts")
    assert out.classes_text == f"circle\nred square\n{ETOILE}\n"
    assert out.counts == {label: {"train": 8, "val": 3, "test": 3} for label in CLASSES}
    assert out.report["images"] == {"train": 24, "val": 9, "test": 9}
    assert out.report["layout"] == "splits" and out.report["classes"] == out.classes
    assert out.report["notes"] == [] and out.report["warnings"] == []
    assert out.report["bad_images"] == [] and out.report["ignored_files"] == [] and out.report["converted"] == []
    assert len(out.index) == 42
    for row in out.index:
        split, label, _ = Path(row["path"]).relative_to(split_dataset).parts
        assert (row["split"], row["label"]) == (split, label)
        data = Path(row["path"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest() and int(row["bytes"]) == len(data)
        with Image.open(row["path"]) as image:
            assert (int(row["width"]), int(row["height"])) == image.size


def test_non_image_files_are_ignored(split_dataset, tmp_path):
    folder = split_dataset / "train" / "circle"
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "notes.txt").write_text("taken on holiday")
    (split_dataset / "val" / "stray.jpg").write_bytes((folder / "img_000.jpg").read_bytes())
    out = ingest(split_dataset, tmp_path / "artifacts")
    ignored = {item["path"]: item["reason"] for item in out.report["ignored_files"]}
    assert ignored == {str(folder / ".DS_Store"): "not an image file name",
                       str(folder / "notes.txt"): "not an image file name",
                       str(split_dataset / "val" / "stray.jpg"): "not inside a class folder"}
    assert not any(p in out.by_path for p in ignored)
    assert out.counts["circle"]["train"] == 8 and out.counts["circle"]["val"] == 3
    assert out.report["bad_images"] == [] and out.report["warnings"] == []


def plant_bad_images(folder):
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG" * 20)
    (folder / "empty.jpg").write_bytes(b"")
    return folder / "corrupt.jpg", folder / "empty.jpg"


def test_bad_images_are_listed_and_skipped(split_dataset, tmp_path):
    corrupt, empty = plant_bad_images(split_dataset / "train" / "red square")
    out = ingest(split_dataset, tmp_path / "artifacts")
    bad = {item["path"]: item["reason"] for item in out.report["bad_images"]}
    assert set(bad) == {str(corrupt), str(empty)}
    assert bad[str(corrupt)].startswith("does not decode")
    assert bad[str(empty)].startswith("empty file")
    assert str(corrupt) not in out.by_path and str(empty) not in out.by_path
    assert out.counts["red square"]["train"] == 8
    assert out.report["ignored_files"] == []


def test_bad_image_fails_the_run_when_asked(split_dataset, tmp_path):
    corrupt = split_dataset / "train" / "red square" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG" * 20)
    artifacts = tmp_path / "artifacts"
    with pytest.raises(DataError, match="bad image") as excinfo:
        runner_for(split_dataset, artifacts, on_bad_image="fail").run(["ingest"])
    assert str(corrupt) in str(excinfo.value) and "does not decode" in str(excinfo.value)
    assert not (artifacts / "ingest").exists()  # no half-written stage folder


def test_odd_image_modes_are_converted(split_dataset, tmp_path):
    folder = split_dataset / "train" / ETOILE
    base = shape_image(ETOILE, 7, size=40)
    base.convert("L").save(folder / "gray.jpg")
    base.convert("RGBA").save(folder / "alpha.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    exif_jpeg(folder / "rotated.jpg", base, 6)
    out = ingest(split_dataset, tmp_path / "artifacts")
    expected = {"gray.jpg": "L converted", "alpha.png": "RGBA converted", "cmyk.jpg": "CMYK converted",
                "rotated.jpg": "EXIF orientation 6"}
    converted = {Path(item["path"]).name: item["converted"] for item in out.report["converted"]}
    assert set(converted) == set(expected)
    for name, note in expected.items():
        assert note in converted[name]
        row = out.by_path[str(folder / name)]
        assert row["converted"] == converted[name] and (row["split"], row["label"]) == ("train", ETOILE)
    rotated = out.by_path[str(folder / "rotated.jpg")]
    assert (int(rotated["width"]), int(rotated["height"])) == (base.height, base.width)
    assert out.counts[ETOILE]["train"] == 12
    assert out.report["bad_images"] == []


# -- warnings and errors ---------------------------------------------------------------------------

def test_class_missing_from_val_is_warned_about(split_dataset, tmp_path):
    shutil.rmtree(split_dataset / "val" / "red square")
    out = ingest(split_dataset, tmp_path / "artifacts")
    assert "red square" in out.classes
    assert out.counts["red square"] == {"train": 8, "val": 0, "test": 3}
    assert out.report["warnings"] == ["class 'red square' has no images in the val split"]


def test_empty_class_folder_is_left_out_with_a_warning(split_dataset, tmp_path):
    (split_dataset / "train" / "hexagon").mkdir()
    (split_dataset / "val" / "hexagon").mkdir()
    (split_dataset / "val" / "hexagon" / ".DS_Store").write_bytes(b"x")
    out = ingest(split_dataset, tmp_path / "artifacts")
    assert out.classes == sorted(CLASSES) and "hexagon" not in out.counts
    assert out.report["warnings"] == ["class 'hexagon' has no training images and is left out (empty)"]


def test_empty_class_folder_in_bare_layout_is_warned_about(class_dataset, tmp_path):
    (class_dataset / "hexagon").mkdir()
    out = ingest(class_dataset, tmp_path / "artifacts")
    assert out.classes == sorted(CLASSES)
    assert warnings_about(out, "class 'hexagon' has no training images and is left out (empty)")


def test_class_only_in_val_is_dropped_with_a_warning(split_dataset, tmp_path):
    write_images(split_dataset / "val" / "hexagon", "circle", 2, start=500)
    out = ingest(split_dataset, tmp_path / "artifacts")
    assert "hexagon" not in out.classes and not any(r["label"] == "hexagon" for r in out.index)
    assert warnings_about(out, "class 'hexagon' has no training images and is left out (2 images")


def test_same_image_in_train_and_test_is_leakage(split_dataset, tmp_path):
    original = split_dataset / "train" / "circle" / "img_003.jpg"
    copy = split_dataset / "test" / "circle" / "copy.jpg"
    shutil.copyfile(original, copy)
    artifacts = tmp_path / "artifacts"
    out = ingest(split_dataset, artifacts)
    leaks = warnings_about(out, "leakage")
    assert len(leaks) == 1 and str(original) in leaks[0] and str(copy) in leaks[0]
    assert "train" in leaks[0] and "test" in leaks[0]
    manifest = json.loads(Catalog(artifacts).stage("ingest").manifest.read_text(encoding="utf-8"))
    assert manifest["summary"]["leaks"] == 1


def test_duplicate_within_one_split_is_not_leakage(split_dataset, tmp_path):
    shutil.copyfile(split_dataset / "train" / "circle" / "img_003.jpg", split_dataset / "train" / "circle" / "b.jpg")
    out = ingest(split_dataset, tmp_path / "artifacts")
    assert not warnings_about(out, "leakage")
    assert warnings_about(out, "1 image(s) appear more than once within one split")


def test_small_class_gets_an_imbalance_warning(split_dataset, tmp_path):
    for path in sorted((split_dataset / "train" / ETOILE).iterdir())[:5]:
        path.unlink()  # 3 left, under half of 8
    for path in sorted((split_dataset / "train" / "circle").iterdir())[:4]:
        path.unlink()  # 4 left: exactly half is not a warning
    out = ingest(split_dataset, tmp_path / "artifacts")
    imbalance = warnings_about(out, "imbalance")
    assert len(imbalance) == 1 and f"'{ETOILE}' has 3 training images" in imbalance[0] and "(8)" in imbalance[0]


def test_one_class_is_an_error(tmp_path):
    root = make_split_dataset(tmp_path / "one", counts={"train": 2, "val": 1}, splits=("train", "val"),
                              classes=("circle",))
    with pytest.raises(DataError, match="at least two") as excinfo:
        runner_for(root, tmp_path / "artifacts").run(["ingest"])
    assert str(root) in str(excinfo.value)


def test_two_class_folders_but_one_empty_is_an_error(tmp_path):
    root = make_class_dataset(tmp_path / "bare", count=3, classes=("circle",))
    (root / "red square").mkdir()
    with pytest.raises(DataError, match="1 class"):
        runner_for(root, tmp_path / "artifacts").run(["ingest"])


# -- splits ingest makes itself --------------------------------------------------------------------

def test_bare_layout_is_split_by_hash(class_dataset, tmp_path):
    out = ingest(class_dataset, tmp_path / "artifacts", val_ratio=0.2, test_ratio=0.2, seed=3)
    assert out.report["layout"] == "classes"
    assert len(out.report["notes"]) == 1 and "no split folders" in out.report["notes"][0]
    assert out.classes == sorted(CLASSES) and len(out.index) == 60
    for row in out.index:
        assert row["split"] == assign_split(row["sha256"], 3, 0.2, 0.2)
        assert row["label"] == Path(row["path"]).parent.name
    totals = out.report["images"]
    assert sum(totals.values()) == 60 and min(totals.values()) > 0
    assert totals == {s: sum(1 for r in out.index if r["split"] == s) for s in SPLITS}


def test_missing_test_folder_is_made_from_train(tmp_path):
    root = make_split_dataset(tmp_path / "tv", counts={"train": 12, "val": 3}, splits=("train", "val"))
    out = ingest(root, tmp_path / "artifacts", test_ratio=0.3)
    assert len(out.report["notes"]) == 1 and "no test/ folder" in out.report["notes"][0]
    rows = out.index
    assert len(rows) == 45
    val_folder = [r for r in rows if folder_split(r["path"], root) == "val"]
    train_folder = [r for r in rows if folder_split(r["path"], root) == "train"]
    assert len(val_folder) == 9 and all(r["split"] == "val" for r in val_folder)  # val images stay in val
    for row in train_folder:
        expected = "test" if assign_split(row["sha256"], 0, 0.0, 0.3) == "test" else "train"
        assert row["split"] == expected
    assert 0 < out.report["images"]["test"] < 36
    assert out.report["images"] == {"train": 36 - out.report["images"]["test"], "val": 9,
                                    "test": out.report["images"]["test"]}


def test_adding_a_photo_keeps_every_split(class_dataset, tmp_path):
    artifacts = tmp_path / "artifacts"
    before = ingest(class_dataset, artifacts)
    new = write_images(class_dataset / "circle", "circle", 1, start=900)[0]
    after = ingest(class_dataset, artifacts)  # ingest() asserts the runner ran it again
    assert len(after.index) == len(before.index) + 1 and str(new) in after.by_path
    for path, row in before.by_path.items():
        assert after.by_path[path]["split"] == row["split"]


# -- sources, archives, caching --------------------------------------------------------------------

def test_source_folder_is_never_modified(split_dataset, tmp_path):
    folder = split_dataset / "train" / "circle"
    plant_bad_images(folder)
    (folder / ".DS_Store").write_bytes(b"x")
    exif_jpeg(folder / "rotated.jpg", shape_image("circle", 5), 8)
    shape_image("circle", 6).convert("RGBA").save(folder / "alpha.png")
    before = snapshot(split_dataset)
    ingest(split_dataset, tmp_path / "artifacts")
    assert snapshot(split_dataset) == before


def test_zip_archive_as_data_path(split_dataset, tmp_path):
    archive = zip_folder(split_dataset, tmp_path / "shapes.zip")
    artifacts = tmp_path / "artifacts"
    out = ingest(archive, artifacts)
    assert out.classes == sorted(CLASSES)
    assert out.counts == {label: {"train": 8, "val": 3, "test": 3} for label in CLASSES}
    sources = Catalog(artifacts).sources
    assert Path(out.report["source"]).is_relative_to(sources)
    assert all(Path(r["path"]).is_relative_to(sources) and Path(r["path"]).is_file() for r in out.index)
    assert runner_for(archive, artifacts).run(["ingest"]) == []


def test_damaged_unpacked_archive_is_unpacked_again(split_dataset, tmp_path):
    archive = zip_folder(split_dataset, tmp_path / "shapes.zip")
    artifacts = tmp_path / "artifacts"
    runner = runner_for(archive, artifacts)
    assert runner.run(["ingest"]) == ["ingest"]
    image = Path(outputs(artifacts).index[0]["path"])
    original = image.read_bytes()
    image.unlink()
    assert runner.freshness(BY_NAME["ingest"]).reasons == ["inputs changed"]
    assert runner.run(["ingest"]) == ["ingest"]
    assert image.read_bytes() == original
    out = outputs(artifacts)
    assert out.counts == {label: {"train": 8, "val": 3, "test": 3} for label in CLASSES}
    assert all(Path(row["path"]).is_file() for row in out.index)


def test_archive_fingerprint_tells_a_damaged_unpacked_copy(split_dataset, tmp_path):
    archive = zip_folder(split_dataset, tmp_path / "shapes.zip")
    artifacts = tmp_path / "artifacts"
    runner = runner_for(archive, artifacts)
    assert runner.run(["ingest"]) == ["ingest"]
    sources = Catalog(artifacts).sources
    whole = {"archive": str(archive.resolve()), "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    assert fingerprint(runner.cfg, sources) == fingerprint(runner.cfg) == whole
    image = Path(outputs(artifacts).index[0]["path"])
    image.unlink()
    damaged = fingerprint(runner.cfg, sources)
    assert damaged.pop("unpacked").startswith("damaged: ") and damaged == whole


def test_unchanged_dataset_is_not_ingested_again(split_dataset, tmp_path):
    runner = runner_for(split_dataset, tmp_path / "artifacts")
    assert runner.run(["ingest"]) == ["ingest"]
    assert runner.run(["ingest"]) == []
    assert runner.freshness(BY_NAME["ingest"]).state == "fresh"
    write_images(split_dataset / "val" / "circle", "circle", 1, start=700)
    status = runner.freshness(BY_NAME["ingest"])
    assert (status.state, status.reasons) == ("stale", ["inputs changed"])
    assert runner.run(["ingest"]) == ["ingest"]
    assert outputs(tmp_path / "artifacts").counts["circle"]["val"] == 4


def test_nfd_folder_name_gives_nfc_label(tmp_path):
    nfd = unicodedata.normalize("NFD", ETOILE)
    assert nfd == "e\u0301toile" and nfd != ETOILE
    root = make_split_dataset(tmp_path / "mac", counts={"train": 3, "val": 1, "test": 1},
                              classes=("circle", "red square"))
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        write_images(root / split / nfd, ETOILE, n, start=300)
    out = ingest(root, tmp_path / "artifacts")
    assert out.classes == ["circle", "red square", ETOILE]
    assert out.classes_text.encode("utf-8").count("\u00e9".encode("utf-8")) == 1
    assert {r["label"] for r in out.index} == {"circle", "red square", ETOILE}
    assert out.counts[ETOILE] == {"train": 3, "val": 1, "test": 1}


@pytest.mark.parametrize("layout", ["splits", "classes"])
def test_class_folders_differing_only_in_normalisation_are_an_error(tmp_path, layout):
    if layout == "splits":
        root = make_split_dataset(tmp_path / "d", counts={"train": 3, "val": 1, "test": 1})
        parent = root / "train"
    else:
        root = parent = make_class_dataset(tmp_path / "d", count=3)
    write_images(parent / NFD_ETOILE, ETOILE, 2, start=500)
    assert {p.name for p in parent.iterdir()} >= {ETOILE, NFD_ETOILE}  # two folders on disk
    artifacts = tmp_path / "artifacts"
    with pytest.raises(DataError) as excinfo:
        runner_for(root, artifacts).run(["ingest"])
    message = str(excinfo.value)
    assert f"'{parent / ETOILE}'" in message and f"'{parent / NFD_ETOILE}'" in message
    assert "'\\xe9toile'" in message and "'e\\u0301toile'" in message  # their code points, told apart
    assert "differ only in Unicode normalisation" in message and "rename one" in message
    assert not (artifacts / "ingest").exists()


def test_one_class_written_in_two_normalisations_across_splits_is_one_class(tmp_path):
    root = make_split_dataset(tmp_path / "d", counts={"train": 3, "val": 1, "test": 1},
                              classes=("circle", "red square"))
    write_images(root / "train" / ETOILE, ETOILE, 3, start=300)
    write_images(root / "val" / NFD_ETOILE, ETOILE, 1, start=400)
    write_images(root / "test" / NFD_ETOILE, ETOILE, 1, start=500)
    out = ingest(root, tmp_path / "artifacts")
    assert out.classes_text.encode("utf-8") == "circle\nred square\n\u00e9toile\n".encode("utf-8")
    assert {r["label"] for r in out.index} == {"circle", "red square", ETOILE}
    assert out.counts[ETOILE] == {"train": 3, "val": 1, "test": 1}
    assert out.report["classes"] == out.classes and out.report["warnings"] == []


# -- files and folders that cannot be read ---------------------------------------------------------

class Unreadable:
    """Gives paths mode 000, and back. Root ignores mode bits: for root, opening or listing such a path is made to
    fail as it does for anyone else."""

    def __init__(self, monkeypatch):
        self.paths = set()
        if os.geteuid() == 0:
            for module, name in ((os, "scandir"), (io, "open"), (builtins, "open")):
                monkeypatch.setattr(module, name, self._refusing(getattr(module, name)))

    def __call__(self, path):
        path.chmod(0)
        self.paths.add(path)
        return path

    def restore(self, path):
        path.chmod(0o755 if path.is_dir() else 0o644)
        self.paths.discard(path)

    def _refusing(self, real):
        def call(*args, **kwargs):
            if args and isinstance(args[0], (str, os.PathLike)) and Path(args[0]) in self.paths:
                raise PermissionError(errno.EACCES, DENIED, str(args[0]))
            return real(*args, **kwargs)

        return call


@pytest.fixture
def unreadable(monkeypatch):
    """unreadable(path): the path with mode 000 (as for a user other than root), until the test ends."""
    made = Unreadable(monkeypatch)
    yield made
    for path in list(made.paths):
        made.restore(path)


def test_unreadable_image_is_a_bad_image(split_dataset, tmp_path, unreadable):
    image = unreadable(split_dataset / "train" / "circle" / "img_002.jpg")
    out = ingest(split_dataset, tmp_path / "artifacts")
    assert out.report["bad_images"] == [{"path": str(image), "reason": f"cannot be read: {DENIED}"}]
    assert str(image) not in out.by_path and out.counts["circle"]["train"] == 7
    with pytest.raises(DataError) as excinfo:
        runner_for(split_dataset, tmp_path / "artifacts2", on_bad_image="fail").run(["ingest"])
    message = str(excinfo.value)
    assert f"bad image '{image}': cannot be read: {DENIED}" in message
    assert f"fix its permissions (chmod a+r '{image}') or remove the file" in message


def test_image_made_readable_is_ingested_again(split_dataset, tmp_path, unreadable):
    image = unreadable(split_dataset / "train" / "circle" / "img_002.jpg")
    runner = runner_for(split_dataset, tmp_path / "artifacts")
    assert runner.run(["ingest"]) == ["ingest"]
    unreadable.restore(image)
    assert runner.freshness(BY_NAME["ingest"]).reasons == ["inputs changed"]
    assert runner.run(["ingest"]) == ["ingest"]
    out = outputs(tmp_path / "artifacts")
    assert str(image) in out.by_path and out.report["bad_images"] == []


@pytest.mark.parametrize("make, folder", [
    (make_split_dataset, "train/circle"), (make_split_dataset, "train/circle/sub"), (make_split_dataset, "val"),
    (make_split_dataset, "."), (make_class_dataset, "circle"),
])
def test_folder_that_cannot_be_listed_is_an_error(tmp_path, unreadable, make, folder):
    root = make(tmp_path / "d")
    folder = root / folder
    if not folder.exists():
        write_images(folder, "circle", 2, start=900)
    unreadable(folder)
    artifacts = tmp_path / "artifacts"
    with pytest.raises(DataError) as excinfo:  # never a class fewer
        runner_for(root, artifacts).run(["ingest"])
    message = str(excinfo.value)
    assert f"dataset folder '{folder}' cannot be listed ({DENIED})" in message
    assert f"chmod -R a+rX '{folder}'" in message and "remove it" in message
    assert not (artifacts / "ingest").exists()


def test_status_shows_unreadable_files_and_folders(split_dataset, tmp_path, unreadable):
    runner = runner_for(split_dataset, tmp_path / "artifacts")
    assert runner.run(["ingest"]) == ["ingest"]
    image = unreadable(split_dataset / "train" / "circle" / "img_002.jpg")
    folder = unreadable(split_dataset / "val" / "red square")
    (row, *_) = runner.status()
    assert (row["stage"], row["state"], row["why"]) == ("ingest", "stale", "inputs changed")
    entries = {name: rest for name, *rest in fingerprint(runner.cfg)["files"]}
    assert entries["train/circle/img_002.jpg"] == [image.stat().st_size, f"unreadable: {DENIED}"]
    assert entries["val/red square"] == ["folder", f"unlistable: {DENIED}"]
    assert not [name for name in entries if name.startswith("val/red square/")]
    unreadable.restore(image)
    unreadable.restore(folder)
    assert runner.run(["ingest"]) == []  # the same key as before


def test_unreadable_archive_is_a_clear_error(split_dataset, tmp_path, unreadable):
    archive = unreadable(zip_folder(split_dataset, tmp_path / "shapes.zip")).resolve()
    runner = runner_for(archive, tmp_path / "artifacts")
    assert runner.status()[0]["state"] == "never run"
    assert fingerprint(runner.cfg) == {"archive": str(archive), "sha256": f"unreadable: {DENIED}"}
    with pytest.raises(DataError) as excinfo:
        runner.run(["ingest"])
    message = str(excinfo.value)
    assert f"dataset archive '{archive}' cannot be read ({DENIED})" in message and "chmod a+r" in message


# -- an artifacts folder that cannot be written ----------------------------------------------------

def assert_unwritable(message, artifacts):
    assert f"artifacts folder '{artifacts}' is not writable" in message
    assert "pass --artifacts to a writable folder or fix its permissions" in message


def test_artifacts_under_a_file_is_a_clear_error(split_dataset, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")  # unwritable for root too
    artifacts = blocker / "artifacts"
    with pytest.raises(PipelineError) as excinfo:
        runner_for(split_dataset, artifacts).run(["ingest"])
    assert_unwritable(str(excinfo.value), artifacts)


@pytest.fixture
def read_only_artifacts(tmp_path, monkeypatch):
    """An artifacts folder with mode 555; for root, which ignores mode bits, mkdir under it fails as for others."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    artifacts.chmod(0o555)
    if os.geteuid() == 0:
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).is_relative_to(artifacts):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    yield artifacts
    artifacts.chmod(0o755)


def test_read_only_artifacts_is_a_clear_error(split_dataset, read_only_artifacts):
    with pytest.raises(PipelineError) as excinfo:
        runner_for(split_dataset, read_only_artifacts).run(["ingest"])
    assert_unwritable(str(excinfo.value), read_only_artifacts)
    assert "Permission denied" in str(excinfo.value)
    assert not list(read_only_artifacts.iterdir())


def test_stage_folder_of_another_user_fails_before_the_stage_runs(split_dataset, tmp_path, monkeypatch):
    artifacts = tmp_path / "artifacts"
    assert runner_for(split_dataset, artifacts).run(["ingest"]) == ["ingest"]
    final = artifacts / "ingest"
    before = snapshot(final)
    final.chmod(0o555)  # moving a folder to another parent needs write access to it
    if os.geteuid() == 0:  # root may move it anyway: answer access() as the kernel does for anyone else
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (Path(path) == final and mode & os.W_OK)
                            and real_access(path, mode, **kw))
    try:
        with pytest.raises(PipelineError) as excinfo:
            runner_for(split_dataset, artifacts, seed=1).run(["ingest"])  # a changed config: ingest must rerun
    finally:
        final.chmod(0o755)
    assert_unwritable(str(excinfo.value), artifacts)
    assert str(final) in str(excinfo.value)
    assert snapshot(final) == before and sorted(p.name for p in artifacts.iterdir()) == ["ingest"]


def test_read_only_artifacts_is_one_line_from_the_cli(split_dataset, read_only_artifacts):
    result = invoke("--config", str(SMOKE_CONFIG), "--data", str(split_dataset),
                    "--artifacts", str(read_only_artifacts), "ingest")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if not line[:2].isdigit()]  # log lines start with a time
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in result.stderr
    assert_unwritable(errors[0], read_only_artifacts)


# -- symbolic links --------------------------------------------------------------------------------

@pytest.fixture
def reads(monkeypatch):
    """Every file ingest hashes or reads, resolved."""
    seen = []
    real_hash, real_read = fileio.sha256_file, Path.read_bytes

    def sha256_file(path, *args):
        seen.append(Path(path).resolve())
        return real_hash(path, *args)

    def read_bytes(self):
        seen.append(self.resolve())
        return real_read(self)

    monkeypatch.setattr(fileio, "sha256_file", sha256_file)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return seen


def outside_reason(target, root):
    return (f"symbolic link to '{target.resolve()}', outside the dataset folder '{root.resolve()}'; not read "
            "(set ingest.follow_symlinks: true to read such links)")


def test_symlink_leading_outside_is_skipped_and_listed(split_dataset, tmp_path, reads):
    outside = tmp_path / "outside"
    secret = write_images(outside, "circle", 1, start=800)[0]  # a real image: followed, it would be indexed
    passwd = outside / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\n")
    folder = split_dataset / "train" / "circle"
    (folder / "secret.jpg").symlink_to(secret)
    (folder / "passwd.jpg").symlink_to(passwd)
    out = ingest(split_dataset, tmp_path / "artifacts")
    ignored = {item["path"]: item for item in out.report["ignored_files"]}
    assert set(ignored) == {str(folder / "secret.jpg"), str(folder / "passwd.jpg")}
    assert ignored[str(folder / "secret.jpg")]["reason"] == outside_reason(secret, split_dataset)
    assert ignored[str(folder / "passwd.jpg")] == {"path": str(folder / "passwd.jpg"), "link": str(passwd),
                                                   "reason": outside_reason(passwd, split_dataset)}
    assert str(folder / "secret.jpg") not in out.by_path and out.report["bad_images"] == []
    assert out.counts["circle"]["train"] == 8
    assert reads and not [p for p in reads if p.is_relative_to(outside)]  # neither the key nor the scan read them


def test_class_folder_link_leading_outside_is_skipped(split_dataset, tmp_path):
    outside = tmp_path / "outside" / "hexagon"
    write_images(outside, "circle", 4, start=600)
    (split_dataset / "train" / "hexagon").symlink_to(outside, target_is_directory=True)
    out = ingest(split_dataset, tmp_path / "artifacts")
    assert out.classes == sorted(CLASSES) and out.report["warnings"] == []  # not taken for an empty class
    assert [item["reason"] for item in out.report["ignored_files"]] == [outside_reason(outside, split_dataset)]


def test_symlinks_inside_the_dataset_are_followed(split_dataset, tmp_path):
    folder = split_dataset / "train" / "circle"
    (folder / "copy.jpg").symlink_to(Path("..", "..", "val", "circle", "img_100.jpg"))
    write_images(split_dataset / "pool" / "round", "circle", 3, start=400)
    (split_dataset / "train" / "round").symlink_to(Path("..", "pool", "round"), target_is_directory=True)
    more = Path("..", "..", "val", "circle")
    (folder / "more").symlink_to(more, target_is_directory=True)
    out = ingest(split_dataset, tmp_path / "artifacts")
    assert out.by_path[str(folder / "copy.jpg")]["split"] == "train"
    assert warnings_about(out, "leakage")  # the link and its target are the same image
    assert "round" in out.classes and out.counts["round"]["train"] == 3
    assert out.report["ignored_files"] == [{"path": str(folder / "more"), "link": str(more),
                                            "reason": "symbolic link to a folder inside a class folder; not followed"}]


def test_broken_symlink_is_listed(split_dataset, tmp_path):
    link = split_dataset / "train" / "circle" / "gone.jpg"
    link.symlink_to(tmp_path / "nowhere.jpg")
    out = ingest(split_dataset, tmp_path / "artifacts")
    assert [(i["path"], i["reason"]) for i in out.report["ignored_files"]] == [
        (str(link), f"broken symbolic link to '{tmp_path / 'nowhere.jpg'}' (missing, or a loop)")]


def test_follow_symlinks_reads_links_leading_outside(split_dataset, tmp_path):
    secret = write_images(tmp_path / "outside", "circle", 1, start=800)[0]
    link = split_dataset / "train" / "circle" / "secret.jpg"
    link.symlink_to(secret)
    out = ingest(split_dataset, tmp_path / "artifacts", follow_symlinks=True)
    assert str(link) in out.by_path and out.report["ignored_files"] == []
    assert out.by_path[str(link)]["sha256"] == hashlib.sha256(secret.read_bytes()).hexdigest()


def test_followed_folder_link_is_part_of_the_cache_key(split_dataset, tmp_path):
    outside = tmp_path / "outside" / "hexagon"
    write_images(outside, "circle", 3, start=600)
    (split_dataset / "train" / "hexagon").symlink_to(outside, target_is_directory=True)
    runner = runner_for(split_dataset, tmp_path / "artifacts", follow_symlinks=True)
    assert runner.run(["ingest"]) == ["ingest"]
    assert outputs(tmp_path / "artifacts").counts["hexagon"]["train"] == 3
    assert runner.run(["ingest"]) == []
    write_images(outside, "circle", 1, start=700)
    assert runner.freshness(BY_NAME["ingest"]).reasons == ["inputs changed"]


def test_split_folder_link_leading_outside_is_an_error(tmp_path):
    elsewhere = make_split_dataset(tmp_path / "elsewhere", counts={"train": 2}, splits=("train",))
    root = make_split_dataset(tmp_path / "d", counts={"val": 1, "test": 1}, splits=("val", "test"))
    (root / "train").symlink_to(elsewhere / "train", target_is_directory=True)
    with pytest.raises(DataError) as excinfo:
        runner_for(root, tmp_path / "artifacts").run(["ingest"])
    message = str(excinfo.value)
    assert f"'{root / 'train'}' is a symbolic link to '{(elsewhere / 'train').resolve()}'" in message
    assert "set ingest.follow_symlinks: true" in message
    assert not (tmp_path / "artifacts" / "ingest").exists()
    out = ingest(root, tmp_path / "artifacts", follow_symlinks=True)
    assert out.counts["circle"] == {"train": 2, "val": 1, "test": 1}


# -- bad images, archive limits, the new keys ------------------------------------------------------

def test_bad_image_reason_names_no_python_object(split_dataset, tmp_path):
    page = split_dataset / "train" / "circle" / "page.jpg"
    page.write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")  # a saved error page
    out = ingest(split_dataset, tmp_path / "artifacts")
    (reason,) = [item["reason"] for item in out.report["bad_images"] if item["path"] == str(page)]
    assert reason == "does not decode as an image: not a format Pillow can read (the file starts with " \
                     "b'<!DOCTYPE html><')"
    with pytest.raises(DataError) as excinfo:
        runner_for(split_dataset, tmp_path / "artifacts2", on_bad_image="fail").run(["ingest"])
    assert f"bad image '{page}': does not decode as an image: not a format" in str(excinfo.value)
    assert "object at 0x" not in str(excinfo.value)


def test_archive_limits_come_from_the_ingest_config(split_dataset, tmp_path):
    archive = zip_folder(split_dataset, tmp_path / "shapes.zip")
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("shapes/train/circle/zeros.bin", b"\0" * 1_000_000)
    artifacts = tmp_path / "artifacts"
    with pytest.raises(DataError, match="ingest.max_compression_ratio") as excinfo:
        runner_for(archive, artifacts, max_compression_ratio=2).run(["ingest"])
    assert str(archive) in str(excinfo.value)
    assert not list(Catalog(artifacts).sources.iterdir()) and not (artifacts / "ingest").exists()
    out = ingest(archive, artifacts)  # the default ratio lets it through
    assert [Path(i["path"]).name for i in out.report["ignored_files"]] == ["zeros.bin"]


@pytest.mark.parametrize("key, value", [("max_archive_gb", 0), ("max_compression_ratio", 0.5),
                                        ("follow_symlinks", "yes")])
def test_new_ingest_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=f"ingest.{key}"):
        from_dict({"ingest": {key: value}})


# -- identical images under two labels, archives inside the dataset, what the log says ----------------

@pytest.fixture
def pipeline_log():
    """Every record the pipeline logs at INFO and above."""
    with log_records("pipeline", logging.INFO) as records:
        yield records


def warning_lines(records):
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_same_image_under_two_labels_is_one_label_conflict(split_dataset, tmp_path):
    train, test = split_dataset / "train", split_dataset / "test"
    shutil.copyfile(train / "circle" / "img_003.jpg", train / "red square" / "copy.jpg")  # within one split
    original = train / "circle" / "img_004.jpg"
    shutil.copyfile(original, test / "circle" / "c.jpg")  # across splits, and under two labels there
    shutil.copyfile(original, test / ETOILE / "b.jpg")
    artifacts = tmp_path / "artifacts"
    out = ingest(split_dataset, artifacts)
    assert warnings_about(out, "label conflict") == [
        "label conflict: the same image is 'train/circle/img_003.jpg' (circle) and 'train/red square/copy.jpg' "
        "(red square); keep it in one class only",
        "label conflict: the same image is 'train/circle/img_004.jpg' (circle), 'test/circle/c.jpg' (circle) and "
        f"'test/{ETOILE}/b.jpg' ({ETOILE}); keep it in one class only"]
    assert not warnings_about(out, "leakage") and not warnings_about(out, "more than once")  # each group once
    manifest = json.loads(Catalog(artifacts).stage("ingest").manifest.read_text(encoding="utf-8"))
    assert (manifest["summary"]["label_conflicts"], manifest["summary"]["leaks"]) == (2, 0)
    assert (out.report["label_conflicts"], out.report["leaks"]) == (2, 0)


def test_summary_counts_are_the_warning_lines_printed(tmp_path, pipeline_log):
    root = make_split_dataset(tmp_path / "tv", counts={"train": 8, "val": 3}, splits=("train", "val"))  # a note
    folder = root / "train" / "circle"
    plant_bad_images(folder)
    (folder / ".DS_Store").write_bytes(b"x")  # ignored without a warning
    (folder / "more.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: ignored, warned about
    (folder / "secret.jpg").symlink_to(write_images(tmp_path / "outside", "circle", 1, start=800)[0])  # the same
    shutil.copyfile(folder / "img_001.jpg", root / "train" / "red square" / "copy.jpg")  # a label conflict
    out = ingest(root, tmp_path / "artifacts")
    (summary,) = [r.getMessage() for r in pipeline_log if r.getMessage().startswith("ingest ") and " done in " in
                  r.getMessage()]

    def number(pattern):
        found = re.search(pattern, summary)
        assert found, f"no {pattern!r} in the summary line {summary!r}"
        return int(found.group(1))

    lines = warning_lines(pipeline_log)
    bad = [line for line in lines if line.startswith("skipping bad image ")]
    ignoring = [line for line in lines if line.startswith("ignoring ")]
    other = [line for line in lines if line not in bad + ignoring]
    assert (len(bad), len(ignoring)) == (2, 2)
    assert number(r"(\d+) bad image") == len(bad)
    assert number(r"(\d+) warned about") == len(ignoring)
    assert number(r"(\d+) other warning") == len(other) and other == out.report["warnings"]
    assert any(line.startswith("label conflict: ") for line in other)
    assert number(r"(\d+) file\(s\) ignored") == len(out.report["ignored_files"]) == 3
    (note,) = out.report["notes"]
    assert "no test/ folder" in note and [r.levelno for r in pipeline_log if r.getMessage() == note] == [logging.INFO]


def test_archive_inside_the_dataset_is_named_and_warned_about(split_dataset, tmp_path, pipeline_log):
    folder = split_dataset / "train" / "circle"
    zip_folder(write_images(tmp_path / "more", "circle", 2, start=900)[0].parent, folder / "more.zip")
    for name in ("old.tar.gz", "old.tgz", "old.TAR"):
        (folder / name).write_bytes(b"\0" * 1024)
    (split_dataset / "train" / "batch.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # beside the class folders
    (folder / "notes.txt").write_text("taken on holiday")
    planted = [folder / "more.zip", *(folder / n for n in ("old.tar.gz", "old.tgz", "old.TAR", "notes.txt")),
               split_dataset / "train" / "batch.zip"]
    archives = [p for p in planted if is_archive(p)]
    assert len(archives) == 5
    out = ingest(split_dataset, tmp_path / "artifacts")
    reasons = {item["path"]: item["reason"] for item in out.report["ignored_files"]}
    expected = ("an archive inside the dataset; not unpacked: unpack it into its class folder, or pass the archive "
                "itself as --data")
    assert reasons == {**{str(p): expected for p in archives}, str(folder / "notes.txt"): "not an image file name"}
    lines = warning_lines(pipeline_log)
    for archive in archives:
        assert [line for line in lines if str(archive) in line] == [f"ignoring {archive}: {expected}"]
    assert len(lines) == len(archives) and out.counts["circle"]["train"] == 8
