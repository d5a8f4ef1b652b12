"""The installed package imports, with its CUDA kernels, away from the source tree."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

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
    for name in ("pyproject.toml", "README.md"):
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
