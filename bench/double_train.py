"""Bench helper: a copy of a split dataset whose training set is 2 or 4 times as large, for time and memory.

Usage: python bench/double_train.py SOURCE OUT [FACTOR]
FACTOR is 2 (the default) or 4. Every training image is kept and joined by FACTOR - 1 new JPEGs (so different
files and content hashes): its mirror image, then a central 90% crop and that crop's mirror. val and test are
hard-linked (or copied) unchanged. The result is a dataset like any user folder.
"""
import os
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def central_crop(image, fraction=0.9):
    """The central `fraction` of `image` in each dimension."""
    width, height = image.size
    left, top = round(width * (1 - fraction) / 2), round(height * (1 - fraction) / 2)
    return image.crop((left, top, width - left, height - top))


def variants(image, factor):
    """The `factor - 1` new images that join `image` in the enlarged training set."""
    crop = central_crop(image)
    return {"mirror": ImageOps.mirror(image), "crop": crop, "crop-mirror": ImageOps.mirror(crop)
            } if factor == 4 else {"mirror": ImageOps.mirror(image)}


def main():
    if len(sys.argv) not in (3, 4) or (len(sys.argv) == 4 and sys.argv[3] not in ("2", "4")):
        sys.exit(__doc__.split("\n\n")[1])
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    factor = int(sys.argv[3]) if len(sys.argv) == 4 else 2
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, target)
        if path.relative_to(source).parts[0] == "train" and path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                for name, variant in variants(image.convert("RGB"), factor).items():
                    variant.save(target.with_name(f"{target.stem}-{name}.jpg"), quality=92)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
