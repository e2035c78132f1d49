"""Stage 2, augment: resolve the training ImageDataGenerator settings and draw a preview of what training sees."""
from __future__ import annotations

import numpy as np

from pipeline import fileio
from pipeline.data.augmentation import ImageBatches, generator_settings, make_generator
from pipeline.reporting.report import plot_grid


def run(ctx):
    """Write augment.json (the generator settings) and preview.png (augmented training samples, labelled)."""
    cfg, out = ctx.cfg, ctx.out
    settings = generator_settings(cfg.augment, cfg.model.backbone)
    fileio.write_json(out.settings, settings)
    classes = ctx.inputs["ingest"].read_classes()
    rows = ctx.inputs["ingest"].read_index("train")
    rng = np.random.default_rng(0)
    picked = [rows[i] for i in sorted(rng.choice(len(rows), min(cfg.augment.preview_images, len(rows)),
                                                 replace=False))]
    batches = ImageBatches(picked, classes, cfg.model.image_size, make_generator(settings), len(picked),
                           augment=True)
    images, labels = batches.images(0)
    plot_grid(images, [classes[i] for i in labels], out.preview)
    return {"message": f"generator settings saved; preview of {len(picked)} augmented training images"}
