"""tools/check_platforms.py: which requirements each target gets from our markers (pure, no network).

The expected values come from the marker definitions (PEP 508) and the platforms' own values
(CPython on macOS has sys.platform "darwin", platform.system() "Darwin", platform.machine()
"arm64" on Apple silicon; on Linux "linux", "Linux", "x86_64"), written out here by hand.
"""
import importlib.util
import sys
import tomllib

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("check_platforms", REPO / "tools" / "check_platforms.py")
cp = importlib.util.module_from_spec(spec)
sys.modules.setdefault("check_platforms", cp)
spec.loader.exec_module(cp)

PYTHONS = ["3.11", "3.12", "3.13"]
TF = "tensorflow==2.21.0"
TF_CUDA = "tensorflow[and-cuda]==2.21.0"
# The marker names of PEP 508 (and the packaging specification that replaced it).
PEP508_NAMES = {"os_name", "sys_platform", "platform_machine", "platform_python_implementation",
                "platform_release", "platform_system", "platform_version", "python_version",
                "python_full_version", "implementation_name", "implementation_version"}


def project():
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def requirements(target, python, extras=None):
    p = project()
    return cp.select_requirements(p["dependencies"], p.get("optional-dependencies", {}),
                                  target.extras if extras is None else extras,
                                  cp.marker_environment(target, python))


def names(reqs):
    return {r.split("==")[0].split("[")[0].lower() for r in reqs}


@pytest.mark.parametrize("target", cp.TARGETS, ids=lambda t: t.name)
def test_environment_names_every_pep508_marker(target):
    assert set(cp.marker_environment(target, "3.12")) == PEP508_NAMES


def test_environments_are_those_of_cpython_on_each_platform():
    mac = cp.marker_environment(cp.MACOS_ARM64, "3.13")
    linux = cp.marker_environment(cp.LINUX_X86_64, "3.11")
    assert (mac["sys_platform"], mac["platform_system"], mac["platform_machine"], mac["os_name"]) == \
        ("darwin", "Darwin", "arm64", "posix")
    assert (linux["sys_platform"], linux["platform_system"], linux["platform_machine"], linux["os_name"]) == \
        ("linux", "Linux", "x86_64", "posix")
    assert (mac["python_version"], mac["python_full_version"], mac["implementation_name"]) == \
        ("3.13", "3.13.0", "cpython")
    assert (linux["python_version"], linux["platform_python_implementation"]) == ("3.11", "CPython")


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("target", [cp.MACOS_ARM64, cp.LINUX_X86_64], ids=["macos", "linux"])
def test_every_platform_gets_tensorflow_and_never_tensorflow_cpu_beside_it(target, python):
    reqs = requirements(target, python)
    assert TF in reqs
    assert "tensorflow-cpu" not in names(reqs)  # tf-keras requires tensorflow: the CPU build would be a second copy


@pytest.mark.parametrize("python", PYTHONS)
def test_gpu_extra_adds_the_cuda_build_on_linux_only(python):
    assert TF_CUDA in requirements(cp.LINUX_X86_64_GPU, python)
    assert TF_CUDA not in requirements(cp.LINUX_X86_64, python)  # not without the extra
    mac_gpu = requirements(cp.MACOS_ARM64, python, extras=("test", "cluster", "gpu"))
    assert mac_gpu == requirements(cp.MACOS_ARM64, python)  # the extra's marker is false on macOS


def test_every_other_pin_is_the_same_everywhere():
    tensorflows = {TF_CUDA}
    lists = [[r for r in requirements(t, py) if r not in tensorflows] for t in cp.TARGETS for py in PYTHONS]
    assert all(reqs == lists[0] for reqs in lists)
    assert "pytest==9.2.0" in lists[0] and "ray[train]==2.60.0" in lists[0]  # the test and cluster extras too
    assert all("==" in r for r in lists[0])  # all pinned


def test_pip_gets_plain_requirements_without_markers():
    for target in cp.TARGETS:
        for python in PYTHONS:
            assert not any(";" in r for r in requirements(target, python))


def test_markers_are_decided_for_the_target_not_this_machine():
    deps = [
        'a; sys_platform == "darwin"',
        'b; sys_platform == "linux"',
        'c; python_version < "3.12"',
        'd; python_full_version >= "3.13.0"',
        'e; platform_machine == "arm64" and platform_system == "Darwin"',
        'f; os_name == "nt"',
        'g>=1; platform_machine == "x86_64" or python_version == "3.12"',
        "h",
    ]
    optional = {"gpu": ['i; sys_platform == "linux"'], "docs": ["j"]}

    def chosen(target, python, extras=()):
        return cp.select_requirements(deps, optional, extras, cp.marker_environment(target, python))

    assert chosen(cp.MACOS_ARM64, "3.11") == ["a", "c", "e", "h"]
    assert chosen(cp.MACOS_ARM64, "3.12") == ["a", "e", "g>=1", "h"]
    assert chosen(cp.MACOS_ARM64, "3.13") == ["a", "d", "e", "h"]
    assert chosen(cp.LINUX_X86_64, "3.11") == ["b", "c", "g>=1", "h"]
    assert chosen(cp.LINUX_X86_64, "3.13") == ["b", "d", "g>=1", "h"]
    assert chosen(cp.LINUX_X86_64, "3.13", ("gpu",)) == ["b", "d", "g>=1", "h", "i"]
    assert chosen(cp.MACOS_ARM64, "3.13", ("gpu", "docs")) == ["a", "d", "e", "h", "j"]


def test_extra_marker_in_an_optional_dependency_names_its_own_extra():
    optional = {"gpu": ['x; extra == "gpu"'], "test": ['y; extra == "gpu"']}
    env = cp.marker_environment(cp.LINUX_X86_64, "3.12")
    assert cp.select_requirements([], optional, ("gpu", "test"), env) == ["x"]


def test_requires_python_admits_exactly_the_supported_pythons():
    spec = cp.SpecifierSet(project()["requires-python"])
    assert [v for v in ["3.10.14", "3.11.0", "3.12.7", "3.13.0", "3.13.9", "3.14.0"] if spec.contains(v)] == \
        ["3.11.0", "3.12.7", "3.13.0", "3.13.9"]
    assert cp.PYTHONS == ("3.11", "3.12", "3.13")


def test_linux_tags_reach_every_wheel_tag_our_stack_uses():
    tags = cp.LINUX_X86_64.platforms
    # tensorflow(-cpu) 2.21: manylinux_2_27; coremltools 9.0: manylinux1 only; others manylinux2014 / 2_28
    for needed in ["manylinux_2_27_x86_64", "manylinux1_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64",
                   "manylinux_2_28_x86_64", "manylinux2010_x86_64"]:
        assert needed in tags
    assert "manylinux_2_29_x86_64" not in tags  # nothing newer than the promised glibc 2.28
    assert len(tags) == len(set(tags)) == (28 - 5 + 1) + 3
    assert cp.MACOS_ARM64.platforms == ("macosx_14_0_arm64",)  # pip itself adds 13_0, 12_0, ... and universal2


def test_pip_arguments_resolve_for_the_target_without_installing():
    args = cp.pip_arguments(cp.LINUX_X86_64, "3.13", ["x==1"])
    assert args[0] == "install"
    for flag in ["--dry-run", "--ignore-installed", "--only-binary=:all:"]:
        assert flag in args
    assert args[args.index("--python-version") + 1] == "3.13"
    assert args[args.index("--implementation") + 1] == "cp"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--platform"] == list(cp.LINUX_X86_64.platforms)
    assert args[args.index("--index-url") + 1] == "https://pypi.org/simple"
    assert args[-1] == "x==1"
    assert "--index-url" not in cp.pip_arguments(cp.LINUX_X86_64, "3.13", ["x==1"], use_pip_config=True)


def test_pip_environment_drops_this_machines_pip_configuration(monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    env = cp.pip_environment()
    assert "PIP_FIND_LINKS" not in env and env["PIP_CERT"] == "/etc/ssl/certs/ca-certificates.crt"
    assert env["PIP_CONFIG_FILE"] == cp.os.devnull
    assert cp.pip_environment(use_pip_config=True)["PIP_FIND_LINKS"] == "/opt/wheels"


def test_pips_own_markers_follow_the_patched_environment(monkeypatch):
    from pip._vendor.packaging import markers

    monkeypatch.setattr(markers, "default_environment", markers.default_environment)  # restored afterwards
    cp.patch_pip_marker_environment(cp.marker_environment(cp.MACOS_ARM64, "3.13"))
    assert markers.Marker('sys_platform == "darwin" and python_version >= "3.13"').evaluate()
    assert not markers.Marker('sys_platform == "linux"').evaluate({"extra": ""})


def test_pip_output_parsing():
    failed = "Collecting x\nERROR: Could not find a version that satisfies x\nERROR: No matching distribution found for x\n"
    assert cp.last_error_line(failed) == "ERROR: No matching distribution found for x"
    assert cp.last_error_line("Traceback\n  ImportError: no pip\n\n") == "ImportError: no pip"
    assert cp.would_install("Collecting a\nWould install a-1 b-2 c-3\n") == 3
    assert cp.would_install("nothing\n") == 0
