"""The installed package imports, with its CUDA kernels, away from the source tree."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _installed():
    try:
        return importlib.metadata.distribution("numba-mamba")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(_installed() is None, reason="numba-mamba is not installed (pip install .)")
def test_installed_wheel_imports_with_kernels(tmp_path):
    code = (
        "import json, numba_mamba, numba_mamba.cuda_kernels.scan as k, numba_mamba._cpu_scan as c;"
        "print(json.dumps([numba_mamba.__file__, k.__file__, c.__file__]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    package, kernels, cpu = map(Path, json.loads(result.stdout.strip().splitlines()[-1]))
    # The kernels are a subpackage of the installed numba_mamba (the wheel ships
    # the top-level cuda_kernels/ folder as numba_mamba.cuda_kernels).
    editable = package.parent == REPO / "numba_mamba"
    if editable:  # pip install -e . maps the subpackage onto the source folder
        assert kernels == REPO / "cuda_kernels" / "scan.py"
    else:
        assert "site-packages" in package.parts, f"imported {package}, not an installed copy"
        assert kernels.parent == package.parent / "cuda_kernels"
    assert cpu.parent == package.parent


# ------------------------------------------------- one module object per file
_NOT_INSTALLED = r"""
import importlib, json, os, sys
# the source tree on sys.path, the editable install's finder (if any) removed
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, sys.argv[1])
"""

_ONE_MODULE = r"""
import numba_mamba
import numba_mamba.cuda_kernels.step as step
from numba_mamba.cuda_kernels import _common, _launch
from numba_mamba.cuda_kernels.settings import settings
files = {}
for name, m in list(sys.modules.items()):
    f = getattr(m, "__file__", None)
    if f and os.path.realpath(f).startswith(os.path.realpath(os.path.join(sys.argv[1], "cuda_kernels"))):
        files.setdefault(os.path.realpath(f), []).append(name)
try:
    import cuda_kernels
    top = None
except ImportError as e:
    top = str(e)
# a setting changed through the public import is the one the seam reads
settings.raw_launch = False
seen = _launch.launch_path(object())
print(json.dumps({"numba_mamba": numba_mamba.__file__, "step": step.__file__, "files": files,
                  "top": top, "same_launch": _common.launch is _launch.launch,
                  "raw_launch_seen": seen,
                  "attribute": numba_mamba.cuda_kernels is sys.modules["numba_mamba.cuda_kernels"]}))
"""


def _run(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_one_module(got):
    assert Path(got["step"]).resolve() == REPO / "cuda_kernels" / "step.py"
    assert got["files"], "no kernel module was imported"
    for path, names in got["files"].items():
        assert len(names) == 1, f"{path} is loaded as {names}"
        assert names[0].startswith("numba_mamba.cuda_kernels"), names
    assert got["files"][str((REPO / "cuda_kernels" / "step.py").resolve())] == [
        "numba_mamba.cuda_kernels.step"]
    assert "import numba_mamba.cuda_kernels" in got["top"]
    assert got["same_launch"] and got["raw_launch_seen"] == "numba" and got["attribute"]


def test_source_tree_without_install_has_one_module_per_kernel_file(tmp_path):
    """With the source tree on ``sys.path`` and no install, the kernels load
    as ``numba_mamba.cuda_kernels`` only, and ``import cuda_kernels`` fails."""
    got = _run(_NOT_INSTALLED + _ONE_MODULE, tmp_path)
    assert Path(got["numba_mamba"]).resolve() == REPO / "numba_mamba" / "__init__.py"
    _check_one_module(got)


def test_source_tree_first_on_sys_path_has_one_module_per_kernel_file():
    """As pytest and the benchmarks run: from the repository root (the
    top-level ``cuda_kernels`` folder importable by path), installed or not."""
    code = "import json, os, sys\nsys.path.insert(0, sys.argv[1])\n" + _ONE_MODULE
    _check_one_module(_run(code, REPO))


def test_kernel_doctests_run_under_the_package_name():
    """The doctests of ``numba_mamba.cuda_kernels`` (which pytest does not
    collect from the folder: it would import it as ``cuda_kernels``)."""
    import doctest
    import importlib
    import pkgutil

    import numba_mamba.cuda_kernels as kernels

    attempted = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"numba_mamba.cuda_kernels.{info.name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{module.__name__}: {result}"
        attempted += result.attempted
    assert attempted > 0


def test_built_wheel_ships_the_kernels_as_the_subpackage(tmp_path):
    import zipfile

    import shutil

    pytest.importorskip("setuptools")
    tree = tmp_path / "tree"  # (a copy: setuptools leaves a build/ folder where it builds)
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tree / name)
    for name in ("numba_mamba", "cuda_kernels"):
        shutil.copytree(REPO / name, tree / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    def build(*isolation):
        return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                               "-w", str(tmp_path), str(tree)],
                              capture_output=True, text=True, timeout=600)

    result = build("--no-build-isolation")  # (the environment's setuptools: no download)
    text = result.stderr + result.stdout
    if result.returncode != 0 and ("No module named 'wheel'" in text
                                   or "invalid command 'bdist_wheel'" in text):
        result = build()  # an older setuptools without wheel: pip's isolated build
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("numba_mamba-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "_launch", "_common", "settings", "scan", "step"):
        assert f"numba_mamba/cuda_kernels/{module}.py" in names
    assert not any(n.startswith("cuda_kernels/") for n in names)
    assert "numba_mamba/py.typed" in names
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert zipfile.ZipFile(wheel).read(license_file).startswith(b"BSD 3-Clause License")
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    assert b"License-Expression: BSD-3-Clause" in metadata
    assert not re.search(rb"Requires-Dist: [^\n;]*(nvidia|cuda|cupy)[^\n;]*\n", metadata, re.I)


# ------------------------------------------------- license, version, dependencies
def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_license_is_bsd3_in_the_repository_and_the_metadata():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in text
    project = _pyproject()["project"]
    assert project["license"] == "BSD-3-Clause"  # an SPDX expression, not the table form
    assert project["license-files"] == ["LICENSE"]


def test_one_version_source():
    import numba_mamba

    config = _pyproject()
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "numba_mamba.__version__"}
    installed = _installed()
    if installed is not None:
        assert installed.version == numba_mamba.__version__


def test_plain_install_and_test_extra_need_no_cuda_toolkit():
    project = _pyproject()["project"]
    cuda = re.compile(r"nvidia|cuda|cupy", re.IGNORECASE)
    assert not [d for d in project["dependencies"] if cuda.search(d)]
    extras = project["optional-dependencies"]
    # the test extra: numba-cuda for its CUDA simulator, but no toolkit
    assert not [d for d in extras["test"] if re.search(r"nvidia|cupy|\[cu\d+\]", d)]
    assert any(d.startswith("numba-cuda[cu12]") for d in extras["ptx"])
    for name, cu in (("cuda12", "cu12"), ("cuda13", "cu13")):
        assert any(d.startswith(f"numba-cuda[{cu}]") for d in extras[name])
        assert any(d.startswith(f"cupy-cuda{cu[2:]}x") for d in extras[name])


def test_ci_checks_a_cpu_only_install_and_runs_the_readme_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "--dry-run" in ci and "--report" in ci and "nvidia|cuda|cupy" in ci
    # CI installs (at least) the extras of the README's test command, then runs it
    readme_extras = re.search(r'pip install "\.\[(test[^"]*)\]" && python -m pytest',
                              readme).group(1).split(",")
    ci_extras = re.search(r'pip install -q "\.\[(test[^"]*)\]"', ci).group(1).split(",")
    assert "ptx" in readme_extras and set(readme_extras) <= set(ci_extras)
    assert re.search(r"^python -m pytest$", ci, re.MULTILINE)


def test_type_hints_and_py_typed():
    import typing

    import numba_mamba as nm

    assert (REPO / "numba_mamba" / "py.typed").is_file()
    for f in (nm.selective_scan, nm.selective_scan_vjp, nm.discretize, nm.discretize_vjp,
              nm.ssm_filter, nm.ssm_kernel, nm.save_checkpoint, nm.load_checkpoint,
              nm.SSMFilter.__init__, nm.SSMFilter.step, nm.SSMFilter.__call__):
        hints = typing.get_type_hints(f)
        assert hints, f"{f.__qualname__} has no type hints"


_WITHOUT_CUDA = r"""
import importlib.abc, json, sys, types
import numpy as np
BLOCKED = ("numba.cuda", "numba_cuda", "cupy", "cupyx")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
            raise ImportError(f"no module named {name!r} (blocked)")
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import numba_mamba as nm
y = nm.selective_scan(np.ones((1, 1, 3)), np.ones((1, 1, 3)), -np.ones((1, 1)), np.ones((1, 1)),
                      np.ones((1, 1)))
f = nm.ssm_filter(-np.ones(2), np.ones(2), np.ones(2), np.ones(5))
# a CuPy array arrives (a stand-in: CuPy itself is blocked here)
fake = types.ModuleType("cupy")
class ndarray:
    __module__ = "cupy"
    __cuda_array_interface__ = {}
    def __init__(self, a):
        self.a, self.shape, self.dtype, self.ndim = a, a.shape, a.dtype, a.ndim
        self.data = types.SimpleNamespace(device_id=0, ptr=0)
        self.strides, self.flags = a.strides, a.flags
fake.ndarray = ndarray
sys.modules["cupy"] = fake
args = [ndarray(np.ones(s)) for s in [(1, 1, 3), (1, 1, 3), (1, 1), (1, 1), (1, 1)]]
try:
    nm.selective_scan(*args)
    error = None
except (ImportError, RuntimeError) as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"y": y.tolist(), "f": f.tolist(), "error": error,
                  "cuda": sorted(m for m in sys.modules
                                 if m.startswith(("numba.cuda", "numba_cuda")))}))
"""


def test_imports_and_runs_on_the_cpu_without_numba_cuda(tmp_path):
    """numba-cuda is an extra: the package imports and computes without it, and
    a CuPy array gets an error that says what to install."""
    got = _run(_WITHOUT_CUDA, tmp_path)
    assert got["y"][0][0] == pytest.approx([1, 1 + np.exp(-1), 1 + np.exp(-1) + np.exp(-2)])
    assert len(got["f"]) == 5 and got["cuda"] == []
    assert got["error"] is not None and "pip install 'numba-mamba[cuda12]'" in got["error"], got


def test_sdist_carries_the_tests_and_their_helpers(tmp_path):
    import shutil
    import tarfile

    setuptools = pytest.importorskip("setuptools")
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (77, 0):
        pytest.skip("the SPDX license string needs setuptools >= 77")
    tree = tmp_path / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".hypothesis",
        ".pytest_cache", "gpu-test-logs", "*.png"))
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.build_sdist(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tree,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (sdist,) = tmp_path.glob("numba_mamba-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in ("LICENSE", "README.md", "pyproject.toml", "tests/__init__.py", "tests/gpu.py",
                 "tests/scan_cases.py", "tests/conftest.py", "tests/test_selective_scan.py",
                 "numba_mamba/py.typed", "cuda_kernels/_launch.py", "examples/quickstart.py",
                 "benchmarks/bench_scan.py"):
        assert name in names, f"the sdist lacks {name}"
    assert not any("__pycache__" in n for n in names)
