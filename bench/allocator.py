"""Bench: TensorFlow's CPU allocator on a frozen-backbone forward pass, the work of feature caching.

Usage: python bench/allocator.py [--backbone efficientnet_lite0] [--size 256] [--batch 32] [--images 320]
Compare the pool allocator the pipeline sets with TensorFlow's default:
    python bench/allocator.py                                   # TF_CPU_ALLOCATOR_USE_BFC=true (the pipeline's)
    TF_CPU_ALLOCATOR_USE_BFC=false python bench/allocator.py    # TensorFlow's default allocator
Prints one JSON line: images/s of the timed batches (after one warm-up batch), the process's user and system CPU
seconds, the kernel's share of CPU time, minor page faults, peak resident memory and whether the pool is in force.
Pixels are random: the rate of a forward pass does not depend on what the image shows.
"""
import argparse
import json
import resource
import time

import numpy as np

import pipeline  # noqa: F401  (the pipeline's library environment, before TensorFlow)
from pipeline.config import ModelConfig
from pipeline.environment import pool_allocator_in_force
from pipeline.train import models


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=320)
    args = parser.parse_args()
    model = models.build_classifier(ModelConfig(backbone=args.backbone, image_size=args.size, weights=None), 20)
    extractor = models.feature_extractor(model)
    pixels = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    extractor(pixels, training=False)  # warm-up: graph tracing and first allocations
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.images // args.batch):
        extractor(pixels, training=False).numpy()
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(json.dumps({"backbone": args.backbone, "size": args.size, "batch": args.batch,
                      "images_per_s": round(args.images // args.batch * args.batch / seconds, 1),
                      "user_s": round(user, 2), "system_s": round(system, 2),
                      "kernel_share": round(system / (user + system), 3),
                      "minor_faults": after.ru_minflt - before.ru_minflt,
                      "peak_rss_gb": round(after.ru_maxrss / 2**20, 2), "pool_allocator": pool_allocator_in_force()}))


if __name__ == "__main__":
    main()
