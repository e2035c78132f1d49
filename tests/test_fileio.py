"""Atomic writes, and a run's temporary files kept inside its own folder."""
import os
import subprocess
import sys
import tempfile

import pytest

from pipeline import fileio


def test_temporary_files_go_to_the_folder_for_this_process_and_its_children(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "system"))
    (tmp_path / "system").mkdir()
    folder = tmp_path / "artifacts" / ".tmp"
    before = tempfile.gettempdir()
    with fileio.temporary_files_in(folder):
        assert os.path.dirname(tempfile.mkdtemp()) == str(folder)
        child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                               capture_output=True, text=True, timeout=60, check=True)
        assert child.stdout.strip() == str(folder)
    assert not folder.exists()  # removed with what was left in it
    assert os.environ["TMPDIR"] == str(tmp_path / "system") and tempfile.gettempdir() == before


def test_nested_blocks_on_one_folder_leave_it_to_the_outer_one(tmp_path):
    folder = tmp_path / ".tmp"
    with fileio.temporary_files_in(folder):
        with fileio.temporary_files_in(folder):
            pass
        assert folder.is_dir() and tempfile.mkdtemp().startswith(str(folder))
    assert not folder.exists()


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    fileio.write_json(path, {"old": 1})
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert fileio.read_json(path) == {"old": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]
