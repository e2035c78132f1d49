"""Stage 6, export: Core ML, ONNX and TFLite files with the same labels and preprocessing, each checked."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipeline import fileio, models
from pipeline.backbones import BACKBONES
from pipeline.errors import ExportError
from pipeline.exporters import FORMATS, ExportMeta
from pipeline.images import load_array
from pipeline.stages.ingest import read_classes, read_index

log = logging.getLogger("pipeline.export")


def export_meta(cfg, classes, metrics, ingest_report):
    """The labels, preprocessing and descriptive metadata every exported file carries."""
    backbone = BACKBONES[cfg.model.backbone]
    return ExportMeta(
        labels=classes, image_size=cfg.model.image_size, scale=backbone.input_scale, bias=backbone.input_bias,
        author=cfg.export.author, license=cfg.export.license,
        description=f"{cfg.export.description} Classes: {len(classes)}.", version=cfg.export.version,
        user={"backbone": f"{cfg.model.backbone} alpha {cfg.model.alpha} (ImageNet weights: {cfg.model.weights})",
              "image_size": cfg.model.image_size,
              "test_accuracy": f"{metrics['accuracy']:.4f}",
              "test_images": metrics["test_images"],
              # the folder's name, not its path: a shipped model should not carry the developer's file system
              "dataset": f"{Path(ingest_report['source']).name} ({ingest_report['images']})",
              "training": f"head {cfg.train_head.features} features, lr {cfg.train_head.learning_rate}; "
                          f"finetune {cfg.finetune.epochs} epochs from block {cfg.finetune.unfreeze_from}, "
                          f"lr {cfg.finetune.learning_rate}",
              "classes": len(classes)})


def check_images(ingest_files, cfg):
    """Raw RGB pixels (N, H, W, 3, float32 0-255) of the test images the exports are checked on."""
    rows = read_index(ingest_files, "test")
    if cfg.export.check_images is not None:
        rows = rows[:cfg.export.check_images]
    return np.stack([load_array(r["path"], cfg.model.image_size) for r in rows]).astype(np.float32)


def run(ctx):
    """Export every configured format, check each against Keras, and write labels.txt and export.json."""
    cfg, out = ctx.cfg, ctx.out
    classes = read_classes(ctx.inputs["ingest"])
    metrics = fileio.read_json(ctx.inputs["evaluate"].metrics)
    meta = export_meta(cfg, classes, metrics, fileio.read_json(ctx.inputs["ingest"].report))
    model = models.load(ctx.inputs["finetune"].model)
    pixels = check_images(ctx.inputs["ingest"], cfg)
    expected = model.predict(pixels * meta.scale + meta.bias, batch_size=64, verbose=0)
    fileio.write_text(out.labels, "".join(f"{label}\n" for label in classes))
    results = {}
    for name in cfg.export.formats:
        fmt = FORMATS[name]
        path = out.model(cfg.export.name, fmt.suffix)
        t0 = time.monotonic()
        fmt.exporter().export(model, meta, path)
        seconds = time.monotonic() - t0
        result = {"file": path.name, "megabytes": round(path.stat().st_size / 1e6, 2),
                  "conversion_seconds": round(seconds, 1), "checked_by": fmt.checked_by,
                  **fmt.exporter().check(path, meta, pixels, expected)}
        results[name] = result
        log.info("export %s: %s (%.1f MB) in %.1fs%s", fmt.title, path.name, result["megabytes"], seconds,
                 _agreement_text(result))
    fileio.write_json(out.checks, {"labels": classes, "preprocessing": meta.preprocessing(), "formats": results})
    failures = [f"{FORMATS[n].title}: top-1 agreement {r['top1_agreement']:.4f}, max probability difference "
                f"{r['max_probability_difference']:.2e}" for n, r in results.items()
                if r.get("images") and (r["top1_agreement"] < cfg.export.min_top1_agreement
                                        or r["max_probability_difference"] > cfg.export.max_probability_difference)]
    if failures:
        raise ExportError("exports disagree with the Keras model beyond export.min_top1_agreement / "
                          "export.max_probability_difference: " + "; ".join(failures))
    return {"message": "; ".join(f"{FORMATS[n].title} {r['megabytes']} MB{_agreement_text(r)}"
                                 for n, r in results.items()), "formats": results}


def _agreement_text(result):
    if not result.get("images"):
        return ""
    return (f", agrees with Keras on {result['top1_agreement'] * 100:.1f}% of {result['images']} test images "
            f"(max diff {result['max_probability_difference']:.1e})")
