"""Stage 3, train-head: a new GlobalAveragePooling -> Dropout -> Dense -> softmax head on the frozen backbone."""
from __future__ import annotations

from pipeline import models, training
from pipeline.augmentation import one_hot, predict_views, split_batches, view_specs
from pipeline.errors import ConfigError
from pipeline.stages.ingest import read_classes, read_index


def check_batch_size(section_name, batch_size, n_train):
    """A batch larger than the training set is a config error naming the key."""
    if batch_size > n_train:
        raise ConfigError(f"config key '{section_name}.batch_size' has value {batch_size}, larger than the "
                          f"training set ({n_train} images); set it to at most {n_train}")


def run(ctx):
    """Train the head, with live augmentation (the book) or on cached features of fixed views."""
    cfg, out, section = ctx.cfg, ctx.out, ctx.cfg.train_head
    ingest, augment, size, batch = ctx.inputs["ingest"], ctx.inputs["augment"], cfg.model.image_size, section.batch_size
    classes = read_classes(ingest)
    check_batch_size("train_head", batch, len(read_index(ingest, "train")))
    model = models.build_classifier(cfg.model, len(classes), ctx.options.get("weights_dir"))
    val = split_batches(ingest, augment, "val", size, batch)
    if section.features == "live":
        train = split_batches(ingest, augment, "train", size, batch, augment=True, shuffle=True, seed=section.seed)
        summary = training.fit(model, train, val, section, out, section.learning_rate)
        how = "live augmentation"
    else:
        extractor = models.feature_extractor(model)
        views = view_specs(section.flip_view, section.augmented_views)
        x, y = predict_views(extractor, ingest, augment, size, batch, views, section.seed)
        val_x = extractor.predict(val, verbose=training.keras_verbose(predict=True))
        head = models.build_head(cfg.model, len(classes), x.shape[1])
        summary = training.fit(head, (x, one_hot(y, len(classes))), (val_x, one_hot(val.labels, len(classes))),
                               section, out, section.learning_rate, shuffle=True)
        models.copy_head(head, model)
        how = f"cached features of {len(views)} view(s) of each training image"
    models.save(model, out.model)
    return {"message": f"head trained on {how}: best val accuracy {summary['val_accuracy']:.3f} at epoch "
                       f"{summary['best_epoch']}/{summary['epochs_run']}", **summary}
