"""Bench helper: a copy of a split dataset whose training set is twice as large, for memory measurements.

Usage: python bench/double_train.py SOURCE OUT
Every training image is kept and joined by its mirror image (a new JPEG, so a different file and content
hash); val and test are hard-linked (or copied) unchanged. The result is a dataset like any user folder.
"""
import os
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main():
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, target)
        if path.relative_to(source).parts[0] == "train" and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            with Image.open(path) as image:
                ImageOps.mirror(image.convert("RGB")).save(target.with_name(f"{target.stem}-mirror.jpg"), quality=92)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
