"""Bench: the evaluate stage's confidence measurements on a finished run's fine-tuned model, with today's code.

Usage: PYTHONPATH=. python bench/confidence.py ARTIFACTS OUT [--set section.key=value ...]

ARTIFACTS holds finished ingest, augment, train-head and finetune stages (for example a snacks run made by older
code, whose cache today's code would not reuse). The config is the one the run's finetune stage recorded in its
config.yaml, with any --set applied (for example evaluate.unknown_data=FOLDER). The script runs the evaluate stage's
own run() with the run's files as its inputs, writing its outputs (the calibrated model.h5, metrics.json, the
report and reliability.png) into OUT, and prints the calibration and threshold figures.
"""
import argparse
from pathlib import Path

import yaml

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from pipeline import config, fileio
from pipeline.catalog import Catalog
from pipeline.runner import StageContext
from pipeline.stages import evaluate


def main(argv=None):
    """Parse the arguments, run evaluate into OUT, print the confidence figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    catalog = Catalog(args.artifacts)
    recorded = catalog.stage("finetune").resolved_config
    if not recorded.exists():
        raise SystemExit(f"{args.artifacts}: no finetune/config.yaml; run the pipeline there first")
    raw = yaml.safe_load(recorded.read_text(encoding="utf-8")) or {}
    raw = {section: values for section, values in raw.items() if section in config.Config.__dataclass_fields__}
    cfg = config.from_dict(config.apply_overrides(raw, args.overrides))
    inputs = {name: catalog.stage(name) for name in ("ingest", "augment", "train-head", "finetune")}
    args.out.mkdir(parents=True, exist_ok=True)
    summary = evaluate.run(StageContext(cfg, inputs, catalog.stage("evaluate", args.out), catalog.sources))
    print(summary["message"])
    confidence = fileio.read_json(args.out / "metrics.json")["confidence"]
    print(f"temperature {confidence['temperature']:.4f}; threshold {confidence['threshold']}")
    for name in ("test_before", "test_after"):
        row = confidence[name]
        print(f"{name}: NLL {row['nll']:.4f}, ECE {row['ece']:.4f}, mean confidence {row['mean_confidence']:.4f}, "
              f"accuracy {row['accuracy']:.4f}")
    for row in confidence["table"]:
        print(row)
    if "unknown" in confidence:
        print(confidence["unknown"])


if __name__ == "__main__":
    main()
