"""Bench: fine-tune MobileNet from block N on (BatchNorm frozen) on cached block-(N-1) activations of fixed views.

Usage: python bench/partial_finetune.py DATA_ARTIFACTS WEIGHTS_DIR --block 7 [--size 224] [--epochs 8] [--lr 1e-4]
       [--views orig,flip,aug0] [--out results.json]
DATA_ARTIFACTS is an artifacts folder where ingest and augment have run (bench/features.py makes one).
The frozen lower blocks give the same activations for the same view every epoch, so they are computed once;
only blocks N..13 and the head run forward and backward.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

import pipeline  # noqa: F401
from pipeline import models
from pipeline.augmentation import split_batches
from pipeline.backbones import block_start_layer
from pipeline.catalog import Catalog
from pipeline.config import ModelConfig


def arg(name, default, cast=str):
    return cast(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def main():
    import tf_keras as keras

    artifacts, weights = Path(sys.argv[1]), sys.argv[2]
    block, size, epochs, lr = arg("--block", 7, int), arg("--size", 224, int), arg("--epochs", 8, int), arg("--lr", 1e-4, float)
    views = arg("--views", "orig,flip").split(",")
    out = arg("--out", None)
    cat = Catalog(artifacts)
    ingest, augment = cat.stage("ingest"), cat.stage("augment")
    classes = ingest.classes.read_text().splitlines()
    n = len(classes)
    cfg = ModelConfig(image_size=size)
    full = models.build_classifier(cfg, n, weights)
    base = models.backbone_of(full)
    start = block_start_layer(base, block)
    prefix = keras.Model(base.input, base.layers[start - 1].output)
    t0 = time.monotonic()

    def acts(split, **kw):
        b = split_batches(ingest, augment, split, size, 64, **kw)
        return prefix.predict(b, verbose=0).astype(np.float16), b.labels

    data = {}
    for v in views:
        kw = {"orig": {}, "flip": {"flip": True}}[v] if v in ("orig", "flip") else {"augment": True, "seed": int(v[3:] or 0)}
        data[v] = acts("train", **kw)
    val_x, val_y = acts("val")
    test_x, test_y = acts("test")
    testf_x, _ = acts("test", flip=True)
    cache_s = time.monotonic() - t0
    print(f"cached block-{block} inputs {prefix.output_shape} in {cache_s:.0f}s", flush=True)

    inputs = keras.Input(prefix.output_shape[1:])
    x = inputs
    for layer in base.layers[start:]:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        x = layer(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = full.get_layer("dropout")(x)
    x = full.get_layer("logits")(x)
    x = full.get_layer("probabilities")(x)
    model = keras.Model(inputs, x)
    onehot = np.eye(n, dtype=np.float32)
    train_x = np.concatenate([data[v][0] for v in views])
    train_y = onehot[np.concatenate([data[v][1] for v in views])]

    # Head first, on pooled features of the same views (bench/features.py wrote them beside the artifacts),
    # exactly what the frozen upper blocks give: the head starts where train-head leaves it.
    feats = artifacts.parent
    fx = np.concatenate([np.load(feats / f"{ {'orig': 'train', 'flip': 'train_flip'}.get(v, 'train_' + v)}_{size}.npy")
                         for v in views])
    head = models.build_head(cfg, n, fx.shape[1])
    head.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    t1 = time.monotonic()
    head.fit(fx, train_y, batch_size=64, epochs=40, shuffle=True, verbose=0,
             validation_data=(np.load(feats / f"val_{size}.npy"), onehot[val_y]),
             callbacks=[keras.callbacks.EarlyStopping("val_accuracy", mode="max", patience=8, restore_best_weights=True)])
    models.copy_head(head, full)
    head_s = time.monotonic() - t1
    suffix_trainable = list(base.layers[start:])

    def test_acc():
        p, pf = model.predict(test_x, verbose=0), model.predict(testf_x, verbose=0)
        return float((p.argmax(1) == test_y).mean()), float(((p + pf).argmax(1) == test_y).mean())

    results = {"block": block, "size": size, "views": views, "lr": lr, "cache_seconds": round(cache_s),
               "head_seconds": round(head_s), "head_test": test_acc(), "epochs": []}
    print("head only:", results["head_test"], flush=True)
    for l in suffix_trainable:
        l.trainable = not isinstance(l, keras.layers.BatchNormalization)
    model.compile(keras.optimizers.Adam(lr), "categorical_crossentropy", metrics=["accuracy"])

    class Log(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, "val": float(logs["val_accuracy"]), "val_loss": float(logs["val_loss"]),
                   "test": test_acc(), "seconds": round(time.monotonic() - self.t),
                   "lr": float(keras.backend.get_value(self.model.optimizer.learning_rate))}
            results["epochs"].append(row)
            print(row, flush=True)

    model.fit(train_x, train_y, batch_size=32, epochs=epochs, shuffle=True, verbose=0,
              validation_data=(val_x, onehot[val_y]),
              callbacks=[Log(), keras.callbacks.ReduceLROnPlateau("val_loss", factor=1 / 3, patience=1, verbose=0)])
    if out:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
