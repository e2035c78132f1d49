"""Conversions in a worker process: the same files as converting in the stage's own process, each format's
error raised with its name, a worker that cannot start named with the fix, calibration images read only when
a format needs them."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_parity import colour_meta, colour_model  # the tiny colour classifier of the parity tests

from pipeline import quiet
from pipeline.errors import ExportError
from pipeline.export.conversions import Conversions, export_file


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("keras") / "model.h5"
    colour_model().save(path)
    return path


@pytest.fixture(scope="module")
def model(model_path):
    from pipeline.train import models

    return models.load(model_path)


def test_the_worker_writes_the_same_files_as_this_process(tmp_path, model, model_path):
    names = ("onnx", "tflite")
    here = {name: tmp_path / "here" / f"m-{name}" for name in names}
    there = {name: tmp_path / "worker" / f"m-{name}" for name in names}
    for files, in_worker in ((here, False), (there, True)):
        files[names[0]].parent.mkdir()
        with Conversions(model, model_path, colour_meta(), files, in_worker=in_worker) as conversions:
            conversions.wait_all()
        summary = conversions.summary()
        assert list(summary["convert"]) == list(names) and all(s > 0 for s in summary["convert"].values())
        assert summary["calibration_images"] == 0.0
    assert there["tflite"].read_bytes() == here["tflite"].read_bytes()
    assert onnx_content(there["onnx"]) == onnx_content(here["onnx"])


def onnx_content(path):
    """What an ONNX file computes and carries, without the names of its nodes and tensors: TensorFlow numbers the
    functions it traces per process, and tf2onnx names nodes after them, so a process that traced more before
    writes longer names for the same graph."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return {"ops": [(node.op_type, [(a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute
                                    if a.type != onnx.AttributeProto.GRAPH]) for node in proto.graph.node],
            "weights": sorted(numpy_helper.to_array(t).tobytes() for t in proto.graph.initializer),
            "metadata": {p.key: p.value for p in proto.metadata_props}}


def test_a_conversion_error_in_the_worker_is_raised_with_the_format_name(tmp_path, model, model_path):
    files = {"tflite-int8-full": tmp_path / "m.tflite", "onnx": tmp_path / "m.onnx"}
    with Conversions(model, model_path, colour_meta(), files, calibration=None) as conversions:
        with pytest.raises(ExportError, match="tflite-int8-full.*calibration images"):
            conversions.wait("tflite-int8-full")
        conversions.wait("onnx")  # the worker goes on with the next format
    assert (tmp_path / "m.onnx").exists() and not (tmp_path / "m.tflite").exists()


def test_a_worker_that_cannot_start_is_an_error_naming_the_format_and_the_fix(tmp_path, model):
    broken = tmp_path / "model.h5"
    broken.write_bytes(b"not an HDF5 file")
    with Conversions(model, broken, colour_meta(), {"onnx": tmp_path / "m.onnx"}) as conversions:
        with pytest.raises(ExportError, match=r"converting ONNX \('onnx'\).*export.convert_in_worker: false"):
            conversions.wait("onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_calibration_images_are_read_once_and_only_for_a_format_that_needs_them(tmp_path, model, model_path):
    calls = []

    def calibration():
        calls.append(1)
        return np.full((4, 8, 8, 3), 128, np.float32)

    with Conversions(model, model_path, colour_meta(), {"onnx": tmp_path / "m.onnx"}, calibration,
                     in_worker=False) as conversions:
        conversions.wait_all()
    assert calls == []
    files = {"tflite-int8-full": tmp_path / "a.tflite"}
    with Conversions(model, model_path, colour_meta(), files, calibration, in_worker=False) as conversions:
        conversions.wait_all()
        conversions.wait_all()  # a file already written is not converted again
    assert calls == [1] and (tmp_path / "a.tflite").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds child processes through Linux's /proc")
def test_the_worker_ends_with_a_killed_stage(tmp_path):
    """A real SIGKILL of the process that started a busy worker: the worker and multiprocessing's resource
    tracker must not live on."""
    parent = ("import os, time\nfrom pipeline.export.conversions import worker_pool\n"
              "pool = worker_pool()\nprint(pool.submit(os.getpid).result(), flush=True)\n"
              "pool.submit(time.sleep, 300)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        children = _children(proc.pid)
        assert worker in children and len(children) >= 2, children  # the worker, and the resource tracker
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [pid for pid in children if _alive(pid)] == []


def _children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


def test_a_converters_own_lines_are_held_back_unless_verbose(tmp_path, model, capfd, monkeypatch):
    """coremltools' quantization prints a line per layer, and converters warn; the pipeline's output shows neither
    unless -v asks for the libraries' output."""
    export_file("coreml-int8", model, colour_meta(), tmp_path / "quiet.mlmodel")
    assert capfd.readouterr() == ("", "")
    monkeypatch.setattr(quiet, "_verbose", True)
    export_file("coreml-int8", model, colour_meta(), tmp_path / "verbose.mlmodel")
    assert "Quantizing layer" in capfd.readouterr().out
