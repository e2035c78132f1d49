"""Keeping freed memory on Linux: glibc accepts the settings; elsewhere nothing is changed."""
import sys

import pytest

from pipeline.export import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_glibc_accepts_the_settings():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert allocator.keep_freed_memory() is True


def test_nothing_is_changed_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
