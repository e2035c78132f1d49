"""Class weights and oversampling, against their definitions; and both reaching training."""
import numpy as np

from pipeline.data import balance
from pipeline.train.activations import CachedBatches


def test_balanced_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    want = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    got = balance.class_weights(labels, 3)
    np.testing.assert_allclose([got[c] for c in range(3)], want)
    assert balance.class_weights(labels, 4)[3] == 1.0  # a class with no images


def test_oversampling_evens_the_classes_and_keeps_every_image():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 4)
    indices = np.arange(100, 117)  # any row numbers, labelled by `labels`
    out = balance.oversample(indices, labels, np.random.default_rng(0))
    by_index = dict(zip(indices, labels))
    counts = np.bincount([by_index[i] for i in out])
    assert list(counts) == [10, 10, 10]  # 3 x 3 + 1 drawn, 4 x 2 + 2 drawn
    assert set(out) == set(indices)  # nobody dropped
    ones = [i for i in out if by_index[i] == 1]
    assert all(ones.count(i) in (3, 4) for i in set(ones))


class _Rows:
    """A stand-in ArrayFile: row i holds the value i."""

    def __init__(self, n):
        self.path, self.n, self.shape = "rows", n, (n, 1)

    def __len__(self):
        return self.n

    def rows(self, picked):
        return np.asarray(picked, dtype=np.float32)[:, None]


def test_cached_batches_oversample_every_epoch():
    labels = np.array([0] * 8 + [1] * 2)
    batches = CachedBatches(_Rows(10), labels, 2, batch_size=4, shuffle=True, oversample=True)
    for epoch in range(2):
        seen = np.concatenate([batches.batch(epoch, i)[1].argmax(1) for i in range(len(batches))])
        assert len(batches) == 4 and np.bincount(seen).tolist() == [8, 8]
