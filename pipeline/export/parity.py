"""The parity table: every exported file measured against the Keras model on the same test images.

For each file: test accuracy, top-1 agreement with Keras, the largest class-probability difference, file size,
mean batch-1 CPU latency where its real runtime exists here, and a verdict against the export thresholds.
Each row also says how long it took: `seconds` checking it (spec check, loading, computing the check images;
for Keras, computing the reference probabilities) and `latency_seconds` measuring its latency.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.checkers.kernels import CannotVerify
from pipeline.checkers.predictor import Predictor, in_label_order
from pipeline.export import coreml_runtime
from pipeline.export.formats import FORMATS

KERAS = "keras"


def compare(probabilities, expected):
    """Top-1 agreement and largest absolute probability difference between an export and Keras."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return {"images": int(len(expected)),
            "top1_agreement": float((probabilities.argmax(1) == expected.argmax(1)).mean()),
            "max_probability_difference": float(np.abs(probabilities - expected).max())}


def keras_predictor(model, meta):
    """The Keras model as a Predictor on raw pixels, preprocessed by the backbone's scale and bias.

    The model runs as one TensorFlow graph (as Keras's own `predict` runs it), not layer by layer, which is faster
    and agrees with the eager model to float32 rounding (bench/RESULTS.md, "Export time").
    """
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(pixels, batch_size=64):
        return np.concatenate([forward(meta.preprocess(pixels[i:i + batch_size])).numpy()
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


def measure(files, model, model_path, meta, pixels, truth, settings, log=None, ready=None):
    """One row per exported file (plus Keras's own), each judged against the thresholds in `settings`.

    files: {format name: path}; truth: the true class index of each image; settings: the export config.
    A file the checker cannot compute (CannotVerify) gets a failed row saying why, not an exception.
    log: called with each row once it is checked. ready: called with a format's name before its file is first
    read, to wait until it is written (the files may still be converting in another process). Latencies are
    measured last, after every check and so after every conversion, so that nothing else runs beside them.
    """
    keras = keras_predictor(model, meta)
    t0 = time.monotonic()
    expected = keras.predict(pixels)
    keras_seconds = time.monotonic() - t0
    keras_accuracy = float((expected.argmax(1) == truth).mean())
    keras_row = {"format": KERAS, "title": "Keras (reference)", "file": Path(model_path).name,
                 "precision": "fp32", "megabytes": megabytes(model_path), "checked_by": "tf-keras",
                 "images": len(pixels), "accuracy": keras_accuracy, "accuracy_drop": 0.0, "top1_agreement": 1.0,
                 "max_probability_difference": 0.0, "problems": [], "passed": True, "verdict": "reference",
                 "seconds": round(keras_seconds, 2)}
    rows, timed = [keras_row], [(keras_row, keras)]
    native = coreml_runtime.available()
    for name, path in files.items():
        if ready is not None:
            ready(name)
        fmt = FORMATS[name]
        module = fmt.exporter()
        t0 = time.monotonic()
        base = {"format": name, "title": fmt.title, "file": Path(path).name, "precision": fmt.precision,
                "megabytes": megabytes(path), "problems": module.problems(path, meta), "latency_ms": None}
        spec_seconds = time.monotonic() - t0
        runs = [(fmt.runtime or "spec only (no runtime on Linux)", lambda: module.load(path, meta.labels), fmt.timed)]
        if fmt.native and native:
            runs.append((coreml_runtime.TITLE, lambda: coreml_runtime.load(path, meta.labels), True))
        for n, (checked_by, load, is_timed) in enumerate(runs):
            t0 = time.monotonic()
            row = {**base, "checked_by": checked_by}
            if n:
                row.update(format=f"{name}@coreml", title=f"{fmt.title}, on Core ML")
            elif fmt.native and not native:
                row["native_absent"] = coreml_runtime.ABSENT
            try:
                predictor = load()
                if predictor is not None:
                    row.update(_measured(predictor, pixels, truth, expected, keras_accuracy, meta.labels))
            except CannotVerify as exc:
                predictor, row["unverifiable"] = None, str(exc)
            row["seconds"] = round(time.monotonic() - t0 + (0 if n else spec_seconds), 2)
            if predictor is not None and is_timed:
                timed.append((row, predictor))
            row["passed"], row["verdict"] = judge(row, fmt, settings)
            rows.append(row)
            if log:
                log(row)
    for row, predictor in timed:
        row.update(_latency(predictor, pixels, settings.latency_images))
    return rows


def _latency(predictor, pixels, images):
    """{latency_ms, latency_seconds}: the mean batch-1 latency and how long measuring it took."""
    t0 = time.monotonic()
    latency = latency_ms(predictor, pixels, images)
    return {"latency_ms": latency, "latency_seconds": round(time.monotonic() - t0, 2)}


def _measured(predictor, pixels, truth, expected, keras_accuracy, labels):
    """Accuracy, agreement and largest difference from Keras of one predictor on the check images."""
    probabilities = in_label_order(predictor.predict(pixels), predictor.labels, labels)
    accuracy = float((probabilities.argmax(1) == truth).mean())
    return {**compare(probabilities, expected), "accuracy": accuracy, "accuracy_drop": keras_accuracy - accuracy}


def judge(row, fmt, settings):
    """(passed, verdict) of one row: fp32 files against the strict thresholds, reduced ones the looser ones.

    A row whose file the checker cannot compute (`unverifiable`) fails, with the checker's reason.
    """
    reasons = list(row["problems"]) + ([row["unverifiable"]] if "unverifiable" in row else [])
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
    """The failed rows that must stop the export: any fp32 file measured against Keras, and any file whose
    interface is wrong. A file the checker cannot compute is reported failed but does not stop the others: it
    was not shown to disagree."""
    return [r for r in rows if not r["passed"] and (r["problems"] or (r["precision"] == "fp32"
                                                                      and "unverifiable" not in r))]


def smallest_coreml(rows):
    """The row of the smallest Core ML file (.mlmodel or .mlpackage) that was measured and passed, or None.

    A file counts as passed only if every row computing it (the NumPy checker, and Core ML itself on a Mac)
    passed and at least one of them measured it against Keras.
    """
    by_file = {}
    for row in rows:
        fmt = FORMATS.get(row["format"].split("@")[0])
        if fmt is not None and fmt.native:
            by_file.setdefault(row["file"], []).append(row)
    passing = [group[0] for group in by_file.values()
               if all(r["passed"] for r in group) and any("top1_agreement" in r for r in group)]
    return min(passing, key=lambda r: (r["megabytes"], r["file"]), default=None)


def smallest_line(rows):
    """The sentence under the parity table naming the smallest passing Core ML file, as the one to ship when
    size matters, with how many times smaller it is than the fp32 Core ML file; or saying that none passed."""
    best = smallest_coreml(rows)
    if best is None:
        return "No Core ML file passed its parity check, so none is named as the one to ship when size matters."
    line = (f"Smallest Core ML file that passed: `{best['file']}` ({best['title']}, {best['megabytes']:.2f} MB), "
            "the one to ship when size matters")
    reference = next((r for r in rows if FORMATS.get(r["format"]) is not None and FORMATS[r["format"]].native
                      and r["precision"] == "fp32"), None)
    if reference is not None and reference["file"] != best["file"] and best["megabytes"] > 0:
        line += (f"; {reference['megabytes'] / best['megabytes']:.1f} times smaller than the fp32 Core ML file "
                 f"`{reference['file']}` ({reference['megabytes']:.2f} MB)")
    return line + "."


def table(rows):
    """The rows as a Markdown table, then the smallest passing Core ML file (smallest_line) and any notes."""
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
    return "\n".join(lines + ["", smallest_line(rows)] + [""] * bool(notes) + notes) + "\n"
