"""Cached activations: written batch by batch to .npy, read back by rows, and drawn per epoch from a bank of views."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline.train.activations import ArrayFile, ArrayWriter, CachedBatches, StackedArrays, write_outputs, write_view


def test_array_file_reads_rows_in_any_order(tmp_path):
    a = np.random.default_rng(0).normal(size=(10, 3, 4)).astype(np.float16)
    np.save(tmp_path / "a.npy", a)
    f = ArrayFile(tmp_path / "a.npy")
    assert f.shape == (10, 3, 4) and f.dtype == np.float16 and f.nbytes == a.nbytes
    np.testing.assert_array_equal(f.rows([7, 0, 7, 3]), a[[7, 0, 7, 3]])
    head = f.first(4)
    assert len(head) == 4 and len(f) == 10
    np.testing.assert_array_equal(head.rows([3, 1]), a[[3, 1]])
    f.close()



def test_array_writer_writes_what_np_save_writes(tmp_path):
    a = np.random.default_rng(0).normal(size=(7, 3, 2)).astype(np.float32)
    with ArrayWriter(tmp_path / "w.npy", "float16", a.shape) as w:
        w.append(a[:3])
        w.append(a[3:3])
        w.append(a[3:])
    np.save(tmp_path / "s.npy", a.astype(np.float16))
    assert (tmp_path / "w.npy").read_bytes() == (tmp_path / "s.npy").read_bytes()


def test_array_writer_refuses_rows_that_do_not_fit_and_a_short_file(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        with ArrayWriter(tmp_path / "w.npy", "float32", (2, 3)) as w:
            w.append(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="do not fit"):
        with ArrayWriter(tmp_path / "w.npy", "float32", (2, 3)) as w:
            w.append(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="1 of 2 rows written"):
        with ArrayWriter(tmp_path / "w.npy", "float32", (2, 3)) as w:
            w.append(np.zeros((1, 3)))


def test_array_file_reads_blocks_and_reports_a_file_cut_short(tmp_path):
    a = np.arange(24, dtype=np.int16).reshape(6, 2, 2)
    np.save(tmp_path / "a.npy", a)
    f = ArrayFile(tmp_path / "a.npy")
    np.testing.assert_array_equal(f.block(1, 4), a[1:4])
    assert f.block(6, 6).shape == (0, 2, 2)
    with pytest.raises(IndexError):
        f.block(5, 7)
    f.close()
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[:-8])  # the last row gone, as a crash mid-write leaves it
    with pytest.raises(ValueError, match="shorter than its header"):
        ArrayFile(tmp_path / "a.npy").block(0, 6)


def test_writing_outputs_keeps_memory_to_a_batch_whatever_the_file_size(tmp_path):
    """Peak memory while writing 512 MB of outputs stays far below the file's size (a memory-mapped file being
    written counts every page it touches as the process's own)."""
    script = textwrap.dedent(f"""
        import resource, numpy as np
        import tf_keras as keras
        from pipeline.train.activations import write_outputs
        class Batches:  # 32 batches of 64 rows
            paths = range(2048)
            def __len__(self):
                return 32
            def __getitem__(self, i):
                return np.ones((64, 4), np.float32), np.eye(3, dtype=np.float32)[np.zeros(64, int)]
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(65536)])
        model(np.ones((64, 4), np.float32))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        write_outputs(model, [("x", Batches())], {str(tmp_path / "big.npy")!r}, "float32")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "big.npy").stat().st_size >= 512 * 2 ** 20
    grown_mb = int(done.stdout.split()[-1])
    assert grown_mb < 128, f"peak memory grew by {grown_mb} MB while writing a 512 MB file"

class _Batches:
    """Stands in for ImageBatches: a few (images, one-hot labels) batches."""

    def __init__(self, x, labels, batch_size):
        self.x, self.labels, self.batch_size = x, labels, batch_size
        self.paths = list(range(len(x)))

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[s], np.eye(3, dtype=np.float32)[self.labels[s]]


def test_write_outputs_concatenates_every_source_in_order(tmp_path):
    import tf_keras as keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    la, lb = np.array([0, 1, 2, 0, 1]), np.array([2, 2, 0])
    array, labels = write_outputs(model, [("a", _Batches(a, la, 2)), ("b", _Batches(b, lb, 2))],
                                  tmp_path / "out.npy", "float32")
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), model.predict(np.concatenate([a, b]), verbose=0),
                               atol=1e-6)
    np.testing.assert_array_equal(labels, np.concatenate([la, lb]))
    assert array.shape == (8, 2)


def test_write_view_writes_each_kept_output_of_one_pass(tmp_path):
    import tf_keras as keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(3)(inputs)])
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    classes = np.array([0, 1, 2, 0, 1])
    labels = write_view(model, "a", _Batches(x, classes, 2), [None, (tmp_path / "b.npy", "float16")])
    np.testing.assert_array_equal(labels, classes)
    expected = model.predict(x, verbose=0)[1].astype(np.float16)
    np.testing.assert_allclose(np.load(tmp_path / "b.npy").astype(np.float32), expected.astype(np.float32),
                               rtol=2 ** -10)  # float16 keeps 11 significant bits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npy"]


def test_stacked_arrays_read_rows_across_files_in_any_order(tmp_path):
    a, b = np.arange(6.0).reshape(3, 2), np.arange(10.0, 14.0).reshape(2, 2)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    stacked = StackedArrays([ArrayFile(tmp_path / "a.npy"), ArrayFile(tmp_path / "b.npy")])
    both = np.concatenate([a, b])
    assert stacked.shape == (5, 2) and len(stacked) == 5 and stacked.nbytes == both.nbytes
    np.testing.assert_array_equal(stacked.rows([4, 0, 3, 2, 3]), both[[4, 0, 3, 2, 3]])
    with pytest.raises(IndexError):
        stacked.rows([5])
    np.save(tmp_path / "c.npy", np.zeros((2, 3)))
    with pytest.raises(ValueError, match="one row shape"):
        StackedArrays([ArrayFile(tmp_path / "a.npy"), ArrayFile(tmp_path / "c.npy")])
    stacked.close()


def _bank(tmp_path, n_images=6, n_views=3):
    # row v * n_images + i holds the value 10 * v + i: view v of image i
    values = np.array([[10 * v + i] for v in range(n_views) for i in range(n_images)], np.float32)
    np.save(tmp_path / "bank.npy", values)
    labels = np.tile(np.arange(n_images) % 3, n_views)
    return ArrayFile(tmp_path / "bank.npy"), labels


def test_all_views_every_epoch_by_default(tmp_path):
    array, labels = _bank(tmp_path)
    batches = CachedBatches(array, labels, 3, 4, shuffle=True, n_views=3)
    seen = np.concatenate([batches[i][0][:, 0] for i in range(len(batches))])
    assert sorted(seen) == sorted(10 * v + i for v in range(3) for i in range(6))


@pytest.mark.parametrize("per_epoch", [1, 2])
def test_views_per_epoch_takes_that_many_distinct_views_of_every_image(tmp_path, per_epoch):
    array, labels = _bank(tmp_path)
    batches = CachedBatches(array, labels, 3, 4, shuffle=True, seed=1, n_views=3, views_per_epoch=per_epoch)
    epochs = []
    for epoch in range(6):
        rows = [(x[:, 0], y.argmax(1)) for x, y in (batches.batch(epoch, i) for i in range(len(batches)))]
        values = np.concatenate([r[0] for r in rows]).astype(int)
        classes = np.concatenate([r[1] for r in rows])
        np.testing.assert_array_equal(classes, (values % 10) % 3)  # labels travel with their rows
        images, views = values % 10, values // 10
        assert sorted(images) == sorted(list(range(6)) * per_epoch)
        for i in range(6):
            assert len(set(views[images == i])) == per_epoch
        epochs.append(tuple(sorted(values)))
    assert len(set(epochs)) > 1  # drawn afresh each epoch


def test_rows_must_divide_into_views(tmp_path):
    array, labels = _bank(tmp_path, n_images=5, n_views=2)
    with pytest.raises(ValueError, match="do not divide into 3 views"):
        CachedBatches(array, labels, 3, 4, n_views=3)


