"""Bench: memory allocation on the pipeline's two heaviest loops, the frozen-backbone forward pass of feature caching
and a fine-tuning step on cached activations, the latter either alone (`finetune`: train_on_batch on one array) or
as the finetune stage runs it (`fit`: Keras fit over CachedBatches read from a float16 .npy file, as tf.data).

Usage: python bench/allocator.py [--work forward|finetune|fit] [--backbone efficientnet_lite0]
                                 [--size 256] [--cut block6a] [--batch 32] [--images 320]
TensorFlow's own tensors: the pool allocator the pipeline sets, against TensorFlow's default:
    python bench/allocator.py                                   # TF_CPU_ALLOCATOR_USE_BFC=true (the pipeline's)
    TF_CPU_ALLOCATOR_USE_BFC=false python bench/allocator.py    # TensorFlow's default allocator
Everything else (NumPy arrays, Keras's input batches, the math libraries' scratch buffers) comes from malloc, which
importing the pipeline tells to keep freed memory for reuse (pipeline.environment.keep_freed_memory), against glibc's
default:
    MULTISNACKS_KEEP_FREED_MEMORY=0 python bench/allocator.py --work fit   # glibc's default
    python bench/allocator.py --work fit                                  # the pipeline's
Prints one JSON line: images/s of the timed batches (after two warm-up batches), the process's user and system CPU
seconds, the kernel's share of CPU time, minor page faults, peak resident memory and which settings were in force.
Inputs are random: the rate of these loops does not depend on what the image shows.
"""
import argparse
import json
import resource
import sys
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", choices=("forward", "finetune", "fit"), default="forward")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cut", default="block6a")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=320)
    args = parser.parse_args()

    import pipeline  # noqa: F401  (the pipeline's library environment, before TensorFlow)
    from pipeline.environment import keep_freed_memory

    kept = keep_freed_memory()  # already applied by the import; called again to report it
    import tf_keras as keras

    from pipeline.config import ModelConfig
    from pipeline.stages.finetune import unfreeze
    from pipeline.train import models

    model = models.build_classifier(ModelConfig(backbone=args.backbone, image_size=args.size, weights=None), 20)
    rng = np.random.default_rng(0)
    if args.work == "forward":
        network = models.feature_extractor(model)
        x = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)

        def step():
            network(x, training=False).numpy()
    elif args.work == "fit":
        return _bench_fit(args, model, kept)
    else:
        unfreeze(model, args.backbone, args.cut, freeze_batchnorm=True)  # as the finetune stage trains
        lower, upper = models.split_at(model, args.backbone, args.cut)
        upper.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy")
        x = rng.uniform(0, 6, (args.batch, *lower.output_shape[1:])).astype(np.float32)
        y = np.eye(20, dtype=np.float32)[rng.integers(0, 20, args.batch)]

        def step():
            upper.train_on_batch(x, y)
    for _ in range(2):  # warm-up: tracing and first allocations
        step()
    batches = args.images // args.batch
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(batches):
        step()
    _report(args, batches * args.batch, time.perf_counter() - t0, before, kept)


def _bench_fit(args, model, kept):
    """One warm-up epoch and one timed epoch of Keras fit over CachedBatches, as the finetune stage trains."""
    import tempfile
    from pathlib import Path

    import tf_keras as keras

    from pipeline.stages.finetune import unfreeze
    from pipeline.train import inputs, models
    from pipeline.train.activations import ArrayFile, CachedBatches

    unfreeze(model, args.backbone, args.cut, freeze_batchnorm=True)
    lower, upper = models.split_at(model, args.backbone, args.cut)
    upper.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.npy"
        np.save(path, rng.uniform(0, 6, (args.images, *lower.output_shape[1:])).astype(np.float16))
        batches = CachedBatches(ArrayFile(path), rng.integers(0, 20, args.images), 20, args.batch, shuffle=True)
        upper.fit(inputs.dataset(batches, 0, 1), epochs=1, verbose=0)  # warm-up: tracing and first allocations
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        upper.fit(inputs.dataset(batches, 1, 2), epochs=1, verbose=0)
        _report(args, len(batches) * args.batch, time.perf_counter() - t0, before, kept)


def _report(args, images, seconds, before, kept):
    from pipeline.environment import pool_allocator_in_force

    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(json.dumps({"work": args.work, "backbone": args.backbone, "size": args.size, "batch": args.batch,
                      "images_per_s": round(images / seconds, 1), "user_s": round(user, 2),
                      "system_s": round(system, 2), "kernel_share": round(system / (user + system), 3),
                      "minor_faults": after.ru_minflt - before.ru_minflt,
                      "peak_rss_gb": round(after.ru_maxrss / 2**20, 2), "pool_allocator": pool_allocator_in_force(),
                      "keep_freed": kept}))


if __name__ == "__main__":
    sys.exit(main())
