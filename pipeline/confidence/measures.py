"""What evaluate records about the model's confidence: the temperature fitted on the validation split, calibration
on the test split before and after, the "none of these" threshold chosen on the validation split, and what each
threshold keeps of the test images and rejects of photos of none of the classes."""
from __future__ import annotations

import logging

from pipeline.confidence import threshold as thresholds
from pipeline.confidence.calibration import TEMPERATURE_RANGE, at_range_edge, fit_temperature, softmax, summary

log = logging.getLogger("pipeline.evaluate")


def measure(section, val_logits, val_labels, test_logits, test_labels, unknown_photos=None):
    """The `confidence` entry of metrics.json.

    section: the evaluate config. The temperature is fitted on the validation logits when section.calibrate (and
    there are validation images), else 1; the "none of these" threshold is chosen on the validation images by
    section.keep_correct (threshold.recommend). The test split only measures: calibration before and after, and
    the share of test images each threshold keeps. unknown_photos: {"logits", "source", "unreadable"} of photos
    of none of the classes, for the share each threshold rejects and each score's AUROC against the test images.
    """
    result = {"calibrated": False, "temperature": 1.0, "fit_images": len(val_logits), "score": thresholds.SCORE,
              "keep_correct": section.keep_correct, "threshold": None}
    if not section.calibrate:
        result["not_calibrated"] = "evaluate.calibrate is false"
    elif not len(val_logits):
        result["not_calibrated"] = "the validation split is empty"
    else:
        result.update(calibrated=True, temperature=fit_temperature(val_logits, val_labels))
        if at_range_edge(result["temperature"]):
            log.warning("the fitted temperature %.3g is at the edge of the range searched %s: the model's validation "
                        "predictions are %s; look at the training curves before shipping it",
                        result["temperature"], TEMPERATURE_RANGE,
                        "no better than chance (its calibrated probabilities are all near 1/number of classes)"
                        if result["temperature"] > 1 else "all right and certain")
    temperature = result["temperature"]
    result["test_before"], result["test_after"] = summary(test_logits, test_labels), summary(
        test_logits, test_labels, temperature)
    if section.keep_correct is None:
        result["no_threshold"] = "evaluate.keep_correct is null"
    elif not len(val_logits):
        result["no_threshold"] = "the validation split is empty"
    else:
        val = softmax(val_logits, temperature)
        result["threshold"] = thresholds.recommend(val.max(axis=1), val.argmax(axis=1) == val_labels,
                                                   section.keep_correct)
        if result["threshold"] is None:
            result["no_threshold"] = "the model gets no validation image right"
    test_scores = thresholds.scores(test_logits, temperature)
    test_correct = test_logits.argmax(axis=1) == test_labels  # a temperature never changes the top class
    chosen = {result["threshold"]} if result["threshold"] is not None else set()
    listed = sorted(set(thresholds.TABLE_THRESHOLDS) | chosen)
    unknown_scores = thresholds.scores(unknown_photos["logits"], temperature) if unknown_photos else None
    result["table"] = thresholds.rows(test_scores["confidence"], test_correct, listed,
                                      unknown_scores["confidence"] if unknown_scores else None)
    if unknown_photos:
        result["unknown"] = {
            "source": str(unknown_photos["source"]), "images": len(unknown_photos["logits"]),
            "unreadable": len(unknown_photos["unreadable"]),
            "auroc": {name: thresholds.auroc(test_scores[name], unknown_scores[name]) for name in test_scores}}
        if result["threshold"] is not None:
            result["unknown"]["rejected"] = float((unknown_scores["confidence"] < result["threshold"]).mean())
    return result
