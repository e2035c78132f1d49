"""Check that multisnacks' pinned dependencies resolve on every platform and Python we support.

For each target -- macOS arm64 and Linux x86_64 (the latter also with the ``gpu`` extra), each on
Python 3.11, 3.12 and 3.13 -- this reads ``[project].dependencies`` (plus the target's extras)
from pyproject.toml and asks pip to resolve them for that target:

    pip install --dry-run --ignore-installed --only-binary=:all: \\
        --platform <tag> ... --python-version X.Y --implementation cp <requirements>

Nothing is installed or built. A target resolves only if every pin and every transitive
dependency has a wheel for that platform and Python on the index, which is what a user there needs
for ``pip install`` to work. It prints one line per target and exits 1 if any target fails.

Why our markers are evaluated by hand: ``--platform`` and ``--python-version`` only change which
wheel tags and which Requires-Python pip accepts. pip still evaluates PEP 508 environment markers
(``sys_platform == "darwin"``, ``python_version < "3.12"``) against the machine it runs on, so run
on Linux it would take the Linux branch of our markers for the macOS target too and "check" a set
of packages no Mac would ever install. So this script evaluates our markers itself for each
target's marker environment (``packaging.markers.Marker.evaluate(environment)``) and hands pip
the resulting plain requirement list. The markers inside the dependencies' own metadata are
evaluated by pip during resolution; for those, pip is run with its marker environment replaced by
the target's (see ``patch_pip_marker_environment``), so they are decided for the target as well.

By default pip resolves from PyPI with no pip configuration (a fresh machine, not this one's local
mirrors or caps); ``--use-pip-config`` keeps the pip configuration of the machine instead (e.g. a
company mirror). Run it with the project's virtual environment:

    .venv/bin/python tools/check_platforms.py [--target NAME] [--python X.Y] [--use-pip-config]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # no stand-alone packaging: pip vendors one
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

TOOLS = Path(__file__).resolve().parent
PYPROJECT = TOOLS.parent / "pyproject.toml"
PYTHONS = ("3.11", "3.12", "3.13")
PYPI = "https://pypi.org/simple"
# Oldest glibc the Linux target promises (RHEL 8, Debian 10, Ubuntu 20.04 and newer have at least it).
LINUX_GLIBC_MINOR = 28
# The oldest macOS the stack has wheels for (onnxruntime 1.32.0's arm64 wheels are macosx_14_0).
# pip expands a macOS tag to the older macOS versions itself, but not a manylinux one.
MACOS_TAG = "macosx_14_0_arm64"
# The manylinux tags older than PEP 600's form, and the glibc each stands for.
MANYLINUX_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
# pip environment variables kept without --use-pip-config: the ones that say how to reach the network.
PIP_NETWORK_ENV = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT",
                   "PIP_RETRIES")


def manylinux_tags(arch: str, glibc_minor: int = LINUX_GLIBC_MINOR) -> tuple[str, ...]:
    """Every manylinux platform tag a Linux with glibc 2.<glibc_minor> accepts, newest first."""
    tags = []
    for minor in range(glibc_minor, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in MANYLINUX_LEGACY:
            tags.append(f"{MANYLINUX_LEGACY[minor]}_{arch}")
    return tuple(tags)


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    platforms: tuple[str, ...]  # pip --platform tags
    sys_platform: str
    platform_system: str
    platform_machine: str
    platform_release: str
    platform_version: str
    extras: tuple[str, ...] = ("test", "cluster")


MACOS_ARM64 = Target("macos-arm64", "macOS 14+ arm64", (MACOS_TAG,), "darwin", "Darwin", "arm64",
                     "23.0.0", "Darwin Kernel Version 23.0.0")
LINUX_X86_64 = Target("linux-x86_64", f"Linux x86_64 glibc 2.{LINUX_GLIBC_MINOR}", manylinux_tags("x86_64"),
                      "linux", "Linux", "x86_64", "6.1.0", "#1 SMP")
LINUX_X86_64_GPU = Target("linux-x86_64-gpu", f"{LINUX_X86_64.label} +gpu", LINUX_X86_64.platforms, "linux",
                          "Linux", "x86_64", "6.1.0", "#1 SMP", extras=("test", "gpu", "cluster"))
TARGETS = (MACOS_ARM64, LINUX_X86_64, LINUX_X86_64_GPU)


def marker_environment(target: Target, python: str) -> dict[str, str]:
    """The PEP 508 marker environment of CPython <python> (its first release, X.Y.0) on <target>."""
    full = f"{python}.0"
    return {
        "implementation_name": "cpython",
        "implementation_version": full,
        "os_name": "posix",
        "platform_machine": target.platform_machine,
        "platform_release": target.platform_release,
        "platform_system": target.platform_system,
        "platform_version": target.platform_version,
        "python_full_version": full,
        "platform_python_implementation": "CPython",
        "python_version": python,
        "sys_platform": target.sys_platform,
    }


def read_project(path: Path = PYPROJECT) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)["project"]


def select_requirements(dependencies: list[str], optional: dict[str, list[str]], extras: tuple[str, ...],
                        environment: dict[str, str]) -> list[str]:
    """The requirements that apply in <environment>, with <extras> requested, as plain strings without markers."""
    chosen = []
    groups = [(dependencies, "")] + [(optional.get(extra, []), extra) for extra in extras]
    for requirements, extra in groups:
        for line in requirements:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**environment, "extra": extra}):
                continue
            req.marker = None
            chosen.append(str(req))
    return chosen


def pip_arguments(target: Target, python: str, requirements: list[str], use_pip_config: bool = False) -> list[str]:
    """The arguments of `pip` that resolve <requirements> for <target> on CPython <python> without installing."""
    args = ["install", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--implementation", "cp",
            "--python-version", python, "--disable-pip-version-check", "--progress-bar", "off"]
    for tag in target.platforms:
        args += ["--platform", tag]
    if not use_pip_config:
        args += ["--index-url", PYPI]
    return args + requirements


def pip_environment(use_pip_config: bool = False) -> dict[str, str]:
    """The process environment for pip: without --use-pip-config, no pip configuration but how to reach the network."""
    env = dict(os.environ)
    if not use_pip_config:
        env = {k: v for k, v in env.items() if not k.startswith("PIP_") or k in PIP_NETWORK_ENV}
        env["PIP_CONFIG_FILE"] = os.devnull
    return env


def patch_pip_marker_environment(environment: dict[str, str]) -> None:
    """Make pip's vendored packaging evaluate every marker in <environment> instead of this machine's."""
    from pip._vendor.packaging import markers

    markers.default_environment = lambda: dict(environment)


def pip_main(environment_json: str, args: list[str]) -> int:
    """Run pip in this process with its marker environment set to <environment_json>."""
    patch_pip_marker_environment(json.loads(environment_json))
    from pip._internal.cli.main import main

    return main(args)


# The child process that runs pip: this file's pip_main with the target's marker environment.
PIP_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); import check_platforms; " \
            "sys.exit(check_platforms.pip_main(sys.argv[2], sys.argv[3:]))"


def last_error_line(output: str) -> str:
    """pip's last line starting with ERROR:, else its last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["pip printed nothing"])[-1]


def would_install(output: str) -> int:
    """How many packages pip's dry run would install (its "Would install ..." line), 0 if none."""
    for line in output.splitlines():
        if line.startswith("Would install "):
            return len(line.split()) - 2
    return 0


def check(target: Target, python: str, project: dict, use_pip_config: bool = False,
          timeout: float = 900) -> tuple[bool, str]:
    """Resolve the project's requirements for <target> on <python>: (resolved?, what to print)."""
    requires_python = project.get("requires-python", "")
    if requires_python and not SpecifierSet(requires_python).contains(f"{python}.0"):
        return False, f"requires-python {requires_python!r} excludes Python {python}"
    environment = marker_environment(target, python)
    requirements = select_requirements(project.get("dependencies", []), project.get("optional-dependencies", {}),
                                       target.extras, environment)
    command = [sys.executable, "-c", PIP_CHILD, str(TOOLS), json.dumps(environment),
               *pip_arguments(target, python, requirements, use_pip_config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=pip_environment(use_pip_config),
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"pip did not finish in {timeout:.0f} s"
    if done.returncode != 0:
        return False, last_error_line(done.stdout + "\n" + done.stderr)
    return True, f"{would_install(done.stdout)} packages"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=[t.name for t in TARGETS],
                        help="check only this target (repeatable); default: all")
    parser.add_argument("--python", action="append", choices=PYTHONS,
                        help="check only this Python (repeatable); default: all")
    parser.add_argument("--use-pip-config", action="store_true",
                        help="resolve with this machine's pip configuration instead of plain PyPI")
    opts = parser.parse_args(argv)
    project = read_project()
    targets = [t for t in TARGETS if not opts.target or t.name in opts.target]
    pythons = [p for p in PYTHONS if not opts.python or p in opts.python]
    index = "this machine's pip configuration" if opts.use_pip_config else PYPI
    print(f"Resolving the dependencies of {project['name']} from {index} (dry run, wheels only):", flush=True)
    failed = 0
    for target in targets:
        for python in pythons:
            start = time.monotonic()
            ok, detail = check(target, python, project, opts.use_pip_config)
            failed += not ok
            print(f"  {target.label:<28} Python {python}  {'resolved' if ok else 'FAILED  '}  "
                  f"{time.monotonic() - start:5.1f} s  {detail}", flush=True)
    total = len(targets) * len(pythons)
    print(f"{total - failed} of {total} targets resolve" + (f"; {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
