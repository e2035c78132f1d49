"""The CLI end to end on a tiny dataset with configs/smoke.yaml: every stage, the cache, chaining, status."""
import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO, SMOKE_CONFIG, base_args, invoke, ran, snapshot

from pipeline.cli import cli
from pipeline.export import coreml

STAGES = ["ingest", "augment", "train-head", "finetune", "evaluate", "export"]


def test_all_runs_every_stage_and_writes_the_exports(world):
    result = world["first"]
    assert result.exit_code == 0, result.stderr
    assert ran(result) == STAGES
    export = world["artifacts"] / "export"
    for name in ("MultiSnacks.mlmodel", "MultiSnacks.onnx", "MultiSnacks.tflite", "labels.txt", "export.json"):
        assert (export / name).is_file(), name
    for name in ("metrics.json", "report.md", "confusion.png", "predictions.csv"):
        assert (world["artifacts"] / "evaluate" / name).is_file(), name
    assert (world["artifacts"] / "augment" / "preview.png").is_file()
    assert (world["artifacts"] / "finetune" / "history.csv").read_text().splitlines()[0].count("lr")
    # Each stage ends with one summary line.
    for stage in STAGES:
        assert re.search(rf"I {re.escape(stage)}\s+done in \S+: \S", result.stderr), stage


def test_coreml_spec_field_by_field(world):
    spec = coreml.read_spec(world["artifacts"] / "export" / "MultiSnacks.mlmodel")
    classes = (world["artifacts"] / "ingest" / "classes.txt").read_text(encoding="utf-8").splitlines()
    assert classes == ["circle", "red square", "étoile"]
    (inp,) = spec.description.input
    assert inp.name == "image"
    assert inp.type.WhichOneof("Type") == "imageType"
    assert (inp.type.imageType.width, inp.type.imageType.height) == (32, 32)
    assert inp.type.imageType.colorSpace == 20  # RGB
    scaler = spec.neuralNetworkClassifier.preprocessing[0].scaler
    assert abs(scaler.channelScale - 2 / 255) < 1e-7
    assert (scaler.redBias, scaler.greenBias, scaler.blueBias) == (-1.0, -1.0, -1.0)
    assert list(spec.neuralNetworkClassifier.stringClassLabels.vector) == classes
    outputs = {o.name: o.type.WhichOneof("Type") for o in spec.description.output}
    assert outputs == {"labelProbability": "dictionaryType", "label": "stringType"}
    md = spec.description.metadata
    assert md.author and md.license and md.shortDescription and md.versionString == "1.0"
    user = dict(md.userDefined)
    assert user["com.apple.coreml.model.preview.type"] == "imageClassifier"
    for key in ("backbone", "image_size", "test_accuracy", "dataset", "training"):
        assert user[key], key
    assert user["image_size"] == "32"
    assert user["dataset"].startswith("shapes (") and "/" not in user["dataset"]
    metrics = json.loads((world["artifacts"] / "evaluate" / "metrics.json").read_text())
    assert user["test_accuracy"] == f"{metrics['accuracy']:.4f}"
    from pipeline.data import vision_crop

    best = vision_crop.get_option(metrics["recommended_crop"])
    assert f"imageCropAndScaleOption {best.vision}" in inp.shortDescription  # what the app should set


def test_label_order_is_the_same_everywhere(world):
    import onnx

    from pipeline.train import models

    classes = (world["artifacts"] / "ingest" / "classes.txt").read_text(encoding="utf-8").splitlines()
    export = world["artifacts"] / "export"
    assert (export / "labels.txt").read_text(encoding="utf-8").splitlines() == classes
    assert json.loads((export / "export.json").read_text(encoding="utf-8"))["labels"] == classes
    props = {p.key: p.value for p in onnx.load(str(export / "MultiSnacks.onnx")).metadata_props}
    assert json.loads(props["labels"]) == classes
    spec = coreml.read_spec(export / "MultiSnacks.mlmodel")
    assert list(spec.neuralNetworkClassifier.stringClassLabels.vector) == classes
    # the confidence the files were measured with: the same in both formats' metadata and export.json
    confidence = json.loads((export / "export.json").read_text(encoding="utf-8"))["confidence"]
    assert set(confidence) == {"temperature", "confidence_threshold", "confidence_threshold_rule"}
    core_ml = spec.description.metadata.userDefined
    for key, value in confidence.items():
        assert props[key] == core_ml[key] == str(value)
    probability = next(o for o in spec.description.output if o.name == "labelProbability")
    assert f"below {confidence['confidence_threshold']:.3f}, show" in probability.shortDescription
    model = models.load(world["artifacts"] / "finetune" / "model.h5")
    assert model.output_shape[-1] == len(classes)
    metrics = json.loads((world["artifacts"] / "evaluate" / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics["per_class"]) == classes


def test_second_run_does_no_work(world):
    result = invoke(*base_args(world), "all")
    assert result.exit_code == 0
    assert ran(result) == []
    assert len(re.findall(r"fresh, skipping", result.stderr)) == 6


def test_status_table(world):
    result = invoke(*base_args(world), "status")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["stage", "state", "why"]
    for stage, line in zip(STAGES, lines[1:]):
        assert line.split()[:2] == [stage, "fresh"]
    assert "MultiSnacks" in lines[-1]


def test_status_imports_no_tensorflow(world):
    """`status` reads manifests and code digests only: it must answer in a second, not after loading TensorFlow."""
    probe = ("import sys\nfrom pipeline.cli import cli\ntry:\n    cli(sys.argv[1:], standalone_mode=False)\n"
             "finally:\n    print('tensorflow loaded:', 'tensorflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe, *base_args(world), "status"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fresh" in done.stdout and done.stdout.strip().endswith("tensorflow loaded: False")


@pytest.mark.parametrize("given_by", ["file", "--set"])
def test_a_config_change_reruns_exactly_the_right_stages(world, tmp_path, given_by):
    """A changed value, in the config file or by --set, makes exactly the stages that read it stale."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    if given_by == "file":
        config = tmp_path / "smoke.yaml"
        config.write_text(SMOKE_CONFIG.read_text().replace("finetune:\n", "finetune:\n  learning_rate: 0.0003\n"))
        args = [*base_args(world, artifacts, config)]
    else:
        args = [*base_args(world, artifacts), "--set", "finetune.learning_rate=0.0003"]
    status = invoke(*args, "status")
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[1:]}
    assert states == {"ingest": "fresh", "augment": "fresh", "train-head": "fresh", "finetune": "stale",
                      "evaluate": "stale", "export": "stale"}
    assert "config changed" in status.stdout
    result = invoke(*args, "finetune")
    assert ran(result) == ["finetune"]  # naming a stage does not run what is downstream of it
    assert "learning_rate: 0.0003" in (artifacts / "finetune" / "config.yaml").read_text()
    status = invoke(*args, "status")  # what runs next does not depend on how the value was given
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[1:]}
    assert [stage for stage, state in states.items() if state != "fresh"] == ["evaluate", "export"]


def test_chaining_and_force(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    result = invoke(*base_args(world, artifacts), "train-head", "evaluate")
    assert ran(result) == []
    result = invoke(*base_args(world, artifacts), "--force", "evaluate", "augment")
    assert ran(result) == ["augment", "evaluate"]


def test_deleted_output_makes_a_stage_stale(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    (artifacts / "evaluate" / "confusion.png").unlink()
    status = invoke(*base_args(world, artifacts), "status")
    assert "output confusion.png missing" in status.stdout
    result = invoke(*base_args(world, artifacts), "evaluate")
    assert ran(result) == ["evaluate"]


def test_bad_config_is_a_clear_error(world, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  dropout: 1.5\n")
    result = CliRunner().invoke(cli, base_args(world, tmp_path / "a", config) + ["ingest"])
    assert result.exit_code == 1
    assert "model.dropout" in result.stderr and "1.5" in result.stderr
    assert not (tmp_path / "a").exists()


def test_missing_data_is_a_clear_error(world, tmp_path):
    result = CliRunner().invoke(cli, ["--config", str(SMOKE_CONFIG), "--data", str(tmp_path / "nowhere"),
                                      "--artifacts", str(tmp_path / "a"), "ingest"])
    assert result.exit_code == 1
    assert "nowhere" in result.stderr and "does not exist" in result.stderr


def test_help_explains_each_stage():
    from pipeline.stages import STAGES as REGISTRY

    for stage in REGISTRY:
        result = invoke(stage.name, "--help")
        assert result.exit_code == 0 and " ".join(stage.help.split()) in " ".join(result.stdout.split())
    for command in ("all", "status"):
        assert invoke(command, "--help").exit_code == 0
    overview = invoke("--help").stdout
    assert "--force" in overview and all(stage.name in overview for stage in REGISTRY)


def test_an_interrupt_is_one_line_and_exit_130(world, tmp_path, monkeypatch):
    """What the user sees; that the cache stays intact is the runner's test."""
    import pipeline.stages.evaluate as evaluate

    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run", interrupted)
    result = CliRunner().invoke(cli, base_args(world, artifacts) + ["--force", "evaluate"])
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_is_one_line_and_leaves_the_cache_as_it_was(world, tmp_path):
    """A real SIGTERM to a real run, mid-stage: like Ctrl-C, not a silent death that leaves the stage's folder."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    before = snapshot(artifacts)
    blocked = ("import sys, time\nimport pipeline.stages.evaluate as evaluate\nfrom pipeline.cli import main\n"
               "def run(ctx):\n    (ctx.out.root / 'half.json').write_text('{')\n    print('started', flush=True)\n"
               "    time.sleep(300)\nevaluate.run = run\nsys.argv[0] = 'multisnacks'\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", blocked, *base_args(world, artifacts), "--force", "evaluate"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "terminated: the running stage was not saved" in stderr and "Traceback" not in stderr
    assert snapshot(artifacts) == before  # no scratch folder, no lock record, previous outputs untouched


@pytest.mark.parametrize("override, named", [
    ("finetune.epochs=many", "finetune.epochs"), ("finetune.no_such_key=1", "finetune.no_such_key"),
    ("nosection.key=1", "nosection"), ("finetune.epochs", "section.key=value"), ("epochs=3", "section.key=value"),
])
def test_bad_set_is_a_clear_error(world, tmp_path, override, named):
    result = CliRunner().invoke(cli, base_args(world, tmp_path / "a") + ["--set", override, "ingest"])
    assert result.exit_code == 1 and named in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()


def test_weights_dir_is_not_part_of_the_cache_key(world, tmp_path):
    status = invoke(*base_args(world), "--weights-dir", str(tmp_path), "status")
    assert "stale" not in status.stdout


@pytest.mark.parametrize("name", ["mynet", "smallcnn"])
def test_a_small_network_runs_end_to_end_on_the_digits_folder(tmp_path, name):
    digits = tmp_path / "digits"
    result = invoke("digits", str(digits), "--size", "28")
    assert "wrote 1797 digit images" in result.stdout and (digits / "test" / "7").is_dir()
    artifacts = tmp_path / "artifacts"
    result = invoke("--config", f"configs/{name}.yaml", "--data", str(digits), "--artifacts", str(artifacts),
                    "--set", "train_head.epochs=3", "--set", "export.formats=[coreml, onnx, tflite]", "all")
    assert ran(result) == ["ingest", "augment", "train-head", "finetune", "evaluate", "export"]
    rows = json.loads((artifacts / "export" / "export.json").read_text())["formats"]
    assert all(row["passed"] and row.get("top1_agreement", 1.0) == 1.0 for row in rows), rows
    metrics = json.loads((artifacts / "evaluate" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.3  # three epochs from scratch: well above chance (0.1), far from done


def test_error_text_wraps_to_the_width_without_splitting_paths():
    from pipeline.cli import error_text
    from pipeline.errors import DataError

    path = "/a/very/long/folder/name/that/is/wider/than/the/terminal/itself.jpg"
    message = f"image '{path}' cannot be read (permission denied); fix its permissions\nsecond line of the message"
    lines = error_text(DataError(message), 40).splitlines()
    assert lines[0].startswith("error: image") and all(line.startswith("  ") for line in lines[1:])
    assert all(len(line) <= 40 for line in lines if path not in line)
    assert f"'{path}'" in lines[1]  # on its own line, whole
    assert " ".join(line.strip() for line in lines) == f"error: {' '.join(message.split())}"
    assert lines[-1] == "  second line of the message"  # the message's own line breaks are kept
    assert error_text(DataError(message)) == f"error: {message}"  # not a terminal: as it is


def test_errors_on_a_terminal_are_wrapped_to_its_width(tmp_path):
    """A real pseudo-terminal as stderr: the message is wrapped to its COLUMNS; redirected, it stays one line."""
    import os
    import pty

    args = [sys.executable, "-m", "pipeline", "--config", str(tmp_path / "missing.yaml"), "status"]
    env = {**os.environ, "COLUMNS": "50"}
    parent, child = pty.openpty()
    process = subprocess.Popen(args, stderr=child, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    assert process.wait(timeout=60) == 1
    wrapped = b"".join(chunks).decode().replace("\r\n", "\n").strip().splitlines()
    piped = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=60).stderr.strip()
    assert len(wrapped) > 1 and "\n" not in piped
    assert all(len(line) <= 50 or " " not in line.strip() for line in wrapped)
    assert " ".join(line.strip() for line in wrapped) == piped
