"""Plots and the Markdown report: training curves, confusion matrix, image grids, the dataset section."""
from __future__ import annotations

import math
import re

import numpy as np

from pipeline import fileio

# Markdown markup characters; an underscore only where it could open or close emphasis (not inside a word)
_MARKUP = re.compile(r"[\\`*\[\]|]|(?<![^\W_])_|_(?![^\W_])")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)


def plot_curves(rows, path):
    """Loss and accuracy per epoch, training and validation, side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in rows]
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            key = prefix + metric
            if rows and key in rows[0]:
                ax.plot(epochs, [r[key] for r in rows], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_overlaid_curves(curves, path, title):
    """Several runs' validation accuracy and loss per epoch in one figure: {label: history rows}, one line each."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows in curves.items():
        epochs = [r["epoch"] for r in rows]
        for ax, metric in zip(axes, ("val_accuracy", "val_loss")):
            ax.plot(epochs, [r[metric] for r in rows], "-o", markersize=3, label=label)
    for ax, name in zip(axes, ("validation accuracy", "validation loss")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_confusion(matrix, classes, path):
    """A seaborn heatmap of the confusion matrix, class names on both axes."""
    import seaborn as sns

    plt = _pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * n + 2), max(5, 0.5 * n + 1.5)))
    sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", cbar=False, xticklabels=classes,
                yticklabels=classes, ax=ax, annot_kws={"size": 8})
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split)")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    _save(fig, path)


def plot_reliability(curves, path):
    """A reliability diagram: each curve's accuracy against mean confidence per confidence bin (the diagonal is
    perfect calibration), and below it the share of images in each bin. `curves`: {label: bins}, bins as
    pipeline.confidence.calibration.reliability_bins gives them."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    for i, (label, bins) in enumerate(curves.items()):
        full = [b for b in bins if b["count"]]
        top.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "-" + "os^D"[i % 4],
                 markersize=4, label=label)
        total = sum(b["count"] for b in bins) or 1
        width = (bins[0]["high"] - bins[0]["low"]) / len(curves) if bins else 0
        bottom.bar([b["low"] + (i + 0.5) * width for b in bins], [b["count"] / total for b in bins], width=width,
                   label=label)
    top.set_ylabel("accuracy")
    top.set_title("Reliability (test split)")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    bottom.set_xlabel("confidence (largest class probability)")
    bottom.set_ylabel("share of images")
    bottom.grid(alpha=0.3)
    _save(fig, path)


def plot_grid(images, titles, path, columns=4):
    """A grid of uint8 images with a title under each (augment previews, worst predictions)."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
        ax.set_title(title, fontsize=9)
    _save(fig, path)


def markdown_text(text):
    """`text` (a message, a file name) as Markdown that shows it as it is: markup characters are escaped, and `<`,
    so that no file name becomes an HTML tag in report.html."""
    return _MARKUP.sub(lambda m: "\\" + m.group(0), text).replace("<", "&lt;").replace("\n", " ")


def dataset_section(ingest_report, report_path, limit=20):
    """The report's "Dataset" section, from ingest's report (a dict): the source, the images per split, where the
    splits came from (ingest's notes), ingest's warnings (the first `limit`, then how many more) and the numbers
    of bad images and ignored files; `report_path` is ingest's report as the section links to it."""
    link = f"[{report_path.rsplit('/', 1)[-1]}]({report_path})"
    layout = "split folders" if ingest_report["layout"] == "splits" else "class folders, split by ingest"
    lines = ["## Dataset", "", f"Source: {markdown_text(ingest_report['source'])} ({layout}); "
             f"{len(ingest_report['classes'])} classes.", "", "| split | images |", "|---|---|"]
    lines += [f"| {split} | {count} |" for split, count in ingest_report["images"].items()]
    if ingest_report["notes"]:
        lines += ["", *(f"- {markdown_text(note)}" for note in ingest_report["notes"])]
    lines += ["", *_warning_lines(ingest_report["warnings"], link, limit)]
    lines += ["", f"Bad images skipped: {len(ingest_report['bad_images'])}; files ignored: "
                  f"{len(ingest_report['ignored_files'])} (each listed with its reason in {link})."]
    return lines


def _warning_lines(warnings, link, limit):
    if not warnings:
        return ["Ingest's warnings: none."]
    lines = [f"Ingest's warnings ({len(warnings)}):", "", *(f"- {markdown_text(w)}" for w in warnings[:limit])]
    if len(warnings) > limit:
        lines.append(f"- and {len(warnings) - limit} more in {link}")
    return lines
