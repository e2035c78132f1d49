"""Stage 6, export: Core ML, ONNX and TFLite files (and smaller variants), each measured against Keras."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipeline import fileio, models
from pipeline.backbones import BACKBONES, alpha_of
from pipeline.errors import ExportError
from pipeline.exporters import FORMATS, ExportMeta
from pipeline.images import load_array
from pipeline.parity import blocking_failures, measure, megabytes, table
from pipeline.stages.ingest import read_classes, read_index

log = logging.getLogger("pipeline.export")


def export_meta(cfg, classes, metrics, ingest_report):
    """The labels, preprocessing and descriptive metadata every exported file carries."""
    backbone = BACKBONES[cfg.model.backbone]
    return ExportMeta(
        labels=classes, image_size=cfg.model.image_size, scale=backbone.input_scale, bias=backbone.input_bias,
        author=cfg.export.author, license=cfg.export.license,
        description=f"{cfg.export.description} Classes: {len(classes)}.", version=cfg.export.version,
        user={"backbone": f"{cfg.model.backbone} alpha {alpha_of(cfg.model)} (ImageNet weights: {cfg.model.weights})",
              "image_size": cfg.model.image_size,
              "test_accuracy": f"{metrics['accuracy']:.4f}",
              "test_images": metrics["test_images"],
              # the folder's name, not its path: a shipped model should not carry the developer's file system
              "dataset": f"{Path(ingest_report['source']).name} ({ingest_report['images']})",
              "training": f"head {cfg.train_head.features} features, lr {cfg.train_head.learning_rate}; "
                          f"finetune {cfg.finetune.epochs} epochs from {cfg.finetune.unfreeze_from}, "
                          f"lr {cfg.finetune.learning_rate}",
              "classes": len(classes)})


def check_images(ingest_files, cfg):
    """Raw RGB pixels (N, H, W, 3, float32 0-255) of the test images, and each one's true class index."""
    rows = read_index(ingest_files, "test")
    if cfg.export.check_images is not None:
        rows = rows[:cfg.export.check_images]
    classes = read_classes(ingest_files)
    pixels = np.stack([load_array(r["path"], cfg.model.image_size) for r in rows]).astype(np.float32)
    return pixels, np.array([classes.index(r["label"]) for r in rows])


def stage_meta(cfg, inputs):
    """export_meta from the upstream stages' files."""
    return export_meta(cfg, read_classes(inputs["ingest"]), fileio.read_json(inputs["evaluate"].metrics),
                       fileio.read_json(inputs["ingest"].report))


def parity(cfg, inputs, files, model=None):
    """The parity rows of the exported `files` ({format: path}) against the fine-tuned Keras model."""
    pixels, truth = check_images(inputs["ingest"], cfg)
    model = model or models.load(inputs["finetune"].model)
    return measure(files, model, inputs["finetune"].model, stage_meta(cfg, inputs), pixels, truth, cfg.export,
                   log=_log_row)


def run(ctx):
    """Export every configured format, measure each against Keras, and write labels.txt, export.json, parity.md."""
    cfg, out = ctx.cfg, ctx.out
    classes = read_classes(ctx.inputs["ingest"])
    meta = stage_meta(cfg, ctx.inputs)
    model = models.load(ctx.inputs["finetune"].model)
    fileio.write_text(out.labels, "".join(f"{label}\n" for label in classes))
    files = {}
    for name in cfg.export.formats:
        fmt = FORMATS[name]
        files[name] = out.model(cfg.export.name, fmt.suffix)
        t0 = time.monotonic()
        fmt.exporter().export(model, meta, files[name], fmt.precision)
        log.info("export %s: %s (%.2f MB) in %.1fs", fmt.title, files[name].name, megabytes(files[name]),
                 time.monotonic() - t0)
    rows = parity(cfg, ctx.inputs, files, model)
    fileio.write_json(out.checks, {"labels": classes, "preprocessing": meta.preprocessing(), "formats": rows})
    fileio.write_text(out.parity, table(rows))
    stop = blocking_failures(rows)
    if stop:
        raise ExportError("exports disagree with the Keras model beyond the export thresholds (export.*):\n"
                          + table(rows) + "\n".join(f"{r['title']}: {r['verdict']}" for r in stop))
    for row in rows:
        if not row["passed"]:
            log.warning("%s: %s", row["title"], row["verdict"])
    return {"message": "; ".join(f"{r['title']} {r['verdict']}" for r in rows[1:]), "formats": rows}


def _log_row(row):
    measured = (f": accuracy {row['accuracy']:.2%}, agrees with Keras on {row['top1_agreement']:.2%} of "
                f"{row['images']} test images (max diff {row['max_probability_difference']:.1e})"
                if "top1_agreement" in row else "")
    log.info("check %s%s -> %s", row["title"], measured, row["verdict"])
