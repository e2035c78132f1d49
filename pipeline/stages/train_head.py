"""Stage 3, train-head: a new GlobalAveragePooling -> Dropout -> Dense -> softmax head on the frozen backbone."""
from __future__ import annotations

import logging
import time

import numpy as np

from pipeline import models, training
from pipeline.augmentation import split_batches
from pipeline.errors import ConfigError
from pipeline.stages.ingest import read_classes, read_index

log = logging.getLogger("pipeline.train_head")


def check_batch_size(section_name, batch_size, n_train):
    """A batch larger than the training set is a config error naming the key."""
    if batch_size > n_train:
        raise ConfigError(f"config key '{section_name}.batch_size' has value {batch_size}, larger than the "
                          f"training set ({n_train} images); set it to at most {n_train}")


def _batches(ctx, split, batch_size, **kwargs):
    return split_batches(ctx.inputs["ingest"], ctx.inputs["augment"], split, ctx.cfg.model.image_size,
                         batch_size, seed=ctx.cfg.train_head.seed, **kwargs)


def extract_features(extractor, batches, what):
    """Pooled backbone features of every image a Sequence yields, with their labels."""
    t0 = time.monotonic()
    features = extractor.predict(batches, verbose=0)
    seconds = time.monotonic() - t0
    log.info("features of %s: %d images in %.0fs (%.1f images/s)", what, len(features), seconds,
             len(features) / max(seconds, 1e-9))
    return features, batches.labels[batches.order]


def run(ctx):
    """Train the head, with live augmentation (the book) or on cached features of fixed views."""
    cfg, out, section = ctx.cfg, ctx.out, ctx.cfg.train_head
    classes = read_classes(ctx.inputs["ingest"])
    n_train = len(read_index(ctx.inputs["ingest"], "train"))
    check_batch_size("train_head", section.batch_size, n_train)
    model = models.build_classifier(cfg.model, len(classes), ctx.options.get("weights_dir"))
    batch = section.batch_size
    if section.features == "live":
        train = _batches(ctx, "train", augment=True, shuffle=True, batch_size=batch)
        val = _batches(ctx, "val", batch_size=batch)
        summary = training.fit(model, train, val, section, out, section.learning_rate)
        how = "live augmentation"
    else:
        extractor = models.feature_extractor(model)
        views = [("original", dict())]
        if section.flip_view:
            views.append(("mirrored", dict(flip=True)))
        views += [(f"augmented view {k + 1}", dict(augment=True)) for k in range(section.augmented_views)]
        parts = []
        for k, (name, kwargs) in enumerate(views):
            batches = _batches(ctx, "train", batch_size=batch, **kwargs)
            batches.rng = np.random.default_rng([section.seed, k])
            parts.append(extract_features(extractor, batches, f"train ({name})"))
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        val_x, val_y = extract_features(extractor, _batches(ctx, "val", batch_size=batch), "val")
        head = models.build_head(cfg.model, len(classes), x.shape[1])
        onehot = np.eye(len(classes), dtype=np.float32)
        summary = training.fit(head, (x, onehot[y]), (val_x, onehot[val_y]), section, out,
                               section.learning_rate, shuffle=True)
        models.copy_head(head, model)
        how = f"cached features of {len(views)} view(s) of each training image"
    model.save(str(out.model))
    return {"message": f"head trained on {how}: best val accuracy {summary['val_accuracy']:.3f} at epoch "
                       f"{summary['best_epoch']}/{summary['epochs_run']}", **summary}
