"""Stage 5, evaluate: the fine-tuned model on the test split, with per-class figures and the worst mistakes."""
from __future__ import annotations

import csv
import io
import logging

import numpy as np

from pipeline import fileio, models
from pipeline.augmentation import split_batches
from pipeline.errors import DataError
from pipeline.images import load_array
from pipeline.report import plot_confusion, plot_grid
from pipeline.stages.ingest import read_classes, read_index
from pipeline.training import keras_verbose

log = logging.getLogger("pipeline.evaluate")


def predict(model, ingest_files, augment_files, split, size, batch_size, flip=False):
    """Class probabilities of every image of a split, in index order."""
    batches = split_batches(ingest_files, augment_files, split, size, batch_size, flip=flip)
    log.info("predicting %d %s images%s", len(batches.paths), split, " (mirrored)" if flip else "")
    return model.predict(batches, verbose=keras_verbose(predict=True))


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
    """Write metrics.json, predictions.csv, confusion.png, worst.png and report.md."""
    cfg, out = ctx.cfg, ctx.out
    ingest = ctx.inputs["ingest"]
    classes = read_classes(ingest)
    rows = read_index(ingest, "test")
    if not rows:
        raise DataError(f"the test split in {ingest.index} is empty: add images to the dataset's test/ folder, "
                        "or remove test/ so that ingest takes ingest.test_ratio of the training images")
    model = models.load(ctx.inputs["finetune"].model)
    size, batch = cfg.model.image_size, cfg.evaluate.batch_size
    augment = ctx.inputs["augment"]
    probs = predict(model, ingest, augment, "test", size, batch)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r["label"]] for r in rows])
    result = metrics(labels, probs, classes)
    if cfg.evaluate.tta_flip:
        flipped = predict(model, ingest, augment, "test", size, batch, flip=True)
        tta = metrics(labels, (probs + flipped) / 2, classes)
        result["tta_flip"] = {k: tta[k] for k in ("accuracy", "macro_f1", "weighted_f1")}
    predicted = probs.argmax(axis=1)
    weakest = sorted(classes, key=lambda c: result["per_class"][c]["f1-score"])[:3]
    result.update({"test_images": len(rows), "weakest_classes": weakest})
    fileio.write_json(out.metrics, result)
    _write_predictions(out.predictions, rows, classes, probs, predicted)
    plot_confusion(np.array(result["confusion"]), classes, out.confusion)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:cfg.evaluate.worst_count]
    if len(worst):
        plot_grid([load_array(rows[i]["path"], size) for i in worst],
                  [f"{rows[i]['label']} -> {classes[predicted[i]]}\n{probs[i, predicted[i]]:.2f}" for i in worst],
                  out.worst)
    fileio.write_text(out.report, _report(ctx, result, classes, rows, worst, probs, predicted))
    tta_text = f", {result['tta_flip']['accuracy']:.3f} with flip TTA" if cfg.evaluate.tta_flip else ""
    return {"message": f"test accuracy {result['accuracy']:.3f}{tta_text}, macro F1 {result['macro_f1']:.3f} "
                       f"on {len(rows)} images", "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
            "tta_accuracy": result.get("tta_flip", {}).get("accuracy")}


def _write_predictions(path, rows, classes, probs, predicted):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "predicted", "confidence", "p_true"])
    index = {c: i for i, c in enumerate(classes)}
    for row, p, k in zip(rows, probs, predicted):
        writer.writerow([row["path"], row["label"], classes[k], f"{p[k]:.4f}", f"{p[index[row['label']]]:.4f}"])
    fileio.write_text(path, buffer.getvalue())


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
    lines += ["", "## Training curves", ""]
    for stage in ("train-head", "finetune"):
        if stage in ctx.inputs:
            lines.append(f"- {stage}: ![{stage} curves](../{stage}/{ctx.inputs[stage].curves.name})")
    return "\n".join(lines) + "\n"
