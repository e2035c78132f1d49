"""Stage 3, train-head: a new GlobalAveragePooling -> Dropout -> Dense -> softmax head on the frozen backbone."""
from __future__ import annotations

from pipeline import models, training
from pipeline.activations import CachedBatches, cache_split, cache_views, view_specs
from pipeline.augmentation import split_batches


def run(ctx):
    """Train the head, with live augmentation (the book) or on cached features of fixed views."""
    cfg, out, section = ctx.cfg, ctx.out, ctx.cfg.train_head
    ingest, augment, size, batch = ctx.inputs["ingest"], ctx.inputs["augment"], cfg.model.image_size, section.batch_size
    classes = ingest.read_classes()
    training.check_batch_size("train_head", batch, len(ingest.read_index("train")))
    model = models.build_classifier(cfg.model, len(classes))
    if section.features == "live":
        train = split_batches(ingest, augment, "train", size, batch, augment=True, shuffle=True, seed=section.seed,
                              oversample=section.oversample)
        val = split_batches(ingest, augment, "val", size, batch)
        summary = training.fit(model, train, val, section, out)
        how = "live augmentation"
    else:
        extractor = models.feature_extractor(model)
        views = view_specs(section.flip_view, section.augmented_views)
        x, y = cache_views(extractor, ingest, augment, size, batch, views, section.seed, out.cache("train"))
        val_x, val_y = cache_split(extractor, ingest, augment, "val", size, batch, out.cache("val"))
        head = models.build_head(cfg.model, len(classes), x.shape[1])
        train = CachedBatches(x, y, len(classes), batch, shuffle=True, seed=section.seed, n_views=len(views),
                              views_per_epoch=section.views_per_epoch, oversample=section.oversample)
        summary = training.fit(head, train, CachedBatches(val_x, val_y, len(classes), batch), section, out)
        for array in (x, val_x):
            array.remove()
        models.copy_head(head, model)
        how = f"cached features of {len(views)} view(s) of each training image"
    models.save(model, out.model)
    return {"message": f"head trained on {how}: best val accuracy {summary['val_accuracy']:.3f} at epoch "
                       f"{summary['best_epoch']}/{summary['epochs_run']}", **summary}
