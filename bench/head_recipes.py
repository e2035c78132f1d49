"""Bench: head recipes on cached features (from bench/features.py): which training views give the best test accuracy.

Usage: python bench/head_recipes.py FEATURES_DIR [--size 224] [--out results.json]
Trains the pipeline's own head (Dropout -> Dense(L2) -> softmax) on: originals; originals + mirrors;
originals + mirrors + 1..K augmented views, with the pipeline's EarlyStopping on validation accuracy.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

import pipeline  # noqa: F401
from pipeline.config import ModelConfig
from pipeline.train import models


def main():
    folder = Path(sys.argv[1])
    size = int(sys.argv[sys.argv.index("--size") + 1]) if "--size" in sys.argv else 224
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    import tf_keras as keras

    load = lambda name: np.load(folder / f"{name}_{size}.npy")  # noqa: E731
    y = {s: np.load(folder / f"{s}_labels.npy") for s in ("train", "val", "test")}
    n = int(y["train"].max()) + 1
    onehot = np.eye(n, dtype=np.float32)
    aug = sorted(p.stem.rsplit("_", 1)[0] for p in folder.glob(f"train_aug*_{size}.npy"))
    recipes = {"original": ["train"], "original+mirror": ["train", "train_flip"]}
    for k in range(1, len(aug) + 1):
        recipes[f"original+mirror+{k} augmented"] = ["train", "train_flip"] + aug[:k]
        recipes[f"original+{k} augmented"] = ["train"] + aug[:k]
    val, test, test_flip = load("val"), load("test"), load("test_flip")
    results = {}
    for name, views in recipes.items():
        x = np.concatenate([load(v) for v in views])
        labels = np.concatenate([y["train"]] * len(views))
        keras.utils.set_random_seed(0)
        head = models.build_head(ModelConfig(), n, x.shape[1])
        head.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
        t0 = time.monotonic()
        hist = head.fit(x, onehot[labels], batch_size=64, epochs=60, shuffle=True, verbose=0,
                        validation_data=(val, onehot[y["val"]]),
                        callbacks=[keras.callbacks.EarlyStopping("val_accuracy", mode="max", patience=8,
                                                                 restore_best_weights=True)])
        p, pf = head.predict(test, verbose=0), head.predict(test_flip, verbose=0)
        results[name] = {"views": len(views), "epochs": len(hist.epoch),
                         "val": float(max(hist.history["val_accuracy"])),
                         "test": float((p.argmax(1) == y["test"]).mean()),
                         "test_flip_tta": float(((p + pf).argmax(1) == y["test"]).mean()),
                         "head_seconds": round(time.monotonic() - t0, 1)}
        print(name, results[name], flush=True)
    if out:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
