"""`predict` and `verify` on the smoke world's exports: output, format choice, and the errors a user can hit,
damaged exported files among them."""
import json
import re
import shutil

import pytest
from conftest import SMOKE_CONFIG, base_args, invoke, shape_image
from test_export import KINDS, damaged_copy, good_files  # noqa: F401  (good_files: a fixture)

from pipeline import config, predict
from pipeline.export.formats import FORMATS

CLASSES = ["circle", "red square", "étoile"]
LINE = re.compile(r"^(.+): (.+) (\d\.\d{3}), (.+) (\d\.\d{3})$")


def a_test_image(world):
    return sorted((world["data"] / "test" / "circle").iterdir())[0]


def test_predict_prints_top_k_labels_for_each_format(world):
    image = a_test_image(world)
    answers = {}
    for name in ("coreml", "onnx", "tflite", "keras", "coreml-int8", "coreml-mlprogram", "coreml-mlprogram-fp32"):
        # --threshold 0: labels only, never "not sure" (the smoke model is unsure of everything)
        result = invoke(*base_args(world), "predict", str(image), "--format", name, "--top-k", "2", "--threshold", "0")
        assert result.exit_code == 0, result.stderr
        (line,) = result.stdout.splitlines()
        match = LINE.match(line)
        assert match and match.group(1) == str(image), line
        assert match.group(2) in CLASSES and match.group(4) in CLASSES
        assert float(match.group(3)) >= float(match.group(5))
        answers[name] = (match.group(2), float(match.group(3)))
    top = {label for label, _ in answers.values()}
    assert len(top) == 1, answers  # every format gives the same answer for the same photo
    assert max(p for _, p in answers.values()) - min(p for _, p in answers.values()) < 1e-2


def test_predict_a_folder_recursively(world):
    result = invoke(*base_args(world), "predict", str(world["data"] / "test"), "--format", "onnx")
    assert result.exit_code == 0, result.stderr
    images = predict.image_files(world["data"] / "test")
    assert len(result.stdout.splitlines()) == len(images) > 3


def test_predict_errors_name_the_path_and_the_fix(world, tmp_path):
    missing = invoke(*base_args(world), "predict", str(tmp_path / "nope.jpg"))
    assert missing.exit_code == 1 and "nope.jpg: no such file or folder" in missing.stderr
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    bad = invoke(*base_args(world), "predict", str(text), "--format", "tflite")
    assert bad.exit_code == 1 and "notes.jpg: not an image" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = invoke(*base_args(world), "predict", str(empty))
    assert nothing.exit_code == 1 and "no image files" in nothing.stderr
    no_exports = invoke(*base_args(world, artifacts=tmp_path / "none"), "predict", str(a_test_image(world)))
    assert no_exports.exit_code == 1 and "run `python -m pipeline export`" in no_exports.stderr
    unknown = invoke(*base_args(world), "predict", str(a_test_image(world)), "--format", "pdf")
    assert unknown.exit_code == 2 and "pdf" in unknown.stderr


def test_predict_offers_every_exported_format():
    assert set(predict.RUNNABLE) == {"keras", *FORMATS}  # ML Programs through the NumPy ML Program checker


def test_verify_prints_the_parity_table(world):
    result = invoke(*base_args(world), "verify")
    assert result.exit_code == 0, result.stderr
    formats = config.load(SMOKE_CONFIG).export.formats
    for name in formats:
        assert FORMATS[name].title in result.stdout
    assert "FAILED" not in result.stdout
    assert "Smallest Core ML file that passed: `MultiSnacks-" in result.stdout  # a compressed one, smaller than fp32
    saved = (world["artifacts"] / "export" / "parity.md").read_text(encoding="utf-8")
    assert saved.splitlines()[0] == result.stdout.splitlines()[0]
    rows = json.loads((world["artifacts"] / "export" / "export.json").read_text(encoding="utf-8"))["formats"]
    assert [r["format"] for r in rows] == ["keras", *formats]
    assert all(r["passed"] for r in rows)


def test_verify_fails_when_an_export_is_broken(world, tmp_path):
    import coremltools as ct

    from pipeline.export import coreml

    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    path = artifacts / "export" / "MultiSnacks.mlmodel"
    spec = coreml.read_spec(path)
    spec.neuralNetworkClassifier.preprocessing[0].scaler.redBias = 0.0
    ct.utils.save_spec(spec, str(path))
    result = invoke(*base_args(world, artifacts=artifacts), "verify")
    assert result.exit_code == 1
    assert "Core ML: FAILED" in result.stderr and "redBias" in result.stderr


def the_error_line(result):
    """The one "error: ..." line of a failed run, which must have printed no traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


@pytest.mark.parametrize("damage", ["truncated .mlmodel", "truncated .mlpackage spec", "removed weights",
                                    "garbage .onnx", "truncated .tflite"])
def test_predict_with_a_damaged_export_names_the_file_the_reason_and_the_fix(good_files, tmp_path,  # noqa: F811
                                                                               damage):
    artifacts = tmp_path / "artifacts"
    (artifacts / "export").mkdir(parents=True)
    name, path = damaged_copy(good_files, artifacts / "export", damage)  # MultiSnacks.<suffix>, as export names it
    (artifacts / "export" / "labels.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    image = tmp_path / "photo.jpg"
    shape_image("circle", 0).save(image)
    result = invoke("--config", str(SMOKE_CONFIG), "--artifacts", str(artifacts), "predict", str(image),
                    "--format", name)
    line = the_error_line(result)
    assert f"{path}: cannot read this {KINDS[name]} (" in line
    assert "run `python -m pipeline export --force` to rewrite it, or copy it again" in line


def test_verify_with_damaged_exports_fails_with_a_row_naming_each_one(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    export = artifacts / "export"
    mlmodel = export / "MultiSnacks.mlmodel"
    mlmodel.write_bytes(mlmodel.read_bytes()[:mlmodel.stat().st_size // 2])
    (export / "MultiSnacks.onnx").write_bytes(bytes(range(256)) * 4)
    result = invoke(*base_args(world, artifacts=artifacts), "verify")
    line = the_error_line(result)
    rows = {r.split(" | ")[0].strip("| "): r for r in result.stdout.splitlines() if r.startswith("| ")}
    for title, path in (("Core ML", mlmodel), ("ONNX", export / "MultiSnacks.onnx")):
        assert f"FAILED: damaged file; {path}: cannot read this" in rows[title] and "export --force" in rows[title]
    assert "FAILED" not in rows["TFLite"]  # the whole files are still measured
    assert "Core ML: FAILED" in result.stderr and "ONNX: FAILED" in result.stderr and line.startswith("error: ")


def test_below_the_threshold_an_answer_is_not_sure_with_the_best_guesses():
    results = [("a.jpg", [("circle", 0.9), ("étoile", 0.1)]), ("b.jpg", [("circle", 0.5), ("étoile", 0.4)])]
    assert predict.format_results(results, 0.6).splitlines() == [
        "a.jpg: circle 0.900, étoile 0.100", "b.jpg: not sure (below 0.600; best guesses: circle 0.500, étoile 0.400)"]
    assert "not sure" not in predict.format_results(results)
    assert "not sure" not in predict.format_results(results, 0.0)


def test_predict_uses_the_recommended_threshold_unless_told_otherwise(world):
    image = a_test_image(world)
    recorded = json.loads((world["artifacts"] / "export" / "export.json").read_text())["confidence"]
    threshold = recorded["confidence_threshold"]
    evaluated = json.loads((world["artifacts"] / "evaluate" / "metrics.json").read_text())["confidence"]["threshold"]
    assert threshold == pytest.approx(evaluated, abs=1e-6)
    cfg = config.load(SMOKE_CONFIG)
    assert predict.recommended_threshold("onnx", cfg, world["artifacts"]) == threshold
    assert predict.recommended_threshold("keras", cfg, world["artifacts"]) == evaluated
    result = invoke(*base_args(world), "predict", str(image), "--format", "onnx", "--threshold", "1")
    assert result.exit_code == 0 and result.stdout.startswith(f"{image}: not sure (below 1.000; best guesses: ")
    result = invoke(*base_args(world), "predict", str(image), "--format", "onnx")
    [(_, labels)] = predict.top_labels(predict.load_predictor("onnx", cfg, world["artifacts"]), [image], 3)
    assert result.stdout.strip() == predict.format_results([(image, labels)], threshold)
    assert ("not sure" in result.stdout) == (labels[0][1] < threshold)
    result = invoke(*base_args(world), "predict", str(image), "--format", "onnx", "--threshold", "1.5")
    assert result.exit_code != 0 and "--threshold" in result.stderr
