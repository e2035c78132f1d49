"""Temperature scaling and the calibration measures, against their definitions computed here."""
import numpy as np
import pytest
from scipy.special import log_softmax

from pipeline.confidence import calibration


def _nll(logits, labels, temperature):
    """The definition: mean of -log softmax(z / T)[true class]."""
    return -np.mean(log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)[np.arange(len(labels)), labels])


def test_softmax_and_nll_by_hand():
    logits = np.array([[0.0, np.log(3.0)], [2.0, 2.0]])
    np.testing.assert_allclose(calibration.softmax(logits), [[0.25, 0.75], [0.5, 0.5]])
    np.testing.assert_allclose(calibration.softmax(logits * 2, temperature=2), [[0.25, 0.75], [0.5, 0.5]])
    # -(log 0.75 + log 0.5) / 2
    assert calibration.nll(logits, np.array([1, 0])) == pytest.approx(-(np.log(0.75) + np.log(0.5)) / 2)


def test_nll_survives_large_logits():
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    assert calibration.nll(logits, np.array([0, 0])) == pytest.approx(500.0)


def test_fitted_temperature_is_the_nll_minimum():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (400, 5))
    labels = rng.integers(0, 5, 400)
    labels[:250] = logits[:250].argmax(axis=1)  # mostly right, so the optimum is an interior one
    t = calibration.fit_temperature(logits, labels)
    # a minimum of the definition: no nearby temperature does better
    assert _nll(logits, labels, t) <= min(_nll(logits, labels, t * 0.99), _nll(logits, labels, t * 1.01))
    grid = np.geomspace(0.1, 10, 2001)
    best = grid[np.argmin([_nll(logits, labels, g) for g in grid])]
    assert t == pytest.approx(best, rel=3e-3)  # the grid's spacing


def test_fitted_temperature_recovers_the_one_the_labels_were_drawn_with():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, (20000, 4))
    true_t = 3.0
    p = np.exp(log_softmax(logits / true_t, axis=1))
    labels = (rng.random((len(p), 1)) > p.cumsum(axis=1)).sum(axis=1)  # one draw per row from p
    assert calibration.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_fit_needs_images():
    with pytest.raises(ValueError, match="no images"):
        calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, int))


def test_ece_by_hand():
    # bins of width 1/15: 0.95 in (14/15, 1], 0.55 in (8/15, 9/15]
    confidence = [0.95, 0.95, 0.55, 0.55]
    correct = [True, False, True, True]
    # |0.5 - 0.95| * 2/4 + |1 - 0.55| * 2/4
    assert calibration.expected_calibration_error(confidence, correct) == pytest.approx(0.45)


def test_bins_hold_their_upper_edge_and_count_everything():
    bins = calibration.reliability_bins([1 / 15, 1 / 15 + 1e-9, 1.0, 0.5], [True, False, True, False])
    assert len(bins) == 15
    assert bins[0]["count"] == 1 and bins[1]["count"] == 1 and bins[14]["count"] == 1
    assert sum(b["count"] for b in bins) == 4
    assert bins[7]["low"] == pytest.approx(7 / 15) and bins[7]["confidence"] == 0.5 and bins[7]["accuracy"] == 0
    assert bins[3]["confidence"] is None and bins[3]["accuracy"] is None


def test_a_perfectly_calibrated_set_has_zero_ece():
    confidence = [0.6] * 5 + [0.8] * 5
    correct = [True, True, True, False, False] + [True] * 4 + [False]
    assert calibration.expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-12)


def test_summary_after_temperature_scaling_lowers_an_overconfident_models_nll():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 6, (3000, 10))  # sharp logits
    p = np.exp(log_softmax(logits / 4.0, axis=1))  # labels as a model four times less sure would draw them
    labels = (rng.random((len(p), 1)) > p.cumsum(axis=1)).sum(axis=1)
    t = calibration.fit_temperature(logits[:1500], labels[:1500])
    before = calibration.summary(logits[1500:], labels[1500:])
    after = calibration.summary(logits[1500:], labels[1500:], t)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    assert before["accuracy"] == after["accuracy"]  # a temperature never changes the top class
    assert after["mean_confidence"] < before["mean_confidence"]
