"""Bench: cache frozen-backbone features of the real snacks data (train views, val, test, flipped test).

Usage: python bench/features.py DATA_DIR WEIGHTS_DIR OUT_DIR [--size 224] [--aug-views 3]
Runs the pipeline's own ingest and augment stages (into OUT_DIR/artifacts), then writes one .npy of pooled
features per view, streaming batches through the same ImageBatches the pipeline trains on.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

import pipeline  # noqa: F401  (selects tf-keras)
from pipeline import config
from pipeline.catalog import Catalog
from pipeline.data.augmentation import split_batches
from pipeline.runner import Runner
from pipeline.train import inputs, models


def main():
    data, weights, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    size = int(sys.argv[sys.argv.index("--size") + 1]) if "--size" in sys.argv else 224
    k_aug = int(sys.argv[sys.argv.index("--aug-views") + 1]) if "--aug-views" in sys.argv else 3
    out.mkdir(parents=True, exist_ok=True)
    cfg = config.from_dict({"data": {"path": data}, "model": {"image_size": size, "weights_dir": weights}})
    Runner(cfg, out / "artifacts").run(["augment"])
    cat = Catalog(out / "artifacts")
    ingest, augment = cat.stage("ingest"), cat.stage("augment")
    classes = ingest.read_classes()
    model = models.build_classifier(cfg.model, len(classes))
    extractor = models.feature_extractor(model)
    views = {"train": dict(split="train"), "train_flip": dict(split="train", flip=True),
             "val": dict(split="val"), "test": dict(split="test"), "test_flip": dict(split="test", flip=True)}
    views.update({f"train_aug{k}": dict(split="train", augment=True, seed=k) for k in range(k_aug)})
    timings = {}
    for name, kw in views.items():
        path = out / f"{name}_{size}.npy"
        if path.exists():
            continue
        batches = split_batches(ingest, augment, kw.pop("split"), size, 64, **kw)
        t0 = time.monotonic()
        feats = extractor.predict(inputs.dataset(batches), verbose=0)
        timings[name] = time.monotonic() - t0
        np.save(path, feats)
        np.save(out / f"{name.split('_')[0]}_labels.npy", batches.labels)
        print(f"{name}: {len(feats)} images in {timings[name]:.0f}s ({len(feats) / timings[name]:.1f}/s)", flush=True)
    (out / f"timings_{size}.json").write_text(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
