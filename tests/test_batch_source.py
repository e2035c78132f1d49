"""The per-epoch order every batch source shares."""
import numpy as np

from pipeline.data.batch_source import BatchSource


def test_an_epochs_order_depends_on_the_seed_and_the_epoch_alone():
    labels = np.array([0] * 6 + [1] * 2)
    source, again = (BatchSource(labels, 2, 3, shuffle=True, seed=4, oversample=True) for _ in range(2))
    source.order(5)
    np.testing.assert_array_equal(source.order(2), again.order(2))
    assert not np.array_equal(source.order(2), source.order(3))
    # oversampled: the 2 images of class 1 repeated up to class 0's 6, so 12 rows in batches of 3
    assert np.bincount(labels[source.order(2)]).tolist() == [6, 6] and len(source) == 4
    np.testing.assert_array_equal(np.concatenate([source.picked(2, i) for i in range(4)]), source.order(2))


def test_without_shuffling_or_oversampling_every_epoch_reads_the_rows_in_order():
    source = BatchSource([0, 1, 0, 1, 1], 2, 2)
    assert [list(source.order(e)) for e in (0, 3)] == [[0, 1, 2, 3, 4]] * 2
    assert len(source) == 3 and list(source.picked(0, 2)) == [4]
