"""Training stages on the workers of a Ray cluster: Ray Train's TensorflowTrainer starts the workers and gives each
its `TF_CONFIG`; each runs the pipeline's own command line with `distribute.strategy=multi_worker`.

    python -m pipeline.cluster.ray_train --workers N [--address ADDRESS] [--cpus-per-worker C]
        [--gpus-per-worker G] [--artifacts DIR] -- [PIPELINE OPTIONS] STAGE...

Worker 0 (Ray's world rank 0, the chief) writes to `--artifacts`, worker k to `DIR-worker-k`: each runs the stale
stages before the training ones itself, and all end with the same model. The config, `--data` and DIR's parent
must be at the same path on every machine. Ray's `cluster` extra installs it (`pip install -e '.[cluster]'`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from pipeline.cache.lock import holding
from pipeline.errors import ArtifactsError

PACKAGE_PARENT = Path(__file__).resolve().parents[2]
STORAGE_PREFIX = "multisnacks-ray-"


def worker_folder(artifacts, rank):
    """The artifacts folder of worker `rank`: `artifacts` itself for the chief, `artifacts-worker-<rank>` else."""
    return str(artifacts) if rank == 0 else f"{artifacts}-worker-{rank}"


def worker_arguments(pipeline_args, artifacts, rank):
    """The command line of worker `rank`: the user's pipeline arguments in its artifacts folder, with the
    strategy that makes it one worker of the cluster in `TF_CONFIG`."""
    return ["--artifacts", worker_folder(artifacts, rank), "--set", "distribute.strategy=multi_worker",
            "--set", "distribute.local_workers=0", *pipeline_args]


def check_arguments(pipeline_args):
    """A click.UsageError for pipeline arguments that would undo what every worker needs."""
    for i, arg in enumerate(pipeline_args):
        value = pipeline_args[i + 1] if arg == "--set" and i + 1 < len(pipeline_args) else arg
        if arg == "--artifacts" or arg.startswith("--artifacts="):
            raise click.UsageError("give --artifacts before `--`: each worker gets its own folder from it")
        if value.startswith("distribute."):
            raise click.UsageError(f"`--set {value}` after `--`: every worker trains with distribute.strategy="
                                   "multi_worker and its cluster from Ray; leave distribute settings out")


class WorkerExit(RuntimeError):
    """A worker's command line ended with a non-zero exit status (negative: killed by that signal)."""

    def __init__(self, rank, folder, code):
        super().__init__(rank, folder, code)
        self.rank, self.folder, self.code = rank, folder, code

    def __str__(self):
        how = f"was killed by {signal.Signals(-self.code).name}" if self.code < 0 else f"exited with {self.code}"
        return f"worker {self.rank} (artifacts {self.folder}) {how}"


@contextlib.contextmanager
def run_storage(root=None):
    """A new folder in `root` (the system's temporary folder by default) for Ray Train's records of this run, locked
    while the run lasts and removed after it. First removes the folders of runs whose driver was killed (no longer
    locked), which could not remove their own."""
    root = Path(root or tempfile.gettempdir())
    for old in root.glob(STORAGE_PREFIX + "*"):
        with contextlib.suppress(ArtifactsError):  # locked: another run's, still going
            with holding(old):
                shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=STORAGE_PREFIX, dir=root))
    try:
        with holding(folder):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _train_loop(config):
    """One Ray Train worker: the pipeline's command line in a child process that ends with this one."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": str(config["cpus"]),
           "PYTHONPATH": os.pathsep.join(filter(None, [config["package_parent"], os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pipeline.cluster.worker_process", str(os.getpid()),
               *worker_arguments(config["args"], config["artifacts"], rank)]
    code = subprocess.run(command, env=env, cwd=config["cwd"]).returncode
    if code:
        raise WorkerExit(rank, worker_folder(config["artifacts"], rank), code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workers", type=click.IntRange(min=1), required=True, help="Ray Train workers (processes).")
@click.option("--address", default=None,
              help="The Ray cluster to join (`auto`: the one running here); without it, Ray starts on this machine.")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--gpus-per-worker", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--artifacts", type=click.Path(file_okay=False), default="artifacts", show_default=True,
              help="The chief's artifacts folder; worker k writes to ARTIFACTS-worker-k.")
@click.argument("pipeline_args", nargs=-1, type=click.UNPROCESSED)
def main(workers, address, cpus_per_worker, gpus_per_worker, artifacts, pipeline_args):
    """Run the pipeline command PIPELINE_ARGS (options, then stages) on Ray Train workers."""
    check_arguments(pipeline_args)
    try:
        import ray.train.tensorflow  # noqa: F401  (checks that Ray Train is installed)
    except ImportError as exc:
        raise click.ClickException(f"Ray Train is not installed ({exc}): pip install -e '.[cluster]'") from None
    with run_storage() as storage:
        _fit(workers, address, cpus_per_worker, gpus_per_worker, artifacts, pipeline_args, storage)


def _fit(workers, address, cpus_per_worker, gpus_per_worker, artifacts, pipeline_args, storage):
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.tensorflow import TensorflowTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:  # the workers' CPUs, and one for Ray's own controller
            ray.init(num_cpus=workers * cpus_per_worker + 1, num_gpus=workers * gpus_per_worker,
                     include_dashboard=False)
        trainer = TensorflowTrainer(
            _train_loop,
            train_loop_config={"args": list(pipeline_args), "artifacts": str(Path(artifacts).resolve()),
                               "cwd": os.getcwd(), "cpus": cpus_per_worker, "package_parent": str(PACKAGE_PARENT)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name="multisnacks", storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=0)))
        trainer.fit()
    except TrainingFailedError as exc:
        raise click.ClickException(f"{failure_line(exc)}; the other workers were stopped; run the same command again "
                                   "to go on from the last finished epoch") from None
    finally:
        ray.shutdown()


def failure_line(error):
    """One line for Ray's training failure: a worker killed by a signal first (the others' collective operations
    then fail because of it), else the lowest-ranked failed worker (a WorkerGroupError holds each one's error),
    else the first line of Ray's own message."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = min(failures, key=lambda k: (not (isinstance(failures[k], WorkerExit) and failures[k].code < 0), k))
        error = failures[rank]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    main()
