"""Open evaluate's report.html in headless Chromium, save a screenshot of the whole page, and check that it shows the
report.

Usage: python tools/screenshot_report.py [REPORT_HTML] [OUT_PNG]
(defaults: artifacts/evaluate/report.html and report.png beside it). Needs Chromium or Chrome: on Debian
`apt-get install chromium`, on macOS Google Chrome in /Applications. Exits 1 if the page renders blank or its
embedded figures did not load.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
            "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome")
# Without the networking switches Chromium tries to reach Google's hosts at every start.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


# A window this tall holds the whole report; trim() then cuts the blank rows below it.
FULL_PAGE = 16000


def find_browser():
    """The first Chromium-family browser on this machine, or None."""
    for name in BROWSERS:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


def screenshot(html, png, width=1200, height=2400, browser=None):
    """Render `html` in headless Chromium into `png` (width x height pixels)."""
    browser = browser or find_browser()
    if browser is None:
        raise SystemExit("no Chromium or Chrome found: install one (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={Path(png).resolve()}", Path(html).resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)


def trim(png, margin=40):
    """Cut the blank rows below the page's last content row (keeping `margin` of them) from the screenshot."""
    image = Image.open(png).convert("RGB")
    rows = np.flatnonzero((np.asarray(image, dtype=np.int16) < 245).any(axis=(1, 2)))
    bottom = min(image.height, (int(rows[-1]) + 1 + margin) if len(rows) else margin)
    if bottom < image.height:
        image.crop((0, 0, image.width, bottom)).save(png)


def check(png, min_figure_pixels=20_000):
    """Problems with a screenshot of the report: blank, or no coloured figure (the plots) on it."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    problems = []
    if (rgb < 200).any(axis=2).mean() < 0.002:
        problems.append("the page is blank (almost no dark pixels: no text)")
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    if int((saturation > 60).sum()) < min_figure_pixels:
        problems.append("no coloured figure on the page: the embedded plots did not load")
    return problems


def main(argv):
    html = Path(argv[1] if len(argv) > 1 else "artifacts/evaluate/report.html")
    png = Path(argv[2] if len(argv) > 2 else html.with_suffix(".png"))
    if not html.is_file():
        raise SystemExit(f"{html} does not exist: run `make evaluate` first")
    screenshot(html, png, height=FULL_PAGE)
    trim(png)
    problems = check(png)
    for problem in problems:
        print(f"{png}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{png}: the report renders, with its figures")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
