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


def test_with_replicas_each_batch_is_filled_to_a_multiple_of_them_with_rows_weighted_zero(tmp_path):
    source = _source(tmp_path)  # batches of 4, 4 and 3 rows
    got = list(inputs.dataset(source, 0, 1, replicas=2).as_numpy_iterator())
    for i, (x, y, w) in enumerate(got):
        want_x, want_y = source.batch(0, i)
        n = len(want_x)
        assert len(x) == n + n % 2 and len(x) % 2 == 0
        np.testing.assert_array_equal(x[:n], want_x)
        np.testing.assert_array_equal(y[:n], want_y)
        np.testing.assert_allclose(w, [len(x) / n] * n + [0] * (len(x) - n))
        np.testing.assert_array_equal(x[n:], want_x[:len(x) - n])  # copies of real rows: a valid input, weighted 0


def test_a_filled_batch_has_the_loss_of_the_batch_itself(tmp_path):
    import tf_keras as keras

    source = _source(tmp_path)
    x, y, w = list(inputs.dataset(source, 0, 1, replicas=2).as_numpy_iterator())[-1]  # 3 rows filled to 4
    predicted = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]], np.float32)
    loss = keras.losses.CategoricalCrossentropy()  # Keras's default reduction: the weighted sum over the row count
    want = loss(source.batch(0, 2)[1], predicted[:3]).numpy()
    assert loss(y, predicted, sample_weight=w).numpy() == pytest.approx(want, rel=1e-6)


def test_unweighted_means_give_the_epochs_mean_through_the_filled_fraction(tmp_path):
    import tf_keras as keras

    source = _source(tmp_path)  # batches of 4, 4 and 3 rows: 12 rows once filled for 2 replicas
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
