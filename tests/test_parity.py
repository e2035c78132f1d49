"""The parity table on a tiny colour model: every format's row, the ML Program checker catching broken packages,
and the line naming the smallest passing Core ML file."""
import numpy as np
import pytest

from pipeline.config import ExportConfig
from pipeline.export import mlprogram
from pipeline.export import parity
from pipeline.export.formats import FORMATS
from pipeline.export.meta import ExportMeta

LABELS = ["circle", "red square", "étoile"]
PROTOTYPES = np.array([[0, 0, 255], [255, 0, 0], [255, 255, 0]], dtype=np.float32)  # blue, red, yellow (RGB)
SIZE = 8
SETTINGS = ExportConfig(latency_images=2)


def colour_model():
    """Preprocessed image (x * 2/255 - 1) -> mean colour -> softmax over -distance^2 to each class's colour."""
    import tf_keras as keras

    protos = PROTOTYPES * 2 / 255 - 1
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    dense = keras.layers.Dense(len(LABELS))
    outputs = keras.layers.Activation("softmax")(dense(keras.layers.GlobalAveragePooling2D()(inputs)))
    dense.set_weights([4 * protos.T, -2 * (protos ** 2).sum(1)])
    return keras.Model(inputs, outputs)


def colour_meta(**changes):
    fields = dict(labels=LABELS, image_size=SIZE, scale=2 / 255, bias=(-1.0, -1.0, -1.0), author="tests",
                  license="MIT", description="colour test model", version="0.0")
    return ExportMeta(**{**fields, **changes})


@pytest.fixture(scope="module")
def model():
    return colour_model()


@pytest.fixture(scope="module")
def images():
    """Two images near each class's colour (textured, so not solid): their class is clear, never a tie."""
    rng = np.random.default_rng(0)
    classes = np.arange(6) % 3
    pixels = PROTOTYPES[classes, None, None] + rng.normal(0, 15, (6, SIZE, SIZE, 3))
    return np.clip(pixels, 0, 255).astype(np.float32), classes


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("keras") / "model.h5"
    model.save(path)
    return path


def measure(model, model_path, images, files):
    pixels, truth = images
    return parity.measure(files, model, model_path, colour_meta(), pixels, truth, SETTINGS)


NEW_FORMATS = ["coreml-mlprogram", "coreml-mlprogram-fp32", "coreml-mlprogram-int8", "coreml-mlprogram-palette8",
               "coreml-mlprogram-palette6", "tflite-int8-full"]


def test_every_new_format_gets_a_measured_passing_row(tmp_path, model, model_path, images):
    from pipeline.export.conversions import export_file

    files = {name: tmp_path / f"m{FORMATS[name].suffix}" for name in NEW_FORMATS}
    calibration = np.clip(PROTOTYPES[np.arange(9) % 3, None, None] + np.zeros((9, SIZE, SIZE, 3)), 0, 255)
    for name, path in files.items():
        assert export_file(name, model, colour_meta(), path, calibration.astype(np.float32)) >= 0
    rows = measure(model, model_path, images, files)
    assert [r["format"] for r in rows] == ["keras", *NEW_FORMATS]
    for row in rows[1:]:
        fmt = FORMATS[row["format"]]
        assert row["checked_by"] == fmt.runtime and row["images"] == 6, row
        assert row["passed"] and row["verdict"] == "ok", row
        assert row["seconds"] >= 0 and (("latency_seconds" in row) == fmt.timed)
    fp32 = next(r for r in rows if r["format"] == "coreml-mlprogram-fp32")
    assert fp32["max_probability_difference"] <= SETTINGS.max_probability_difference  # the strict fp32 bar
    assert rows[0]["seconds"] >= 0 and rows[0]["latency_seconds"] >= 0


def test_each_file_is_awaited_before_it_is_read_and_latencies_come_after_every_check(tmp_path, model, model_path,
                                                                                       images, monkeypatch):
    from pipeline.export.conversions import export_file

    files = {name: tmp_path / f"m{FORMATS[name].suffix}" for name in ("onnx", "coreml", "tflite")}
    events = []

    def ready(name):  # the file is written only now, as a conversion in the worker would finish it
        events.append(("ready", name))
        assert not files[name].exists()
        export_file(name, model, colour_meta(), files[name])

    timed = parity._latency
    monkeypatch.setattr(parity, "_latency", lambda predictor, *a: events.append(("latency",)) or timed(predictor, *a))
    pixels, truth = images
    rows = parity.measure(files, model, model_path, colour_meta(), pixels, truth, SETTINGS,
                          log=lambda row: events.append(("checked", row["format"])), ready=ready)
    assert events == [("ready", "onnx"), ("checked", "onnx"), ("ready", "coreml"), ("checked", "coreml"),
                      ("ready", "tflite"), ("checked", "tflite"), *[("latency",)] * 3]  # Keras, ONNX, TFLite
    assert all(r["passed"] for r in rows) and [r["latency_ms"] is not None for r in rows] == [True, True, False, True]


@pytest.fixture(scope="module")
def good_package(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("good") / "m-fp32.mlpackage"
    mlprogram.export(model, colour_meta(), path, "fp32")
    return path


def resaved_with(source, target, change):
    """A copy of the package at `source`, its spec changed by `change`, saved at `target`."""
    import coremltools as ct

    original = ct.models.MLModel(str(source), skip_model_load=True)
    spec = original.get_spec()
    change(spec)
    ct.models.MLModel(spec, weights_dir=original.weights_dir, skip_model_load=True).save(str(target))
    return target


def bgr_input(spec):
    spec.description.input[0].type.imageType.colorSpace = 30  # ImageFeatureType.BGR


@pytest.mark.parametrize("broken", ["scale", "bias", "labels rotated", "BGR input"])
def test_the_checker_catches_a_package_that_computes_something_else(tmp_path, model, model_path, images,
                                                                    good_package, broken):
    path = tmp_path / "m-fp32.mlpackage"
    if broken == "BGR input":  # the package says its image is BGR while the model was trained on RGB
        resaved_with(good_package, path, bgr_input)
    else:
        wrong = {"scale": dict(scale=1 / 255), "bias": dict(bias=(0.0, 0.0, 0.0)),
                 "labels rotated": dict(labels=LABELS[1:] + LABELS[:1])}[broken]
        mlprogram.export(model, colour_meta(**wrong), path, "fp32")
    (row,) = measure(model, model_path, images, {"coreml-mlprogram-fp32": path})[1:]
    assert not row["passed"] and row["verdict"].startswith("FAILED")
    # the checker's own numbers show it, not only the spec check: the probabilities are not Keras's
    assert row["top1_agreement"] < 1 and row["max_probability_difference"] > 0.05, row
    assert parity.blocking_failures([row]) == [row]  # an fp32 file that disagrees stops the export


def test_the_unbroken_package_passes_the_strict_fp32_thresholds(model, model_path, images, good_package):
    (row,) = measure(model, model_path, images, {"coreml-mlprogram-fp32": good_package})[1:]
    assert row["passed"] and row["top1_agreement"] == 1.0
    assert row["max_probability_difference"] <= 1e-4


def test_an_op_the_checker_does_not_implement_gives_an_unverifiable_row_not_a_crash(tmp_path, model_path, images):
    import tf_keras as keras

    from pipeline.checkers.mlprogram_numpy import SUPPORTED_OPS

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Activation("softplus")(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(len(LABELS), activation="softmax")(x))
    path = tmp_path / "m-fp32.mlpackage"
    mlprogram.export(model, colour_meta(), path, "fp32")
    main = mlprogram.read_spec(path).mlProgram.functions["main"]
    unknown = {op.type for op in main.block_specializations[main.opset].operations} - set(SUPPORTED_OPS)
    assert unknown, "the test needs an op the checker does not implement"
    (row,) = measure(model, model_path, images, {"coreml-mlprogram-fp32": path})[1:]
    assert not row["passed"] and "cannot verify" in row["verdict"] and "top1_agreement" not in row
    assert any(op in row["unverifiable"] for op in unknown), row
    assert parity.blocking_failures([row]) == []  # not shown to disagree: the other formats still ship
    assert "cannot verify" in parity.table([row])


def row(name, file, megabytes, passed=True, measured=True):
    """A parity row as measure() writes it, with only what the smallest-file line reads."""
    fmt = FORMATS[name.split("@")[0]]
    out = {"format": name, "title": fmt.title, "file": file, "megabytes": megabytes, "precision": fmt.precision,
           "passed": passed, "problems": [], "checked_by": fmt.runtime, "verdict": "ok" if passed else "FAILED: x"}
    if measured:
        out.update(accuracy=0.9, accuracy_drop=0.0, top1_agreement=1.0, max_probability_difference=0.0)
    return out


def test_the_smallest_passing_coreml_file_is_named_with_its_ratio_to_the_fp32_file():
    rows = [row("coreml", "M.mlmodel", 12.0), row("coreml-fp16", "M-fp16.mlmodel", 6.0),
            row("coreml-mlprogram-palette6", "M-palette6.mlpackage", 2.5, passed=False),
            row("coreml-mlprogram-int8", "M-int8.mlpackage", 3.0),
            row("tflite-int8-full", "M-int8-full.tflite", 1.0)]  # smaller, but not Core ML
    line = parity.smallest_line(rows)
    assert "`M-int8.mlpackage`" in line and "3.00 MB" in line and "the one to ship when size matters" in line
    assert "4.0 times smaller than the fp32 Core ML file `M.mlmodel` (12.00 MB)" in line  # 12 / 3
    assert line in parity.table(rows).splitlines()


def test_a_file_counts_only_if_measured_and_every_row_of_it_passed():
    spec_only = [row("coreml", "M.mlmodel", 12.0), row("coreml-fp16", "M-fp16.mlmodel", 6.0, measured=False)]
    assert "`M.mlmodel`" in parity.smallest_line(spec_only) and "times smaller" not in parity.smallest_line(spec_only)
    on_a_mac = [row("coreml", "M.mlmodel", 12.0), row("coreml-fp16", "M-fp16.mlmodel", 6.0),
                row("coreml-fp16@coreml", "M-fp16.mlmodel", 6.0, passed=False)]
    assert "`M.mlmodel`" in parity.smallest_line(on_a_mac)


def test_the_line_says_when_no_coreml_file_passed():
    rows = [row("coreml", "M.mlmodel", 12.0, passed=False), row("onnx", "M.onnx", 12.0)]
    assert parity.smallest_line(rows).startswith("No Core ML file passed")
    assert parity.smallest_coreml(rows) is None
