"""Stage 3, train-head: a new GlobalAveragePooling -> Dropout -> Dense -> softmax head on the frozen backbone."""
from __future__ import annotations

import contextlib

from pipeline.data.augmentation import split_batches
from pipeline.train import distribute, models, training, view_store
from pipeline.train.activations import CachedBatches
from pipeline.train.view_store import Output, ViewStore, split_view, training_views


def run(ctx):
    """Train the head, with live augmentation (the book) or on cached features of fixed views."""
    cfg, out, section = ctx.cfg, ctx.out, ctx.cfg.train_head
    ingest, augment, size, batch = ctx.inputs["ingest"], ctx.inputs["augment"], cfg.model.image_size, section.batch_size
    classes = ingest.read_classes()
    training.check_batch_size("train_head", batch, len(ingest.read_index("train")))
    training.seed_everything(section.seed)  # the same config builds the same initial weights
    chosen = distribute.strategy(cfg.distribute)
    batch *= chosen.num_replicas_in_sync  # the global batch
    live = section.features == "live"
    with chosen.scope() if live else contextlib.nullcontext():  # the model trains, or only computes features
        model = models.build_classifier(cfg.model, len(classes))
    if live:
        train = split_batches(ingest, augment, "train", size, batch, augment=True, shuffle=True, seed=section.seed,
                              oversample=section.oversample)
        val = split_batches(ingest, augment, "val", size, batch)
        summary = training.fit(model, train, val, section, out, backup=ctx.backup)
        how = "live augmentation"
    else:
        views = training_views(section.flip_view, section.augmented_views, section.seed)
        (x, y), (val_x, val_y) = _features(ctx, model, views)
        with chosen.scope():
            head = models.build_head(cfg.model, len(classes), x.shape[1])
        train = CachedBatches(x, y, len(classes), batch, shuffle=True, seed=section.seed, n_views=len(views),
                              views_per_epoch=section.views_per_epoch, oversample=section.oversample)
        val = CachedBatches(val_x, val_y, len(classes), batch)
        summary = training.fit(head, train, val, section, out, backup=ctx.backup)
        for array in (x, val_x):
            array.close()
        models.copy_head(head, model)
        how = f"cached features of {len(views)} view(s) of each training image"
    models.save(model, out.model)
    return {"message": f"head trained on {how}: best val accuracy {summary['val_accuracy']:.3f} at epoch "
                       f"{summary['best_epoch']}/{summary['epochs_run']}", **summary}


def _features(ctx, model, views):
    """The frozen backbone's pooled features of the training `views` and of the validation images, from the
    feature store or computed. When cached fine-tuning will follow, the same forward pass also stores the
    activations at its cut point, so fine-tuning does not compute them again."""
    cfg = ctx.cfg
    store = ViewStore(ctx.store, ctx.upstream, view_store.backbone_section(cfg))
    extractor = models.feature_extractor(model)
    outputs = [Output("the backbone's features", models.weights_digest(extractor))]
    cut = finetune_cut(cfg)
    if cut is not None:
        lower, _ = models.split_at(model, cfg.model.backbone, cut)
        outputs.append(view_store.activations_output(cut, lower))
        extractor = models.features_and_activations(model, cfg.model.backbone, cut)
    ingest, augment, size = ctx.inputs["ingest"], ctx.inputs["augment"], cfg.model.image_size
    train, val = (store.outputs(extractor, outputs, v, ingest, augment, size)[0] for v in (views, [split_view("val")]))
    return train, val


def finetune_cut(cfg):
    """The cut point whose activations cached fine-tuning trains on, or None when it does not."""
    section = cfg.finetune
    cached = section.epochs > 0 and section.inputs == "cached" and section.unfreeze_from != "all"
    return section.unfreeze_from if cached else None
