"""Derived stage fingerprints: a stage's code key covers exactly the package modules it imports, however deep."""
import ast
import shutil
from pathlib import Path

import pytest
from conftest import smoke_cfg

from pipeline import code_deps
from pipeline.runner import Runner
from pipeline.stages import BY_NAME, STAGES


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package laid out like ours: imports at the top, inside functions, relative, and of packages."""
    root = tmp_path / "pipeline"
    files = {
        "__init__.py": "",
        "a.py": "import os\nfrom pipeline import b\n\ndef f():\n    from pipeline.sub import c\n    return c\n",
        "b.py": "from .sub.d import thing\n",
        "sub/__init__.py": "",
        "sub/c.py": "import pipeline.e\n",
        "sub/d.py": "from .. import e\nthing = 1\n",
        "e.py": "import numpy\n",
        "unused.py": "import pipeline.a\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.setattr(code_deps, "ROOT", root)
    return root


def test_closure_follows_every_kind_of_import(fake_package):
    # a -> b (top level) -> sub.d (relative) -> e (relative, "from .. import e");
    # a -> sub.c (inside a function) -> e; and the packages pipeline and pipeline.sub they run
    assert code_deps.closure(["pipeline.a"]) == ["pipeline", "pipeline.a", "pipeline.b", "pipeline.e",
                                                 "pipeline.sub", "pipeline.sub.c", "pipeline.sub.d"]
    assert code_deps.closure(["pipeline.e"]) == ["pipeline", "pipeline.e"]


def test_unknown_module_is_an_error(fake_package):
    with pytest.raises(ValueError, match="pipeline.nothing"):
        code_deps.closure(["pipeline.nothing"])


def _stages_importing(module):
    return {stage.name for stage in STAGES if module in stage.code_modules()}


def test_each_stage_covers_what_its_hand_written_list_missed():
    assert "pipeline.backbones" in BY_NAME["finetune"].code_modules()
    assert {"pipeline.train.models", "pipeline.train.training"} <= set(BY_NAME["evaluate"].code_modules())
    assert "pipeline.backbones" in BY_NAME["export"].code_modules()
    for stage in STAGES:
        assert "pipeline.catalog" in stage.code_modules()  # the readers of every artifact live there
    assert {"pipeline.checkers.coreml_numpy", "pipeline.export.onnx"} <= set(BY_NAME["export"].code_modules())


def test_which_stages_an_edit_reaches():
    assert _stages_importing("pipeline.export.parity") == {"export"}
    assert _stages_importing("pipeline.fileio") == {s.name for s in STAGES}
    assert _stages_importing("pipeline.train.training") == {"train-head", "finetune", "evaluate"}


def test_declared_config_sections_are_the_ones_each_stage_reads():
    """Every `cfg.<section>` a stage module reads is in its declared sections (or those it reads only to choose
    what to store for a later stage), and nothing more."""
    for stage in STAGES:
        tree = ast.parse(Path(code_deps.source_file(stage.module)).read_text())
        read = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and (
            (isinstance(node.value, ast.Name) and node.value.id == "cfg")  # cfg.model
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "cfg"))}  # ctx.cfg.model
        by_name = {node.args[0].value.partition(".")[0] for node in ast.walk(tree)  # cfg.key_section("model")
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                   and node.func.attr == "key_section" and isinstance(node.args[0], ast.Constant)}
        read = (read - {"key_section"}) | by_name
        assert read == {s.partition(".")[0] for s in stage.sections + stage.store_only}, stage.name
        keys = {}  # a stage that declares keys of a section reads only those
        for declared in (s for s in stage.sections if "." in s):
            section, _, key = declared.partition(".")
            keys.setdefault(section, set()).add(key)
        for section, declared in keys.items():
            used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Attribute) and node.value.attr == section}
            assert used == declared, (stage.name, section, used)


@pytest.mark.parametrize("module, stale", [("pipeline.export.parity", {"export"}),
                                           ("pipeline.fileio", {s.name for s in STAGES})])
def test_an_edited_module_makes_exactly_its_importers_stale(world, tmp_path, monkeypatch, module, stale):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    runner = Runner(smoke_cfg(world), artifacts)
    assert {row["stage"] for row in runner.status() if row["state"] != "fresh"} == set()
    edited = tmp_path / "edited.py"
    edited.write_text(code_deps.source_file(module).read_text() + "\n# an appended comment\n")
    real = code_deps.source_file
    monkeypatch.setattr(code_deps, "source_file", lambda name: edited if name == module else real(name))
    reasons = {s.name: runner.freshness(s).reasons for s in STAGES}
    assert {name for name, why in reasons.items() if why} == stale
    assert all(why == ["code changed"] for name, why in reasons.items() if name in stale)


def test_a_rerun_reruns_the_importers_and_only_what_their_new_bytes_reach(world, tmp_path, monkeypatch):
    """pipeline.train.training is imported by train-head, finetune and evaluate. After an edit, all three rerun even
    where the stage above wrote identical bytes; ingest and augment do not; export (which does not import it) is
    then stale exactly when finetune's model bytes changed (that the runner runs what is stale, and only that, is
    tests/test_cli.py's)."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(world["artifacts"], artifacts)
    module = "pipeline.train.training"
    assert _stages_importing(module) == {"train-head", "finetune", "evaluate"}
    before = (artifacts / "finetune" / "model.h5").read_bytes()
    edited = tmp_path / "edited.py"
    edited.write_text(code_deps.source_file(module).read_text() + "\n# an appended comment\n")
    real = code_deps.source_file
    monkeypatch.setattr(code_deps, "source_file", lambda name: edited if name == module else real(name))
    runner = Runner(smoke_cfg(world), artifacts)
    ran = runner.run(["evaluate"])
    assert ran == ["train-head", "finetune", "evaluate"]
    changed = (artifacts / "finetune" / "model.h5").read_bytes() != before
    assert runner.freshness(BY_NAME["export"]).reasons == (["inputs changed"] if changed else [])


def test_only_the_runner_and_the_cli_import_stage_modules():
    """Stages share code through library modules (catalog, training, ...), never through each other."""
    from pathlib import Path

    import pipeline
    from pipeline.code_deps import direct_imports

    root = Path(pipeline.__file__).parent
    modules = ["pipeline." + ".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py")]
    allowed = {"pipeline.runner", "pipeline.cli", "pipeline.stages.__init__"}
    offenders = {m: sorted(i for i in direct_imports(m.removesuffix(".__init__"))
                           if i.startswith("pipeline.stages.") and i != m)
                 for m in modules if m not in allowed}
    assert {m: i for m, i in offenders.items() if i} == {}
