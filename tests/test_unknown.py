"""The unknown photos (evaluate.unknown_data): found in a folder or an archive, identified for the cache key."""
import pytest
from conftest import shape_image, zip_folder

from pipeline import config
from pipeline.confidence import unknown
from pipeline.errors import DataError


def _cfg(path):
    return config.from_dict({"evaluate": {"unknown_data": None if path is None else str(path)}})


def test_images_found_in_a_folder_and_its_subfolders(tmp_path):
    shape_image("circle", 1).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    shape_image("circle", 2).save(tmp_path / "sub" / "a.jpg")
    (tmp_path / "notes.txt").write_text("not a photo")
    limits = config.IngestConfig()
    assert unknown.image_paths(tmp_path, tmp_path / "sources", limits) == [tmp_path / "b.png",
                                                                             tmp_path / "sub" / "a.jpg"]


def test_images_found_in_an_archive(tmp_path):
    folder = tmp_path / "others"
    folder.mkdir()
    shape_image("circle", 1).save(folder / "x.png")
    archive = zip_folder(folder, tmp_path / "others.zip")
    found = unknown.image_paths(archive, tmp_path / "sources", config.IngestConfig())
    assert [p.name for p in found] == ["x.png"] and (tmp_path / "sources") in found[0].parents


def test_missing_or_empty_unknown_data_names_the_key_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="evaluate.unknown_data '.*nowhere' is not a folder .* or set it to null"):
        unknown.image_paths(tmp_path / "nowhere", tmp_path / "sources", config.IngestConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="evaluate.unknown_data '.*empty' holds no image files"):
        unknown.image_paths(tmp_path / "empty", tmp_path / "sources", config.IngestConfig())


def test_fingerprint_follows_the_photos_content(tmp_path):
    assert unknown.fingerprint(_cfg(None)) is None
    shape_image("circle", 1).save(tmp_path / "a.png")
    before = unknown.fingerprint(_cfg(tmp_path))
    assert unknown.fingerprint(_cfg(tmp_path)) == before
    shape_image("circle", 2).save(tmp_path / "a.png")
    assert unknown.fingerprint(_cfg(tmp_path)) != before
