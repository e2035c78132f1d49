"""The pipeline's command line run as one worker of a cluster job, ending when the process that started it ends.

Usage, by pipeline.cluster.ray_train only: `python -m pipeline.cluster.worker_process PARENT_PID PIPELINE_ARGS...`,
with `TF_CONFIG` naming this worker's place. A fresh interpreter, so that the command line makes the
tf.distribute strategy before TensorFlow runs any other operation.
"""
from __future__ import annotations

import sys

from pipeline import cli, processes


def main(argv=None):
    """Watch the parent process given first, then run the command line on the remaining arguments."""
    parent, *args = sys.argv[1:] if argv is None else argv
    processes.exit_with_parent(int(parent))
    sys.argv = ["python -m pipeline", *args]
    cli.main()


if __name__ == "__main__":
    main()
