"""Bench helper: how fast the machines of a TF_CONFIG cluster send each other their shares of cached activations.

Usage: PYTHONPATH=. python bench/exchange_rate.py [--workers 2] [--shape 32,17,17,48] [--dtype float16] [--blocks 50]
                                                  [--eager]
Starts --workers processes of this machine with TF_CONFIG over free 127.0.0.1 ports, as the machines of a cluster;
each makes the MultiWorkerMirroredStrategy and sends --blocks blocks of --shape (one CACHE_BATCH of one worker's
share, as pipeline.train.view_store.AcrossMachines sends them) through distribute.all_gather. Prints, as JSON, the
seconds of the slowest worker and the MB/s each worker received from the others. On one machine the figure is
loopback's and the CPU's, an upper bound for a network. --eager calls the strategy's gather eagerly instead, as
distribute.all_gather did first, for comparison.
"""
import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np


def worker(index, addresses, shape, dtype, blocks, eager):
    from pipeline import processes

    processes.exit_with_parent(os.getppid())  # not left waiting on its peers if the bench is killed
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
    from pipeline.config import DistributeConfig
    from pipeline.train import distribute

    chosen = distribute.strategy(DistributeConfig("multi_worker"))
    block = np.random.default_rng(index).normal(size=shape).astype(dtype)
    gather = functools.partial(distribute.all_gather, chosen)
    if eager:
        import tensorflow as tf

        def gather(array):
            return chosen.gather(chosen.run(lambda: tf.constant(array)[tf.newaxis]), axis=0).numpy()

    gather(block)  # warm-up: the first collective sets up the group
    start = time.monotonic()
    for _ in range(blocks):
        gathered = gather(block)
    seconds = time.monotonic() - start
    assert np.array_equal(gathered[index], block)
    received = block.nbytes * (len(addresses) - 1) * blocks
    rate = round(received / seconds / 1e6, 1)
    print(json.dumps({"worker": index, "seconds": round(seconds, 3), "received_MB_per_s": rate}), flush=True)
    os._exit(0)  # TensorFlow's collective runtime can hang at exit (tensorflow#35878)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shape", default="32,17,17,48")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--blocks", type=int, default=50)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--addresses", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    if args.index is not None:
        return worker(args.index, args.addresses.split(","), shape, args.dtype, args.blocks, args.eager)
    from pipeline import local_workers

    addresses = ",".join(f"127.0.0.1:{port}" for port in local_workers.free_ports(args.workers))
    command = [sys.executable, __file__, "--shape", args.shape, "--dtype", args.dtype, "--blocks", str(args.blocks),
               *(["--eager"] if args.eager else []), "--addresses", addresses, "--index"]
    running = [subprocess.Popen(command + [str(k)], stdout=subprocess.PIPE, text=True, start_new_session=True)
               for k in range(args.workers)]
    try:
        results = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in running]
    finally:
        for p in running:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    block_mb = np.prod(shape) * np.dtype(args.dtype).itemsize / 1e6
    print(json.dumps({"workers": args.workers, "eager": args.eager, "shape": list(shape), "dtype": args.dtype,
                      "block_MB": round(block_mb, 3), "blocks": args.blocks,
                      "seconds": max(r["seconds"] for r in results),
                      "received_MB_per_s": [r["received_MB_per_s"] for r in results]}))


if __name__ == "__main__":
    main()
