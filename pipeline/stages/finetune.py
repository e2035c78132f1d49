"""Stage 4, finetune: unfreeze the backbone (whole, or from a cut point on) and train at a lower learning rate."""
from __future__ import annotations

import logging
import shutil

from pipeline.backbones import cut_layer
from pipeline.data.augmentation import split_batches
from pipeline.fileio import write_json
from pipeline.train import distribute, models, training
from pipeline.train.activations import CachedBatches
from pipeline.train.view_store import ViewStore, activations_output, backbone_section, split_view, training_views

log = logging.getLogger("pipeline.finetune")


def unfreeze(model, backbone_name, unfreeze_from, freeze_batchnorm):
    """Make the backbone trainable from cut point `unfreeze_from` on (`all`: all of it); return the count of
    layers with weights that train."""
    import tf_keras as keras

    base = models.backbone_of(model)
    base.trainable = True
    start = 0 if unfreeze_from == "all" else cut_layer(base, backbone_name, unfreeze_from)
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start and not (freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization))
    return sum(1 for layer in base.layers if layer.trainable and layer.weights)


def _fit_cached(ctx, model, chosen, batch):
    """Train the layers above `unfreeze_from` on cached activations of the frozen layers below it, under strategy
    `chosen`, in batches of `batch` (the global batch)."""
    cfg, section, out = ctx.cfg, ctx.cfg.finetune, ctx.out
    ingest, augment, size = ctx.inputs["ingest"], ctx.inputs["augment"], cfg.model.image_size
    n_classes = len(ingest.read_classes())
    with chosen.scope():
        lower, upper = models.split_at(model, cfg.model.backbone, section.unfreeze_from)
    store = ViewStore(ctx.store, ctx.upstream, backbone_section(cfg))
    outputs = [activations_output(section.unfreeze_from, lower)]
    views = training_views(section.flip_view, section.augmented_views, section.seed)
    (x, y), = store.outputs(lower, outputs, views, ingest, augment, size)
    (val_x, val_y), = store.outputs(lower, outputs, [split_view("val")], ingest, augment, size)
    log.info("training on %d cached activations of shape %s (%.2f GB on disk)", len(x), x.shape[1:],
             (x.nbytes + val_x.nbytes) / 1e9)
    train = CachedBatches(x, y, n_classes, batch, shuffle=True, seed=section.seed, n_views=len(views),
                          views_per_epoch=section.views_per_epoch, oversample=section.oversample)
    val = CachedBatches(val_x, val_y, n_classes, batch)
    summary = training.fit(upper, train, val, section, out, backup=ctx.backup)
    for array in (x, val_x):
        array.close()
    return summary


def run(ctx):
    """Fine-tune the head model; with `epochs: 0` the head model is passed on unchanged."""
    cfg, out, section = ctx.cfg, ctx.out, ctx.cfg.finetune
    head_files = ctx.inputs["train-head"]
    if section.epochs == 0:
        for name in ("model", "history", "curves"):
            shutil.copyfile(getattr(head_files, name), getattr(out, name))
        write_json(out.summary, {"epochs_run": 0})
        return {"message": "fine-tuning skipped (finetune.epochs is 0); the head model is passed on"}
    ingest, augment, size = ctx.inputs["ingest"], ctx.inputs["augment"], cfg.model.image_size
    training.check_batch_size("finetune", section.batch_size, len(ingest.read_index("train")))
    chosen = distribute.strategy(cfg.distribute)
    batch = section.batch_size * chosen.num_replicas_in_sync  # the global batch
    with chosen.scope():
        model = models.load(head_files.model)
    layers = unfreeze(model, cfg.model.backbone, section.unfreeze_from, section.freeze_batchnorm)
    where = "the whole backbone" if section.unfreeze_from == "all" else f"from {section.unfreeze_from} on"
    log.info("fine-tuning %s (%d trainable layers with weights, batchnorm %s, %s inputs)", where, layers,
             "frozen" if section.freeze_batchnorm else "trainable", section.inputs)
    if section.inputs == "cached":
        summary = _fit_cached(ctx, model, chosen, batch)
    else:
        train = split_batches(ingest, augment, "train", size, batch, augment=True, shuffle=True, seed=section.seed,
                              oversample=section.oversample)
        val = split_batches(ingest, augment, "val", size, batch)
        summary = training.fit(model, train, val, section, out, backup=ctx.backup)
    models.save(model, out.model)
    return {"message": f"fine-tuned {where} ({section.inputs} inputs): best val accuracy "
                       f"{summary['val_accuracy']:.3f} at epoch {summary['best_epoch']}/{summary['epochs_run']}",
            **summary}
