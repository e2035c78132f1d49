"""Bench: where the export stage's time goes, format by format, on a finished run's artifacts.

Usage: PYTHONPATH=. python bench/export_time.py ARTIFACTS OUT [--formats a,b,...] [--check-images N]
       [--latency-images N] [--set section.key=value ...]

ARTIFACTS holds finished ingest, finetune and evaluate stages (for example a full snacks run). The config is
the one the run's export (or else finetune) stage recorded in its config.yaml, with --formats, --check-images,
--latency-images and any --set applied. The script runs the export stage's own export_and_check (export_file for
each format, in a worker process unless --set export.convert_in_worker=false, and parity) writing the files
into OUT, then prints and writes the breakdown:
seconds converting each file, checking each file (spec check, loading, computing the check images), computing
the Keras reference, measuring latency, and reading the calibration and test images. OUT also gets
parity.md and export_time.json ({"config", "seconds", "formats": parity rows}).
"""
import argparse
import sys
from pathlib import Path

import yaml

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from pipeline import config, fileio
from pipeline.catalog import Catalog, ExportFiles
from pipeline.export.formats import FORMATS
from pipeline.export.parity import table
from pipeline.stages import export
from pipeline.train import models


def run_config(artifacts, formats, check_images, latency_images, overrides):
    """The Config of the run in `artifacts` (its export or finetune stage's config.yaml) with the bench's choices."""
    catalog = Catalog(artifacts)
    for stage in ("export", "finetune"):
        recorded = catalog.stage(stage).resolved_config
        if recorded.exists():
            raw = yaml.safe_load(recorded.read_text(encoding="utf-8")) or {}
            break
    else:
        raise SystemExit(f"{artifacts}: no export/config.yaml or finetune/config.yaml; run the pipeline there first")
    raw = {section: values for section, values in raw.items() if section in config.Config.__dataclass_fields__}
    changes = [f"export.formats=[{','.join(formats)}]", f"export.check_images={check_images or 'null'}"]
    if latency_images:
        changes.append(f"export.latency_images={latency_images}")
    return config.from_dict(config.apply_overrides(raw, [*changes, *overrides]))


def main(argv=None):
    """Parse the arguments, export and check every format, print the time breakdown and parity table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated names (default: all)")
    parser.add_argument("--check-images", type=int, default=None, help="test images checked (default: all)")
    parser.add_argument("--latency-images", type=int, default=None, help="single-image calls timed per runtime")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    formats = [name.strip() for name in args.formats.split(",") if name.strip()]
    cfg = run_config(args.artifacts, formats, args.check_images, args.latency_images, args.overrides)
    catalog = Catalog(args.artifacts)
    inputs = {name: catalog.stage(name) for name in ("ingest", "evaluate")}
    meta = export.stage_meta(cfg, inputs)
    model = models.load(inputs["evaluate"].model)
    out = ExportFiles(args.out)
    files = {name: out.model(cfg.export.name, name) for name in cfg.export.formats}
    exported, rows = export.export_and_check(cfg, inputs, model, meta, files)
    seconds = export.time_breakdown(exported, rows)
    fileio.write_text(args.out / "parity.md", table(rows))
    fileio.write_json(args.out / "export_time.json", {"config": cfg.section("export"), "seconds": seconds,
                                                       "formats": rows})
    print(f"{rows[0]['images']} check images, {cfg.export.latency_images} latency calls per runtime\n")
    print(export.time_table(seconds))
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
