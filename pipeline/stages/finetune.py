"""Stage 4, finetune: unfreeze the backbone (whole, or from a block on) and train at a lower learning rate."""
from __future__ import annotations

import logging
import shutil

from pipeline import models, training
from pipeline.augmentation import one_hot, predict_views, split_batches, view_specs
from pipeline.backbones import block_start_layer
from pipeline.fileio import write_json
from pipeline.stages.ingest import read_classes, read_index
from pipeline.stages.train_head import check_batch_size
from pipeline.training import keras_verbose

log = logging.getLogger("pipeline.finetune")


def unfreeze(model, unfreeze_from, freeze_batchnorm):
    """Make the backbone trainable from block `unfreeze_from` on (0: all of it); return the count of layers."""
    import tf_keras as keras

    base = models.backbone_of(model)
    base.trainable = True
    start = 0 if unfreeze_from == 0 else block_start_layer(base, unfreeze_from)
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start and not (freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization))
    return sum(1 for layer in base.layers if layer.trainable and layer.weights)


def _fit_cached(ctx, model):
    """Train the blocks above `unfreeze_from` on cached activations of the frozen blocks below it."""
    cfg, section = ctx.cfg, ctx.cfg.finetune
    ingest, augment, size = ctx.inputs["ingest"], ctx.inputs["augment"], cfg.model.image_size
    n_classes = len(read_classes(ingest))
    lower, upper = models.split_at_block(model, section.unfreeze_from)
    views = view_specs(section.flip_view, section.augmented_views)
    # float16 halves the memory of the cached activations; the network upcasts them on input.
    x, y = predict_views(lower, ingest, augment, size, section.batch_size, views, section.seed, dtype="float16")
    val = split_batches(ingest, augment, "val", size, section.batch_size)
    val_x = lower.predict(val, verbose=keras_verbose(predict=True)).astype("float16")
    log.info("cached %d activations of shape %s (%.2f GB)", len(x), x.shape[1:], (x.nbytes + val_x.nbytes) / 1e9)
    return training.fit(upper, (x, one_hot(y, n_classes)), (val_x, one_hot(val.labels, n_classes)), section,
                        ctx.out, section.learning_rate, reduce_lr=True, shuffle=True)


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
    check_batch_size("finetune", section.batch_size, len(read_index(ingest, "train")))
    model = models.load(head_files.model)
    layers = unfreeze(model, section.unfreeze_from, section.freeze_batchnorm)
    where = "the whole backbone" if section.unfreeze_from == 0 else f"block {section.unfreeze_from} on"
    log.info("fine-tuning %s (%d trainable layers with weights, batchnorm %s, %s inputs)", where, layers,
             "frozen" if section.freeze_batchnorm else "trainable", section.inputs)
    if section.inputs == "cached":
        summary = _fit_cached(ctx, model)
    else:
        train = split_batches(ingest, augment, "train", size, section.batch_size, augment=True, shuffle=True,
                              seed=section.seed)
        val = split_batches(ingest, augment, "val", size, section.batch_size)
        summary = training.fit(model, train, val, section, out, section.learning_rate, reduce_lr=True)
    models.save(model, out.model)
    return {"message": f"fine-tuned {where} ({section.inputs} inputs): best val accuracy "
                       f"{summary['val_accuracy']:.3f} at epoch {summary['best_epoch']}/{summary['epochs_run']}",
            **summary}
