"""Stage 6, export: Core ML, ONNX and TFLite files (and smaller variants), each measured against Keras."""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np

from pipeline import fileio
from pipeline.backbones import alpha_of
from pipeline.data.images import load_array
from pipeline.data.labels import class_indices
from pipeline.errors import ExportError, PipelineError
from pipeline.export.conversions import Conversions
from pipeline.export.formats import FORMATS
from pipeline.export.meta import model_meta
from pipeline.export.parity import KERAS, blocking_failures, measure, smallest_line, table
from pipeline.train import models

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
              "classes": len(classes), **confidence_metadata(metrics)},
        input_note=input_note(metrics), output_note=output_note(metrics))


def confidence_metadata(metrics):
    """What the exported files say about their confidence, from evaluate's metrics: the temperature their logits
    are divided by and, if evaluate recommended one, the "none of these" threshold and its rule."""
    confidence = metrics.get("confidence")
    if confidence is None:  # metrics of an evaluate stage from before calibration
        return {}
    meta = {"temperature": round(confidence["temperature"], 6)}
    if confidence["threshold"] is not None:
        meta["confidence_threshold"] = round(confidence["threshold"], 6)
        meta["confidence_threshold_rule"] = (
            f"below it, say 'not sure': the highest confidence (the largest class probability) that keeps "
            f"{confidence['keep_correct']:.0%} of the validation images the model gets right")
    return meta


def output_note(metrics):
    """The Core ML probability output's note on calibration and the "none of these" threshold ("" if none)."""
    confidence = metrics.get("confidence")
    if confidence is None:
        return ""
    note = (f"Calibrated on the validation photos (temperature {confidence['temperature']:.3f})"
            if confidence["calibrated"] else "Not calibrated")
    if confidence["threshold"] is not None:
        note += (f"; when the top class's probability is below {confidence['threshold']:.3f}, show \"not sure\" "
                 f"(keeps {confidence['keep_correct']:.0%} of correct answers)")
    return note + "."


def input_note(metrics):
    """The Core ML input's advice on Vision's crop-and-scale option, from evaluate's measurements ("" if none)."""
    if "recommended_crop" not in metrics:
        return ""
    from pipeline.data import vision_crop

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
    return _pixels(rows, cfg.model.image_size), class_indices(rows, ingest_files.read_classes())


def calibration_rows(ingest_files, cfg):
    """The training-split index rows (never val or test) that calibrate the formats needing it, deterministic:
    `export.calibration_images` of them, taken in turn from each class (in class-list order) while it has
    images left, each class's share spread evenly over its images in path order."""
    classes = ingest_files.read_classes()
    by_class = {label: [] for label in classes}
    for row in ingest_files.read_index("train"):
        by_class.setdefault(row["label"], []).append(row)
    pools = [sorted(rows, key=lambda r: r["path"]) for rows in by_class.values() if rows]
    if not pools:
        needing = [name for name in cfg.export.formats if FORMATS[name].calibrated]
        raise ExportError(f"the training split has no images to calibrate {', '.join(needing) or 'with'}: rerun "
                          "ingest, or leave those formats out of export.formats")
    wanted = min(cfg.export.calibration_images, sum(len(pool) for pool in pools))
    shares, taken = [0] * len(pools), 0
    while taken < wanted:  # one image per class per round, skipping classes already used up
        for i, pool in enumerate(pools):
            if shares[i] < len(pool) and taken < wanted:
                shares[i] += 1
                taken += 1
    chosen = []
    for pool, share in zip(pools, shares):
        positions = np.linspace(0, len(pool) - 1, share).round().astype(int) if share else []
        chosen += [pool[i] for i in positions]
    return chosen


def calibration_pixels(ingest_files, cfg):
    """Raw RGB pixels (N, H, W, 3, float32 0-255) of the calibration_rows, loaded as the check images are."""
    return _pixels(calibration_rows(ingest_files, cfg), cfg.model.image_size)


def _pixels(rows, size):
    """Raw RGB pixels (N, size, size, 3, float32 0-255) of the index rows' images."""
    return np.stack([load_array(r["path"], size) for r in rows]).astype(np.float32)


def stage_meta(cfg, inputs):
    """export_meta from the upstream stages' files."""
    return export_meta(cfg, inputs["ingest"].read_classes(), fileio.read_json(inputs["evaluate"].metrics),
                       fileio.read_json(inputs["ingest"].report))


def parity(cfg, inputs, files, model=None, meta=None, ready=None):
    """The parity rows of the exported `files` ({format: path}) against the fine-tuned Keras model (and the
    metadata the files carry), each loaded from the upstream stages' files when not given. The Keras row's
    `check_images_seconds` is the time spent reading the test images.

    ready: called with a format's name before its file is read, to wait until it is written (see measure)."""
    t0 = time.monotonic()
    pixels, truth = check_images(inputs["ingest"], cfg)
    loading = round(time.monotonic() - t0, 2)
    model = model or models.load(inputs["evaluate"].model)
    rows = measure(files, model, inputs["evaluate"].model, meta or stage_meta(cfg, inputs), pixels, truth,
                   cfg.export, log=_log_row, ready=ready)
    rows[0]["check_images_seconds"] = loading  # the Keras row: time spent reading the test images
    return rows


def start_conversions(cfg, inputs, model, meta, files, in_worker=None):
    """The Conversions (pipeline.export.conversions) writing every file of `files` ({format: path}) of the fine-tuned
    model: in a worker process if `in_worker` (default export.convert_in_worker) is set, which loads the model
    from the evaluate stage's file, else here. Calibration images are loaded only when a format needs them."""
    in_worker = cfg.export.convert_in_worker if in_worker is None else in_worker
    calibration = (functools.partial(calibration_pixels, inputs["ingest"], cfg)  # picklable, for the worker
                   if any(FORMATS[name].calibrated for name in files) else None)
    return Conversions(model, inputs["evaluate"].model if in_worker else None, meta, files, calibration, in_worker)


def export_and_check(cfg, inputs, model, meta, files):
    """Write every file of `files` and measure each against Keras: (the conversions' summary, parity rows).

    With export.convert_in_worker the files are converted in a worker process while this one computes the
    Keras reference and checks each file as soon as it is written; otherwise here, each just before its check.
    The summary's "elapsed" is the wall time of it all.
    """
    t0 = time.monotonic()
    with start_conversions(cfg, inputs, model, meta, files) as conversions:
        rows = parity(cfg, inputs, files, model, meta, ready=conversions.wait)
    return {**conversions.summary(), "elapsed": round(time.monotonic() - t0, 2)}, rows


def time_breakdown(exported, rows):
    """Where the export's time went, in seconds, from export_and_check's summary and the parity rows' timings.

    Returns {"calibration_images": reading them, "check_images": reading the test images, "keras_reference":
    computing Keras's probabilities, "convert": {format: converting}, "check": {row format: spec check, loading
    and computing}, "latency": {row format: measuring batch-1 latency}, "total": their sum}, and "elapsed", the
    wall time, when export_and_check gave it (less than the total when conversions ran beside the checks).
    """
    keras = next(r for r in rows if r["format"] == KERAS)
    breakdown = {"calibration_images": exported["calibration_images"],
                 "check_images": keras.get("check_images_seconds", 0.0), "keras_reference": keras["seconds"],
                 "convert": dict(exported["convert"]),
                 "check": {r["format"]: r["seconds"] for r in rows if r["format"] != KERAS},
                 "latency": {r["format"]: r.get("latency_seconds", 0.0) for r in rows}}
    parts = [breakdown["calibration_images"], breakdown["check_images"], breakdown["keras_reference"],
             *breakdown["convert"].values(), *breakdown["check"].values(), *breakdown["latency"].values()]
    breakdown["total"] = round(sum(parts), 2)
    if "elapsed" in exported:  # conversions beside the checks: the wall time is less than the parts' sum
        breakdown["elapsed"] = exported["elapsed"]
    return breakdown


def time_table(breakdown):
    """The time breakdown as a Markdown table: seconds converting, checking and timing each format, then the
    image reading and the totals."""
    convert, check, latency = breakdown["convert"], breakdown["check"], breakdown["latency"]
    names = [KERAS, *convert, *[name for name in check if name not in convert]]
    check = {**check, KERAS: breakdown["keras_reference"]}

    def line(name, *cells):
        return f"| {name} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |"

    lines = ["| format | convert s | check s | latency s | total s |", "|---|---|---|---|---|"]
    for name in names:
        parts = (convert.get(name), check.get(name, 0.0), latency.get(name, 0.0))
        lines.append(line(name, *parts, sum(p or 0.0 for p in parts)))
    lines.append(line("(reading calibration images)", breakdown["calibration_images"], None, None,
                      breakdown["calibration_images"]))
    lines.append(line("(reading test images)", None, breakdown["check_images"], None, breakdown["check_images"]))
    lines.append(line("all", sum(convert.values()) + breakdown["calibration_images"],
                      sum(check.values()) + breakdown["check_images"], sum(latency.values()), breakdown["total"]))
    if "elapsed" in breakdown:
        lines.append(line("elapsed (wall time: conversions in a worker overlap the checks)", None, None, None,
                          breakdown["elapsed"]))
    return "\n".join(lines) + "\n"


def stop_on_failures(rows, show_table=True):
    """An ExportError listing the rows whose fp32 files disagree with Keras or whose interface is wrong, if any."""
    stop = blocking_failures(rows)
    if stop:
        raise ExportError("exported files fail their checks (a damaged file, a wrong interface, or answers that "
                          "disagree with the Keras model beyond the export.* thresholds):\n"
                          + (table(rows) if show_table else "")
                          + "\n".join(f"{r['title']}: {r['verdict']}" for r in stop))


def run(ctx):
    """Export every configured format, measure each against Keras, and write labels.txt, export.json, parity.md."""
    cfg, out = ctx.cfg, ctx.out
    meta = stage_meta(cfg, ctx.inputs)
    model = models.load(ctx.inputs["evaluate"].model)
    out.write_labels(meta.labels)
    files = {name: out.model(cfg.export.name, name) for name in cfg.export.formats}
    exported, rows = export_and_check(cfg, ctx.inputs, model, meta, files)
    seconds = time_breakdown(exported, rows)
    log.info("export time (seconds):\n%s", time_table(seconds))
    confidence = confidence_metadata(fileio.read_json(ctx.inputs["evaluate"].metrics))
    fileio.write_json(out.checks, {"labels": meta.labels, "preprocessing": meta.preprocessing(),
                                   "confidence": confidence, "formats": rows, "seconds": seconds})
    fileio.write_text(out.parity, table(rows))
    stop_on_failures(rows)
    for row in rows:
        if not row["passed"]:
            log.warning("%s: %s", row["title"], row["verdict"])
    log.info("%s", smallest_line(rows))
    return {"message": "; ".join(f"{r['title']} {r['verdict']}" for r in rows[1:]), "formats": rows,
            "seconds": seconds}


def verify(cfg, catalog):
    """The `verify` command: the parity rows of the exported files already in the artifacts, against Keras."""
    files = {name: catalog.stage("export").model(cfg.export.name, name) for name in cfg.export.formats}
    missing = [str(path) for path in files.values() if not path.exists()]
    if missing:
        raise PipelineError(f"no exported file {', '.join(missing)}: run `python -m pipeline export` first")
    return parity(cfg, {name: catalog.stage(name) for name in ("ingest", "evaluate")}, files)


def _log_row(row):
    measured = (f": accuracy {row['accuracy']:.2%}, agrees with Keras on {row['top1_agreement']:.2%} of "
                f"{row['images']} test images (max diff {row['max_probability_difference']:.1e})"
                if "top1_agreement" in row else "")
    log.info("check %s%s -> %s (checked in %.1fs)", row["title"], measured, row["verdict"], row["seconds"])
