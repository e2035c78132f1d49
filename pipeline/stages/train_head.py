"""Stage 3, train-head: a new GlobalAveragePooling -> Dropout -> Dense -> softmax head on the frozen backbone."""
from __future__ import annotations

import numpy as np

from pipeline import fileio
from pipeline.catalog import FeatureFiles
from pipeline.data.augmentation import split_batches
from pipeline.train import models, training
from pipeline.train.activations import ArrayFile, CachedBatches, cache_split, cache_views, view_specs

HEAD_ONLY = ("dropout", "l2")
"""The model keys that shape only the head, so the frozen backbone's features do not depend on them."""


def run(ctx):
    """Train the head, with live augmentation (the book) or on cached features of fixed views."""
    cfg, out, section = ctx.cfg, ctx.out, ctx.cfg.train_head
    ingest, augment, size, batch = ctx.inputs["ingest"], ctx.inputs["augment"], cfg.model.image_size, section.batch_size
    classes = ingest.read_classes()
    training.check_batch_size("train_head", batch, len(ingest.read_index("train")))
    training.seed_everything(section.seed)  # the same config builds the same initial weights
    model = models.build_classifier(cfg.model, len(classes))
    if section.features == "live":
        train = split_batches(ingest, augment, "train", size, batch, augment=True, shuffle=True, seed=section.seed,
                              oversample=section.oversample)
        val = split_batches(ingest, augment, "val", size, batch)
        summary = training.fit(model, train, val, section, out)
        how = "live augmentation"
    else:
        views = view_specs(section.flip_view, section.augmented_views)
        extractor = models.feature_extractor(model)

        def compute(folder):
            files = FeatureFiles(folder)
            _, y = cache_views(extractor, ingest, augment, size, batch, views, section.seed, files.features("train"))
            _, val_y = cache_split(extractor, ingest, augment, "val", size, batch, files.features("val"))
            np.save(files.labels("train"), y)
            np.save(files.labels("val"), val_y)

        key = features_key(ctx, models.weights_digest(extractor))
        folder, reused = ctx.store.get_or_make(key, compute, "the backbone's features")
        (x, y), (val_x, val_y) = (_features(FeatureFiles(folder), split) for split in ("train", "val"))
        head = models.build_head(cfg.model, len(classes), x.shape[1])
        train = CachedBatches(x, y, len(classes), batch, shuffle=True, seed=section.seed, n_views=len(views),
                              views_per_epoch=section.views_per_epoch, oversample=section.oversample)
        summary = training.fit(head, train, CachedBatches(val_x, val_y, len(classes), batch), section, out)
        for array in (x, val_x):
            array.close()
        models.copy_head(head, model)
        how = (f"cached features of {len(views)} view(s) of each training image"
               f"{' (reused from an earlier run)' if reused else ''}")
    models.save(model, out.model)
    return {"message": f"head trained on {how}: best val accuracy {summary['val_accuracy']:.3f} at epoch "
                       f"{summary['best_epoch']}/{summary['epochs_run']}", **summary}


def features_key(ctx, weights):
    """The feature store key of the frozen backbone's features: the stage's code and inputs digests, the
    backbone's weights digest, the model section without the head's keys, and the settings that choose the
    views and batches."""
    model = {k: v for k, v in ctx.cfg.key_section("model").items() if k not in HEAD_ONLY}
    views = {k: v for k, v in ctx.cfg.key_section("train_head").items()
             if k in ("flip_view", "augmented_views", "seed", "batch_size")}
    return "train-head-" + fileio.sha256_json({"code": ctx.key["code"], "inputs": ctx.key["inputs"],
                                               "weights": weights, "model": model, "views": views})[:32]


def _features(files, split):
    """(ArrayFile of the features, class index of each row) of one split in a store entry."""
    return ArrayFile(files.features(split)), np.load(files.labels(split))
