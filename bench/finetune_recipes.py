"""Bench: fine-tuning recipes from one cut point, all on one bank of cached activations.

Usage: PYTHONPATH=. python bench/finetune_recipes.py ARTIFACTS CONFIG RECIPES.yaml OUT.json

ARTIFACTS is a pipeline artifacts folder where ingest, augment and train-head have run with CONFIG (its
`finetune.unfreeze_from` is the cut point). The activations at the cut are computed once for the original,
mirrored and up to K augmented views of every training image (K = the most any recipe uses), and for val,
test and mirrored test; each recipe then starts from train-head's model and trains on a prefix of that bank
with the pipeline's own code (pipeline.train.activations, pipeline.train.models, pipeline.train.training). RECIPES.yaml maps
recipe names to finetune overrides (any FinetuneConfig key; `augmented_views` picks the bank prefix).
Each recipe's test top-1 (plain and flip TTA), macro F1, validation accuracy, epochs and minutes go to OUT.
"""
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

import pipeline  # noqa: F401
from pipeline import config
from pipeline.catalog import Catalog, TrainFiles
from pipeline.data.augmentation import split_batches
from pipeline.stages.evaluate import metrics
from pipeline.train import inputs, models, training
from pipeline.train.activations import CachedBatches, cache_split, cache_views, view_specs, write_outputs


def main():
    artifacts, cfg_path, recipes_path, out_path = (Path(a) for a in sys.argv[1:5])
    cfg = config.load(cfg_path)
    recipes = yaml.safe_load(recipes_path.read_text())
    catalog = Catalog(artifacts)
    ingest, augment = catalog.stage("ingest"), catalog.stage("augment")
    classes = ingest.read_classes()
    size, cut, batch = cfg.model.image_size, cfg.finetune.unfreeze_from, cfg.finetune.batch_size
    bank = max(r.get("augmented_views", cfg.finetune.augmented_views) for r in recipes.values())
    scratch = Path(tempfile.mkdtemp(prefix="recipes-", dir=artifacts))
    lower, _ = models.split_at(models.load(catalog.stage("train-head").model), cfg.model.backbone, cut)
    t0 = time.monotonic()
    views = view_specs(True, bank)
    x, y = cache_views(lower, ingest, augment, size, batch, views, cfg.finetune.seed, scratch / "train.npy", "float16")
    val = cache_split(lower, ingest, augment, "val", size, batch, scratch / "val.npy", "float16")
    test = cache_split(lower, ingest, augment, "test", size, batch, scratch / "test.npy", "float16")
    flipped = write_outputs(lower, [("mirrored test", split_batches(ingest, augment, "test", size, batch, flip=True))],
                            scratch / "test_flip.npy", "float16")
    cache_minutes = (time.monotonic() - t0) / 60
    print(f"cached {len(views)} views at {cut} in {cache_minutes:.1f} min", flush=True)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    n_images = len(x) // len(views)
    for name, overrides in recipes.items():
        if name in results:
            continue
        section = dataclasses.replace(cfg.finetune, **overrides)
        section.validate()
        model = models.load(catalog.stage("train-head").model)
        _, upper = models.split_at(model, cfg.model.backbone, cut)
        for layer in upper.get_layer("trained_blocks").layers:
            layer.trainable = not layer.__class__.__name__ == "BatchNormalization"
        n_views = 2 + section.augmented_views
        train = CachedBatches(x.first(n_views * n_images), y[:n_views * n_images], len(classes), section.batch_size,
                              shuffle=True, seed=section.seed, n_views=n_views,
                              views_per_epoch=section.views_per_epoch)
        (scratch / name).mkdir()
        t1 = time.monotonic()
        summary = training.fit(upper, train, CachedBatches(*val, len(classes), batch), section,
                               TrainFiles(scratch / name))
        minutes = (time.monotonic() - t1) / 60
        probs = upper.predict(inputs.dataset(CachedBatches(*test, len(classes), batch)), verbose=0)
        probs_flip = upper.predict(inputs.dataset(CachedBatches(*flipped, len(classes), batch)), verbose=0)
        plain, tta = metrics(test[1], probs, classes), metrics(test[1], (probs + probs_flip) / 2, classes)
        results[name] = {"overrides": overrides, "test": plain["accuracy"], "test_tta": tta["accuracy"],
                         "macro_f1": plain["macro_f1"], "val": summary["val_accuracy"],
                         "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"],
                         "train_minutes": round(minutes, 1), "cache_minutes_all_views": round(cache_minutes, 1),
                         "peak_rss_gb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
        print(name, results[name], flush=True)
        out_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
