"""Assemble a folder of photos that show none of the snack classes, for `evaluate.unknown_data`, from files that
ship inside packages on the registry under licences that allow it (public domain, CC0, CC BY 2.0).

    PYTHONPATH=. .venv/bin/python bench/unknown_photos.py OUT [--skimage-wheel PATH]

scikit-learn's and matplotlib's photos come from the installed packages; scikit-image's from its wheel, downloaded
with pip (no install) unless --skimage-wheel gives one. OUT gets the photos as they are and CREDITS.md.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SKIMAGE = "scikit-image==0.25.2"
# (file in skimage/data, what it shows, licence as scikit-image's skimage/data/_fetchers.py states it)
SKIMAGE_PHOTOS = (
    ("astronaut.png", "astronaut Eileen Collins", "public domain (NASA)"),
    ("brick.png", "a brick wall", "CC0"),
    ("camera.png", "a man with a camera (greyscale)", "CC0"),
    ("cell.png", "a cell under a microscope (greyscale)", "CC0"),
    ("chelsea.png", "a cat", "CC0"),
    ("clock_motion.png", "a clock, motion-blurred (greyscale)", "public domain"),
    ("coffee.png", "a cup of coffee", "CC0"),
    ("coins.png", "Greek coins (greyscale)", "no known copyright restrictions (Brooklyn Museum)"),
    ("grass.png", "grass (greyscale)", "CC0"),
    ("gravel.png", "gravel (greyscale)", "CC0"),
    ("hubble_deep_field.jpg", "the Hubble deep field", "public domain (NASA)"),
    ("ihc.png", "an immunohistochemistry slide", "no known copyright restrictions"),
    ("retina.jpg", "a fundus photograph of an eye", "CC0"),
    ("rocket.jpg", "a Falcon 9 rocket", "public domain (SpaceX)"),
    ("text.png", "a photograph of printed text (greyscale)", "public domain"),
)
INSTALLED_PHOTOS = (
    ("sklearn", "datasets/images/china.jpg", "a temple in China", "CC BY 2.0, danielbuechele on Flickr"),
    ("sklearn", "datasets/images/flower.jpg", "a flower", "CC BY 2.0, vultilion on Flickr"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "Grace Hopper", "public domain (US Navy)"),
)


def skimage_wheel(folder):
    """A scikit-image wheel for this Python, downloaded into `folder` without installing it."""
    subprocess.run([sys.executable, "-m", "pip", "download", SKIMAGE, "--no-deps", "--quiet", "-d", str(folder)],
                   check=True)
    return next(Path(folder).glob("scikit_image-*.whl"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--skimage-wheel", type=Path, default=None)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    credits = ["# Photos of none of the snack classes", "",
               "| file | shows | from | licence |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.skimage_wheel or skimage_wheel(tmp)
        with zipfile.ZipFile(wheel) as zf:
            for name, shows, licence in SKIMAGE_PHOTOS:
                (args.out / f"skimage-{name}").write_bytes(zf.read(f"skimage/data/{name}"))
                credits.append(f"| skimage-{name} | {shows} | {SKIMAGE} (skimage/data) | {licence} |")
    for package, member, shows, licence in INSTALLED_PHOTOS:
        module = __import__(package)
        source = Path(module.__file__).parent / member
        target = args.out / f"{package}-{source.name}"
        shutil.copyfile(source, target)
        credits.append(f"| {target.name} | {shows} | {package} ({member}) | {licence} |")
    (args.out / "CREDITS.md").write_text("\n".join(credits) + "\n", encoding="utf-8")
    print(f"{len(SKIMAGE_PHOTOS) + len(INSTALLED_PHOTOS)} photos in {args.out}")


if __name__ == "__main__":
    main()
