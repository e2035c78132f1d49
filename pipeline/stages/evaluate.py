"""Stage 5, evaluate: the fine-tuned model on the test split, with per-class figures and the worst mistakes; its
confidence calibrated on the validation split (the model that ships) and a "none of these" threshold."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
from PIL import Image

from pipeline import fileio
from pipeline.backbones import scale_bias
from pipeline.confidence import unknown
from pipeline.confidence.calibration import softmax
from pipeline.confidence.measures import measure
from pipeline.data import vision_crop
from pipeline.data.augmentation import split_batches
from pipeline.data.images import BadImage, load_array
from pipeline.data.labels import class_indices
from pipeline.errors import DataError
from pipeline.progress import Progress
from pipeline.reporting import html_report
from pipeline.reporting.confidence import confidence_section
from pipeline.reporting.report import dataset_section, plot_confusion, plot_grid, plot_reliability
from pipeline.train import inputs, models
from pipeline.train.training import keras_verbose

log = logging.getLogger("pipeline.evaluate")


def predict(model, ingest_files, augment_files, split, size, batch_size, flip=False):
    """The model's outputs for every image of a split, in index order (a list of arrays for a model with several
    outputs)."""
    batches = split_batches(ingest_files, augment_files, split, size, batch_size, flip=flip)
    log.info("predicting %d %s images%s", len(batches.paths), split, " (mirrored)" if flip else "")
    return model.predict(inputs.dataset(batches), verbose=keras_verbose())


def _outputs_in_batches(model, items, batch_size, load, settings, what):
    """`model`'s first output for the images `load(item)` gives, `batch_size` items at a time, through the
    backbone's preprocessing (the augment stage's scale and bias); `load` returns None for an item to skip.
    A (N, ...) array, or None when every item was skipped."""
    progress = Progress(what, len(items), "images")
    parts = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pixels = [p for p in map(load, chunk) if p is not None]
        if pixels:
            batch = scale_bias(np.stack(pixels).astype(np.float32), settings["input_scale"], settings["input_bias"])
            outputs = model(batch, training=False)
            parts.append((outputs[0] if isinstance(outputs, (list, tuple)) else outputs).numpy())
        progress.advance(len(chunk))
    progress.close()
    return np.concatenate(parts) if parts else None


def vision_accuracies(model, rows, labels, size, settings, batch_size, scale_fill_probabilities):
    """Test accuracy with the photos cropped and scaled as each of Vision's options does, {option name: accuracy}.

    The pixels go through the backbone's own preprocessing, as the exported files apply it; scale_fill is what
    training and `predict` do, so its probabilities are the plain pass's.
    """
    accuracies = {}
    for option in vision_crop.OPTIONS:
        if option.name == vision_crop.TRAINING_OPTION:
            probs = scale_fill_probabilities
        else:
            probs = _outputs_in_batches(model, rows, batch_size,
                                        lambda row: vision_crop.load_as(row["path"], size, option.name), settings,
                                        f"test images as Vision's {option.vision}")
        accuracies[option.name] = float((probs.argmax(axis=1) == labels).mean())
    return accuracies


def unknown_paths(cfg, sources_dir):
    """The image files of evaluate.unknown_data (None when it is unset); an archive is unpacked into `sources_dir`
    within the limits a dataset archive is."""
    if cfg.evaluate.unknown_data is None:
        return None
    limits = SimpleNamespace(max_archive_gb=cfg.ingest.max_archive_gb,
                             max_compression_ratio=cfg.ingest.max_compression_ratio)
    return unknown.image_paths(cfg.evaluate.unknown_data, sources_dir, limits)


def unknown_logits(model, cfg, paths, settings):
    """The logits (N, C) under `model` (a logits_and_probabilities model) of the unknown photos at `paths`, and the
    paths of those that could not be read (skipped, each with a warning)."""
    unreadable = []

    def load(path):
        try:
            return load_array(path, cfg.model.image_size)
        except (BadImage, OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("%s: skipped, not an image this tool can read (%s)", path, exc)
            unreadable.append(str(path))
            return None

    logits = _outputs_in_batches(model, paths, cfg.evaluate.batch_size, load, settings, "unknown photos")
    if logits is None:
        raise DataError(f"{unknown.KEY} '{cfg.evaluate.unknown_data}': none of its {len(paths)} image files could be "
                        "read; give JPEG/PNG photos that show none of the classes, or set it to null")
    return logits, unreadable


def metrics(labels, probabilities, classes):
    """Accuracy, per-class report, macro and weighted F1 and the confusion matrix."""
    from sklearn.metrics import classification_report, confusion_matrix, f1_score

    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(classes)))
    report = classification_report(labels, predicted, labels=indices, target_names=classes, output_dict=True,
                                   zero_division=0)
    return {
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, labels=indices, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, predicted, labels=indices, average="weighted", zero_division=0)),
        "per_class": {c: {k: float(v) for k, v in report[c].items()} for c in classes},
        "confusion": confusion_matrix(labels, predicted, labels=indices).tolist(),
    }


def run(ctx):
    """Write model.h5 (the fine-tuned model, calibrated), metrics.json, predictions.csv, confusion.png,
    reliability.png, worst.png, report.md and report.html."""
    cfg, out = ctx.cfg, ctx.out
    ingest = ctx.inputs["ingest"]
    classes = ingest.read_classes()
    rows = ingest.read_index("test")
    if not rows:
        raise DataError(f"the test split in {ingest.index} is empty: add images to the dataset's test/ folder, "
                        "or remove test/ so that ingest takes ingest.test_ratio of the training images")
    photos = unknown_paths(cfg, ctx.sources_dir)  # before any work: a wrong path is an error at once
    model = models.load(ctx.inputs["finetune"].model)
    both = models.logits_and_probabilities(model)
    size, batch = cfg.model.image_size, cfg.evaluate.batch_size
    augment = ctx.inputs["augment"]
    settings = fileio.read_json(augment.settings)
    logits, probs = predict(both, ingest, augment, "test", size, batch)
    labels = class_indices(rows, classes)
    result = metrics(labels, probs, classes)
    if cfg.evaluate.tta_flip:
        _, flipped = predict(both, ingest, augment, "test", size, batch, flip=True)
        tta = metrics(labels, (probs + flipped) / 2, classes)
        result["tta_flip"] = {k: tta[k] for k in ("accuracy", "macro_f1", "weighted_f1")}
    if cfg.evaluate.vision_options:
        result["vision_options"] = vision_accuracies(model, rows, labels, size, settings, batch, probs)
        result["recommended_crop"] = vision_crop.recommend(result["vision_options"])
    result["confidence"] = _confidence(ctx, both, settings, logits, labels, classes, photos)
    temperature = result["confidence"]["temperature"]
    models.divide_logits(model, temperature)
    models.save(model, out.model)
    probs = softmax(logits, temperature)  # what the saved model says: the report's confidences are these
    predicted = probs.argmax(axis=1)
    weakest = sorted(classes, key=lambda c: result["per_class"][c]["f1-score"])[:3]
    result.update({"test_images": len(rows), "weakest_classes": weakest})
    fileio.write_json(out.metrics, result)
    _write_predictions(out.predictions, rows, classes, labels, probs, predicted)
    plot_confusion(np.array(result["confusion"]), classes, out.confusion)
    plot_reliability({"before calibration": result["confidence"]["test_before"]["bins"],
                      f"after (T = {temperature:.3f})": result["confidence"]["test_after"]["bins"]}, out.reliability)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:cfg.evaluate.worst_count]
    if len(worst):
        plot_grid([load_array(rows[i]["path"], size) for i in worst],
                  [f"{rows[i]['label']} -> {classes[predicted[i]]}\n{probs[i, predicted[i]]:.2f}" for i in worst],
                  out.worst)
    text = _report(ctx, result, classes, rows, worst, probs, predicted)
    fileio.write_text(out.report, text)
    images = {out.confusion.name: out.confusion, out.worst.name: out.worst, out.reliability.name: out.reliability}
    images.update({f"../{stage}/{ctx.inputs[stage].curves.name}": ctx.inputs[stage].curves
                   for stage in ("train-head", "finetune") if stage in ctx.inputs})
    fileio.write_text(out.report_html, html_report.render(text, images, f"{cfg.export.name} evaluation"))
    tta_text = f", {result['tta_flip']['accuracy']:.3f} with flip TTA" if cfg.evaluate.tta_flip else ""
    crop_text = ("; fed as Vision's " + ", ".join(f"{name} {acc:.3f}" for name, acc in result["vision_options"].items())
                 if "vision_options" in result else "")
    return {"message": f"test accuracy {result['accuracy']:.3f}{tta_text}, macro F1 {result['macro_f1']:.3f} "
                       f"on {len(rows)} images{crop_text}; {_confidence_text(result['confidence'])}",
            "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
            "tta_accuracy": result.get("tta_flip", {}).get("accuracy"),
            "temperature": temperature, "threshold": result["confidence"]["threshold"]}


def _confidence(ctx, both, settings, test_logits, test_labels, classes, photo_paths):
    """pipeline.confidence.measures.measure from the validation split's logits (and the unknown photos', if any)."""
    cfg, ingest = ctx.cfg, ctx.inputs["ingest"]
    size, batch = cfg.model.image_size, cfg.evaluate.batch_size
    val_rows = ingest.read_index("val")
    n_classes = len(classes)
    val_logits = (predict(both, ingest, ctx.inputs["augment"], "val", size, batch)[0] if val_rows
                  else np.zeros((0, n_classes), np.float32))
    if not val_rows:
        log.warning("the validation split is empty: the confidence is not calibrated and no \"none of these\" "
                    "threshold is recommended (give the dataset a val/ folder, or set ingest.val_ratio above 0)")
    photos = None
    if photo_paths is not None:
        photo_logits, unreadable = unknown_logits(both, cfg, photo_paths, settings)
        photos = {"logits": photo_logits, "source": cfg.evaluate.unknown_data, "unreadable": unreadable}
    return measure(cfg.evaluate, val_logits, class_indices(val_rows, classes), test_logits, test_labels, photos)


def _confidence_text(confidence):
    before, after = confidence["test_before"], confidence["test_after"]
    text = (f"temperature {confidence['temperature']:.3f} (test ECE {before['ece']:.3f} -> {after['ece']:.3f}, "
            f"NLL {before['nll']:.3f} -> {after['nll']:.3f})")
    if confidence["threshold"] is not None:
        text += f", \"none of these\" threshold {confidence['threshold']:.3f}"
        if "rejected" in confidence.get("unknown", {}):
            text += f" rejecting {confidence['unknown']['rejected']:.1%} of the unknown photos"
    return text


def _write_predictions(path, rows, classes, labels, probs, predicted):
    fileio.write_csv(path, ("path", "label", "predicted", "confidence", "p_true"), [
        {"path": row["path"], "label": row["label"], "predicted": classes[k], "confidence": f"{p[k]:.4f}",
         "p_true": f"{p[truth]:.4f}"} for row, p, k, truth in zip(rows, probs, predicted, labels)])


def _report(ctx, result, classes, rows, worst, probs, predicted):
    out = ctx.out
    lines = ["# MultiSnacks evaluation", "",
             f"Test split: {len(rows)} images, {len(classes)} classes.", "",
             f"- Accuracy: **{result['accuracy']:.4f}**"]
    if "tta_flip" in result:
        lines.append(f"- Accuracy with horizontal-flip TTA: **{result['tta_flip']['accuracy']:.4f}**")
    lines += [f"- Macro F1: {result['macro_f1']:.4f}; weighted F1: {result['weighted_f1']:.4f}",
              "- Weakest classes (F1): " + ", ".join(
                  f"{c} ({result['per_class'][c]['f1-score']:.2f})" for c in result["weakest_classes"]), "",
              *_dataset_lines(ctx.inputs["ingest"]), "",
              "## Per class", "", "| class | precision | recall | F1 | images |", "|---|---|---|---|---|"]
    for c in classes:
        m = result["per_class"][c]
        lines.append(f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1-score']:.3f} | {int(m['support'])} |")
    lines += ["", "## Plots", "", f"![confusion matrix]({out.confusion.name})", ""]
    if len(worst):
        lines += [f"![worst predictions]({out.worst.name})", "", "## Most confidently wrong", "",
                  "| image | true | predicted | confidence |", "|---|---|---|---|"]
        for i in worst:
            lines.append(f"| {rows[i]['path']} | {rows[i]['label']} | {classes[predicted[i]]} | "
                         f"{probs[i, predicted[i]]:.3f} |")
    lines += ["", *confidence_section(result["confidence"], ctx.out.reliability.name)]
    if "vision_options" in result:
        lines += ["", *app_section(ctx.cfg, result["vision_options"], result["recommended_crop"],
                                   result["confidence"]["threshold"])]
    lines += ["", "## Training curves", ""]
    for stage in ("train-head", "finetune"):
        if stage in ctx.inputs:
            lines.append(f"- {stage}: ![{stage} curves](../{stage}/{ctx.inputs[stage].curves.name})")
    return "\n".join(lines) + "\n"


def _dataset_lines(ingest):
    """The report's Dataset section from ingest's report, which it links to beside this stage's folder."""
    return dataset_section(fileio.read_json(ingest.report), f"../{ingest.root.name}/{ingest.report.name}")


def app_section(cfg, accuracies, recommended, threshold=None):
    """The report's "Using the model in your app": how each Vision option feeds the model, what it scores, and
    the Swift lines for the recommended one (saying "not sure" below `threshold`, if given)."""
    size = cfg.model.image_size
    lines = ["## Using the model in your app", "",
             f"Vision crops and scales every photo to the model's {size}x{size} input before the model sees it; how "
             "depends on the API and one option. Test accuracy with the test photos fed each way:", "",
             "| option | `VNCoreMLRequest` | `CoreMLRequest` (iOS 18) | what it does | test accuracy |",
             "|---|---|---|---|---|"]
    for option in vision_crop.OPTIONS:
        vision = option.vision + (" (default)" if option.vision_default else "")
        request = option.coreml_request + (" (default)" if option.coreml_request_default else "")
        mark = " **recommended**" if option.name == recommended else ""
        lines.append(f"| {option.name}{mark} | `{vision}` | `{request}` | {option.summary} | "
                     f"{accuracies[option.name]:.4f} |")
    best = vision_crop.get_option(recommended)
    lines += ["", f"Set `{best.vision}` on a `VNCoreMLRequest` (its default is `.centerCrop`) or `{best.coreml_request}` "
              "on a `CoreMLRequest` (its default is `.scaleToFill`):", "",
              vision_crop.swift_snippet(swift_class_name(cfg.export.name), best, threshold=threshold).rstrip("\n")]
    return lines


def swift_class_name(model_name):
    """The class Xcode generates for a model file named `model_name` (characters Swift does not allow become _)."""
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in model_name)
    return name if not name[0].isdigit() else "_" + name
