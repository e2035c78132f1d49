"""The export stage's own functions: calibration images from the train split only, export_file handing them to
the formats that need them, and the breakdown of where the export's time went; and what loading and verifying
make of a damaged exported file."""
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from test_exporters import LABELS, PROTOTYPES, colour_model, conv_model, solid
from test_exporters import meta as tiny_meta

from pipeline import config
from pipeline.catalog import IngestFiles
from pipeline.checkers.kernels import DamagedFile
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



# -- damaged exported files ----------------------------------------------------------------------------------

def _half(path):
    """Cut the file to the first half of its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _weights(package):
    return package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


KINDS = {"coreml": "Core ML model (.mlmodel)", "coreml-mlprogram-fp32": "Core ML ML Program (.mlpackage)",
         "onnx": "ONNX model", "tflite": "TFLite model"}
# (format, what is done to a good file, words of the reader's reason)
DAMAGES = {
    "truncated .mlmodel": ("coreml", _half, "Error parsing message"),
    "empty .mlmodel": ("coreml", lambda p: p.write_bytes(b""), "holds no model"),
    "truncated .mlpackage spec": ("coreml-mlprogram-fp32",
                                  lambda p: _half(p / "Data" / "com.apple.CoreML" / "model.mlmodel"),
                                  "Error parsing message"),
    "removed weights": ("coreml-mlprogram-fp32", lambda p: _weights(p).unlink(), "No such file"),
    "truncated weights": ("coreml-mlprogram-fp32", lambda p: _half(_weights(p)), "weights/weight.bin ends at byte"),
    "removed manifest": ("coreml-mlprogram-fp32", lambda p: (p / "Manifest.json").unlink(), "manifest"),
    "garbage .onnx": ("onnx", lambda p: p.write_bytes(bytes(range(256)) * 4), "(Error parsing|INVALID_PROTOBUF)"),
    "truncated .tflite": ("tflite", _half, "not a valid Flatbuffer"),
}


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    """{format: path} of a tiny model exported once in each format of KINDS (the ML Program from a convolutional
    model, whose weights are too many to be kept in the spec: they are in its weights file)."""
    folder = tmp_path_factory.mktemp("good")
    files = {}
    for name in KINDS:
        fmt = FORMATS[name]
        files[name] = folder / f"MultiSnacks{fmt.suffix}"
        fmt.exporter().export(conv_model() if fmt.suffix.endswith(".mlpackage") else colour_model(), tiny_meta(),
                              files[name], fmt.precision)
    return files


def copied(source, folder):
    """A copy of the file or package `source` in `folder`."""
    path = folder / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, path)
    return path


def damaged_copy(good_files, folder, damage):
    """A copy of the good file of the damage's format in `folder`, damaged; returns (format name, path)."""
    name, change, _ = DAMAGES[damage]
    path = copied(good_files[name], folder)
    change(path)
    return name, path


def assert_names_file_reason_and_fix(message, path, reason):
    assert str(path) in message and "\n" not in message, message
    assert re.search(reason, message), message
    assert "damaged or truncated: run `python -m pipeline export --force` to rewrite it, or copy it again" in message


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_file_is_one_error_naming_the_file_the_reason_and_the_fix(good_files, tmp_path, damage):
    name, path = damaged_copy(good_files, tmp_path, damage)
    module = FORMATS[name].exporter()
    with pytest.raises(DamagedFile) as error:  # a PipelineError: one "error: ..." line from the CLI
        module.load(path, LABELS)
    assert f"cannot read this {KINDS[name]} (" in str(error.value)
    assert_names_file_reason_and_fix(str(error.value), path, DAMAGES[damage][2])
    assert module.problems(path, tiny_meta()) == ["damaged file"]  # fails a verify row, beside the error above


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("name", KINDS)
def test_an_unreadable_file_is_one_error_saying_to_make_it_readable(good_files, tmp_path, name):
    path = copied(good_files[name], tmp_path)
    (path / "Data" / "com.apple.CoreML" / "model.mlmodel" if path.is_dir() else path).chmod(0)
    with pytest.raises(DamagedFile, match="make it readable") as error:
        FORMATS[name].exporter().load(path, LABELS)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert FORMATS[name].exporter().problems(path, tiny_meta()) == ["unreadable file"]


def test_damaged_files_get_failed_rows_in_the_parity_table_and_stop_verify(good_files, tmp_path):
    from pipeline.config import ExportConfig
    from pipeline.export import parity

    files = dict(good_files)
    for damage in ("truncated .mlmodel", "removed weights", "garbage .onnx"):
        name, files[name] = damaged_copy(good_files, tmp_path, damage)
    model = colour_model()
    model.save(tmp_path / "model.h5")
    pixels = np.stack([solid(colour) for colour in PROTOTYPES])
    rows = parity.measure(files, model, tmp_path / "model.h5", tiny_meta(), pixels, np.arange(3),
                          ExportConfig(latency_images=1))
    by_format = {r["format"]: r for r in rows}
    for name in ("coreml", "coreml-mlprogram-fp32", "onnx"):
        row = by_format[name]
        assert not row["passed"] and "top1_agreement" not in row
        assert row["verdict"].startswith(f"FAILED: damaged file; {files[name]}: cannot read this {KINDS[name]} (")
    assert by_format["tflite"]["passed"]  # the good file beside them is still measured
    assert {r["format"] for r in parity.blocking_failures(rows)} == {"coreml", "coreml-mlprogram-fp32", "onnx"}
    assert "cannot read this" in parity.table(rows)


def test_a_file_core_ml_itself_cannot_read_is_a_damaged_file_too(tmp_path, monkeypatch):
    import coremltools as ct

    from pipeline.export import coreml_runtime

    def refuse(path):  # Core ML runs only on macOS: this stands in for its answer to a cut-off file
        raise RuntimeError("Error reading protobuf spec.\nvalidator error: truncated")

    monkeypatch.setattr(ct.models, "MLModel", refuse)
    path = tmp_path / "MultiSnacks.mlmodel"
    path.write_bytes(b"\x08")
    with pytest.raises(DamagedFile) as error:
        coreml_runtime.load(path, LABELS)
    assert_names_file_reason_and_fix(str(error.value), path, "Error reading protobuf spec. validator error")


def test_confidence_metadata_from_evaluates_metrics():
    confidence = {"temperature": 1.23456789, "threshold": 0.61234567, "keep_correct": 0.95}
    meta = export.confidence_metadata({"confidence": confidence})
    assert meta["temperature"] == 1.234568 and meta["confidence_threshold"] == 0.612346
    assert "keeps 95% of the validation images the model gets right" in meta["confidence_threshold_rule"]
    assert export.confidence_metadata({"confidence": {**confidence, "threshold": None}}) == {"temperature": 1.234568}
    assert export.confidence_metadata({}) == {}  # an evaluate stage from before calibration


def test_the_probability_outputs_note_gives_the_calibration_and_the_threshold():
    confidence = {"calibrated": True, "temperature": 1.5, "threshold": 0.612, "keep_correct": 0.95}
    assert export.output_note({"confidence": confidence}) == (
        "Calibrated on the validation photos (temperature 1.500); when the top class's probability is below 0.612, "
        'show "not sure" (keeps 95% of correct answers).')
    assert export.output_note({"confidence": {**confidence, "calibrated": False, "threshold": None}}) == (
        "Not calibrated.")
    assert export.output_note({}) == ""
