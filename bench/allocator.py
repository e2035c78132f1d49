"""Bench: memory allocation on the pipeline's two heaviest loops, the frozen-backbone forward pass of feature caching
and a fine-tuning step on cached activations.

Usage: python bench/allocator.py [--work forward|finetune] [--keep-freed] [--backbone efficientnet_lite0]
                                 [--size 256] [--cut block6a] [--batch 32] [--images 320]
TensorFlow's own tensors: the pool allocator the pipeline sets, against TensorFlow's default:
    python bench/allocator.py                                   # TF_CPU_ALLOCATOR_USE_BFC=true (the pipeline's)
    TF_CPU_ALLOCATOR_USE_BFC=false python bench/allocator.py    # TensorFlow's default allocator
Everything else (NumPy arrays, the math libraries' scratch buffers): `--keep-freed` asks glibc to keep freed memory
for reuse (pipeline.export.allocator) before TensorFlow loads, as the command line does.
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
    parser.add_argument("--work", choices=("forward", "finetune"), default="forward")
    parser.add_argument("--keep-freed", action="store_true")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cut", default="block6a")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=320)
    args = parser.parse_args()

    import pipeline  # noqa: F401  (the pipeline's library environment, before TensorFlow)
    from pipeline.export.allocator import keep_freed_memory

    kept = keep_freed_memory() if args.keep_freed else False
    import tf_keras as keras

    from pipeline.config import ModelConfig
    from pipeline.environment import pool_allocator_in_force
    from pipeline.stages.finetune import unfreeze
    from pipeline.train import models

    model = models.build_classifier(ModelConfig(backbone=args.backbone, image_size=args.size, weights=None), 20)
    rng = np.random.default_rng(0)
    if args.work == "forward":
        network = models.feature_extractor(model)
        x = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)

        def step():
            network(x, training=False).numpy()
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
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(json.dumps({"work": args.work, "backbone": args.backbone, "size": args.size, "batch": args.batch,
                      "images_per_s": round(batches * args.batch / seconds, 1), "user_s": round(user, 2),
                      "system_s": round(system, 2), "kernel_share": round(system / (user + system), 3),
                      "minor_faults": after.ru_minflt - before.ru_minflt,
                      "peak_rss_gb": round(after.ru_maxrss / 2**20, 2), "pool_allocator": pool_allocator_in_force(),
                      "keep_freed": kept}))


if __name__ == "__main__":
    sys.exit(main())
