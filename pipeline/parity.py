"""The parity table: every exported file measured against the Keras model on the same test images.

For each file: test accuracy, top-1 agreement with Keras, the largest class-probability difference, file size,
mean batch-1 CPU latency where its real runtime exists here, and a verdict against the export thresholds.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.exporters import FORMATS, Predictor, compare, coreml_runtime, in_label_order

KERAS = "keras"


def keras_predictor(model, meta):
    """The Keras model as a Predictor on raw pixels, preprocessed by the backbone's scale and bias."""
    def predict(pixels, batch_size=64):
        return np.concatenate([model(meta.preprocess(pixels[i:i + batch_size]), training=False).numpy()
                               for i in range(0, len(pixels), batch_size)])

    return Predictor(labels=list(meta.labels), image_size=meta.image_size, predict=predict)


def megabytes(path):
    """Size of a file, or of everything in a folder (an .mlpackage), in MB."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return round(size / 1e6, 2)


def latency_ms(predictor, pixels, images):
    """Mean milliseconds per single-image call over `images` images, after one warm-up call."""
    sample = pixels[:max(1, images)]
    predictor.predict(sample[:1])
    start = time.perf_counter()
    for image in sample:
        predictor.predict(image[None])
    return round((time.perf_counter() - start) * 1000 / len(sample), 2)


def measure(files, model, model_path, meta, pixels, truth, settings, log=None):
    """One row per exported file (plus Keras's own), each judged against the thresholds in `settings`.

    files: {format name: path}; truth: the true class index of each image; settings: the export config.
    """
    keras = keras_predictor(model, meta)
    expected = keras.predict(pixels)
    keras_accuracy = float((expected.argmax(1) == truth).mean())
    rows = [{"format": KERAS, "title": "Keras (reference)", "file": Path(model_path).name,
             "precision": "fp32", "megabytes": megabytes(model_path), "checked_by": "tf-keras",
             "images": len(pixels), "accuracy": keras_accuracy, "accuracy_drop": 0.0, "top1_agreement": 1.0,
             "max_probability_difference": 0.0, "latency_ms": latency_ms(keras, pixels, settings.latency_images),
             "problems": [], "passed": True, "verdict": "reference"}]
    native = coreml_runtime.available()
    for name, path in files.items():
        fmt = FORMATS[name]
        module = fmt.exporter()
        base = {"format": name, "title": fmt.title, "file": Path(path).name, "precision": fmt.precision,
                "megabytes": megabytes(path), "problems": module.problems(path, meta), "latency_ms": None}
        runs = [(fmt.runtime or "spec only (no runtime on Linux)", module.load(path, meta.labels), fmt.timed)]
        if fmt.native and native:
            runs.append((coreml_runtime.TITLE, coreml_runtime.load(path, meta.labels), True))
        for n, (checked_by, predictor, timed) in enumerate(runs):
            row = {**base, "checked_by": checked_by}
            if n:
                row.update(format=f"{name}@coreml", title=f"{fmt.title}, on Core ML")
            elif fmt.native and not native:
                row["native_absent"] = coreml_runtime.ABSENT
            if predictor is not None:
                row.update(_measured(predictor, pixels, truth, expected, keras_accuracy, meta.labels))
                if timed:
                    row["latency_ms"] = latency_ms(predictor, pixels, settings.latency_images)
            row["passed"], row["verdict"] = judge(row, fmt, settings)
            rows.append(row)
            if log:
                log(row)
    return rows


def _measured(predictor, pixels, truth, expected, keras_accuracy, labels):
    """Accuracy, agreement and largest difference from Keras of one predictor on the check images."""
    t0 = time.monotonic()
    probabilities = in_label_order(predictor.predict(pixels), predictor.labels, labels)
    accuracy = float((probabilities.argmax(1) == truth).mean())
    return {**compare(probabilities, expected), "accuracy": accuracy, "accuracy_drop": keras_accuracy - accuracy,
            "seconds": round(time.monotonic() - t0, 1)}


def judge(row, fmt, settings):
    """(passed, verdict) of one row: fp32 files against the strict thresholds, reduced ones the looser ones."""
    reasons = list(row["problems"])
    if "top1_agreement" in row:
        if fmt.reduced:
            if row["top1_agreement"] < settings.reduced_min_top1_agreement:
                reasons.append(f"top-1 agreement {row['top1_agreement']:.2%} < "
                               f"{settings.reduced_min_top1_agreement:.2%}")
            if row["accuracy_drop"] > settings.reduced_max_accuracy_drop:
                reasons.append(f"accuracy drop {row['accuracy_drop'] * 100:.2f} points > "
                               f"{settings.reduced_max_accuracy_drop * 100:.2f}")
        else:
            if row["top1_agreement"] < settings.min_top1_agreement:
                reasons.append(f"top-1 agreement {row['top1_agreement']:.2%} < {settings.min_top1_agreement:.2%}")
            if row["max_probability_difference"] > settings.max_probability_difference:
                reasons.append(f"max probability difference {row['max_probability_difference']:.2e} > "
                               f"{settings.max_probability_difference:.0e}")
    if reasons:
        return False, "FAILED: " + "; ".join(reasons)
    return True, "ok" if "top1_agreement" in row else "ok (spec only)"


def blocking_failures(rows):
    """The failed rows that must stop the export: any fp32 file, and any file whose interface is wrong."""
    return [r for r in rows if not r["passed"] and (r["precision"] == "fp32" or r["problems"])]


def table(rows):
    """The rows as a Markdown table."""
    head = ("format", "file", "MB", "test accuracy", "vs Keras (points)", "top-1 agreement",
            "max prob. diff", "latency ms (batch 1)", "computed by", "result")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        measured = "top1_agreement" in r
        cells = (r["title"], f"`{r['file']}`", f"{r['megabytes']:.2f}",
                 f"{r['accuracy']:.2%}" if measured else "-",
                 f"{0.0 - r['accuracy_drop'] * 100:+.2f}" if measured else "-",
                 f"{r['top1_agreement']:.2%}" if measured else "-",
                 f"{r['max_probability_difference']:.1e}" if measured else "-",
                 f"{r['latency_ms']:.1f}" if r.get("latency_ms") is not None else "-",
                 r["checked_by"], r["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({r["native_absent"] for r in rows if "native_absent" in r})
    return "\n".join(lines + [""] * bool(notes) + notes) + "\n"
