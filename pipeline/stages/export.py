"""Stage 6, export: Core ML, ONNX and TFLite files (and smaller variants), each measured against Keras."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipeline import fileio, models
from pipeline.backbones import alpha_of
from pipeline.catalog import class_indices
from pipeline.errors import ExportError, PipelineError
from pipeline.exporters import FORMATS, model_meta
from pipeline.images import load_array
from pipeline.parity import blocking_failures, measure, megabytes, table

log = logging.getLogger("pipeline.export")


def export_meta(cfg, classes, metrics, ingest_report):
    """The labels, preprocessing and descriptive metadata every exported file carries."""
    return model_meta(
        cfg.model, classes, author=cfg.export.author, license=cfg.export.license,
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
              "classes": len(classes)},
        input_note=input_note(metrics))


def input_note(metrics):
    """The Core ML input's advice on Vision's crop-and-scale option, from evaluate's measurements ("" if none)."""
    if "recommended_crop" not in metrics:
        return ""
    from pipeline import vision_crop

    best = vision_crop.get_option(metrics["recommended_crop"])
    scores = metrics["vision_options"]
    return (f"Recommended: imageCropAndScaleOption {best.vision} (CoreMLRequest: {best.coreml_request}), test "
            f"accuracy {scores[best.name]:.1%}; " + ", ".join(
                f"{vision_crop.get_option(name).vision} {acc:.1%}" for name, acc in scores.items() if name != best.name)
            + ".")


def check_images(ingest_files, cfg):
    """Raw RGB pixels (N, H, W, 3, float32 0-255) of the test images, and each one's true class index."""
    rows = ingest_files.read_index("test")
    if cfg.export.check_images is not None:
        rows = rows[:cfg.export.check_images]
    pixels = np.stack([load_array(r["path"], cfg.model.image_size) for r in rows]).astype(np.float32)
    return pixels, class_indices(rows, ingest_files.read_classes())


def stage_meta(cfg, inputs):
    """export_meta from the upstream stages' files."""
    return export_meta(cfg, inputs["ingest"].read_classes(), fileio.read_json(inputs["evaluate"].metrics),
                       fileio.read_json(inputs["ingest"].report))


def parity(cfg, inputs, files, model=None, meta=None):
    """The parity rows of the exported `files` ({format: path}) against the fine-tuned Keras model (and the
    metadata the files carry), each loaded from the upstream stages' files when not given."""
    pixels, truth = check_images(inputs["ingest"], cfg)
    model = model or models.load(inputs["finetune"].model)
    return measure(files, model, inputs["finetune"].model, meta or stage_meta(cfg, inputs), pixels, truth,
                   cfg.export, log=_log_row)


def export_file(name, model, meta, path):
    """Write the file of format `name`: timed, its size logged, and a failure reported with the format's name."""
    fmt = FORMATS[name]
    t0 = time.monotonic()
    try:
        fmt.exporter().export(model, meta, path, fmt.precision)
    except PipelineError:
        raise
    except Exception as exc:  # a converter's own error, whatever its type
        raise ExportError(f"export of {fmt.title} ('{name}' in export.formats) to {path.name} failed: "
                          f"{type(exc).__name__}: {exc}; leave '{name}' out of export.formats to export the "
                          "others") from exc
    log.info("export %s: %s (%.2f MB) in %.1fs", fmt.title, path.name, megabytes(path), time.monotonic() - t0)


def stop_on_failures(rows, show_table=True):
    """An ExportError listing the rows whose fp32 files disagree with Keras or whose interface is wrong, if any."""
    stop = blocking_failures(rows)
    if stop:
        raise ExportError("exports disagree with the Keras model beyond the export thresholds (export.*):\n"
                          + (table(rows) if show_table else "")
                          + "\n".join(f"{r['title']}: {r['verdict']}" for r in stop))


def run(ctx):
    """Export every configured format, measure each against Keras, and write labels.txt, export.json, parity.md."""
    cfg, out = ctx.cfg, ctx.out
    meta = stage_meta(cfg, ctx.inputs)
    model = models.load(ctx.inputs["finetune"].model)
    out.write_labels(meta.labels)
    files = {name: out.model(cfg.export.name, name) for name in cfg.export.formats}
    for name, path in files.items():
        export_file(name, model, meta, path)
    rows = parity(cfg, ctx.inputs, files, model, meta)
    fileio.write_json(out.checks, {"labels": meta.labels, "preprocessing": meta.preprocessing(), "formats": rows})
    fileio.write_text(out.parity, table(rows))
    stop_on_failures(rows)
    for row in rows:
        if not row["passed"]:
            log.warning("%s: %s", row["title"], row["verdict"])
    return {"message": "; ".join(f"{r['title']} {r['verdict']}" for r in rows[1:]), "formats": rows}


def verify(cfg, catalog):
    """The `verify` command: the parity rows of the exported files already in the artifacts, against Keras."""
    files = {name: catalog.stage("export").model(cfg.export.name, name) for name in cfg.export.formats}
    missing = [str(path) for path in files.values() if not path.exists()]
    if missing:
        raise PipelineError(f"no exported file {', '.join(missing)}: run `python -m pipeline export` first")
    return parity(cfg, {name: catalog.stage(name) for name in ("ingest", "finetune", "evaluate")}, files)


def _log_row(row):
    measured = (f": accuracy {row['accuracy']:.2%}, agrees with Keras on {row['top1_agreement']:.2%} of "
                f"{row['images']} test images (max diff {row['max_probability_difference']:.1e})"
                if "top1_agreement" in row else "")
    log.info("check %s%s -> %s", row["title"], measured, row["verdict"])
