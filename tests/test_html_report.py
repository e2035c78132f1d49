"""report.html: the Markdown report as one file, its images embedded; and, where Chromium exists, rendered."""
import base64
import html
import importlib.util
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from pipeline.reporting import html_report


def test_images_are_embedded_and_tables_and_code_render(tmp_path):
    png = tmp_path / "plot.png"
    Image.new("RGB", (4, 3), (200, 30, 30)).save(png)
    page = html_report.render("# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![plot](plot.png)\n\n![gone](x.png)\n\n"
                              "```swift\nlet x = 1\n```\n", {"plot.png": png, "x.png": tmp_path / "missing.png"},
                              "t")
    assert f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"' in page
    assert 'src="x.png"' in page  # a missing file keeps its reference instead of failing the report
    assert "<table>" in page and "<td>2</td>" in page and "<code" in page and "let x = 1" in page
    assert page.startswith("<!DOCTYPE html>") and "<title>t</title>" in page


def test_file_names_in_the_dataset_section_show_as_they_are(tmp_path):
    from pipeline.reporting.report import dataset_section

    warnings = ["label conflict: the same image is 'train/cat/<b>_x_*1*.jpg' (cat) and 'train/dog/a|b.jpg' (dog); "
                "keep it in one class only"]
    report = {"source": "/data/<i>shapes</i>", "layout": "splits", "classes": ["cat", "dog"],
              "images": {"train": 5, "val": 2, "test": 1}, "notes": [], "warnings": warnings,
              "bad_images": [], "ignored_files": []}
    page = html_report.render("\n".join(dataset_section(report, "../ingest/ingest_report.json")) + "\n", {}, "t")
    assert "<h2>Dataset</h2>" in page and "<b>" not in page and "<em>" not in page
    assert f"<li>{html.escape(warnings[0], quote=False)}</li>" in page
    assert f"Source: {html.escape('/data/<i>shapes</i>', quote=False)} (split folders)" in page


def test_the_evaluate_stage_writes_a_self_contained_report(world):
    page = (world["artifacts"] / "evaluate" / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 4  # confusion, worst predictions, reliability, training curves
    assert "Using the model in your app" in page and "<h2>Confidence</h2>" in page
    assert page.index("<h2>Dataset</h2>") < page.index("<h2>Per class</h2>")


def _tool():
    spec = importlib.util.spec_from_file_location("screenshot_report", REPO / "tools" / "screenshot_report.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("screenshot_report", tool)
    spec.loader.exec_module(tool)
    return tool


def test_the_screenshot_check_tells_a_report_from_a_blank_page(tmp_path):
    tool = _tool()
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (255, 255, 255)).save(blank)
    assert len(tool.check(blank)) == 2
    page = np.full((300, 300, 3), 255, dtype=np.uint8)
    page[10:20, 10:200] = 0  # a line of text
    page[50:250, 50:250] = (30, 90, 200)  # a figure
    Image.fromarray(page).save(tmp_path / "page.png")
    assert tool.check(tmp_path / "page.png") == []


@pytest.mark.skipif(_tool().find_browser() is None, reason="no Chromium or Chrome on this machine")
def test_report_html_renders_in_a_headless_browser(world, tmp_path):
    tool = _tool()
    png = tmp_path / "report.png"
    tool.screenshot(world["artifacts"] / "evaluate" / "report.html", png, width=900, height=1800)
    assert tool.check(png) == []


def test_trim_cuts_the_blank_rows_below_the_page(tmp_path):
    tool = _tool()
    page = np.full((1000, 200, 3), 255, dtype=np.uint8)
    page[100:300, 20:180] = (30, 90, 200)
    Image.fromarray(page).save(tmp_path / "page.png")
    tool.trim(tmp_path / "page.png", margin=40)
    assert Image.open(tmp_path / "page.png").size == (200, 340)
    tool.trim(tmp_path / "page.png", margin=40)  # nothing more to cut
    assert Image.open(tmp_path / "page.png").size == (200, 340)
