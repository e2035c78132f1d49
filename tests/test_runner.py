"""The runner: manifests, freshness, atomic stage folders, and interrupted stages never taken for fresh."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import REPO, SMOKE_CONFIG, base_args, invoke, smoke_cfg, snapshot

from pipeline import fileio
from pipeline.errors import ArtifactsError
from pipeline.runner import Runner
from pipeline.stages import BY_NAME, STAGES, upstream_closure


def test_registry_order_and_upstream():
    names = [s.name for s in STAGES]
    assert names == ["ingest", "augment", "train-head", "finetune", "evaluate", "export"]
    for stage in STAGES:
        for up in stage.upstream:
            assert names.index(up) < names.index(stage.name)
    assert [s.name for s in upstream_closure(["finetune"])] == names[:4]


@pytest.mark.parametrize("stop", [RuntimeError("killed mid-way"), KeyboardInterrupt()])
def test_failing_stage_leaves_previous_outputs_intact(world, tmp_path, monkeypatch, stop):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    before = snapshot(artifacts / "evaluate")
    import pipeline.stages.evaluate as evaluate

    def broken(ctx):
        fileio.write_text(ctx.out.metrics, "{half written")
        raise stop

    monkeypatch.setattr(evaluate, "run", broken)
    runner = Runner(smoke_cfg(world, evaluate={"worst_count": 2}), artifacts)
    with pytest.raises(type(stop)):
        runner.run(["evaluate"])
    assert snapshot(artifacts / "evaluate") == before
    assert not any(p.name.startswith(".evaluate") for p in artifacts.iterdir())
    status = runner.freshness(BY_NAME["evaluate"])
    assert status.state == "stale" and status.reasons == ["config changed"]


def test_a_full_disk_is_one_error_naming_the_folder_the_stage_and_the_fix(world, tmp_path, monkeypatch):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    before = snapshot(artifacts / "evaluate")
    import pipeline.stages.evaluate as evaluate

    def full(ctx):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(ctx.out.metrics))

    monkeypatch.setattr(evaluate, "run", full)
    with pytest.raises(ArtifactsError) as err:
        Runner(smoke_cfg(world), artifacts).run(["evaluate"], force={"evaluate"})
    message = str(err.value)
    assert message.startswith(f"no space left on the disk of artifacts folder '{artifacts}' (")
    assert "while evaluate wrote" in message and "metrics.json" in message and "--artifacts" in message
    assert snapshot(artifacts / "evaluate") == before
    assert not any(p.name.startswith(".") and p.name.endswith(".tmp") for p in artifacts.iterdir())


def test_killed_stage_is_not_fresh_afterwards(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    before = snapshot(artifacts / "evaluate")
    changed = tmp_path / "smoke.yaml"
    changed.write_text(SMOKE_CONFIG.read_text().replace("worst_count: 4", "worst_count: 3"))
    args = base_args(world, artifacts, changed)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "evaluate"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scratch = artifacts / ".evaluate.tmp"
    deadline = time.monotonic() + 120
    while not scratch.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert scratch.exists(), "the stage never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert snapshot(artifacts / "evaluate") == before  # the old outputs are untouched
    status = invoke(*args, "status").stdout
    line = next(line for line in status.splitlines() if line.startswith("evaluate"))
    assert line.split()[1] == "stale" and "config changed" in line
    result = invoke(*args, "evaluate")  # the next run cleans up and completes
    assert "evaluate   done" in result.stderr
    assert not scratch.exists()


@pytest.mark.parametrize("elsewhere", [False, True])
def test_in_a_cluster_a_training_stage_runs_when_any_machine_needs_it(world, tmp_path, monkeypatch, elsewhere):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    import pipeline.stages.finetune as finetune
    import pipeline.stages.train_head as train_head

    ran = []
    for module in (train_head, finetune):
        monkeypatch.setattr(module, "run", lambda ctx, name=module.__name__: ran.append(name) or {})
    runner = Runner(smoke_cfg(world), artifacts)
    asked = []
    # another machine's stage is stale, or not
    runner.cluster = SimpleNamespace(any_worker=lambda flag: asked.append(flag) or flag or elsewhere)
    runner.run(["finetune"])
    # Only the stages that train together ask; both are fresh here, but finetune's input is new once train-head ran.
    assert asked == [False, elsewhere]
    assert ran == ([train_head.__name__, finetune.__name__] if elsewhere else [])


@pytest.mark.parametrize("lost", [False, True])
def test_in_a_cluster_a_stage_failing_for_a_lost_worker_is_the_clusters_one_line(world, tmp_path, monkeypatch, lost):
    from pipeline.errors import TrainingError

    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    before = snapshot(artifacts / "finetune")
    import pipeline.stages.finetune as finetune

    def broken(ctx):
        raise RuntimeError("a collective operation failed")

    monkeypatch.setattr(finetune, "run", broken)
    runner = Runner(smoke_cfg(world), artifacts)
    runner.cluster = SimpleNamespace(any_worker=lambda flag: flag, failure=lambda stage, error: TrainingError(
        f"{stage}: worker 1 is gone ({error})") if lost else None)
    with pytest.raises(TrainingError if lost else RuntimeError) as raised:
        runner.run(["finetune"], force={"finetune"})
    if lost:
        assert str(raised.value) == "finetune: worker 1 is gone (a collective operation failed)"
    assert snapshot(artifacts / "finetune") == before  # the previous outputs untouched
    assert not any(p.name.startswith(".finetune") for p in artifacts.iterdir())


def test_corrupt_manifest_is_a_cache_miss(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    (artifacts / "export" / "manifest.json").write_text("{not json")
    runner = Runner(smoke_cfg(world), artifacts)
    assert runner.freshness(BY_NAME["export"]).state == "never run"
    assert runner.freshness(BY_NAME["evaluate"]).state == "fresh"


def test_modified_output_is_detected(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    with open(artifacts / "ingest" / "classes.txt", "a", encoding="utf-8") as f:
        f.write("extra\n")
    runner = Runner(smoke_cfg(world), artifacts)
    assert runner.freshness(BY_NAME["ingest"]).reasons == ["output classes.txt modified"]


def test_resolved_config_written_beside_outputs(world):
    import yaml

    resolved = yaml.safe_load((world["artifacts"] / "finetune" / "config.yaml").read_text())
    assert set(resolved) == {"model", "finetune", "distribute"}
    assert resolved["finetune"]["unfreeze_from"] == "block12"


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "f.txt"
    fileio.write_text(path, "old")
    with pytest.raises(ZeroDivisionError):
        with fileio.atomic_path(path) as tmp:
            tmp.write_text("new, half")
            1 / 0
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_writes_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        fileio.write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
