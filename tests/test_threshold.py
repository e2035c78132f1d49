"""The "none of these" threshold: the recommendation rule, the table, the scores and AUROC by their definitions."""
import itertools

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from pipeline.confidence import threshold


def test_recommend_keeps_the_asked_share_of_correct_images():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.99])
    correct = np.array([True] * 10 + [False])
    # 10 correct images; keeping 80% of them keeps the 8 most confident: 0.9 ... 0.2
    assert threshold.recommend(confidence, correct, 0.8) == 0.2
    assert threshold.recommend(confidence, correct, 1.0) == 0.05
    assert threshold.recommend(confidence, correct, 0.75) == 0.2  # at least 7.5 of 10: 8
    assert threshold.recommend(confidence, np.zeros(11, bool), 0.9) is None
    t = threshold.recommend(confidence, correct, 0.95)
    assert (confidence[correct] >= t).mean() >= 0.95


def test_rows_by_hand():
    confidence = [0.9, 0.6, 0.4, 0.2]
    correct = [True, True, False, False]
    rows = threshold.rows(confidence, correct, [0.5, 0.95], unknown_confidence=[0.3, 0.7])
    assert rows[0] == {"threshold": 0.5, "kept": 0.5, "kept_accuracy": 1.0, "right_kept": 1.0,
                       "unknown_rejected": 0.5}
    assert rows[1] == {"threshold": 0.95, "kept": 0.0, "kept_accuracy": None, "right_kept": 0.0,
                       "unknown_rejected": 1.0}
    assert "unknown_rejected" not in threshold.rows(confidence, correct, [0.5])[0]


def test_scores_by_their_definitions():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    s = threshold.scores(logits, 2.0)
    np.testing.assert_allclose(s["confidence"], softmax(logits / 2.0, axis=1).max(axis=1))
    np.testing.assert_allclose(s["max_logit"], [3.0, 5.0])
    np.testing.assert_allclose(s["energy"], 2.0 * logsumexp(logits / 2.0, axis=1))


def test_auroc_is_the_share_of_pairs_ranked_right():
    rng = np.random.default_rng(0)
    known = rng.integers(0, 6, 40).astype(float)  # many ties
    unknown = rng.integers(0, 4, 30).astype(float)
    pairs = [1.0 if k > u else 0.5 if k == u else 0.0 for k, u in itertools.product(known, unknown)]
    assert threshold.auroc(known, unknown) == pytest.approx(np.mean(pairs))
    assert threshold.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert np.isnan(threshold.auroc([], [1.0]))
