"""The report's "Confidence" section: calibration before and after, the reliability diagram, and the "none of
these" threshold table, from the `confidence` entry of evaluate's metrics.json."""
from __future__ import annotations

from pipeline.reporting.report import markdown_text


def _share(value):
    return "-" if value is None else f"{value:.1%}"


def confidence_section(confidence, reliability_image):
    """Markdown lines of the section; `reliability_image` is the diagram's file name beside the report."""
    before, after = confidence["test_before"], confidence["test_after"]
    temperature = confidence["temperature"]
    if confidence["calibrated"]:
        how = (f"The logits are divided by a temperature T = {temperature:.4f}, fitted on the {confidence['fit_images']} "
               "validation images by minimising their negative log-likelihood, inside the model itself: every "
               "exported file gives the calibrated probabilities. The test split chose nothing.")
    else:
        how = ("Not calibrated: " + confidence["not_calibrated"]
               + ". The model's probabilities are the fine-tuned model's own (T = 1).")
    lines = ["## Confidence", "", how, "",
             "| test split | NLL | ECE (15 bins) | mean confidence | accuracy |", "|---|---|---|---|---|"]
    for name, row in (("before calibration", before), (f"after (T = {temperature:.4f})", after)):
        lines.append(f"| {name} | {row['nll']:.4f} | {row['ece']:.4f} | {row['mean_confidence']:.4f} | "
                     f"{row['accuracy']:.4f} |")
    lines += ["", f"![reliability diagram]({reliability_image})", "", "### \"None of these\"", ""]
    threshold = confidence.get("threshold")
    unknown = confidence.get("unknown")
    if threshold is None:
        lines.append("No threshold recommended: " + confidence["no_threshold"] + ".")
    else:
        lines.append(f"Recommended threshold: **{threshold:.4f}**, the highest confidence that keeps "
                     f"{confidence['keep_correct']:.0%} of the validation images the model gets right. Below it, an "
                     "app should say it is not sure. The score is " + confidence["score"] + ".")
    header = "| threshold | test images kept | accuracy of those kept | correct ones kept |"
    rule = "|---|---|---|---|"
    if unknown:
        header += " unknown photos rejected |"
        rule += "---|"
    lines += ["", header, rule]
    for row in confidence["table"]:
        mark = " (recommended)" if threshold is not None and row["threshold"] == threshold else ""
        cells = [f"{row['threshold']:.4f}{mark}", _share(row["kept"]), _share(row["kept_accuracy"]),
                 _share(row["right_kept"])]
        if unknown:
            cells.append(_share(row["unknown_rejected"]))
        lines.append("| " + " | ".join(cells) + " |")
    if unknown:
        lines += ["", f"Unknown photos: {unknown['images']} from {markdown_text(unknown['source'])}"
                  + (f" ({unknown['unreadable']} unreadable, skipped)" if unknown["unreadable"] else "") + ". "
                  "How well each score tells test images from them (AUROC: the chance that a test image scores "
                  "higher than an unknown photo): " + ", ".join(f"{name} {value:.3f}"
                                                                for name, value in unknown["auroc"].items()) + "."]
    return lines
