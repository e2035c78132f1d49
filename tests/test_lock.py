"""The artifacts folder's lock: a second run stops with a clear error, and a killed holder leaves no stale lock."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO, smoke_cfg, snapshot

from pipeline.cache.lock import HOLDER, holding
from pipeline.errors import ArtifactsError
from pipeline.runner import Runner

HOLD = ("import sys, time; from pipeline.cache.lock import HOLDER, holding\n"
        "with holding(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n")


@pytest.fixture
def other_process(tmp_path):
    """Start a real second process holding the lock of a folder; it is SIGKILLed at the end if still alive."""
    started = []

    def start(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_folder_held_by_another_process_is_a_clear_error(tmp_path, other_process):
    artifacts = tmp_path / "artifacts"
    proc = other_process(artifacts)
    with pytest.raises(ArtifactsError) as err:
        with holding(artifacts):
            pass
    message = str(err.value)
    assert str(artifacts) in message and "in use by another run" in message and "--artifacts" in message
    assert f"(PID {proc.pid}: " in message and "-c " in message  # which run, and its command line


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, other_process):
    artifacts = tmp_path / "artifacts"
    proc = other_process(artifacts)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with holding(artifacts):
        assert [p.name for p in artifacts.iterdir()] == [HOLDER]  # the killed run's record, now this process's
        assert f'"pid": {os.getpid()}' in (artifacts / HOLDER).read_text()
    assert list(artifacts.iterdir()) == []  # a lock released leaves nothing behind


def test_this_process_may_take_a_lock_it_holds_and_releases_it_last(tmp_path, other_process):
    artifacts = tmp_path / "artifacts"
    with holding(artifacts):
        with holding(artifacts):
            pass
        probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(300)", "pass"), str(artifacts)],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0 and "in use by another run" in probe.stderr  # still held after the inner block
    other_process(artifacts)  # released after the outer one


def test_a_run_on_a_held_folder_stops_before_writing(world, tmp_path, other_process):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    other_process(artifacts)
    before = snapshot(artifacts)
    with pytest.raises(ArtifactsError, match="in use by another run"):
        Runner(smoke_cfg(world), artifacts).run(["evaluate"], force={"evaluate"})
    assert snapshot(artifacts) == before


def test_a_run_removes_what_killed_runs_left(world, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    store = artifacts / "feature-store"
    leftovers = [store / ".tmp", store / ".train-head-0123.4567.tmp", artifacts / ".export.tmp", artifacts / ".tmp",
                 artifacts / "sources" / "0123456789abcdef.tmp"]
    for folder in leftovers:
        (folder / "part").mkdir(parents=True)
        (folder / "part" / "train.npy").write_bytes(b"half written")
    Runner(smoke_cfg(world), artifacts).run(["ingest"])  # fresh: runs nothing, but cleans up
    assert [folder for folder in leftovers if folder.exists()] == []
