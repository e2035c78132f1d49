"""Hyperparameter sweeps on the validation set: the pipeline run once per combination of values, up to training.

Each combination runs in its own artifacts folder under `<artifacts>/sweep/runs/`. Before it runs, every stage
whose cache key equals that of a stage already computed (in the main artifacts or an earlier combination) is
hard-linked in, so the runner reuses what the combinations share (ingest and augment, or the head when only
fine-tuning values vary), and every combination shares the main artifacts' feature store, so a head sweep
computes the backbone's features once. A sweep stops at train-head or finetune: it never evaluates, so the test split is
never read. The sweep writes `sweep.csv`, `sweep.png` (every run's validation curves, overlaid) and
`best.yaml` (the whole config with the best values) under `<artifacts>/sweep/`.
"""
from __future__ import annotations

import csv
import itertools
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import yaml

from pipeline import fileio
from pipeline.cache.lock import holding
from pipeline.cache.sealed_folder import SealedFolder, first_difference, read_manifest
from pipeline.catalog import MANIFEST, Catalog
from pipeline.errors import ConfigError
from pipeline.reporting.report import plot_overlaid_curves
from pipeline.runner import Runner
from pipeline.stages import STAGES, upstream_closure

log = logging.getLogger("pipeline.sweep")

TRAINING_STAGES = ("train-head", "finetune")


def parse_grid(items):
    """{`section.key`: [value texts]} from `section.key=v1,v2,...` items (commas inside [...] do not split)."""
    grid = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key.count(".") != 1 or not text.strip():
            raise ConfigError(f"sweep --set '{item}' is not section.key=value1,value2,... "
                              "(for example --set model.dropout=0,0.2,0.4)")
        values = [v.strip() for v in re.split(r",(?![^\[]*\])", text) if v.strip()]
        if key in grid:
            raise ConfigError(f"sweep --set names '{key}' twice; give all its values in one --set")
        grid[key] = values
    if not grid:
        raise ConfigError("a sweep needs at least one --set section.key=value1,value2,...")
    return grid


def combinations(grid, sample=None, seed=0):
    """Every combination of the grid's values ({key: text} each), or `sample` of them drawn at random."""
    keys = list(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if sample is not None and sample < len(combos):
        combos = random.Random(seed).sample(combos, sample)
    return combos


def _slug(combo):
    text = "_".join(f"{key.split('.')[1]}-{value}" for key, value in combo.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "", text)[:80] or "run"


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def reuse(runner, stages, donors):
    """Hard-link into `runner`'s artifacts each stage of `stages` (in order) that is not fresh there but whose
    manifest in one of the `donors` folders has the very cache key it would have here, and whose files are those
    the manifest records. Returns what was reused."""
    reused = []
    for stage in stages:
        if runner.freshness(stage).state == "fresh":
            continue
        key = runner.key(stage)
        for donor in donors:
            if _link_stage(Catalog(donor).stage(stage.name), runner.catalog, stage.name, key):
                reused.append(stage.name)
                break
    return reused


def _link_stage(source, catalog, name, key):
    """Link the sealed stage folder `source` into `catalog` as stage `name` if its manifest has cache key `key`
    and its files are intact. Returns whether it did."""
    try:
        manifest = read_manifest(source.root, MANIFEST, "outputs")
    except (OSError, ValueError):
        return False
    if manifest is None or manifest.get("key") != key:
        return False
    scratch = catalog.scratch(name)
    try:
        with SealedFolder(catalog.stage(name).root, scratch, MANIFEST, "outputs") as folder:
            shutil.copytree(source.root, folder.path, copy_function=_link_or_copy, dirs_exist_ok=True,
                            ignore=lambda d, names: [MANIFEST] if Path(d) == source.root else [])
            if first_difference(folder.path, manifest["outputs"]) is None:
                folder.seal({k: v for k, v in manifest.items() if k != "outputs"})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder.sealed is not None


def run(make_config, artifacts, grid, until="finetune", sample=None, seed=0):
    """Run every combination of `grid` up to stage `until`; write sweep.csv, sweep.png and best.yaml.

    make_config: {`section.key`: value text} -> a validated Config (the base config with those overrides).
    Returns (rows, best row, path of best.yaml).
    """
    if until not in TRAINING_STAGES:
        raise ConfigError(f"sweep --until must be one of {', '.join(TRAINING_STAGES)} (a sweep never evaluates: "
                          f"it chooses on the validation split, not the test split), got '{until}'")
    combos = combinations(grid, sample, seed)
    for combo in combos:  # every configuration is checked before anything runs
        make_config(combo)
    with holding(artifacts):  # the combinations share its feature store; the sweep's files are written there
        return _run_combinations(make_config, artifacts, grid, combos, until)


def _run_combinations(make_config, artifacts, grid, combos, until):
    sweep_files = Catalog(artifacts).sweep
    stages = upstream_closure([until])
    donors = [Path(artifacts)]
    rows, curves = [], {}
    for n, combo in enumerate(combos, 1):
        label = ", ".join(f"{k}={v}" for k, v in combo.items())
        log.info("sweep %d/%d: %s", n, len(combos), label)
        trial = sweep_files.run(n, _slug(combo))
        runner = Runner(make_config(combo), trial, store=Catalog(artifacts).feature_store)
        reused = reuse(runner, stages, donors)
        if reused:
            log.info("sweep %d/%d: reusing %s", n, len(combos), ", ".join(reused))
        t0 = time.monotonic()
        runner.run([until])
        files = runner.catalog.stage(until)
        summary = fileio.read_json(files.summary)
        rows.append({**combo, "val_accuracy": summary["val_accuracy"], "val_loss": summary["val_loss"],
                     "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
                     "minutes": round((time.monotonic() - t0) / 60, 2), "folder": str(trial)})
        curves[label] = _history(files.history)
        donors.append(trial)
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    fileio.write_csv(sweep_files.table, list(rows[0]), rows)
    plot_overlaid_curves(curves, sweep_files.curves, f"{until}: validation curves of each combination")
    best_cfg = make_config({k: best[k] for k in grid})
    best_path = sweep_files.best_config
    fileio.write_text(best_path, yaml.safe_dump({s: best_cfg.section(s) for s in _sections(best_cfg)},
                                                sort_keys=False, allow_unicode=True))
    log.info("sweep best: %s (val accuracy %.4f) -> %s", ", ".join(f"{k}={best[k]}" for k in grid),
             best["val_accuracy"], best_path)
    return rows, best, best_path


def apply(best_cfg, best_row, artifacts):
    """Make the best combination the main artifacts' config: reuse its stages there, then run the rest."""
    runner = Runner(best_cfg, artifacts)
    with holding(artifacts):  # linking stages in writes there too
        reuse(runner, STAGES, [Path(best_row["folder"])])
        return runner.run([stage.name for stage in STAGES])


def _sections(cfg):
    import dataclasses

    return [f.name for f in dataclasses.fields(cfg)]


def _history(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


