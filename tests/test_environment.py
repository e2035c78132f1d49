"""The library environment: set before TensorFlow loads in every process the pipeline starts, a user's value kept."""
import os
import subprocess
import sys

from conftest import REPO

from pipeline import environment
from pipeline.export.conversions import worker_pool

POOL = "TF_CPU_ALLOCATOR_USE_BFC"


def test_defaults_fill_only_what_is_unset():
    environ = {POOL: "false", "UNRELATED": "x"}
    environment.apply_library_defaults(environ)
    assert environ[POOL] == "false" and environ["UNRELATED"] == "x"
    assert environ["TF_USE_LEGACY_KERAS"] == "1" and environ["TQDM_DISABLE"] == "1"


def test_this_test_process_allocates_from_tensorflows_pool():
    assert environment.pool_allocator_in_force()


def without_pool_setting():
    return {k: v for k, v in os.environ.items() if k != POOL}


def test_the_command_line_process_allocates_from_the_pool():
    """`python -m pipeline` imports pipeline.cli first; TensorFlow, loaded later, finds the pool allocator set."""
    probe = ("import pipeline.cli, os; from pipeline.environment import pool_allocator_in_force; "
             f"print(os.environ['{POOL}'], pool_allocator_in_force())")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=without_pool_setting(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["true", "True"]


def test_the_conversion_worker_allocates_from_the_pool(monkeypatch):
    monkeypatch.delenv(POOL)  # the worker must set it itself, not only inherit it
    with worker_pool() as pool:
        assert pool.submit(environment.pool_allocator_in_force).result(timeout=300) is True
