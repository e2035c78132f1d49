"""Image batches: each epoch's order and augmentation drawn from the seed, the epoch and the batch alone."""
import numpy as np
from conftest import CLASSES, write_images

from pipeline.config import AugmentConfig
from pipeline.data.augmentation import ImageBatches, generator_settings, make_generator


def _batches(tmp_path, **options):
    rows = [{"path": str(path), "label": label} for label in CLASSES
            for path in write_images(tmp_path / label, label, 5)]
    settings = generator_settings(AugmentConfig(), "mobilenet")
    return ImageBatches(rows, CLASSES, 24, make_generator(settings, augment=options.get("augment", False)), 4,
                        **options)


def test_an_epoch_is_the_same_whatever_was_read_before_it(tmp_path):
    options = dict(augment=True, shuffle=True, seed=3)
    first, again = _batches(tmp_path, **options), _batches(tmp_path, **options)
    first.batch(0, 1), first.batch(4, 0)  # other epochs read first: no state carries over
    for i in range(len(first)):
        got, want = first.batch(2, i), again.batch(2, i)
        np.testing.assert_array_equal(got[0], want[0])  # the same reads and transforms: equal
        np.testing.assert_array_equal(got[1], want[1])


def test_each_epoch_draws_its_own_order_and_transforms(tmp_path):
    batches = _batches(tmp_path, augment=True, shuffle=True, seed=3)
    assert not np.array_equal(batches.order(0), batches.order(1))
    assert sorted(batches.order(0)) == sorted(batches.order(1)) == list(range(15))
    plain = _batches(tmp_path, shuffle=True, seed=3)  # the same order, without augmentation
    assert not np.allclose(batches.batch(1, 0)[0], plain.batch(1, 0)[0])


def test_a_fixed_view_reads_epoch_zero_in_index_order(tmp_path):
    plain, mirrored = _batches(tmp_path), _batches(tmp_path, flip=True)
    assert list(plain.order(0)) == list(plain.order(7)) == list(range(15))
    np.testing.assert_array_equal(plain[1][0], plain.batch(0, 1)[0])
    # the mirror view is each image flipped left to right, preprocessing (x / 127.5 - 1) being per pixel
    np.testing.assert_array_equal(mirrored[1][0], plain[1][0][:, :, ::-1, :])


def test_some_positions_of_a_batch_are_those_rows_of_the_whole_batch(tmp_path):
    batches = _batches(tmp_path, augment=True, shuffle=True, seed=3)
    whole_x, whole_y = batches.batch(2, 1)
    part_x, part_y = batches.batch(2, 1, [3, 1])  # each image keeps the transform it has in the whole batch
    np.testing.assert_array_equal(part_x, whole_x[[3, 1]])
    np.testing.assert_array_equal(part_y, whole_y[[3, 1]])


def test_only_unaugmented_batches_may_be_read_from_several_threads(tmp_path):
    # Keras's random_transform seeds NumPy's global generator and draws from it: threads would share it
    assert _batches(tmp_path).thread_safe and not _batches(tmp_path, augment=True).thread_safe
