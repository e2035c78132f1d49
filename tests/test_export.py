"""The export stage's own functions: calibration images from the train split only, export_file handing them to
the formats that need them, and the breakdown of where the export's time went."""
import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.catalog import IngestFiles
from pipeline.errors import ExportError
from pipeline.export import conversions
from pipeline.export.formats import FORMATS
from pipeline.stages import export

CLASSES = ["a", "b", "c"]
SIZE = 4  # the PNGs; the config (smallest image_size 32) scales them up, solid colours stay
TRAIN = {"a": 5, "b": 2, "c": 4}  # uneven, so the spreading over classes shows


def pixel(split, label, i):
    """A colour that says which image it is: red for the split, green for the class, blue for the image."""
    return ({"train": 10, "val": 120, "test": 230}[split], 40 * CLASSES.index(label) + 20, 20 * i + 10)


@pytest.fixture
def ingest(tmp_path):
    files = IngestFiles(tmp_path / "ingest")
    files.write_classes(CLASSES)
    rows = []
    for split, counts in (("test", {c: 3 for c in CLASSES}), ("train", TRAIN), ("val", {c: 2 for c in CLASSES})):
        for label, count in counts.items():
            for i in range(count):
                path = tmp_path / "data" / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (SIZE, SIZE), pixel(split, label, i)).save(path)
                rows.append({"split": split, "label": label, "path": str(path)})
    files.write_index(["split", "label", "path"], rows)
    return files


def settings(calibration_images):
    return config.from_dict({"model": {"image_size": 32}, "export": {"calibration_images": calibration_images}})


def converted(cfg, ingest, files):
    """The conversions' summary after writing `files` in this process, as the stage would."""
    with export.start_conversions(cfg, {"ingest": ingest}, None, None, files, in_worker=False) as conversions:
        conversions.wait_all()
    return conversions.summary()


def test_calibration_images_are_training_images_spread_over_classes(ingest):
    chosen = export.calibration_rows(ingest, settings(7))
    assert {r["split"] for r in chosen} == {"train"}
    # one per class per round: a b c, a b c, then a (b has only 2)
    assert [r["label"] for r in chosen].count("a") == 3 and [r["label"] for r in chosen].count("b") == 2
    assert [r["label"] for r in chosen].count("c") == 2
    a = [r["path"].rsplit("/", 1)[1] for r in chosen if r["label"] == "a"]
    assert a == ["0.png", "2.png", "4.png"]  # spread evenly over a's five images, first to last
    assert export.calibration_rows(ingest, settings(7)) == chosen  # the same in every run


def test_asking_for_more_calibration_images_than_training_images_takes_them_all(ingest):
    chosen = export.calibration_rows(ingest, settings(100))
    assert len(chosen) == sum(TRAIN.values()) and {r["split"] for r in chosen} == {"train"}


def test_the_exporter_gets_the_pixels_of_training_images_and_never_a_test_image(ingest, tmp_path, monkeypatch):
    given = {}
    module = FORMATS["tflite-int8-full"].exporter()
    monkeypatch.setattr(module, "export", lambda model, meta, path, precision, calibration=None:
                        given.update(precision=precision, calibration=calibration))
    cfg = settings(6)
    exported = converted(cfg, ingest, {"tflite-int8-full": tmp_path / "m.tflite"})
    assert given["precision"] == "int8-full" and set(exported["convert"]) == {"tflite-int8-full"}
    colours = {tuple(int(v) for v in image[0, 0]) for image in given["calibration"]}
    assert given["calibration"].shape == (6, 32, 32, 3) and given["calibration"].dtype == np.float32
    train = {pixel("train", label, i) for label, count in TRAIN.items() for i in range(count)}
    assert colours <= train and len(colours) == 6
    assert not colours & {pixel(split, label, i) for split in ("val", "test") for label in CLASSES for i in range(3)}


def test_formats_without_calibration_read_no_calibration_images(ingest, tmp_path, monkeypatch):
    module = FORMATS["tflite"].exporter()
    monkeypatch.setattr(module, "export", lambda model, meta, path, precision: None)
    monkeypatch.setattr(export, "calibration_pixels", lambda *a: pytest.fail("read calibration images"))
    exported = converted(settings(6), ingest, {"tflite": tmp_path / "m.tflite"})
    assert exported["calibration_images"] == 0


def test_a_calibrated_format_without_images_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="needs calibration images"):
        conversions.export_file("tflite-int8-full", None, None, tmp_path / "m.tflite")


def test_the_time_breakdown_adds_up_every_part():
    rows = [{"format": "keras", "seconds": 2.0, "latency_seconds": 1.0, "check_images_seconds": 0.5},
            {"format": "coreml", "seconds": 3.0},
            {"format": "tflite", "seconds": 0.25, "latency_seconds": 0.75}]
    breakdown = export.time_breakdown({"calibration_images": 0.0, "convert": {"coreml": 4.0, "tflite": 1.0}}, rows)
    assert breakdown == {"calibration_images": 0.0, "check_images": 0.5, "keras_reference": 2.0,
                         "convert": {"coreml": 4.0, "tflite": 1.0}, "check": {"coreml": 3.0, "tflite": 0.25},
                         "latency": {"keras": 1.0, "coreml": 0.0, "tflite": 0.75},
                         "total": 0.5 + 2.0 + 4.0 + 1.0 + 3.0 + 0.25 + 1.0 + 0.75}
    lines = export.time_table(breakdown).splitlines()
    assert "| keras | - | 2.0 | 1.0 | 3.0 |" in lines
    assert "| coreml | 4.0 | 3.0 | 0.0 | 7.0 |" in lines and "| tflite | 1.0 | 0.2 | 0.8 | 2.0 |" in lines
    assert lines[-1] == "| all | 5.0 | 5.8 | 1.8 | 12.5 |"  # 5.75 and 1.75 shown to one decimal


def test_the_wall_time_is_shown_apart_from_the_sum_when_conversions_overlap_the_checks():
    rows = [{"format": "keras", "seconds": 2.0, "latency_seconds": 1.0, "check_images_seconds": 0.5},
            {"format": "coreml", "seconds": 3.0}]
    breakdown = export.time_breakdown({"calibration_images": 0.0, "convert": {"coreml": 4.0}, "elapsed": 7.5}, rows)
    assert breakdown["total"] == 0.5 + 2.0 + 4.0 + 3.0 + 1.0 and breakdown["elapsed"] == 7.5
    lines = export.time_table(breakdown).splitlines()
    assert lines[-2] == "| all | 4.0 | 5.5 | 1.0 | 10.5 |"
    assert lines[-1].startswith("| elapsed (wall time") and lines[-1].endswith("| - | - | - | 7.5 |")
