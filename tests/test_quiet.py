"""pipeline.quiet: what native code writes to stderr is held back, and shown again if the block fails."""
import os

import pytest

from pipeline import quiet


def test_native_stderr_is_held_back_and_replayed_on_failure(capfd, monkeypatch):
    monkeypatch.setattr(quiet, "_verbose", False)
    with quiet.native_stderr():
        os.write(2, b"oneDNN chatter\n")
    assert "oneDNN" not in capfd.readouterr().err
    with pytest.raises(RuntimeError):
        with quiet.native_stderr():
            os.write(2, b"why it broke\n")
            raise RuntimeError("boom")
    assert "why it broke" in capfd.readouterr().err
    os.write(2, b"after\n")
    assert "after" in capfd.readouterr().err  # stderr is back


def test_verbose_shows_everything(capfd, monkeypatch):
    monkeypatch.setattr(quiet, "_verbose", True)
    with quiet.native_stderr():
        os.write(2, b"shown\n")
    assert "shown" in capfd.readouterr().err
