"""What evaluate records about confidence (pipeline.confidence.measures): chosen on validation images only,
measured on the test images and the unknown photos."""
import numpy as np
import pytest

from pipeline import config
from pipeline.confidence.measures import measure


def _logits(rng, n, classes=4, sharpness=5.0):
    return rng.normal(0, sharpness, (n, classes))


def test_confidence_is_fitted_and_chosen_on_validation_images_only():
    from pipeline.confidence.calibration import fit_temperature, softmax
    from pipeline.confidence.threshold import recommend

    rng = np.random.default_rng(0)
    val, test = _logits(rng, 300), _logits(rng, 200)
    val_labels, test_labels = rng.integers(0, 4, 300), rng.integers(0, 4, 200)
    val_labels[:200], test_labels[:150] = val[:200].argmax(1), test[:150].argmax(1)
    section = config.EvaluateConfig()
    result = measure(section, val, val_labels, test, test_labels)
    t = fit_temperature(val, val_labels)
    assert result["calibrated"] and result["temperature"] == t
    p = softmax(val, t)
    assert result["threshold"] == recommend(p.max(1), p.argmax(1) == val_labels, 0.95)
    # other test images change what is measured, never what was chosen
    other = measure(section, val, val_labels, test[::-1] * 2, test_labels)
    assert (other["temperature"], other["threshold"]) == (result["temperature"], result["threshold"])
    assert other["test_before"] != result["test_before"]
    kept = [row for row in result["table"] if row["threshold"] == result["threshold"]]
    assert kept and kept[0]["kept"] == pytest.approx((softmax(test, t).max(1) >= result["threshold"]).mean())


def test_confidence_without_calibration_or_validation_images_says_why():
    rng = np.random.default_rng(1)
    test, labels = _logits(rng, 50), rng.integers(0, 4, 50)
    off = measure(config.EvaluateConfig(calibrate=False, keep_correct=None),
                                       _logits(rng, 40), rng.integers(0, 4, 40), test, labels)
    assert off["temperature"] == 1.0 and not off["calibrated"] and off["threshold"] is None
    assert off["not_calibrated"] == "evaluate.calibrate is false" and off["no_threshold"] == "evaluate.keep_correct is null"
    assert off["test_before"] == off["test_after"]
    empty = measure(config.EvaluateConfig(), np.zeros((0, 4)), np.zeros(0, int), test, labels)
    assert empty["not_calibrated"] == empty["no_threshold"] == "the validation split is empty"


def test_unknown_photos_rejected_and_scores_compared():
    rng = np.random.default_rng(2)
    val, labels = _logits(rng, 100), rng.integers(0, 4, 100)
    labels[:90] = val[:90].argmax(1)
    unknown = rng.normal(0, 0.5, (30, 4))  # flat logits: unsure
    result = measure(config.EvaluateConfig(), val, labels, val, labels,
                                          {"logits": unknown, "source": "elsewhere", "unreadable": ["x.jpg"]})
    from pipeline.confidence.calibration import softmax

    confidence = softmax(unknown, result["temperature"]).max(1)
    assert result["unknown"]["rejected"] == pytest.approx((confidence < result["threshold"]).mean())
    assert result["unknown"]["images"] == 30 and result["unknown"]["unreadable"] == 1
    assert set(result["unknown"]["auroc"]) == {"confidence", "max_logit", "energy"}
    assert result["unknown"]["auroc"]["confidence"] > 0.9
    assert all("unknown_rejected" in row for row in result["table"])
