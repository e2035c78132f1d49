"""The report's "Confidence" section (pipeline.reporting.confidence) and its reliability diagram."""
from pipeline.confidence.calibration import reliability_bins
from pipeline.reporting.confidence import confidence_section
from pipeline.reporting.report import plot_reliability


def _entry(**changes):
    row = {"nll": 0.5, "ece": 0.03, "mean_confidence": 0.9, "accuracy": 0.87}
    entry = {"calibrated": True, "temperature": 1.5, "fit_images": 955, "score": "the largest probability",
             "keep_correct": 0.95, "threshold": 0.61, "test_before": row, "test_after": {**row, "ece": 0.01},
             "table": [{"threshold": 0.5, "kept": 0.97, "kept_accuracy": 0.88, "right_kept": 0.99},
                       {"threshold": 0.61, "kept": 0.9, "kept_accuracy": 0.93, "right_kept": 0.95}]}
    return {**entry, **changes}


def test_section_gives_the_temperature_the_threshold_and_the_table():
    text = "\n".join(confidence_section(_entry(), "reliability.png"))
    assert "T = 1.5000, fitted on the 955 validation images" in text
    assert "| after (T = 1.5000) | 0.5000 | 0.0100 | 0.9000 | 0.8700 |" in text
    assert "Recommended threshold: **0.6100**" in text and "keeps 95% of the validation images" in text
    assert "| 0.6100 (recommended) | 90.0% | 93.0% | 95.0% |" in text
    assert "unknown photos rejected" not in text


def test_section_says_why_there_is_no_calibration_or_threshold_and_shows_unknown_photos():
    entry = _entry(calibrated=False, temperature=1.0, not_calibrated="evaluate.calibrate is false", threshold=None,
                   no_threshold="evaluate.keep_correct is null",
                   table=[{"threshold": 0.5, "kept": 1.0, "kept_accuracy": None, "right_kept": None,
                           "unknown_rejected": 0.25}],
                   unknown={"images": 4, "source": "/photos/other_things", "unreadable": 1,
                            "auroc": {"confidence": 0.8, "max_logit": 0.7, "energy": 0.75}})
    text = "\n".join(confidence_section(entry, "reliability.png"))
    assert "Not calibrated: evaluate.calibrate is false." in text
    assert "No threshold recommended: evaluate.keep_correct is null." in text
    assert "| 0.5000 | 100.0% | - | - | 25.0% |" in text
    assert "4 from /photos/other_things (1 unreadable, skipped)" in text
    assert "confidence 0.800, max_logit 0.700, energy 0.750" in text


def test_reliability_diagram_is_written(tmp_path):
    bins = reliability_bins([0.2, 0.5, 0.9, 0.95], [False, True, True, True])
    plot_reliability({"before": bins, "after": bins}, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
