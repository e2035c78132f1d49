"""tools/kill_campaign.py: its comparison, status, leftover and /proc helpers (the campaign itself never runs here)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("kill_campaign", REPO / "tools" / "kill_campaign.py")
kc = importlib.util.module_from_spec(spec)
sys.modules.setdefault("kill_campaign", kc)
spec.loader.exec_module(kc)


def test_json_differences_name_the_keys():
    a = {"x": 1, "s": {"t": [1, 2], "u": "same"}, "gone": 0, "formats": [{"seconds": 1.0}, {"seconds": 2.0}]}
    b = {"x": 1, "s": {"t": [1, 3], "u": "same"}, "new": 0, "formats": [{"seconds": 1.0}, {"seconds": 2.5}]}
    assert kc.json_differences(a, b) == [(kc.KEYS,), ("formats", 1, "seconds"), ("s", "t", 1)]
    uuids = kc.json_differences({"items": {"1f": {"n": 1}}}, {"items": {"9c": {"n": 1}}})
    assert uuids == [("items", kc.KEYS)]
    assert kc.field_id(kc.Difference("export", "M.mlpackage/Manifest.json", "json"), uuids[0]) == \
        ("json", "Manifest.json", "items.<keys>")
    assert kc.json_differences([1, 2], [1, 2, 3]) == [()]  # another length: the list itself
    assert kc.json_differences({"a": 1}, {"a": 1}) == []
    assert kc.path_text(("formats", 1, "seconds")) == "formats[1].seconds"
    assert kc.path_text(("formats", 1, "seconds"), pattern=True) == "formats[*].seconds"


def _folders(tmp_path, files_a, files_b):
    for root, files in (("a", files_a), ("b", files_b)):
        for rel, content in files.items():
            path = tmp_path / root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path / "a", tmp_path / "b"


def test_only_what_varies_between_clean_runs_is_excused(tmp_path):
    clean_a, clean_b = _folders(tmp_path / "clean", {
        "train-head/manifest.json": {"duration_s": 6.1, "outputs": {"model.h5": "x"}},
        "ingest/manifest.json": {"duration_s": 0.02},
        "export/parity.md": "latency 7.5\n",
        "export/labels.txt": "a\n",
    }, {
        "train-head/manifest.json": {"duration_s": 6.3, "outputs": {"model.h5": "x"}},
        "ingest/manifest.json": {"duration_s": 0.02},  # equal by chance
        "export/parity.md": "latency 7.9\n",
        "export/labels.txt": "a\n",
    })
    clean = kc.compare_artifacts(clean_a, clean_b)
    assert [d.describe() for d in clean] == ["train-head/manifest.json: duration_s",
                                             "export/parity.md: bytes (line 1 differs)"]
    varying = kc.varying_ids(clean)
    _, killed = _folders(tmp_path / "killed", {}, {
        "train-head/manifest.json": {"duration_s": 5.0, "outputs": {"model.h5": "y"}},
        "ingest/manifest.json": {"duration_s": 0.03},  # excused: duration_s varies in another manifest
        "export/parity.md": "latency 1.0\n",
        "export/labels.txt": "b\n",
        "export/.tmp/half": "x",
    })
    lines, excused = kc.unexplained(kc.compare_artifacts(clean_a, killed), varying)
    assert lines == ["train-head/manifest.json: outputs.model.h5", "export/.tmp/half: extra",
                     "export/labels.txt: bytes (line 1 differs)"]
    assert excused == ["ingest/manifest.json: duration_s (differs between two never-killed runs)",
                       "train-head/manifest.json: duration_s (differs between two never-killed runs)",
                       "export/parity.md: bytes (line 1 differs) (differs between two never-killed runs)"]


def test_parse_status():
    text = ("12:00:01 W some log line\n"
            "stage       state      why                   last_run                   took   outputs\n"
            "ingest      fresh                            2026-12-03T17:00:00+00:00  0.0s   classes.txt\n"
            "augment     stale      output preview.png modified  2026-12-03T17:00:00+00:00  0.4s   augment.json\n"
            "train-head  never run  never run             -                          -      -\n")
    assert kc.parse_status(text) == {"ingest": ("fresh", ""), "augment": ("stale", "output preview.png modified"),
                                     "train-head": ("never run", "never run")}
    states = {s: ("fresh", "") for s in kc.STAGES} | {"export": ("stale", "inputs changed")}
    assert kc.not_fresh(states) == {"export": "stale (inputs changed)"}


def test_leftovers(tmp_path):
    for rel in ["ingest/classes.txt", ".tmp/tmpab/x", ".export.tmp/1234/a", "feature-store/.tmp/k/x",
                "feature-store/.train-head-1.2.tmp/y", "ingest/.classes.txt.ab12.tmp.txt", "sources/0f.tmp/z",
                ".lock-holder.json", ".lock-holder.json.123", "export/MultiSnacks.mlpackage/Manifest.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert kc.leftovers(tmp_path) == [".export.tmp/", ".lock-holder.json", ".lock-holder.json.123", ".tmp/",
                                      "feature-store/.tmp/", "feature-store/.train-head-1.2.tmp/",
                                      "ingest/.classes.txt.ab12.tmp.txt", "sources/0f.tmp/"]


def test_new_temp_entries():
    uid = os.getuid()
    before = {"tmpold": (uid, 100.0)}
    after = {"tmpold": (uid, 100.0), "tmpnew": (uid, 200.0), "tmpearly": (uid, 50.0), "other": (uid, 200.0),
             "tmpforeign": (uid + 1, 200.0), "tmpwork": (uid, 200.0)}
    assert kc.new_temp_entries(before, after, since=150.0, exclude={"tmpwork"}) == ["tmpnew"]


def test_new_entries(tmp_path):
    (tmp_path / "old").write_text("x")
    (tmp_path / "tmpab12.mlpackage").mkdir()
    (tmp_path / "tmpcd34").write_text("x")
    assert kc.new_entries(tmp_path, {"old"}) == ["tmpab12.mlpackage/", "tmpcd34"]


def test_dataset_is_made_from_the_seed(tmp_path):
    def digest(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}

    first, again, other = (digest(kc.make_dataset(tmp_path / name, seed)) for name, seed in
                           (("a", 0), ("b", 0), ("c", 1)))
    assert first == again and first != other
    assert len(first) == 3 * (12 + 4 + 4)


def test_plan_cycles_through_the_stages():
    reference = kc.Reference(Path("."), {s: 2.0 for s in kc.STAGES}, 5.0, 60.0, [])
    moments = kc.plan(18, list(kc.STAGES), 0, reference)
    assert [s for _, s, _ in moments] == list(kc.STAGES) * 3
    assert all(0.2 <= m <= 7.0 for _, _, m in moments)
    assert moments == kc.plan(18, list(kc.STAGES), 0, reference)
    assert all(5.0 <= m <= 7.0 for _, _, m in kc.plan(18, list(kc.STAGES), 0, reference, during="stage"))


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads Linux's /proc")
def test_descendants_and_alive():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        ident = (child.pid, kc.proc_stat(child.pid).starttime)
        assert ident in kc.descendants(os.getpid(), kc.proc_table())
        assert kc.alive(ident) and not kc.alive((child.pid, ident[1] + 1))  # another process with that pid
        kc.kill_process(ident)
        assert kc.wait_ended([ident], 5) == []  # a zombie until reaped: ended
    finally:
        child.kill()
        child.wait()
    assert not kc.alive(ident)
