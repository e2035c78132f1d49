"""Frozen outputs per view in the feature store: keys that name what the numbers depend on, computed once, shared."""
import logging

import numpy as np
import pytest
from conftest import log_records

from pipeline.cache.feature_store import FeatureStore
from pipeline.train import view_store
from pipeline.train.view_store import Output, View, ViewStore, split_view, training_views

UPSTREAM = {"ingest": {"index.csv": "i"}, "augment": {"augment.json": "a"}}
MODEL = {"backbone": "mobilenet", "image_size": 32}


class _Tensor:
    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array


class _TwoOutputs:
    """Stands in for a Keras model with two outputs: the image's mean per row ("features"), and twice the image
    ("activations"); with `activations_only`, for the model of the second alone."""

    def __init__(self, activations_only=False):
        self.batches, self.activations_only = 0, activations_only
        self.output_shape = (None, 4) if activations_only else [(None, 1), (None, 4)]

    def __call__(self, images, training):
        self.batches += 1
        if self.activations_only:
            return _Tensor(2 * images)
        return [_Tensor(images.mean(axis=1, keepdims=True)), _Tensor(2 * images)]


class _Batches:
    def __init__(self, x, classes):
        self.x, self.classes, self.paths = x, classes, list(range(len(x)))

    def __len__(self):
        return -(-len(self.x) // view_store.CACHE_BATCH)

    def __getitem__(self, i):
        s = slice(i * view_store.CACHE_BATCH, (i + 1) * view_store.CACHE_BATCH)
        return self.x[s], np.eye(3, dtype=np.float32)[self.classes[s]]


@pytest.fixture
def images(monkeypatch):
    """Each view's images: view `flip` reverses the feature axis; `augment` adds the seed."""
    rng = np.random.default_rng(0)
    split_images = {"train": rng.normal(size=(40, 4)).astype(np.float32),
                    "val": rng.normal(size=(7, 4)).astype(np.float32)}
    classes = {split: np.arange(len(x)) % 3 for split, x in split_images.items()}

    def batches(ingest, augment, split, size, batch_size, flip=False, augment_images=False, seed=0, **_):
        x = split_images[split][:, ::-1] if flip else split_images[split]
        return _Batches(x + seed if augment_images else x, classes[split])

    monkeypatch.setattr(view_store, "split_batches",
                        lambda *a, augment=False, **kw: batches(*a, augment_images=augment, **kw))
    return split_images


def _outputs(store, model, outputs, views):
    return store.outputs(model, outputs, views, None, None, 32)


def test_training_views_name_their_seeds_only_where_random():
    views = training_views(True, 2, seed=3)
    assert [v.options for v in views] == [{}, {"flip": True}, {"augment": True, "seed": 3002},
                                          {"augment": True, "seed": 3003}]
    assert training_views(False, 1, seed=3)[1] == views[2]  # the same draws without the mirror
    assert split_view("val") == View("val images", "val")


def test_the_key_names_what_the_numbers_depend_on_and_nothing_else(tmp_path):
    store = ViewStore(FeatureStore(tmp_path), UPSTREAM, MODEL)
    out, view = Output("features", "w"), View("original training images", "train")
    key = store.key(out, view)
    assert key == store.key(out, View("another name", "train"))  # the name is only for messages
    changed = [store.key(Output("features", "w2"), view), store.key(Output("features", "w", "float16"), view),
               store.key(Output("activations", "w"), view), store.key(out, View("x", "val")),
               store.key(out, View("x", "train", {"flip": True})),
               ViewStore(FeatureStore(tmp_path), {**UPSTREAM, "augment": {"augment.json": "b"}}, MODEL).key(out, view),
               ViewStore(FeatureStore(tmp_path), UPSTREAM, {**MODEL, "image_size": 64}).key(out, view)]
    assert len({key, *changed}) == 1 + len(changed)
    seeds = [store.key(out, View("x", "train", {"augment": True, "seed": s})) for s in (1, 2)]
    assert seeds[0] != seeds[1]


def test_outputs_are_computed_once_per_view_and_shared_between_callers(tmp_path, images):
    features, activations = Output("features", "w"), Output("activations", "w-lower", "float16")
    views = training_views(True, 0, seed=0)
    store = ViewStore(FeatureStore(tmp_path), UPSTREAM, MODEL)
    model = _TwoOutputs()
    (x, y), (a, _) = _outputs(store, model, [features, activations], views)
    train = images["train"]
    both_views = np.concatenate([train, train[:, ::-1]])
    np.testing.assert_allclose(x.rows(range(len(x))), both_views.mean(axis=1, keepdims=True), rtol=1e-6)
    assert a.dtype == np.float16 and a.shape == (80, 4)
    np.testing.assert_array_equal(a.rows(range(80)), (2 * both_views).astype(np.float16))
    np.testing.assert_array_equal(y, np.tile(np.arange(40) % 3, 2))
    assert model.batches == 2 * 2  # two views of 40 images in batches of 32

    # Another caller (fine-tuning) asking for the activations of those views and one more computes only that one.
    again = _TwoOutputs(activations_only=True)
    more = training_views(True, 1, seed=5)
    with log_records("pipeline.train.view_store", logging.INFO) as records:
        (b, _), = _outputs(store, again, [activations], more)
    assert again.batches == 2 and b.shape == (120, 4)
    np.testing.assert_array_equal(b.rows(range(80)), a.rows(range(80)))
    np.testing.assert_array_equal(b.rows(range(80, 120)), (2 * (train + 5002)).astype(np.float16))
    assert sum("reusing activations" in r.getMessage() for r in records) == 2


def test_an_output_not_stored_yet_is_computed_beside_the_stored_one(tmp_path, images):
    features, activations = Output("features", "w"), Output("activations", "w-lower", "float16")
    store = ViewStore(FeatureStore(tmp_path), UPSTREAM, MODEL)
    _outputs(store, _TwoOutputs(), [features], [split_view("val")])
    model = _TwoOutputs()
    (x, _), (a, _) = _outputs(store, model, [features, activations], [split_view("val")])
    assert model.batches == 1 and a.shape == (7, 4) and x.shape == (7, 1)
    np.testing.assert_array_equal(a.rows(range(7)), (2 * images["val"]).astype(np.float16))


def _in_threads(count, work):
    """Run `work(index)` for each of `count` workers at once, each in a thread."""
    import threading

    threads = [threading.Thread(target=work, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)


class _AllGather:
    """An all-gather between threads, as TensorFlow's collective gather between worker processes: each worker's
    `gather(index)` returns every worker's array stacked in worker order, once all have sent theirs."""

    def __init__(self, count):
        import threading

        self.barrier, self.sent, self.calls = threading.Barrier(count, timeout=60), [None] * count, [0] * count

    def gather(self, index):
        def gather(array):
            self.calls[index] += 1
            self.sent[index] = np.array(array)
            self.barrier.wait()
            stacked = np.stack(self.sent)
            self.barrier.wait()  # every worker has read this round's arrays
            return stacked
        return gather


def _assert_as_alone(got, alone, rows):
    for (x, y), (a, _) in got:
        np.testing.assert_array_equal(x.rows(range(rows)), alone[0][0].rows(range(rows)))
        np.testing.assert_array_equal(a.rows(range(rows)), alone[1][0].rows(range(rows)))
        np.testing.assert_array_equal(y, alone[0][1])


def test_workers_of_one_machine_compute_missing_entries_together_and_store_what_one_process_would(tmp_path, images):
    import threading

    from pipeline.cache.feature_store import ChiefsStore

    features, activations = Output("features", "w"), Output("activations", "w-lower", "float16")
    views = training_views(True, 0, seed=0)
    alone = _outputs(ViewStore(FeatureStore(tmp_path / "alone"), UPSTREAM, MODEL), _TwoOutputs(),
                     [features, activations], views)
    barrier = threading.Barrier(2, timeout=60)
    stores = [FeatureStore(tmp_path / "store"), ChiefsStore(FeatureStore(tmp_path / "store"))]
    models, got = [_TwoOutputs(), _TwoOutputs()], [None, None]

    def work(index):
        stores[index].group = view_store.OneMachine(index, 2, tmp_path / "shares", barrier.wait)
        got[index] = _outputs(ViewStore(stores[index], UPSTREAM, MODEL), models[index], [features, activations],
                              views)

    _in_threads(2, work)
    assert [m.batches for m in models] == [2, 2]  # each view's 2 batches shared out: one each, not two each
    _assert_as_alone(got, alone, 80)
    assert len(list((tmp_path / "store").glob("view-*"))) == 4  # the chief stored each entry once
    assert not any((tmp_path / "shares").iterdir())  # and removed the shares


@pytest.mark.parametrize("count", [2, 3])
def test_machines_compute_missing_entries_together_and_each_stores_what_one_process_would(tmp_path, images, count):
    features, activations = Output("features", "w"), Output("activations", "w-lower", "float16")
    views = training_views(True, 0, seed=0)  # 2 views of 40 images: batches of 32 and 8 rows each
    alone = _outputs(ViewStore(FeatureStore(tmp_path / "alone"), UPSTREAM, MODEL), _TwoOutputs(),
                     [features, activations], views)
    exchange = _AllGather(count)
    stores = [FeatureStore(tmp_path / f"machine-{k}") for k in range(count)]
    models, got = [_TwoOutputs() for _ in range(count)], [None] * count

    def work(index):
        stores[index].group = view_store.AcrossMachines(index, count, stores[index].shares, exchange.gather(index))
        got[index] = _outputs(ViewStore(stores[index], UPSTREAM, MODEL), models[index], [features, activations],
                              views)

    _in_threads(count, work)
    # Each view's 2 batches are shared out (with 3 workers, the first computes none); none computed twice.
    assert [m.batches for m in models] == [2 * len(view_store.SharedWork(k, count, None).share(2))
                                           for k in range(count)]
    _assert_as_alone(got, alone, 80)
    for store in stores:  # each machine stored every entry in its own store, and kept no share
        assert len(list(store.root.glob("view-*"))) == 4
        assert not any(store.shares.iterdir())


def test_an_entry_one_machine_lacks_is_computed_by_all_and_stored_where_missing(tmp_path, images):
    features, activations = Output("features", "w"), Output("activations", "w-lower", "float16")
    views = [split_view("val")]
    stores = [FeatureStore(tmp_path / f"machine-{k}") for k in range(2)]
    alone = _outputs(ViewStore(stores[0], UPSTREAM, MODEL), _TwoOutputs(), [features, activations], views)
    exchange = _AllGather(2)
    models, got = [_TwoOutputs(), _TwoOutputs()], [None, None]

    def work(index):
        stores[index].group = view_store.AcrossMachines(index, 2, stores[index].shares, exchange.gather(index))
        got[index] = _outputs(ViewStore(stores[index], UPSTREAM, MODEL), models[index], [features, activations],
                              views)

    _in_threads(2, work)
    # The one batch of 7 images is worker 1's share: machine 0 has the entries and computes nothing, but sends its
    # (empty) share, as every worker calls the same collective operations.
    assert [m.batches for m in models] == [0, 1]
    assert exchange.calls[0] == exchange.calls[1] > 0
    _assert_as_alone(got, alone, 7)


def test_a_workers_share_is_its_contiguous_part_of_the_batches():
    shares = [list(view_store.SharedWork(k, 3, None).share(10)) for k in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [list(view_store.SharedWork(k, 2, None).share(1)) for k in range(2)] == [[], [0]]
