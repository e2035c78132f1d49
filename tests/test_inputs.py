"""Training input as tf.data: a batch source's batches, epoch by epoch, from any first epoch."""
import numpy as np
import pytest
import tensorflow as tf

from pipeline.train import inputs
from pipeline.train.activations import ArrayFile, CachedBatches


def _source(tmp_path, n=22, batch_size=4):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "rows.npy", rng.normal(size=(n, 2, 3)).astype(np.float16))
    return CachedBatches(ArrayFile(tmp_path / "rows.npy"), rng.integers(0, 3, n), 3, batch_size, shuffle=True,
                         seed=5, n_views=2, views_per_epoch=1)


def test_the_dataset_yields_the_sources_batches_epoch_after_epoch(tmp_path):
    source = _source(tmp_path)
    steps = len(source)  # 11 rows an epoch (one view of each image) in batches of 4: the last one short
    assert steps == 3
    data = inputs.dataset(source, 2, 5)
    assert int(data.cardinality()) == 3 * steps
    got = list(data.as_numpy_iterator())
    want = [source.batch(epoch, i) for epoch in range(2, 5) for i in range(steps)]
    assert len(got) == len(want)
    for (x, y), (wx, wy) in zip(got, want):
        np.testing.assert_array_equal(x, wx)  # the same rows copied, not computed: equal
        np.testing.assert_array_equal(y, wy)
        assert x.dtype == np.float32 and x.shape[1:] == (2, 3) and y.shape[1] == 3


def test_each_epoch_is_drawn_from_the_seed_and_the_epoch_alone(tmp_path):
    first = _source(tmp_path)
    again = CachedBatches(first.array, first.labels, 3, 4, shuffle=True, seed=5, n_views=2, views_per_epoch=1)
    later = [first.order(epoch).copy() for epoch in (3, 0, 3)]
    np.testing.assert_array_equal(later[0], again.order(3))  # whatever was read before it
    np.testing.assert_array_equal(later[0], later[2])
    assert not np.array_equal(later[0], later[1])


def test_its_shapes_are_known_to_the_graph(tmp_path):
    spec = inputs.dataset(_source(tmp_path)).element_spec
    assert spec[0].shape.as_list() == [None, 2, 3] and spec[1].shape.as_list() == [None, 3]
    assert spec[0].dtype == tf.float32


def _filled(source, epoch, i, replicas):
    """Batch i filled up to a multiple of `replicas` with copies of its first rows, and their weights (own rows
    filled size / own size, fillers 0), as inputs.dataset defines them."""
    x, y = source.batch(epoch, i)
    n = len(x)
    fill = np.arange(-n % replicas) % n
    return (np.concatenate([x, x[fill]]), np.concatenate([y, y[fill]]),
            np.array([(n + len(fill)) / n] * n + [0.0] * len(fill), np.float32))


def test_with_replicas_each_batch_is_filled_and_cut_into_one_part_per_replica(tmp_path):
    source = _source(tmp_path)  # batches of 4, 4 and 3 rows
    got = list(inputs.dataset(source, 0, 1, replicas=2).as_numpy_iterator())
    assert len(got) == 2 * len(source)
    for i in range(len(source)):
        want = _filled(source, 0, i, 2)
        for part in range(2):
            rows = slice(part * len(want[0]) // 2, (part + 1) * len(want[0]) // 2)
            for got_array, want_array in zip(got[2 * i + part], want):
                np.testing.assert_allclose(got_array, want_array[rows], rtol=0, atol=0)


class _CountingSource:
    """A batch source that counts the rows each read asks for."""

    def __init__(self, source):
        self.source, self.rows_read = source, 0
        self.row_shape, self.n_classes, self.thread_safe = source.row_shape, source.n_classes, False

    def __len__(self):
        return len(self.source)

    def picked(self, epoch, i):
        return self.source.picked(epoch, i)

    def batch(self, epoch, i, positions=None):
        x, y = self.source.batch(epoch, i, positions)
        self.rows_read += len(x)
        return x, y


def test_each_input_pipeline_reads_only_its_own_replicas_parts(tmp_path):
    source = _source(tmp_path, n=26)  # 13 rows an epoch: batches of 4, 4, 4 and 1 (filled to 4 for 4 replicas)
    whole = list(inputs.dataset(source, 0, 2, replicas=4).as_numpy_iterator())
    counting = [_CountingSource(source) for _ in range(2)]
    pipelines = [list(inputs.dataset(counting[k], 0, 2, replicas=4, pipeline=(k, 2)).as_numpy_iterator())
                 for k in range(2)]
    # the whole dataset is [batch 0: parts 0 1 2 3, batch 1: ...]: pipeline 0 yields parts 0 1, pipeline 1 parts 2 3
    for step in range(2 * len(source)):
        for k in range(2):
            for part in range(2):
                for got_array, want_array in zip(pipelines[k][2 * step + part], whole[4 * step + 2 * k + part]):
                    np.testing.assert_array_equal(got_array, want_array)
    assert counting[0].rows_read == counting[1].rows_read == 2 * 16 // 2  # 16 filled rows an epoch, half each
    with pytest.raises(ValueError, match="3 replicas do not divide among 2"):
        inputs.dataset(source, replicas=3, pipeline=(0, 2))


def test_class_weights_multiply_the_weights_whatever_the_replicas(tmp_path):
    source = _source(tmp_path)
    weights = {0: 0.5, 1: 2.0, 2: 3.0}
    for replicas in (1, 2):
        plain = list(inputs.dataset(source, 0, 1, replicas=replicas).as_numpy_iterator())
        weighted = list(inputs.dataset(source, 0, 1, replicas=replicas, class_weights=weights).as_numpy_iterator())
        for before, (x, y, w) in zip(plain, weighted):
            own = before[2] if replicas > 1 else np.ones(len(y), np.float32)
            np.testing.assert_array_equal(x, before[0])
            np.testing.assert_allclose(w, own * np.array([weights[c] for c in y.argmax(axis=1)]), rtol=1e-7)


def test_a_filled_batch_has_the_loss_of_the_batch_itself(tmp_path):
    import tf_keras as keras

    source = _source(tmp_path)
    parts = list(inputs.dataset(source, 0, 1, replicas=2).as_numpy_iterator())[-2:]  # 3 rows filled to 4, cut in 2
    predicted = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]], np.float32)
    loss = keras.losses.CategoricalCrossentropy()  # Keras's default reduction: the weighted sum over the row count
    want = loss(source.batch(0, 2)[1], predicted[:3]).numpy()
    # under a strategy, each replica's loss is divided by the replicas and the replicas' losses are summed
    got = sum(loss(y, predicted[2 * k:2 * k + 2], sample_weight=w).numpy() / 2 for k, (_, y, w) in enumerate(parts))
    assert got == pytest.approx(want, rel=1e-6)


def test_unweighted_means_give_the_epochs_mean_through_the_filled_fraction(tmp_path):
    import tf_keras as keras

    source = _source(tmp_path)  # batches of 4, 4 and 3 rows: 12 rows once filled for 2 replicas, in parts of 2
    assert inputs.filled_fraction(source, 2) == 11 / 12 and inputs.filled_fraction(source, 1) == 1
    loss = keras.losses.CategoricalCrossentropy()
    rng = np.random.default_rng(1)
    total, rows, own = 0.0, 0, []
    for x, y, w in inputs.dataset(source, 0, 1, replicas=2, batch_means=False).as_numpy_iterator():
        predicted = rng.dirichlet(np.ones(3), len(y)).astype(np.float32)
        total += float(loss(y, predicted, sample_weight=w)) * len(y)  # what Keras's epoch mean adds up
        rows += len(y)
        own += [(y[i], predicted[i]) for i in range(len(y)) if w[i] > 0]
    want = float(loss(np.array([t for t, _ in own]), np.array([p for _, p in own])))
    assert total / rows / inputs.filled_fraction(source, 2) == pytest.approx(want, rel=1e-6)
