"""Core ML itself in the parity table and `predict`: on macOS an extra row per Core ML file, elsewhere one line
saying why not. Linux has no Core ML, so `MLModel.predict` is played by a stand-in that answers from the file's
own spec (the NumPy checker) for a `.mlmodel` and from Keras for a `.mlpackage`."""
import numpy as np
import pytest
from test_exporters import LABELS, meta, model, pixels  # noqa: F401  (fixtures)

from pipeline.checkers import coreml_numpy
from pipeline.config import ExportConfig
from pipeline.export import coreml, coreml_runtime, mlprogram
from pipeline.export.parity import measure, table

TRUTH = np.array([0, 1, 2, 0, 0, 0, 0, 0])


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):  # noqa: F811
    folder = tmp_path_factory.mktemp("coreml-runtime")
    paths = {"coreml": folder / "m.mlmodel", "coreml-mlprogram": folder / "m.mlpackage"}
    coreml.export(model, meta(), paths["coreml"])
    mlprogram.export(model, meta(), paths["coreml-mlprogram"])
    h5 = folder / "model.h5"
    model.save(h5)
    return paths, h5


def stand_in(model, calls):  # noqa: F811
    """A class standing in for coremltools.models.MLModel: the same interface, answers computed here.

    Opened with skip_model_load (the NumPy ML Program checker reading a package, not Core ML running it), it
    gives the real MLModel.
    """
    import coremltools as ct

    real = ct.models.MLModel

    class FakeMLModel:
        def __new__(cls, path, skip_model_load=False, **options):
            if skip_model_load:
                return real(path, skip_model_load=True, **options)
            return super().__new__(cls)

        def __init__(self, path):
            self.path = str(path)
            self.spec = (mlprogram.read_spec if self.path.endswith(".mlpackage") else coreml.read_spec)(path)

        def get_spec(self):
            return self.spec

        def predict(self, features):
            image = np.asarray(features["image"], dtype=np.float32)[None]  # a PIL image, as Core ML takes it
            calls.append(self.path)
            if self.path.endswith(".mlpackage"):
                probs = model.predict(image * 2 / 255 - 1, verbose=0)[0]
                labels = LABELS
            else:
                labels, probs = coreml_numpy.class_labels(self.spec), coreml_numpy.class_probabilities(self.spec, image)[1][0]
            return {"labelProbability": dict(zip(labels, map(float, probs))), "label": labels[int(np.argmax(probs))]}

    return FakeMLModel


def test_on_macos_every_core_ml_file_gets_a_row_from_core_ml_itself(monkeypatch, files, model, pixels):  # noqa: F811
    import coremltools as ct

    paths, h5 = files
    calls = []
    monkeypatch.setattr(coreml_runtime, "available", lambda: True)
    monkeypatch.setattr(ct.models, "MLModel", stand_in(model, calls))
    rows = measure(paths, model, h5, meta(), np.rint(pixels), TRUTH, ExportConfig(latency_images=2))  # 8-bit photos
    native = {r["format"]: r for r in rows if r["checked_by"] == coreml_runtime.TITLE}
    assert set(native) == {"coreml@coreml", "coreml-mlprogram@coreml"}
    for row in native.values():
        assert row["top1_agreement"] == 1.0 and row["max_probability_difference"] < 1e-5 and row["passed"]
        assert row["latency_ms"] is not None and row["title"].endswith(", on Core ML")
    assert len(calls) == 2 * (len(pixels) + 1 + 2)  # every check image, one warm-up call, two timed ones
    assert coreml_runtime.ABSENT not in table(rows)


def test_elsewhere_the_table_says_why_core_ml_rows_are_absent(monkeypatch, files, model, pixels):  # noqa: F811
    paths, h5 = files
    monkeypatch.setattr(coreml_runtime, "available", lambda: False)
    rows = measure(paths, model, h5, meta(), pixels, TRUTH, ExportConfig(latency_images=1))
    assert not [r for r in rows if r["format"].endswith("@coreml")]
    assert table(rows).rstrip().splitlines()[-1] == coreml_runtime.ABSENT


def test_the_runtime_predictor_feeds_8_bit_pictures_and_orders_labels(monkeypatch, files, model, pixels):  # noqa: F811
    import coremltools as ct

    paths, _ = files
    monkeypatch.setattr(ct.models, "MLModel", stand_in(model, []))
    predictor = coreml_runtime.load(paths["coreml"], list(reversed(LABELS)))
    probs = predictor.predict(pixels[:3])
    assert predictor.image_size == 16 and list(probs.argmax(1)) == [2, 1, 0]  # columns in the order asked for
